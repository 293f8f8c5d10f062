"""Training batches for the next-token loop: `ShardLoader` (pretraining, token shards) and
`ConversationLoader` (SFT, rendered conversations), on one epoch / rank / resume core.

Both yield `(inputs, targets)` int64 tensors of shape (batch_size, seq_len) forever. Each epoch lays
the data out as rows in an order drawn from (seed, epoch) and takes global batches (one optimizer
step) of grad_accum * world_size * batch_size rows, skipping the rows left after the last full global
batch. Micro-batch m of rank r gets rows [(m * world_size + r) * batch_size, ... + batch_size) of each
global batch: every rank must be given the same data, and any layout with the same global batch
(1 rank accumulating 8 micro-batches, 8 ranks with one each) reads the same rows at each step,
disjointly across ranks. `state_dict()` is the same on every rank, does not depend on the layout,
and resumes a loader exactly.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from picochat.data.conversations import PACK_WINDOW, render_all
from picochat.data.shards import MANIFEST, ShardError, read_manifest, split_summary
from picochat.model import IGNORE_INDEX


def check_layout(batch_size: int, seq_len: int, rank: int, world_size: int, grad_accum: int = 1) -> None:
    if batch_size < 1 or seq_len < 1 or world_size < 1 or grad_accum < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size, seq_len, grad_accum >= 1 and 0 <= rank < world_size, got "
                         f"{batch_size}, {seq_len}, {grad_accum}, rank {rank} of {world_size}")


class EpochLoader:
    """The core both loaders share (see the module docstring). A loader gives `_epoch_rows(epoch)`,
    the epoch's rows in order, `_batch(rows)`, the tensors of this rank's rows, and `_identity()`,
    what must match for a saved state to resume it; `error` is the error type of a failed resume."""

    error: type[Exception] = ValueError
    what = "data loader"

    def __init__(self, batch_size: int, seq_len: int, rank: int, world_size: int, seed: int, grad_accum: int = 1):
        check_layout(batch_size, seq_len, rank, world_size, grad_accum)
        self.batch_size, self.seq_len, self.rank, self.world_size, self.seed = batch_size, seq_len, rank, world_size, seed
        self.grad_accum = grad_accum
        self.global_batch_size = batch_size * world_size * grad_accum  # rows per optimizer step
        self.epoch = self.step = self.micro = 0

    def _epoch_rows(self, epoch: int) -> Sequence:
        raise NotImplementedError

    def _batch(self, rows: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _identity(self) -> dict[str, int]:
        raise NotImplementedError

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self._epoch_rows(epoch)) // self.global_batch_size

    def __iter__(self) -> EpochLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.step * self.global_batch_size + (self.micro * self.world_size + self.rank) * self.batch_size
        batch = self._batch(self._epoch_rows(self.epoch)[first : first + self.batch_size])
        self.micro += 1
        if self.micro == self.grad_accum:
            self.step, self.micro = self.step + 1, 0
            if self.step == self.steps_in_epoch(self.epoch):
                self.epoch, self.step = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "step": self.step, "micro": self.micro, "seed": self.seed, "seq_len": self.seq_len,
                "global_batch_size": self.global_batch_size, **self._identity()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where `state` left off; the data, seed, seq_len and global batch must match it (the
        number of processes need not: a run may resume on another number of GPUs)."""
        mine = self.state_dict()
        differs = [k for k in mine if k not in ("epoch", "step", "micro") and state.get(k) != mine[k]]
        if differs:
            raise self.error(f"cannot resume the {self.what}: " + ", ".join(
                f"{k} was {state.get(k)}, is {mine[k]}" for k in differs))
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_in_epoch(epoch):
            raise self.error(f"cannot resume the {self.what}: step {step} of epoch {epoch} is outside that epoch "
                             f"of {self.steps_in_epoch(epoch)} steps")
        micro = int(state.get("micro", 0))  # checkpoints before gradient accumulation in the loader have none
        if not 0 <= micro < self.grad_accum:
            raise self.error(f"cannot resume the {self.what}: micro-batch {micro} of {self.grad_accum}")
        self.epoch, self.step, self.micro = epoch, step, micro


