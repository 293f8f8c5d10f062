"""`picochat plan`: what a preset's pretraining will cost, printed before any money is spent.

    picochat plan --preset gpu-564m --gpus 1 8 --gpu H100          # parameters, tokens, steps, FLOPs, memory, hours
    picochat plan --preset gpu-564m --gpus 8 --shards runs/gpu/shards   # and the epochs over the data you have

For each number of GPUs: parameters with and without embeddings, the token budget (the same on any
number of GPUs, `picochat.train.budget`), the micro-batch and accumulation per GPU, training FLOPs
(6N per token plus attention), the data needed against the data present (epochs), memory per device
(weights, gradients, optimizer state, activations, logits) and hours at a stated MFU on a named GPU.
It warns, and exits 1, when the data would be read more than --max-epochs times or memory will not
fit the GPU.

The memory estimate counts what autograd keeps per layer per token for this Transformer (float32
on CPU; under bf16 autocast the matmul outputs take 2 bytes), with the chunked loss's one chunk of
logits; BENCHMARKS.md compares it with measured peaks on CPU.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from picochat.config import Preset, TrainConfig, add_dataclass_args, apply_overrides, get_preset
from picochat.model import LOSS_CHUNK_ELEMENTS, ModelConfig, Transformer
from picochat.train.budget import Budget, batch_budget

# Dense bf16 peak FLOP/s (SXM parts, without sparsity) and memory in bytes.
GPUS = {"H100": (989e12, 80e9), "H200": (989e12, 141e9), "A100": (312e12, 80e9)}
DEFAULT_MFU = 0.4
DEFAULT_MAX_EPOCHS = 4.0


@dataclass
class Plan:
    preset: str
    world_size: int
    gpu: str
    mfu: float
    params: int
    params_no_embeddings: int
    budget: Budget
    flops: float
    hours: float
    memory: dict[str, float]  # bytes per device by part, and "total"
    data_tokens: int | None  # training tokens present in the shards, when given
    warnings: list[str]

    @property
    def epochs(self) -> float | None:
        return self.budget.tokens / self.data_tokens if self.data_tokens else None


def build_meta_model(config: ModelConfig) -> Transformer:
    """The model on the meta device: its shapes and counts, no memory."""
    with torch.device("meta"):
        return Transformer(config)


def model_config(preset: Preset, seq_len: int, overrides: dict | None = None) -> ModelConfig:
    fields = {**preset.model, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    fields["max_seq_len"] = max(fields.get("max_seq_len", seq_len), seq_len)
    return ModelConfig(vocab_size=preset.vocab_size, **fields)


def memory_per_device(config: ModelConfig, cfg: TrainConfig, budget: Budget, params: int, muon_params: int,
                      device: str = "cuda") -> dict[str, float]:
    """Bytes per device during training (see the module docstring). Under FSDP the weights,
    gradients and optimizer state are divided over the processes; under DDP the gradient buckets
    add one more float32 copy of the gradients. On the CPU, attention with grouped-query heads runs
    PyTorch's math kernel, which keeps the (heads x T x T) attention weights twice per layer; CUDA's
    flash kernels keep none."""
    shards = budget.world_size if cfg.fsdp and budget.world_size > 1 else 1
    adamw_params = params - muon_params if cfg.optimizer == "muon" else params
    muon_params = muon_params if cfg.optimizer == "muon" else 0
    memory = {"weights": 4 * params / shards, "gradients": 4 * params / shards,
              "optimizer": (8 * adamw_params + 4 * muon_params) / shards}
    if budget.world_size > 1 and not cfg.fsdp:
        memory["gradients"] += 4 * params  # DDP's gradient buckets
    d, f, kv = config.d_model, config.ffn_hidden, config.n_kv_head * config.head_dim
    q = config.n_head * config.head_dim
    tokens = budget.micro_batch * cfg.seq_len
    # Kept per layer per token: two norm inputs and outputs (4d), q/k/v projections (q + 2kv), q and k
    # after RoPE (q + kv, k and v repeated to the query heads for attention: 2q), the attention output
    # and its reshaped copy (2q), the MLP's gate, activation, up and product (4f).
    elements = 4 * d + 4 * q + 3 * kv + 2 * q + 4 * f
    low = 2 if cfg.dtype == "bfloat16" else 4  # bytes of a matmul output
    per_layer = tokens * (elements * low + (4 * d * 4 if cfg.dtype == "bfloat16" else 0))  # float32 norm copies under autocast
    if cfg.activation_checkpointing:
        memory["activations"] = tokens * d * 4 * config.n_layer + per_layer  # layer inputs, and one layer recomputed
    else:
        memory["activations"] = per_layer * config.n_layer
    memory["activations"] += tokens * d * 4 * 3  # embeddings out, final norm in and out
    if device == "cpu" and config.n_kv_head != config.n_head:
        memory["activations"] += 2 * 4 * budget.micro_batch * config.n_head * cfg.seq_len**2 * config.n_layer
    chunk = min(tokens, max(1, LOSS_CHUNK_ELEMENTS // config.vocab_size))
    memory["logits"] = chunk * config.vocab_size * 4 * 3  # float32 logits, their softmax and gradient, one chunk
    memory["total"] = sum(memory.values())
    return memory


def make_plan(preset_name: str, cfg: TrainConfig, world_size: int, gpu: str = "H100", mfu: float = DEFAULT_MFU,
              model_overrides: dict | None = None, data_tokens: int | None = None,
              max_epochs: float = DEFAULT_MAX_EPOCHS, device: str = "cuda") -> Plan:
    if gpu not in GPUS:
        raise ValueError(f"unknown GPU {gpu!r}; choose one of {', '.join(GPUS)}")
    if not 0 < mfu <= 1:
        raise ValueError(f"--mfu must be in (0, 1], got {mfu}")
    config = model_config(get_preset(preset_name), cfg.seq_len, model_overrides)
    model = build_meta_model(config)
    params = model.num_params()
    params_no_embeddings = params - model.model.embed_tokens.weight.numel() - (0 if config.tie_embeddings else model.lm_head.weight.numel())
    muon_params = sum(p.numel() for name, p in model.named_parameters()
                      if p.ndim == 2 and "embed_tokens" not in name and "lm_head" not in name)
    budget = batch_budget(cfg, world_size, params)
    flops = float(model.flops_per_token(cfg.seq_len)) * budget.tokens
    peak, device_memory = GPUS[gpu]
    memory = memory_per_device(config, cfg, budget, params, muon_params, device)
    warnings = []
    if data_tokens is not None and budget.tokens > max_epochs * data_tokens:
        warnings.append(f"the data would be read {budget.tokens / data_tokens:.1f} times (more than --max-epochs "
                        f"{max_epochs:g}): get more data or shorten the horizon")
    if memory["total"] > device_memory:
        warnings.append(f"about {memory['total'] / 1e9:.0f} GB per device does not fit a {gpu}'s {device_memory / 1e9:.0f} GB: "
                        "lower --batch-size, or add --activation-checkpointing or --fsdp")
    return Plan(preset_name, world_size, gpu, mfu, params, params_no_embeddings, budget, flops,
                flops / (peak * mfu * world_size) / 3600, memory, data_tokens, warnings)


def format_plan(plan: Plan) -> str:
    b = plan.budget
    gb = lambda n: f"{n / 1e9:.2f} GB"  # noqa: E731
    lines = [
        f"{plan.preset} on {plan.world_size} x {plan.gpu}",
        f"  parameters      {plan.params / 1e6:,.1f}M ({plan.params_no_embeddings / 1e6:,.1f}M without embeddings)",
        f"  tokens          {b.tokens / 1e9:,.3f}B = {b.steps:,} steps x {b.tokens_per_step:,} tokens "
        f"({b.tokens / plan.params:.1f} per parameter)",
        f"  per GPU         micro-batch {b.micro_batch} x {b.seq_len} tokens, {b.grad_accum} accumulated",
        f"  FLOPs           {plan.flops:.3g} (6N per token + attention)",
    ]
    if plan.data_tokens is not None:
        lines.append(f"  data            {b.tokens / 1e9:,.3f}B needed, {plan.data_tokens / 1e9:,.3f}B present: {plan.epochs:.2f} epochs")
    parts = ", ".join(f"{name} {gb(value)}" for name, value in plan.memory.items() if name != "total")
    lines.append(f"  memory/GPU      {gb(plan.memory['total'])} ({parts})")
    lines.append(f"  time            {plan.hours:,.2f} hours at {plan.mfu:.0%} MFU ({plan.hours * plan.world_size:,.1f} GPU-hours)")
    lines += [f"  WARNING: {w}" for w in plan.warnings]
    return "\n".join(lines)


def train_tokens(shards: Path) -> int:
    from picochat.data.shards import read_manifest, split_summary

    return int(split_summary(read_manifest(shards), shards, "train")["tokens"])


MODEL_FLAGS = ("n_layer", "d_model", "n_head", "n_kv_head")


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="cpu", help="named preset (default cpu)")
    parser.add_argument("--stage", default="pretrain", choices=("pretrain", "sft"), help="the stage to plan (default pretrain)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[1, 8], metavar="N", help="numbers of GPUs to plan for (default 1 8)")
    parser.add_argument("--gpu", default="H100", choices=sorted(GPUS), help="GPU model: its bf16 peak and memory (default H100)")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"model FLOPs utilization assumed (default {DEFAULT_MFU})")
    parser.add_argument("--shards", type=Path, default=None, help="token shards folder: compare the data needed with the data present")
    parser.add_argument("--max-epochs", type=float, default=DEFAULT_MAX_EPOCHS,
                        help=f"warn when the data would be read more times than this (default {DEFAULT_MAX_EPOCHS:g})")
    group = parser.add_argument_group("model shape overrides (default: the preset's)")
    for name in MODEL_FLAGS:
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> int:
    cfg = apply_overrides(getattr(get_preset(args.preset), args.stage), args)
    data = train_tokens(args.shards) if args.shards else None
    overrides = {name: getattr(args, name) for name in MODEL_FLAGS}
    plans = [make_plan(args.preset, cfg, n, args.gpu, args.mfu, overrides, data, args.max_epochs) for n in args.gpus]
    print("\n\n".join(format_plan(p) for p in plans))
    return 1 if any(p.warnings for p in plans) else 0
