"""The training loop every stage goes through: device, precision, distributed setup, optimizers,
schedule, and `run_steps`, which owns a stage's bookkeeping (refuse a finished stage or a checkpoint
without --resume, resume, log metrics, checkpoint, write the final model and `done.json`).

Written once, as the lecture says: pretraining and SFT differ only in their data (a loader yielding
`(inputs, targets)` with `targets == IGNORE_INDEX` where no loss is taken) and hyperparameters, and
`train` is their step; RL's step (sample, reward, update) is another function given to `run_steps`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from picochat.checkpoint import latest_checkpoint, load_training_state, save_model, save_training_state
from picochat.config import TrainConfig
from picochat.io import atomic_write_json, atomic_write_text
from picochat.model import IGNORE_INDEX, Transformer
from picochat.train.budget import Budget, batch_budget
from picochat.train.muon import Muon, native_bfloat16


class TrainingError(RuntimeError):
    """A training run cannot start or continue (e.g. an existing run without --resume)."""


@dataclass
class Runtime:
    device: torch.device
    rank: int
    world_size: int
    local_rank: int
    owns_group: bool = False  # this call joined the process group, so its teardown leaves it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_runtime(device: str = "auto", join_group: bool = True) -> Runtime:
    """Pick the device and, under torchrun (WORLD_SIZE set), join the process group (NCCL on GPU, gloo on CPU).

    join_group=False: run as one process (rank 0 of 1) even under torchrun, as the speedrun's preference stages do on rank 0."""
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if join_group else 1
    rank = int(os.environ.get("RANK", "0")) if join_group else 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    joins = world_size > 1 and not dist.is_initialized()
    if joins:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Runtime(dev, rank, world_size, local_rank, owns_group=joins)


def teardown_runtime(rt: Runtime) -> None:
    """Leave the process group if `setup_runtime` joined it (not one a caller such as the speedrun holds)."""
    if rt.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def autocast(rt: Runtime, dtype: str):
    """bf16 autocast when asked, or with "auto" where the device computes bfloat16 natively (CUDA; a
    CPU with AVX512-BF16 or AMX, where the cpu preset's training step runs 1.4-1.5x faster,
    `benchmarks/bench_dtype.py`);
    float32 otherwise (a CPU without bf16 units emulates it, several times slower)."""
    if dtype == "auto":
        dtype = "bfloat16" if native_bfloat16(rt.device) else "float32"
    if dtype == "bfloat16":
        return torch.autocast(device_type=rt.device.type, dtype=torch.bfloat16)
    if dtype != "float32":
        raise ValueError(f"dtype must be float32, bfloat16 or auto, not {dtype!r}")
    return contextlib.nullcontext()


def build_optimizers(model: Transformer, kind: str, lr: float, muon_lr: float = 0.02,
                     weight_decay: float = 0.0, embedding_lr: float = 0.0) -> list[torch.optim.Optimizer]:
    """kind "adamw": AdamW for everything; "muon": Muon for the hidden 2-D matrices and AdamW for
    embeddings, head and norms. `embedding_lr` (0: `lr`): the input embeddings' own rate, when they
    are not tied to the head (a lookup table whose rows each see few gradients takes a larger one)."""
    hidden, other, embeddings = [], [], []
    untied = embedding_lr > 0 and not model.config.tie_embeddings
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if untied and "embed_tokens" in name:
            embeddings.append(p)
        elif p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name:
            hidden.append(p)
        else:
            other.append(p)
    fused = {"fused": True}  # one kernel per step instead of one per parameter; CPU and CUDA
    embedding_group = [{"params": embeddings, "lr": embedding_lr, "weight_decay": 0.0}] if embeddings else []
    if kind == "adamw":
        groups = [{"params": hidden, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}, *embedding_group]
        optimizers = [torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, **fused)]
    elif kind == "muon":
        muon = Muon(hidden, lr=muon_lr, weight_decay=weight_decay, momentum=0.95)
        groups = [{"params": other}, *embedding_group]
        optimizers = [muon, torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, **fused)]
    else:
        raise ValueError(f"optimizer must be adamw or muon, not {kind!r}")
    set_lr(optimizers, 1.0)  # records each group's initial_lr, so a saved state has the keys a fresh one has
    return optimizers


