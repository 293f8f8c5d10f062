"""Supervised fine-tuning: the same training loop as pretraining, on conversations.

The base model is a document simulator; trained on conversations rendered in the chat protocol,
with loss only on the assistant's tokens, it becomes an assistant (the lecture's chapter 10).

    picochat sft --run runs/demo                             # the world's conversations and replayed documents
    picochat sft --run runs/x --data chats.jsonl:3 alpaca.json:1   # a weighted mixture of your files

By default the world's conversations are mixed with a shard of its pretraining documents, trained
on every token (replay): SFT rehearses what pretraining stored while it teaches the assistant's
manner and the word problems, instead of overwriting the facts it does not ask about.

Reads `<run>/base/` (or `--init`), writes `<run>/sft/`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from picochat.checkpoint import load_model
from picochat.config import TrainConfig, add_common_args, add_dataclass_args, apply_overrides, get_preset
from picochat.data.conversations import load_mixture
from picochat.data.loader import ConversationLoader
from picochat.run import Run
from picochat.tokenizer import Tokenizer
from picochat.train.budget import batch_budget
from picochat.train.loop import setup_runtime, teardown_runtime, train


def run_sft(run_dir: Path, preset: str = "cpu", cfg: TrainConfig | None = None, data: list[str] | None = None,
            init: Path | None = None, resume: bool = False, device: str = "auto") -> dict:
    run = Run(run_dir)
    cfg = cfg or get_preset(preset).sft
    data = data or [str(path) for path in run.world_sft_data]
    rt = setup_runtime(device)
    try:
        tok = Tokenizer.load(run.tokenizer)
        model, meta = load_model(Path(init) if init else run.stage("base"))
        if cfg.seq_len > model.config.max_seq_len:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {model.config.max_seq_len}")
        budget = batch_budget(cfg, rt.world_size, model.num_params())
        conversations = load_mixture(data, cfg.seed)
        loader = ConversationLoader(conversations, tok, batch_size=budget.micro_batch, seq_len=cfg.seq_len, rank=rt.rank,
                                    world_size=rt.world_size, seed=cfg.seed, show_progress=rt.is_main, grad_accum=budget.grad_accum)
        if rt.is_main:
            print(f"sft: {len(conversations):,} conversations from {', '.join(data)}; {loader.steps_in_epoch(0)} steps per epoch, "
                  f"{budget.horizon(cfg.time_budget)}, {budget.tokens_per_step:,} tokens per step")
        summary = train(model, loader, cfg, run.stage("sft"), rt, resume=resume, budget=budget,
                        info={"stage": "sft", "preset": preset, "tokenizer": tok.fingerprint, "data": data}, desc="sft")
        summary["conversations"] = loader.stats
        return summary
    finally:
        teardown_runtime(rt)


def register_cli(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--data", nargs="+", default=None,
                        help="conversation files (messages JSONL, ShareGPT or Alpaca) or documents ({\"text\"} JSONL, "
                             "trained on every token), each optionally PATH:WEIGHT for a weighted mixture (default: the "
                             "world's sft.jsonl and tasks-sft.jsonl, and docs/train-00000.jsonl replayed)")
    parser.add_argument("--init", default=None, help="model folder to start from (default: <run>/base)")
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    cfg = apply_overrides(get_preset(args.preset).sft, args)
    summary = run_sft(Path(args.run), args.preset, cfg, args.data, args.init, args.resume, args.device)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"sft: done, loss {summary.get('loss')} -> {Path(args.run) / 'sft'}")