# --- pretraining: token shards ---------------------------------------------------------------------
class _TokenStream:
    """The shards of one split, memory-mapped and read as one concatenated token array."""

    def __init__(self, shards_dir, split: str, expect_fingerprint: str | None):
        shards_dir = Path(shards_dir)
        manifest = read_manifest(shards_dir)
        if expect_fingerprint is not None and manifest["tokenizer_fingerprint"] != expect_fingerprint:
            raise ShardError(
                f"{shards_dir / MANIFEST}: tokenizer mismatch: shards were made with tokenizer "
                f"{manifest['tokenizer_fingerprint'][:12]}, this run uses {expect_fingerprint[:12]}; "
                "prepare the shards again with this tokenizer"
            )
        summary = split_summary(manifest, shards_dir, split)
        dtype = np.dtype(manifest["dtype"])
        self.maps = []
        for shard in summary["shards"]:
            path = shards_dir / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size != shard["tokens"] * dtype.itemsize:
                raise ShardError(f"{path}: expected {shard['tokens'] * dtype.itemsize} bytes "
                                 f"({shard['tokens']} {dtype.name} tokens), found {'no file' if size is None else size}")
            self.maps.append(np.memmap(path, dtype=dtype, mode="r"))
        self.starts = np.cumsum([0] + [len(m) for m in self.maps])
        self.n_tokens = int(self.starts[-1])

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens [start, start + length) of the stream into `out`."""
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        done = 0
        while done < length:
            offset = start + done - int(self.starts[k])
            piece = self.maps[k][offset : offset + length - done]
            out[done : done + len(piece)] = piece
            done += len(piece)
            k += 1


def _batch_tensors(stream: _TokenStream, sequence_ids, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = np.empty((len(sequence_ids), seq_len + 1), dtype=np.int64)
    for row, i in zip(rows, sequence_ids):
        stream.read(int(i) * seq_len, seq_len + 1, row)
    return torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())


def _sequence_count(stream: _TokenStream, split: str, batch_size: int, seq_len: int, world_size: int, shards_dir,
                    grad_accum: int = 1) -> int:
    """The number of sequences in the stream; errors when not even one global batch fits."""
    n_sequences = (stream.n_tokens - 1) // seq_len
    rows = batch_size * world_size * grad_accum
    if n_sequences < rows:
        raise ShardError(
            f"{shards_dir}: the {split} split has {stream.n_tokens} tokens, too few for one batch of "
            f"{rows} sequences of {seq_len}+1 tokens ({rows * seq_len + 1} needed); use more data or a smaller batch"
        )
    return n_sequences


class ShardLoader(EpochLoader):
    """Training batches `(inputs, targets)`: int64 tensors of shape (batch_size, seq_len).

    Layout. The split's shards form one token stream of N tokens, cut into S = (N - 1) // seq_len
    sequences: sequence i is tokens [i*T, i*T + T + 1), inputs its first T tokens and targets its
    last T (the next token at each position). Each epoch visits the sequences in a fresh random order
    (a permutation seeded by (seed, epoch)), taking global batches of world_size * batch_size
    sequences; the sequences left over after the last full global batch are skipped that epoch.
    Micro-batch m of rank r gets rows [(m * world_size + r) * batch_size, ... + batch_size) of each
    global batch (see the module docstring).
    """

    error = ShardError

    def __init__(self, shards_dir, split: str = "train", *, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, expect_fingerprint: str | None = None,
                 grad_accum: int = 1):
        super().__init__(batch_size, seq_len, rank, world_size, seed, grad_accum)
        self.stream = _TokenStream(shards_dir, split, expect_fingerprint)
        self.n_sequences = _sequence_count(self.stream, split, batch_size, seq_len, world_size, shards_dir, grad_accum)
        self._order_epoch, self._order = None, None

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        if self._order_epoch != epoch:
            ids = np.arange(self.n_sequences, dtype=np.uint32 if self.n_sequences < 2**32 else np.uint64)
            np.random.default_rng([self.seed, epoch]).shuffle(ids)
            self._order_epoch, self._order = epoch, ids
        return self._order

    def steps_in_epoch(self, epoch: int) -> int:
        return self.n_sequences // self.global_batch_size

    def _batch(self, rows: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        return _batch_tensors(self.stream, rows, self.seq_len)

    def _identity(self) -> dict[str, int]:
        return {"tokens": self.stream.n_tokens}


def iter_val_batches(shards_dir, batch_size: int, seq_len: int, max_batches: int | None = None, *,
                     split: str = "val", rank: int = 0, world_size: int = 1,
                     expect_fingerprint: str | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation batches over `split` in stream order, the same every time.

    Same layout as `ShardLoader` without shuffling: global batch g holds sequences
    [g * W * B, (g + 1) * W * B), rank r its rows [r * B, (r + 1) * B). Stops after `max_batches`
    global batches or at the last full one.
    """
    check_layout(batch_size, seq_len, rank, world_size)
    stream = _TokenStream(shards_dir, split, expect_fingerprint)
    n_sequences = _sequence_count(stream, split, batch_size, seq_len, world_size, shards_dir)
    n_batches = n_sequences // (batch_size * world_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for g in range(n_batches):
        first = (g * world_size + rank) * batch_size
        yield _batch_tensors(stream, range(first, first + batch_size), seq_len)