def lr_multiplier(step: int, cfg: TrainConfig, steps: int | None = None, progress: float | None = None) -> float:
    """Linear warmup over the first warmup_steps, constant, then linear decay to final_lr_frac over
    the last decay_frac of the horizon. `progress` is the share of the horizon done before this step
    (under a time budget: of its seconds; 1.0 for the last step); default step / `steps` (cfg.max_steps)."""
    warmup = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    if progress is None:
        progress = step / (steps or cfg.max_steps)
    decay_start = 1.0 - cfg.decay_frac
    if progress <= decay_start or cfg.decay_frac <= 0:
        return warmup
    done = min(1.0, (progress - decay_start) / cfg.decay_frac)
    return min(warmup, 1.0 - done * (1.0 - cfg.final_lr_frac))


@dataclass
class TrainClock:
    """A time-budgeted stage's clock: the seconds its steps have taken, the last step's seconds (to
    foresee which step is the last) and whether that last step has run. It is saved in every
    checkpoint, so a resumed run continues the schedule where the checkpoint left it."""

    seconds: float = 0.0
    last_step_s: float = 0.0
    finished: bool = False

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.last_step_s, self.finished = state["seconds"], state["last_step_s"], state["finished"]


def is_last_step(clock: TrainClock, budget_s: float) -> bool:
    """Whether the next step should be the last: expected to take as long as the one before, it ends
    nearer the budget than the step after it would (within half a step of it, or past it)."""
    return clock.seconds + 1.5 * clock.last_step_s >= budget_s


