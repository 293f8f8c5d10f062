"""Token shards on disk, and the pretraining batch loader that reads them.

`prepare(...)` (CLI: `picochat data prepare`) turns documents into binary token shards:

- Every document becomes `<|endoftext|>` followed by its tokens; the documents of a split are
  concatenated into one token stream. Special-token strings inside documents stay plain text.
- The stream is cut into shards of exactly `shard_tokens` tokens (the last one shorter), written as
  flat little-endian `uint16` arrays (`uint32` when the vocabulary exceeds 65,536): `train-00000.bin`,
  `val-00000.bin`, ... that `np.memmap` reads directly. A document may continue into the next shard.
- `manifest.json`, written last, records the sources (paths, sizes), the tokenizer (fingerprint,
  vocabulary size), the dtype, each shard's token and document counts, and per split the documents'
  UTF-8 bytes and their tokens without the `<|endoftext|>` separators (`text_bytes / text_tokens`
  converts a loss per token into bits per byte).
- Validation: the first `val_docs` documents of the input, or separate `val_inputs`.
- Tokenizing runs in a process pool over batches of documents, a bounded number in flight, so
  memory stays flat whatever the input size. The fast encoder is `tiktoken` on the tokenizer's own
  merges (identical ids, tested); `encoder="tokenizers"` uses Hugging Face `tokenizers` instead.
- Atomic and resumable: a shard is written under a temporary name and renamed when complete, then
  recorded in `progress.json` with the position in the document stream where the next shard begins
  (batch index, tokens of that batch already written). Batches are cut from the document stream by a
  fixed rule, so a rerun after a crash skips the finished shards and writes the same bytes an
  uninterrupted run writes. A rerun over a complete manifest for the same job returns at once.

`ShardLoader` serves training batches; `iter_val_batches` serves evaluation batches. See
`ShardLoader` for the data layout across epochs and DDP ranks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from picochat.data.sources import iter_documents, list_source_files
from picochat.io import atomic_write_json, read_json
from picochat.tokenizer import Tokenizer

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
DEFAULT_SHARD_TOKENS = 2**24
ENCODERS = ("tiktoken", "tokenizers")

# A tokenizing batch closes once it holds this many characters or documents. Part of the job
# settings: resuming relies on batches being cut the same way as in the interrupted run.
BATCH_CHARS = 2**20
BATCH_DOCS = 1024
BATCHES_IN_FLIGHT_PER_WORKER = 2


class ShardError(ValueError):
    """Missing, mismatched or unusable token shards (the message says which file and what to do)."""


# --- encoding -------------------------------------------------------------------------------------
def make_encoder(tok: Tokenizer, encoder: str = "tiktoken") -> Callable[[list[str]], list[np.ndarray]]:
    """A function from documents to their token ids (uint32 arrays), special strings kept as text."""
    if encoder == "tiktoken":
        enc = tok.as_tiktoken()
        # allowed_special=set(), disallowed_special=(): special-token strings are encoded as text.
        return lambda docs: [enc.encode_to_numpy(d, allowed_special=set(), disallowed_special=()) for d in docs]
    if encoder == "tokenizers":
        return lambda docs: [np.asarray(ids, dtype=np.uint32) for ids in tok.encode_batch(docs)]
    raise ValueError(f"unknown encoder {encoder!r}: expected one of {ENCODERS}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _encode_docs(encode, docs: list[str], eot_id: int, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """The batch's token stream (each document prefixed by eot_id) and its UTF-8 byte count."""
    pieces = []
    for ids in encode(docs):
        pieces.append(np.array([eot_id], dtype=np.uint32))
        pieces.append(ids)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    return np.concatenate(pieces).astype(dtype, copy=False), n_bytes


_worker_state: dict = {}


def _init_worker(tokenizer_path: str, encoder: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    tok = Tokenizer.load(tokenizer_path)
    _worker_state.update(encode=make_encoder(tok, encoder), eot_id=tok.eot_id, dtype=token_dtype(tok.vocab_size))


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, int]:
    s = _worker_state
    return _encode_docs(s["encode"], docs, s["eot_id"], s["dtype"])


