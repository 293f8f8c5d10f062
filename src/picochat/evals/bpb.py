"""Bits per byte of a model on held-out text: the tokenizer-independent measure of how well it predicts.

Documents are read by the pretraining readers (`data.sources`: text, JSONL, parquet, gzip), each
encoded after the model's start token (`<|endoftext|>` for picochat) and cut into windows of the
model's context that overlap by one token, so every token of the text is predicted once. Bits per
byte = the summed negative log-likelihood in bits / the UTF-8 bytes of the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from picochat.data.sources import iter_documents
from picochat.evals.models import Evaluated
from picochat.evals.scoring import batches
from picochat.model import IGNORE_INDEX


def windows(ids: list[int], context: int) -> list[list[int]]:
    """Pieces of at most context + 1 tokens, each starting on the previous one's last token."""
    return [ids[start : start + context + 1] for start in range(0, max(1, len(ids) - 1), context)]


def bits_per_byte(ev: Evaluated, paths: list[Path], max_bytes: int | None = None, progress: bool = True) -> dict:
    """{"bpb", "bytes", "tokens", "documents", "files"} of the model on the documents in `paths` (the
    first documents up to `max_bytes` bytes when given)."""
    result = documents_bpb(ev, iter_documents(paths), max_bytes, progress)
    if not result["bytes"]:
        raise ValueError(f"{', '.join(map(str, paths))}: no text to measure")
    return {**result, "files": [str(p) for p in paths]}


@torch.inference_mode()
def documents_bpb(ev: Evaluated, texts: Iterable[str], max_bytes: int | None = None, progress: bool = True) -> dict:
    """{"bpb", "bytes", "tokens", "documents"} of the model on the texts (bpb None when they are empty)."""
    context = ev.model.config.max_seq_len
    pieces, total_bytes, documents = [], 0, 0
    for text in texts:
        if max_bytes is not None and total_bytes >= max_bytes:
            break
        ids = ev.bos + ev.encode(text)
        if len(ids) < 2:
            continue
        pieces.extend(windows(ids, context))
        total_bytes += len(text.encode("utf-8"))
        documents += 1
    device = ev.model.lm_head.weight.device
    nats, tokens = 0.0, 0
    for group in tqdm(batches([len(p) - 1 for p in pieces], 0, ev.model.config.vocab_size),
                      desc="bits per byte", disable=not progress, leave=False):
        width = max(len(pieces[i]) for i in group) - 1
        inputs = torch.zeros(len(group), width, dtype=torch.long)
        targets = torch.full((len(group), width), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(group):
            inputs[r, : len(pieces[i]) - 1] = torch.tensor(pieces[i][:-1])
            targets[r, : len(pieces[i]) - 1] = torch.tensor(pieces[i][1:])
        logits = ev.model(inputs.to(device))
        nats += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(device),
                                      ignore_index=IGNORE_INDEX, reduction="sum"))
        tokens += int((targets != IGNORE_INDEX).sum())
    return {"bpb": nats / math.log(2) / total_bytes if total_bytes else None, "bytes": total_bytes, "tokens": tokens,
            "documents": documents, "model": ev.name}