def set_lr(optimizers: list[torch.optim.Optimizer], multiplier: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * multiplier


def measured_peak_flops(device: torch.device) -> float | None:
    """Achievable bf16 matmul FLOP/s on this GPU, measured once (the denominator of MFU); None on CPU."""
    if device.type != "cuda":
        return None
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


class MetricsLog:
    """Append-only metrics JSONL; on resume, lines past the resumed step are dropped first, and so is
    a torn last line (a kill mid-append); a broken line before it is an error naming the file and line."""

    def __init__(self, path: Path, resume_step: int = 0, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        kept = []
        if resume_step and self.path.exists():
            lines = self.path.read_text().splitlines()
            for number, line in enumerate(lines, 1):
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError as e:
                    if number == len(lines):
                        break
                    raise TrainingError(f"{self.path}:{number}: not valid JSON ({e.msg}); remove the line to resume") from None
                if record is not None and record.get("step", 0) <= resume_step:
                    kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


@torch.no_grad()
def evaluate_loss(model: Transformer, batches: Iterator, rt: Runtime, dtype: str, token_bytes: torch.Tensor | None = None) -> dict:
    """Mean loss (nats per token) over the batches, and bits per byte when token byte lengths are given.

    Bits per byte = total loss in bits / total UTF-8 bytes of the predicted tokens, counting only
    tokens with bytes (special tokens and IGNORE_INDEX targets are excluded), so it compares across tokenizers.
    """
    model.eval()
    nats = tokens = 0.0
    bpb_nats = n_bytes = 0.0
    for x, y in batches:
        x, y = x.to(rt.device), y.to(rt.device)
        with autocast(rt, dtype):
            loss = model(x, targets=y, reduction="none").flatten()  # in chunks: never every position's logits
        valid = y.flatten() != IGNORE_INDEX
        nats += loss[valid].sum().item()
        tokens += valid.sum().item()
        if token_bytes is not None:
            nb = token_bytes.to(rt.device)[y.flatten().clamp(min=0)] * valid
            bpb_nats += (loss * (nb > 0)).sum().item()
            n_bytes += nb.sum().item()
    totals = torch.tensor([nats, tokens, bpb_nats, n_bytes], dtype=torch.float64, device=rt.device)
    if rt.distributed:
        dist.all_reduce(totals)
    nats, tokens, bpb_nats, n_bytes = totals.tolist()
    model.train()
    out = {"val_loss": nats / max(tokens, 1)}
    if token_bytes is not None and n_bytes:
        out["val_bpb"] = bpb_nats / (math.log(2) * n_bytes)
    return out


def run_steps(stage_dir: Path, model: Transformer, optimizers: list, rt: Runtime, steps: int,
              step_fn: Callable[[int], dict], *, resume: bool, ckpt_every: int, desc: str, info: dict | None = None,
              stateful: dict | None = None, meta: dict | None = None, summary: dict | None = None,
              postfix: Sequence[str] = (), sharded: bool = False, finished: Callable[[int], bool] | None = None) -> dict:
    """Run `step_fn(step)` for steps 0 .. steps-1 as a stage writing `stage_dir`; returns the summary.
    `finished(steps_done)`, when given, says instead when the stage is done (a time budget; `steps`
    is then only the progress bar's total, 0 for none).

    `step_fn` does one optimizer step and returns its metrics record. The loop refuses a finished
    stage, or a checkpoint, without `resume`; resumes weights, optimizers, RNG states and every
    `stateful` object (state_dict / load_state_dict, e.g. a data loader) from the latest checkpoint;
    logs each record with its step and elapsed time to `metrics.jsonl`; checkpoints every
    `ckpt_every` steps and at the end (with `meta` in its meta.json); and writes the model and
    `done.json` (the last record, the seconds and `summary`). Under DDP only rank 0 writes; a model
    sharded with FSDP2 (`sharded`) is gathered by every rank first, and every rank resumes from the files.
    """
    stage_dir = Path(stage_dir)
    done = stage_dir / "done.json"
    if done.exists() and not resume:
        raise TrainingError(f"{stage_dir} is already complete; remove it or pick another --run")
    ckpt = latest_checkpoint(stage_dir)
    if ckpt and not resume:
        raise TrainingError(f"{stage_dir} has a checkpoint ({ckpt.name}); pass --resume to continue it, or remove the folder")
    stateful = stateful or {}
    finished = finished or (lambda done_steps: done_steps >= steps)
    if sharded:
        from picochat.train.sharding import full_states as gather  # FSDP2 (torch >= 2.6) only when asked
    step = 0
    if ckpt:
        saved = load_training_state(ckpt, model, optimizers, sharded=sharded)
        for name, obj in stateful.items():
            if name not in saved:
                raise TrainingError(f"{ckpt}: the checkpoint holds no {name} state; it was written by a run with other "
                                    f"settings (a time budget's clock is saved only under --time-budget): resume with those")
            obj.load_state_dict(saved[name])
        step = saved["step"]
        if rt.is_main:
            tqdm.write(f"{desc}: resuming from {ckpt} (step {step})")
    if finished(step) and done.exists():
        return json.loads(done.read_text())

    metrics = MetricsLog(stage_dir / "metrics.jsonl", resume_step=step, enabled=rt.is_main)
    last: dict = {}
    bar = tqdm(total=steps or None, initial=step, desc=desc, disable=not rt.is_main, dynamic_ncols=True)
    t_start = time.perf_counter()
    while not finished(step):
        record = {"step": step + 1, **step_fn(step)}
        step += 1
        record["elapsed_s"] = round(time.perf_counter() - t_start, 2)
        metrics.log(**record)
        last = record
        bar.set_postfix({k: record[k] for k in postfix if k in record}, refresh=False)
        bar.update(1)
        if (ckpt_every and step % ckpt_every == 0) or finished(step):
            full = gather(model, optimizers) if sharded else None
            if rt.is_main:
                state = {name: obj.state_dict() for name, obj in stateful.items()}
                save_training_state(stage_dir, step, model, optimizers, {**state, **(meta or {})}, full=full)
            if rt.distributed:
                dist.barrier()
    bar.close()

    result = {**last, "seconds": round(time.perf_counter() - t_start, 2), **(summary or {})}
    weights = gather(model, [])[0] if sharded else None
    if rt.is_main:
        save_model(stage_dir, model, info, weights)
        atomic_write_json(done, result)
    if rt.distributed:
        dist.barrier()
    return result


def train(
    model: Transformer,
    loader,
    cfg: TrainConfig,
    stage_dir: Path,
    rt: Runtime,
    *,
    resume: bool = False,
    evaluate: Callable[[Transformer], dict] | None = None,
    info: dict | None = None,
    desc: str = "train",
    budget: Budget | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Run the budget's optimizer steps of next-token training and save the stage's model.

    `budget` (default: `batch_budget(cfg, ...)` for this world size) gives the micro-batch, the
    accumulation and the steps; `loader` yields this rank's micro-batches of that layout and has
    state_dict()/load_state_dict() so a resumed run sees exactly the batches an uninterrupted one
    would. `evaluate(model)` returns metrics to log every `eval_every` steps and at the end. Returns
    the final metrics.

    Under `cfg.time_budget` the steps are those that fit the seconds: each step's learning rate is
    set by the share of the budget its predecessors took (`clock`, seconds; the slowest process's
    under DDP, so every process stops at the same step), and the step foreseen to end nearest the
    budget runs at the final learning rate and ends the stage.
    """
    budget = budget or batch_budget(cfg, rt.world_size, model.num_params())
    if (loader.batch_size, loader.grad_accum) != (budget.micro_batch, budget.grad_accum):
        raise TrainingError(f"{desc}: the loader's micro-batch {loader.batch_size} x {loader.grad_accum} "
                            f"does not match the budget's {budget.micro_batch} x {budget.grad_accum}")
    steps, accum = budget.steps, budget.grad_accum
    model.to(rt.device).train()
    model.checkpoint_layers = cfg.activation_checkpointing
    sharded = cfg.fsdp and rt.distributed
    if sharded:
        from picochat.train.sharding import local_value, shard  # FSDP2 (torch >= 2.6) only when asked

        shard(model)  # before the optimizers, which then hold the shards
    optimizers = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.muon_lr, cfg.weight_decay, cfg.embedding_lr)
    train_model = torch.compile(model) if cfg.compile else model
    if rt.distributed and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(train_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    peak = measured_peak_flops(rt.device)
    flops_per_token = model.flops_per_token(cfg.seq_len)
    tokens_per_step = budget.tokens_per_step
    timed = cfg.time_budget > 0
    train_clock = TrainClock()

    def step_fn(step: int) -> dict:
        t0 = clock()
        last = is_last_step(train_clock, cfg.time_budget) if timed else step + 1 == steps
        progress = (1.0 if last else train_clock.seconds / cfg.time_budget) if timed else None
        lr_mult = lr_multiplier(step, cfg, steps, progress)
        set_lr(optimizers, lr_mult)
        loss_sum = 0.0
        for micro in range(accum):
            x, y = next(loader)
            x, y = x.to(rt.device, non_blocking=True), y.to(rt.device, non_blocking=True)
            sync = not rt.distributed or micro == accum - 1
            if sharded:  # reduce-scatter the gradients once, after the last micro-batch
                model.set_requires_gradient_sync(sync)
            with contextlib.nullcontext() if sync or sharded else train_model.no_sync(), autocast(rt, cfg.dtype):
                loss = train_model(x, targets=y) / accum
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
        if sharded:
            grad_norm = local_value(grad_norm)
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        if rt.distributed:
            dist.all_reduce(loss_sum, op=dist.ReduceOp.AVG)
        loss_value = loss_sum.item()
        if not math.isfinite(loss_value):
            raise TrainingError(f"{desc}: loss became {loss_value} at step {step + 1}; lower the learning rate")
        dt = clock() - t0
        record = {"loss": round(loss_value, 5), "lr_mult": round(lr_mult, 5),
                  "grad_norm": round(float(grad_norm), 4), "tokens": (step + 1) * tokens_per_step,
                  "tok_per_s": round(tokens_per_step / dt) if dt > 0 else 0}
        if timed:
            if rt.distributed:
                slowest = torch.tensor(dt, dtype=torch.float64, device=rt.device)
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
                dt = slowest.item()
            train_clock.seconds += dt
            train_clock.last_step_s, train_clock.finished = dt, last
            record["train_s"] = round(train_clock.seconds, 2)
            if last:
                record["flops"] = flops_per_token * record["tokens"]
        if peak:
            record["mfu"] = round(flops_per_token * tokens_per_step / dt / (peak * rt.world_size), 4)
        if evaluate and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last):
            record.update(evaluate(model))
        return record

    if timed:
        summary = {"params": model.num_params(), "time_budget": cfg.time_budget}  # tokens and flops: the last record's
        finished = lambda _: train_clock.finished  # noqa: E731
    else:
        summary = {"params": model.num_params(), "tokens": budget.tokens, "flops": flops_per_token * budget.tokens}
        finished = None
    return run_steps(stage_dir, model, optimizers, rt, steps, step_fn, resume=resume, ckpt_every=cfg.ckpt_every,
                     desc=desc, info=info, stateful={"loader": loader, **({"clock": train_clock} if timed else {})},
                     meta={"train_config": asdict(cfg), "budget": asdict(budget)}, summary=summary,
                     postfix=("loss", "tok_per_s", "train_s", "mfu", "val_bpb"), sharded=sharded, finished=finished)
