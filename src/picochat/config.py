"""Training configuration and the named presets (cpu, cpu-text, gpu-135m, gpu-564m: the GPU ones named by parameter count).

A preset fixes the model's shape and each stage's hyperparameters. Every field can be overridden on
the command line: `add_dataclass_args` turns each field of a dataclass into a `--flag`.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any


def knob(default, help: str, choices: tuple | None = None):
    """A dataclass field whose help text becomes the `--flag`'s help; with `choices`, the flag refuses
    any other value before anything runs."""
    return field(default=default, metadata={"help": help, "choices": choices})


DTYPES = ("float32", "bfloat16", "auto")  # the training precisions (`train.loop.autocast`)


@dataclass
class TrainConfig:
    """Hyperparameters of one training stage (pretraining or SFT)."""

    batch_size: int = knob(16, "largest micro-batch per process, in sequences (a memory knob: gradients accumulate "
                               "over micro-batches up to the global batch)")
    seq_len: int = knob(256, "tokens per sequence")
    total_batch_tokens: int = knob(4096, "global batch: tokens per optimizer step over all processes, the same on 1 or "
                                         "8 GPUs (accumulation = this / (batch-size x seq-len x processes))")
    max_steps: int = knob(1000, "horizon in optimizer steps (one of --max-steps, --max-tokens, --tokens-per-param)")
    max_tokens: int = knob(0, "horizon in training tokens (steps = this / total-batch-tokens, rounded up)")
    tokens_per_param: float = knob(0.0, "horizon as tokens per model parameter (20 is Chinchilla's compute-optimal ratio)")
    time_budget: float = knob(0.0, "wall-clock budget in seconds of training steps (0: off). When set it replaces the "
                                   "step/token horizon: training ends when the steps have taken this long, and the "
                                   "learning-rate decay is laid out over the seconds, not over steps (warmup stays in "
                                   "steps); evaluations and checkpoint writes do not count against it")
    optimizer: str = knob("adamw", "adamw, or muon (Muon for the hidden matrices, AdamW for embeddings, head and norms)",
                          choices=("adamw", "muon"))
    lr: float = knob(3e-3, "AdamW peak learning rate")
    muon_lr: float = knob(0.02, "Muon peak learning rate (hidden matrices)")
    embedding_lr: float = knob(0.0, "AdamW peak learning rate of the input embeddings when they are untied from the "
                                    "head (--no-tie-embeddings); 0: --lr")
    weight_decay: float = knob(0.0, "decoupled weight decay of the matrices")
    warmup_steps: int = knob(20, "steps of linear learning-rate warmup")
    decay_frac: float = knob(0.4, "share of the steps, at the end, over which the learning rate decays linearly")
    final_lr_frac: float = knob(0.05, "learning rate at the last step, as a fraction of the peak")
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)")
    eval_every: int = knob(200, "steps between validation evaluations (0: only at the end)")
    eval_batches: int = knob(16, "validation batches per evaluation")
    ckpt_every: int = knob(200, "steps between checkpoints (0: only at the end)")
    dtype: str = knob("float32", "float32, bfloat16 (autocast; fast on GPUs, slow on CPUs without bf16 units), "
                                   "or auto (bfloat16 where the device computes it natively)", choices=DTYPES)
    compile: bool = knob(False, "torch.compile the model")
    fsdp: bool = knob(False, "under torchrun, shard weights, gradients and optimizer state over the processes (FSDP2) "
                             "instead of replicating them (DDP): for models whose training state does not fit one device")
    activation_checkpointing: bool = knob(False, "recompute each layer's activations in the backward pass instead of "
                                                 "keeping them: less memory, about a third more compute")
    seed: int = knob(0, "seed of the initial weights and the data order")


@dataclass
class RLConfig:
    """Hyperparameters of reinforcement learning on verifiable problems."""

    steps: int = knob(60, "RL steps (one batch of sampled problems each)")
    problems_per_step: int = knob(8, "problems sampled together each step")
    group_size: int = knob(8, "completions sampled per problem")
    max_new_tokens: int = knob(96, "longest sampled reply; a reply cut off here has no answer line (reward 0)")
    temperature: float = knob(1.0, "sampling temperature of the rollouts")
    lr: float = knob(5e-5, "AdamW learning rate, constant")
    weight_decay: float = knob(0.0, "decoupled weight decay")
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)")
    micro_batch: int = knob(64, "sequences per forward/backward (gradients accumulate over a step's batch)")
    normalize_std: bool = knob(False, "divide advantages by the group's standard deviation")
    kl_coef: float = knob(0.0, "KL penalty to the starting (SFT) model (0: off)")
    clip_eps: float = knob(0.0, "PPO-style ratio clipping (0: off, plain on-policy policy gradient)")
    ppo_epochs: int = knob(1, "optimizer steps per batch of samples (>1 reuses them, with clip_eps)")
    eval_problems: int = knob(200, "held-out problems for pass@1 / pass@k")
    eval_k: int = knob(8, "samples per problem for pass@k")
    eval_every: int = knob(0, "steps between held-out evaluations (0: only at the end)")
    ckpt_every: int = knob(20, "steps between checkpoints (0: only at the end)")
    replay_coef: float = knob(0.0, "weight of the SFT loss on replayed conversations and documents, added to every "
                                   "step's policy loss (0: off); keeps what the SFT model knew while RL sharpens problem solving")
    replay_batch: int = knob(8, "replayed rows (of the model's context length) per step, with replay_coef")
    dtype: str = knob("float32", "float32, bfloat16 (autocast) or auto (bfloat16 where native) for the "
                                   "policy-gradient forward/backward", choices=DTYPES)
    seed: int = knob(0, "seed of problem order, sampling and the replayed rows")


@dataclass
class Preset:
    model: dict[str, Any]
    vocab_size: int
    world_mb: float  # megabytes of synthetic-world documents to generate
    pretrain: TrainConfig
    sft: TrainConfig
    rl: RLConfig = field(default_factory=RLConfig)
    # Entities in the world relative to its full size (212). Fewer entities means more tokens per
    # fact: the cpu preset's ~1M pretraining tokens teach a quarter-size world's facts, not a full one's.
    world_scale: float = 1.0


PRESETS: dict[str, Preset] = {
    # Two laptop CPU cores, ~7 minutes of pretraining on the synthetic world.
    "cpu": Preset(
        model=dict(n_layer=4, d_model=256, n_head=4, n_kv_head=2, max_seq_len=256, tie_embeddings=True),
        vocab_size=2048,
        world_mb=4,
        world_scale=0.25,
        # Muon: more facts learnt than AdamW in the same wall time (BENCHMARKS.md). 900 steps, a little
        # over one pass over 4 MB: at 400 the base model could not copy a name it never saw from its
        # context, which persona names, search queries and the calculator's operands all need
        # (BENCHMARKS.md, "Copying"). Every stage in bfloat16 where the CPU has it ("auto"): a training
        # step 1.4x faster on AVX512-BF16, and 900 bf16 steps reach 800 float32 steps' held-out bits per
        # byte in 80% of their time (BENCHMARKS.md, "training in bfloat16"); float32 on other CPUs.
        pretrain=TrainConfig(batch_size=8, seq_len=256, total_batch_tokens=2048, max_steps=900, optimizer="muon", lr=3e-3, warmup_steps=20, eval_every=100, eval_batches=8, ckpt_every=50, dtype="auto"),
        # SFT: one pass over the world's mixture (conversations, word problems with and without the
        # calculator, answers from search, replayed documents), ~780k tokens.
        sft=TrainConfig(batch_size=8, seq_len=256, total_batch_tokens=2048, max_steps=380, lr=1e-3, warmup_steps=10, eval_every=0, ckpt_every=50, dtype="auto"),
        # RL: 32 problems x 8 samples a step (a quarter of them questions about facts), ~3 minutes in all
        # on 2 cores; fewer problems a step made the noisy early steps undo the SFT model (BENCHMARKS.md).
        # 40 steps, not 100: the demo's minutes went to pretraining, which gained more (BENCHMARKS.md, "Copying").
        # Replies with a calculator call per step need up to ~120 tokens. The SFT loss on 8 rows of the SFT
        # mixture a step (replay, InstructGPT's PPO-ptx): without it, RL on a base model that copies (copying
        # practice) took harmful requests refused from 91% after SFT to 64% (BENCHMARKS.md, "Copying practice").
        rl=RLConfig(steps=40, problems_per_step=32, group_size=8, max_new_tokens=128, lr=1e-4, ckpt_every=20,
                    eval_problems=100, eval_k=8, dtype="auto", replay_coef=1.0),
    ),
    # The cpu preset's model and stages for real text (BENCHMARKS.md, "Pretraining that learns more per second"):
    # a 4,096-token BPE, untied input embeddings with an AdamW rate of their own, and a longer decay.
    # `picochat pretrain --preset cpu-text --time-budget 600` trains it for 10 minutes.
    "cpu-text": Preset(
        model=dict(n_layer=4, d_model=256, n_head=4, n_kv_head=2, max_seq_len=256, tie_embeddings=False),
        vocab_size=4096,
        world_mb=2,
        world_scale=0.25,
        pretrain=TrainConfig(batch_size=8, seq_len=256, total_batch_tokens=2048, max_steps=1200, optimizer="muon", lr=3e-3,
                             embedding_lr=0.2, warmup_steps=20, decay_frac=0.65, eval_every=200, eval_batches=8, ckpt_every=100),
        sft=TrainConfig(batch_size=8, seq_len=256, total_batch_tokens=2048, max_steps=380, lr=1e-3, warmup_steps=10, eval_every=0, ckpt_every=50),
        rl=RLConfig(steps=100, problems_per_step=32, group_size=8, max_new_tokens=128, lr=1e-4, ckpt_every=20,
                    eval_problems=100, eval_k=8),
    ),
    # 135M parameters (85M without embeddings; nanochat's d12 shape), 2.7B tokens (20 per parameter),
    # 0.5M tokens a step on any number of GPUs; `picochat plan --preset gpu-135m` for time and memory.
    "gpu-135m": Preset(
        model=dict(n_layer=12, d_model=768, n_head=6, n_kv_head=6, max_seq_len=2048, tie_embeddings=False),
        vocab_size=32768,
        world_mb=200,
        pretrain=TrainConfig(batch_size=32, seq_len=2048, total_batch_tokens=524288, max_steps=0, tokens_per_param=20, optimizer="muon", lr=3e-3, warmup_steps=100, weight_decay=0.0, eval_every=250, ckpt_every=500, dtype="bfloat16", compile=True),
        sft=TrainConfig(batch_size=16, seq_len=2048, total_batch_tokens=32768, max_steps=1000, lr=3e-4, warmup_steps=20, eval_every=0, ckpt_every=250, dtype="bfloat16", compile=True),
        rl=RLConfig(steps=300, problems_per_step=32, group_size=16, max_new_tokens=256, lr=1e-5, dtype="bfloat16"),
    ),
    # 564M parameters (397M without embeddings; nanochat's d20 shape), 11.3B tokens (20 per parameter);
    # micro-batch 16, which the plan estimates to fit an 80 GB GPU (32 would not).
    "gpu-564m": Preset(
        model=dict(n_layer=20, d_model=1280, n_head=10, n_kv_head=10, max_seq_len=2048, tie_embeddings=False),
        vocab_size=65536,
        world_mb=200,
        pretrain=TrainConfig(batch_size=16, seq_len=2048, total_batch_tokens=524288, max_steps=0, tokens_per_param=20, optimizer="muon", lr=3e-3, warmup_steps=200, eval_every=500, ckpt_every=1000, dtype="bfloat16", compile=True),
        sft=TrainConfig(batch_size=16, seq_len=2048, total_batch_tokens=32768, max_steps=2000, lr=2e-4, warmup_steps=50, eval_every=0, ckpt_every=500, dtype="bfloat16", compile=True),
        rl=RLConfig(steps=500, problems_per_step=32, group_size=16, max_new_tokens=512, lr=5e-6, micro_batch=32, dtype="bfloat16"),
    ),
}


# The names the presets had before they were named by size; runs and scripts may still use them.
ALIASES = {"gpu-small": "gpu-135m", "gpu-d20": "gpu-564m"}


def get_preset(name: str) -> Preset:
    name = ALIASES.get(name, name)
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)} (or the old names {', '.join(ALIASES)})")
    return PRESETS[name]


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """Add `--<prefix><field-name>` for each field; defaults are None, meaning 'keep the preset's'."""
    group = parser.add_argument_group(f"{cls.__name__} overrides (default: the preset's value)")
    for f in dataclasses.fields(cls):
        flag = "--" + prefix + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f.metadata.get("help"))
        else:
            kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" ")[0], str)
            group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=kind, default=None, metavar=str(f.type).upper(),
                               choices=f.metadata.get("choices"), help=f.metadata.get("help"))


HORIZON = ("max_steps", "max_tokens", "tokens_per_param")  # a TrainConfig sets exactly one


def apply_overrides(config, args: argparse.Namespace, prefix: str = ""):
    """A copy of `config` with every field given on the command line replaced. A horizon given on the
    command line (--max-steps, --max-tokens, --tokens-per-param) replaces the preset's, whichever it was."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(args, prefix.replace("-", "_") + f.name, None)
        if value is not None:
            changes[f.name] = value
    if isinstance(config, TrainConfig) and any(name in changes for name in HORIZON):
        changes = {**{name: type(getattr(config, name))(0) for name in HORIZON}, **changes}
    return dataclasses.replace(config, **changes)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every training stage takes: --run, --preset, --resume, --device."""
    parser.add_argument("--run", required=True, help="run folder (holds tokenizer/, shards/, and the stages' outputs)")
    parser.add_argument("--preset", default="cpu", help="named preset: cpu, cpu-text (real text), gpu-135m, gpu-564m (default cpu); "
                                                        "`picochat plan --preset NAME` shows what it costs")
    parser.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (default: cuda when available)")