# --- SFT: rendered conversations -----------------------------------------------------------------
def _pack_rows(indices: np.ndarray, lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each conversation goes into the fullest row that still has room for it."""
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (space left, row number)
    for i in sorted(indices.tolist(), key=lambda i: -lengths[i]):
        k = bisect.bisect_left(room, (int(lengths[i]), -1))
        if k == len(room):
            rows.append([i])
            space, row = capacity, len(rows) - 1
        else:
            space, row = room.pop(k)
            rows[row].append(i)
        if space - lengths[i] > 0:
            bisect.insort(room, (int(space - lengths[i]), row))
    return rows


class ConversationLoader(EpochLoader):
    """SFT batches `(inputs, targets)`: int64 tensors of shape (batch_size, seq_len), like `ShardLoader`.

    Items are conversations (messages, or `{"messages": [...]}`) or documents `{"text": str}`, which
    are trained on every token, as in pretraining.

    Rows. Each conversation is rendered (`picochat.chat`) and placed whole in a row of seq_len + 1
    tokens; inputs are a row's first seq_len tokens, targets its last seq_len, with IGNORE_INDEX (-100) wherever
    the target token is not trained (not the assistant's, or padding). With `pack=True` several
    conversations share a row (best-fit over windows of the epoch's shuffled order), each starting
    with `<|endoftext|>` as documents do in pretraining; with `pack=False` each row holds one. The
    rest of a row is `<|pad|>`. A conversation never continues into the next row.

    Too long. A conversation over seq_len + 1 tokens is cut to its first seq_len + 1 tokens
    (`too_long="truncate"`, counted in stats["truncated"]; dropped if nothing trainable is left)
    or dropped (`too_long="drop"`, counted in stats["dropped_too_long"]).

    Epochs. Each epoch shuffles and packs the rows anew from (seed, epoch).
    """

    what = "conversation loader"

    def __init__(self, conversations: Sequence, tokenizer, batch_size: int = 8, seq_len: int = 512, *,
                 rank: int = 0, world_size: int = 1, seed: int = 0, pack: bool = True,
                 too_long: str = "truncate", show_progress: bool = False, grad_accum: int = 1):
        super().__init__(batch_size, seq_len, rank, world_size, seed, grad_accum)
        if too_long not in ("truncate", "drop"):
            raise ValueError(f"too_long must be 'truncate' or 'drop', got {too_long!r}")
        self.pack, self.pad_id = pack, tokenizer.pad_id
        self._tokens, self._trained, self._starts, self._lengths, self.stats = render_all(
            conversations, tokenizer, seq_len + 1, too_long, show_progress)
        if len(self._lengths) == 0:
            raise ValueError(f"no conversation to train on ({self.stats})")
        self._plan_epoch, self._plan = None, []
        self.stats["rows_first_epoch"] = len(self._epoch_rows(0))
        if self.stats["rows_first_epoch"] < self.global_batch_size:
            raise ValueError(f"{self.stats['rows_first_epoch']} rows of {seq_len}+1 tokens are too few for one batch of "
                             f"{self.global_batch_size} rows; use more conversations or a smaller batch")

    def _epoch_rows(self, epoch: int) -> list[list[int]]:
        """The epoch's rows (lists of conversation indices), cached for the current epoch."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self._lengths))
            if self.pack:
                rows = [row for k in range(0, len(order), PACK_WINDOW)
                        for row in _pack_rows(order[k : k + PACK_WINDOW], self._lengths, self.seq_len + 1)]
                rows = [rows[i] for i in rng.permutation(len(rows))]
            else:
                rows = [[int(i)] for i in order]
            self._plan_epoch, self._plan = epoch, rows
        return self._plan

    def _batch(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = np.full((len(rows), self.seq_len + 1), self.pad_id, dtype=np.int64)
        trained = np.zeros((len(rows), self.seq_len + 1), dtype=bool)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                start, length = self._starts[i], self._lengths[i]
                tokens[r, at : at + length] = self._tokens[start : start + length]
                trained[r, at : at + length] = self._trained[start : start + length]
                at += length
        targets = np.where(trained[:, 1:], tokens[:, 1:], IGNORE_INDEX)
        return torch.from_numpy(tokens[:, :-1].copy()), torch.from_numpy(targets)

    def _identity(self) -> dict[str, int]:
        return {"pack": int(self.pack), "conversations": len(self._lengths), "tokens": len(self._tokens)}
