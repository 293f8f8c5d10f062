"""Log-likelihood of continuations after a shared prefix, many rows a forward pass.

Every row of a task is (context, continuation) token ids that follow the same prefix (`<|endoftext|>`
and the few-shot examples). The prefix is run through the model once; each batch of rows then starts
from a copy of its keys and values, so the shots, usually most of a prompt's tokens, are computed
once per task instead of once per choice. Rows are sorted by length and right-padded (causal
attention never lets a real token see the padding after it), and batches are sized by a budget of
tokens, cached slots and logits, so a 150k-token vocabulary does not exhaust memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from picochat.model import KVCache, Transformer

ROW_TOKENS = 4096  # tokens fed per forward pass
CACHE_SLOTS = 32768  # rows x (prefix + row) key/value slots per batch
LOGITS = 2**26  # float32 logits per batch (256 MiB)
MAX_ROWS = 64


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities (natural log)
    tokens: int  # continuation tokens
    greedy: bool  # every continuation token is the model's most likely next token

    @property
    def mean(self) -> float:
        return self.logprob / self.tokens


def batches(lengths: Sequence[int], prefix: int, vocab: int) -> list[list[int]]:
    """Row indices grouped for forward passes, shortest rows first, within the budgets."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    for index in order:
        if groups:
            rows = len(groups[-1]) + 1
            width = lengths[index]  # the longest so far, as rows come sorted
            if rows <= MAX_ROWS and rows * width <= ROW_TOKENS and rows * (prefix + width) <= CACHE_SLOTS \
                    and rows * width * vocab <= LOGITS:
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


@torch.inference_mode()
def score_rows(model: Transformer, prefix: list[int], rows: Sequence[tuple[list[int], list[int]]],
               desc: str | None = None) -> list[Score]:
    """A Score for each (context, continuation) row after `prefix`. The last prefix token moves into
    every row so that each row's first continuation token has a logit to come from; rows must fit
    the model's context with the prefix (the caller skips those that do not)."""
    if any(not continuation for _, continuation in rows):
        raise ValueError("a row has an empty continuation")
    shared, carried = prefix[:-1], prefix[-1:]
    rows = [(carried + list(context), list(continuation)) for context, continuation in rows]
    if any(not context for context, _ in rows):
        raise ValueError("a row has no context and there is no prefix: nothing predicts its first token")
    lengths = [len(c) + len(t) for c, t in rows]
    too_long = max(lengths, default=0) + len(shared) - model.config.max_seq_len
    if too_long > 0:
        raise ValueError(f"a row exceeds the model's context of {model.config.max_seq_len} tokens by {too_long}")
    device = model.lm_head.weight.device
    dtype = model.lm_head.weight.dtype
    cache = None
    if shared:
        cache = KVCache(model.config, 1, len(shared), device, dtype)
        model(torch.tensor([shared], device=device), kv_cache=cache, logits_to_keep=1)
    scores: list[Score | None] = [None] * len(rows)
    groups = batches(lengths, len(shared), model.config.vocab_size)
    for group in tqdm(groups, desc=desc, disable=desc is None, leave=False):
        width = max(lengths[i] for i in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for r, i in enumerate(group):
            ids[r, : lengths[i]] = torch.tensor(rows[i][0] + rows[i][1])
        logits = model(ids.to(device), kv_cache=_copies(model.config, cache, len(group), width) if cache else None)
        logprobs = torch.log_softmax(logits, dim=-1).cpu()
        for r, i in enumerate(group):
            context, continuation = rows[i]
            start = len(context) - 1  # the position whose logits predict the first continuation token
            predicted = logprobs[r, start : start + len(continuation)]
            target = torch.tensor(continuation)
            scores[i] = Score(float(predicted.gather(1, target[:, None]).sum()), len(continuation),
                              bool((predicted.argmax(dim=-1) == target).all()))
    return scores


def _copies(config, cache: KVCache, rows: int, width: int) -> KVCache:
    """A cache of `rows` rows, each holding the prefix, with room for `width` more tokens."""
    length = cache.length
    batch = KVCache(config, rows, length + width, cache.keys.device, cache.keys.dtype)
    batch.keys[:, :, :, :length] = cache.keys[:, :, :, :length]
    batch.values[:, :, :, :length] = cache.values[:, :, :, :length]
    batch.length = length
    return batch
