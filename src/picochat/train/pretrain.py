"""Pretraining: next-token prediction on token shards turns a random Transformer into a base model.

    picochat pretrain --run runs/demo --preset cpu            # reads runs/demo/{tokenizer,shards}
    torchrun --standalone --nproc_per_node=8 -m picochat -- pretrain --run runs/big --preset gpu-135m   # "--": see README

Writes `runs/<name>/base/` (see picochat.checkpoint for the layout).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from picochat.config import TrainConfig, add_common_args, add_dataclass_args, apply_overrides, get_preset
from picochat.data.loader import ShardLoader, iter_val_batches
from picochat.data.shards import read_manifest
from picochat.model import ModelConfig, Transformer
from picochat.run import Run
from picochat.tokenizer import Tokenizer, token_byte_lengths
from picochat.train.budget import batch_budget
from picochat.train.loop import evaluate_loss, setup_runtime, teardown_runtime, train

MODEL_FLAGS = ("n_layer", "d_model", "n_head", "n_kv_head")


def model_config_for(preset_model: dict, vocab_size: int, seq_len: int, overrides: dict) -> ModelConfig:
    fields = {**preset_model, **{k: v for k, v in overrides.items() if v is not None}}
    fields["max_seq_len"] = max(fields.get("max_seq_len", seq_len), seq_len)
    return ModelConfig(vocab_size=vocab_size, **fields)


def run_pretrain(run_dir: Path, preset: str = "cpu", cfg: TrainConfig | None = None, model_overrides: dict | None = None,
                 shards_dir: Path | None = None, resume: bool = False, device: str = "auto") -> dict:
    run = Run(run_dir)
    shards_dir = Path(shards_dir) if shards_dir else run.shards
    p = get_preset(preset)
    cfg = cfg or p.pretrain
    rt = setup_runtime(device)
    try:
        tok = Tokenizer.load(run.tokenizer)
        manifest = read_manifest(shards_dir)
        if manifest["tokenizer_fingerprint"] != tok.fingerprint:
            raise ValueError(f"{shards_dir}: shards were made with another tokenizer than {run.tokenizer}")
        config = model_config_for(p.model, tok.vocab_size, cfg.seq_len, model_overrides or {})
        torch.manual_seed(cfg.seed)
        model = Transformer(config)
        model.init_weights(cfg.seed)
        budget = batch_budget(cfg, rt.world_size, model.num_params())
        if rt.is_main:
            print(f"pretrain: {model.num_params() / 1e6:.2f}M parameters, {config.n_layer} layers x {config.d_model}, "
                  f"{budget.tokens_per_step:,} tokens per step ({rt.world_size} x {budget.micro_batch} x {cfg.seq_len} x "
                  f"{budget.grad_accum} accumulated), {budget.horizon(cfg.time_budget)}, device {rt.device}")
        loader = ShardLoader(shards_dir, split="train", batch_size=budget.micro_batch, seq_len=cfg.seq_len, rank=rt.rank,
                             world_size=rt.world_size, seed=cfg.seed, grad_accum=budget.grad_accum)
        token_bytes = torch.tensor(token_byte_lengths(tok), dtype=torch.float32)

        def evaluate(m: Transformer) -> dict:
            batches = iter_val_batches(shards_dir, batch_size=cfg.batch_size, seq_len=cfg.seq_len, max_batches=cfg.eval_batches, rank=rt.rank, world_size=rt.world_size)
            return evaluate_loss(m, batches, rt, cfg.dtype, token_bytes)

        return train(model, loader, cfg, run.stage("base"), rt, resume=resume, evaluate=evaluate, budget=budget,
                     info={"stage": "base", "preset": preset, "tokenizer": tok.fingerprint}, desc="pretrain")
    finally:
        teardown_runtime(rt)


def register_cli(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--shards", default=None, help="token shards folder (default: <run>/shards)")
    group = parser.add_argument_group("model shape overrides (default: the preset's)")
    for name in MODEL_FLAGS:
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=int, default=None)
    group.add_argument("--tie-embeddings", action=argparse.BooleanOptionalAction, default=None,
                       help="share one matrix between the input embeddings and the output head (--no-tie-embeddings: "
                            "two, which costs vocab x d-model parameters and learns faster on real text, BENCHMARKS.md)")
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    cfg = apply_overrides(get_preset(args.preset).pretrain, args)
    overrides = {name: getattr(args, name) for name in (*MODEL_FLAGS, "tie_embeddings")}
    summary = run_pretrain(Path(args.run), args.preset, cfg, overrides, args.shards, args.resume, args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        shown = {k: summary[k] for k in ("loss", "val_bpb", "seconds") if k in summary}
        print(f"pretrain: done {shown} -> {Path(args.run) / 'base'}")