def _doc_batches(docs: Iterable[str]) -> Iterator[list[str]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _encoded_batches(docs: Iterable[str], first_batch: int, encode_local, pool, workers: int):
    """Yield (batch index, tokens or None, documents, UTF-8 bytes) in order.

    Batches before `first_batch` were written by an earlier run: they are counted, not encoded.
    At most `workers * BATCHES_IN_FLIGHT_PER_WORKER` batches wait in the pool, so memory stays flat.
    """
    pending: deque = deque()  # (index, documents, (tokens, bytes) or the pool's AsyncResult for them)
    for index, batch in enumerate(_doc_batches(docs)):
        if index < first_batch:
            payload = (None, sum(len(d.encode("utf-8")) for d in batch))
        elif pool is None:
            payload = encode_local(batch)
        else:
            payload = pool.apply_async(_encode_in_worker, (batch,))
        pending.append((index, len(batch), payload))
        while pending and (len(pending) > workers * BATCHES_IN_FLIGHT_PER_WORKER or isinstance(pending[0][2], tuple)):
            yield _resolve(*pending.popleft())
    while pending:
        yield _resolve(*pending.popleft())


def _resolve(index: int, n_docs: int, payload) -> tuple:
    tokens, n_bytes = payload if isinstance(payload, tuple) else payload.get()
    return index, tokens, n_docs, n_bytes


# --- writing shards -------------------------------------------------------------------------------
def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.bin"


class _ShardWriter:
    """Fills one shard at a time under a temporary name; `finish` fsyncs and renames it."""

    def __init__(self, out_dir: Path, split: str, index: int, shard_tokens: int, eot_id: int):
        self.out_dir, self.split, self.index = out_dir, split, index
        self.shard_tokens, self.eot_id = shard_tokens, eot_id
        self._file = None

    def _open(self) -> None:
        self._tmp = self.out_dir / f".{shard_name(self.split, self.index)}.tmp"
        self._file = open(self._tmp, "wb")
        self.tokens = self.documents = 0

    @property
    def room(self) -> int:
        return self.shard_tokens - (self.tokens if self._file else 0)

    @property
    def is_open(self) -> bool:
        return self._file is not None

    def write(self, tokens: np.ndarray) -> None:
        if self._file is None:
            self._open()
        self._file.write(tokens.tobytes())
        self.tokens += len(tokens)
        self.documents += int(np.count_nonzero(tokens == self.eot_id))

    def finish(self) -> dict:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        name = shard_name(self.split, self.index)
        os.replace(self._tmp, self.out_dir / name)
        self.index += 1
        return {"file": name, "tokens": self.tokens, "documents": self.documents}

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            self._tmp.unlink(missing_ok=True)


def _write_split(split, docs, out_dir, state, save_state, *, shard_tokens, tok, encode_local, pool, workers, bar):
    """Tokenize `docs` into the split's shards, resuming after the shards listed in `state`."""
    shards = state["shards"]
    next_batch, skip = (shards[-1]["next_batch"], shards[-1]["skip"]) if shards else (0, 0)
    writer = _ShardWriter(out_dir, split, len(shards), shard_tokens, tok.eot_id)
    n_docs = n_bytes = 0
    end_batch = 0  # one past the last batch seen
    try:
        for index, tokens, batch_docs, batch_bytes in _encoded_batches(docs, next_batch, encode_local, pool, workers):
            n_docs += batch_docs
            n_bytes += batch_bytes
            bar.update(batch_bytes)
            end_batch = index + 1
            if tokens is None:
                continue
            pos = skip if index == next_batch else 0
            while pos < len(tokens):
                take = min(writer.room, len(tokens) - pos)
                writer.write(tokens[pos : pos + take])
                pos += take
                if writer.room == 0:
                    cursor = (index, pos) if pos < len(tokens) else (index + 1, 0)
                    shards.append({**writer.finish(), "next_batch": cursor[0], "skip": cursor[1]})
                    save_state()
                    bar.set_postfix_str(f"{split} shards {len(shards)}")
        if writer.is_open:
            shards.append({**writer.finish(), "next_batch": end_batch, "skip": 0})
    finally:
        writer.discard()
    n_tokens = sum(s["tokens"] for s in shards)
    state["summary"] = {
        "shards": [{k: s[k] for k in ("file", "tokens", "documents")} for s in shards],
        "tokens": n_tokens,
        "documents": n_docs,
        "text_bytes": n_bytes,
        "text_tokens": n_tokens - n_docs,
    }
    save_state()
    return state["summary"]


# --- the job: what was asked, to match reruns against -----------------------------------------
def _source_entries(paths) -> list[dict]:
    entries = []
    for path in list_source_files(paths):
        stat = path.stat()
        entries.append({"path": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return entries


def _job(inputs, val_inputs, val_docs, shard_tokens, tok) -> dict:
    """What determines the shards' bytes (the encoder does not: both give the same ids)."""
    return {
        "sources": _source_entries(inputs),
        "val_sources": _source_entries(val_inputs) if val_inputs else [],
        "tokenizer_fingerprint": tok.fingerprint,
        "settings": {"val_docs": val_docs, "shard_tokens": shard_tokens, "batch_chars": BATCH_CHARS, "batch_docs": BATCH_DOCS},
    }


def _job_mismatch(job: dict, recorded: dict) -> list[str]:
    names = {"sources": "input files", "val_sources": "validation files",
             "tokenizer_fingerprint": "tokenizer", "settings": "settings"}
    return [names[k] for k in job if job[k] != recorded.get(k)]


def _load_progress(out_dir: Path, job: dict, itemsize: int) -> dict:
    """The finished shards of an interrupted run of this job (those whose files are intact)."""
    path = out_dir / PROGRESS
    if not path.exists():
        return {"job": job, "splits": {}}
    try:
        progress = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: not valid JSON ({e}); delete it to start this prepare over") from None
    differs = _job_mismatch(job, progress.get("job", {}))
    if differs:
        raise ShardError(
            f"{path}: an unfinished prepare of other data is in {out_dir} (different {', '.join(differs)}); "
            "use another --out, or delete the folder to start over"
        )
    for state in progress["splits"].values():
        intact = list(itertools.takewhile(
            lambda s: (out_dir / s["file"]).is_file() and (out_dir / s["file"]).stat().st_size == s["tokens"] * itemsize,
            state["shards"],
        ))
        if len(intact) < len(state["shards"]):
            state["shards"], state["summary"] = intact, None
    return progress


def prepare(
    inputs,
    tokenizer_path: str | Path,
    out_dir: str | Path,
    *,
    val_docs: int = 0,
    val_inputs=None,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    encoder: str = "tiktoken",
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into shards under `out_dir` and return the manifest (see the module doc)."""
    if val_docs and val_inputs:
        raise ValueError("give either val_docs (the first N documents) or val_inputs, not both")
    if val_docs < 0 or shard_tokens < 1:
        raise ValueError(f"val_docs must be >= 0 and shard_tokens >= 1, got {val_docs} and {shard_tokens}")
    if encoder not in ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}: expected one of {ENCODERS}")
    out_dir = Path(out_dir)
    tok = Tokenizer.load(tokenizer_path)
    job = _job(inputs, val_inputs, val_docs, shard_tokens, tok)
    if (out_dir / MANIFEST).exists():
        manifest = read_manifest(out_dir)
        differs = _job_mismatch(job, manifest)
        if differs:
            raise ShardError(
                f"{out_dir / MANIFEST}: these shards were prepared from other data (different {', '.join(differs)}); "
                "use another --out, or delete the folder to prepare again"
            )
        return manifest

    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tok.vocab_size)
    state = _load_progress(out_dir, job, dtype.itemsize)
    save_state = lambda: atomic_write_json(out_dir / PROGRESS, state)  # noqa: E731

    if val_inputs:
        split_docs = {"val": lambda: iter_documents(val_inputs), "train": lambda: iter_documents(inputs)}
    elif val_docs:
        split_docs = {"val": lambda: itertools.islice(iter_documents(inputs), val_docs),
                      "train": lambda: itertools.islice(iter_documents(inputs), val_docs, None)}
    else:
        split_docs = {"train": lambda: iter_documents(inputs)}

    workers = workers or os.cpu_count() or 1
    pool = encode_local = None
    if workers > 1:
        pool = multiprocessing.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer_path), encoder))
    else:
        encode = make_encoder(tok, encoder)
        encode_local = lambda docs: _encode_docs(encode, docs, tok.eot_id, dtype)  # noqa: E731
    splits = {}
    try:
        with tqdm(desc="tokenizing", unit="B", unit_scale=True, disable=not progress) as bar:
            for split, make_docs in split_docs.items():
                split_state = state["splits"].setdefault(split, {"shards": [], "summary": None})
                summary = split_state["summary"] or _write_split(
                    split, make_docs(), out_dir, split_state, save_state, shard_tokens=shard_tokens, tok=tok,
                    encode_local=encode_local, pool=pool, workers=workers, bar=bar,
                )
                if summary["documents"] == 0:
                    after = f" after the first {val_docs} (validation) documents" if split == "train" and val_docs else ""
                    raise ShardError(f"no {split} documents{after} in {val_inputs if split == 'val' and val_inputs else inputs}")
                splits[split] = summary
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()

    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer": {"path": str(Path(tokenizer_path).resolve()), "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "dtype": dtype.name,
        "encoder": encoder,
        **job,
        "splits": splits,
    }
    atomic_write_json(out_dir / MANIFEST, manifest)
    (out_dir / PROGRESS).unlink(missing_ok=True)
    return manifest


# --- reading shards -------------------------------------------------------------------------------
def read_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    if not path.exists():
        hint = " (an interrupted prepare: run it again to finish)" if (Path(shards_dir) / PROGRESS).exists() else ""
        raise ShardError(f"{path}: no manifest, so no finished token shards here{hint}; run `picochat data prepare`")
    manifest = read_json(path, ShardError)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise ShardError(f"{path}: expected a picochat shard manifest of format {FORMAT_VERSION}")
    return manifest


def bytes_per_token(shards_dir: str | Path, split: str = "val") -> float:
    """UTF-8 bytes of text per token of text (separators excluded): bits per byte = loss / ln 2 / this."""
    summary = split_summary(read_manifest(shards_dir), shards_dir, split)
    return summary["text_bytes"] / summary["text_tokens"]


def split_summary(manifest: dict, shards_dir, split: str) -> dict:
    if split not in manifest["splits"]:
        raise ShardError(
            f"{Path(shards_dir) / MANIFEST}: no {split!r} split (has {sorted(manifest['splits'])}); "
            + ("prepare with --val-docs N or --val-input PATHS" if split == "val" else "")
        )
    return manifest["splits"][split]


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="<action>", required=True)

    p = sub.add_parser("prepare", help="tokenize documents into token shards",
                       description="Tokenize documents into binary token shards plus manifest.json "
                                   "(resumable: run it again after an interruption).")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, folders or globs of documents (.txt/.md/.rst, .jsonl, .parquet, optionally .gz)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json, or a folder holding it")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-docs", type=int, default=0,
                     help="use the first N input documents as the validation split (default 0: no validation split)")
    val.add_argument("--val-input", nargs="+", help="separate files or folders for the validation split")
    p.add_argument("--workers", type=int, default=None, help="tokenizing processes (default: one per CPU core)")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS,
                   help=f"tokens per shard file (default {DEFAULT_SHARD_TOKENS})")
    p.add_argument("--encoder", choices=ENCODERS, default="tiktoken",
                   help="tiktoken on the same merges (fast, default) or Hugging Face tokenizers (same ids)")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("info", help="summarize prepared shards", description="Print the summary of a shard folder's manifest.")
    p.add_argument("shards", help="the shard folder (holding manifest.json)")
    p.set_defaults(func=_cmd_info)


def _cmd_prepare(args) -> None:
    manifest = prepare(args.input, args.tokenizer, args.out, val_docs=args.val_docs, val_inputs=args.val_input,
                       workers=args.workers, shard_tokens=args.shard_tokens, encoder=args.encoder)
    print(summarize(manifest, args.out))


def _cmd_info(args) -> None:
    print(summarize(read_manifest(args.shards), args.shards))


def summarize(manifest: dict, shards_dir) -> str:
    """A few human-readable lines about a manifest."""
    tok = manifest["tokenizer"]
    n_sources = len(manifest["sources"]) + len(manifest["val_sources"])
    source_bytes = sum(s["bytes"] for s in manifest["sources"] + manifest["val_sources"])
    lines = [
        f"{shards_dir}: {manifest['dtype']} shards from {n_sources} files ({source_bytes:,} bytes)",
        f"tokenizer {manifest['tokenizer_fingerprint'][:12]} (vocab {tok['vocab_size']}) at {tok['path']}",
    ]
    for split, s in manifest["splits"].items():
        lines.append(f"{split:>5}: {s['tokens']:,} tokens, {s['documents']:,} documents, {len(s['shards'])} shards, "
                     f"{s['text_bytes'] / max(s['text_tokens'], 1):.3f} bytes/token")
    return "\n".join(lines)
