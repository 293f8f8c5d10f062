"""The token budget of a training stage, the same on any number of processes.

A stage states its global batch in tokens (`total_batch_tokens`: tokens per optimizer step, over all
processes) and its horizon as steps, tokens, or tokens per parameter (`max_steps`, `max_tokens`,
`tokens_per_param`: exactly one is set), or as seconds (`time_budget`, which replaces the others).
What each process does is derived from the world size:

    rows per process per step = total_batch_tokens / (seq_len * world_size)
    micro-batch = min(batch_size, rows per process),  accumulation = rows per process / micro-batch

so 1, 2 or 8 processes train the same tokens with the same schedule, and `batch_size` is only the
largest micro-batch that fits in memory. A global batch that does not split evenly is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from picochat.config import TrainConfig


class BudgetError(ValueError):
    """A global batch or horizon that cannot be laid out on this many processes."""


@dataclass(frozen=True)
class Budget:
    micro_batch: int  # sequences per forward/backward, per process
    grad_accum: int  # micro-batches per optimizer step, per process
    world_size: int
    seq_len: int
    steps: int

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.seq_len * self.grad_accum * self.world_size

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    def horizon(self, time_budget: float) -> str:
        """How long the stage trains, for its opening line: the seconds of a time budget, or steps and tokens."""
        return f"a time budget of {time_budget:g} s" if time_budget else f"{self.steps} steps, {self.tokens:,} tokens"


def horizon_steps(cfg: TrainConfig, n_params: int) -> int:
    """Optimizer steps from whichever of max_steps, max_tokens, tokens_per_param is set (rounded up);
    0 under a time budget, which replaces the horizon (the steps are then those that fit the seconds)."""
    if cfg.time_budget < 0:
        raise BudgetError(f"time_budget must be >= 0 seconds (0: off), got {cfg.time_budget}")
    if cfg.time_budget:
        return 0
    given = {name: getattr(cfg, name) for name in ("max_steps", "max_tokens", "tokens_per_param") if getattr(cfg, name)}
    if len(given) != 1:
        raise BudgetError(f"set exactly one of max_steps, max_tokens, tokens_per_param (the horizon), got {given or 'none'}")
    if cfg.max_steps:
        return cfg.max_steps
    tokens = cfg.max_tokens or cfg.tokens_per_param * n_params
    return max(1, math.ceil(tokens / cfg.total_batch_tokens))


def batch_budget(cfg: TrainConfig, world_size: int, n_params: int) -> Budget:
    """The per-process layout and the steps of `cfg` on `world_size` processes (see the module docstring)."""
    if cfg.total_batch_tokens < 1 or cfg.batch_size < 1 or cfg.seq_len < 1:
        raise BudgetError(f"total_batch_tokens, batch_size and seq_len must be >= 1, got "
                          f"{cfg.total_batch_tokens}, {cfg.batch_size}, {cfg.seq_len}")
    per_rank_tokens = cfg.seq_len * world_size
    if cfg.total_batch_tokens % per_rank_tokens:
        raise BudgetError(f"total_batch_tokens {cfg.total_batch_tokens:,} is not a multiple of seq_len {cfg.seq_len} x "
                          f"{world_size} processes; pick a global batch that is (e.g. "
                          f"{max(1, round(cfg.total_batch_tokens / per_rank_tokens)) * per_rank_tokens:,})")
    rows = cfg.total_batch_tokens // per_rank_tokens
    micro = min(cfg.batch_size, rows)
    if rows % micro:
        divisors = [d for d in range(1, micro + 1) if rows % d == 0]
        raise BudgetError(f"{rows} sequences per process per step (total_batch_tokens {cfg.total_batch_tokens:,} / "
                          f"seq_len {cfg.seq_len} / {world_size} processes) do not split into micro-batches of "
                          f"batch_size {cfg.batch_size}; use --batch-size {divisors[-1]}")
    return Budget(micro, rows // micro, world_size, cfg.seq_len, horizon_steps(cfg, n_params))
