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
from picochat.config import TrainConfig, add_dataclass_args, apply_overrides, get_preset
from picochat.data.conversations import ConversationLoader, mix, read_conversations
from picochat.tokenizer import Tokenizer
from picochat.train.common import setup_runtime, teardown_runtime, train
from picochat.train.pretrain import add_common_args


WORLD_SFT_FILES = ("sft.jsonl", "tasks-sft.jsonl")  # world conversations, then worked word problems
# The first shard of the world's pretraining documents (1 MB, 3,400 documents, on the cpu preset). On
# the cpu preset, 200 steps without it took known-fact QA to 63% and fact completion to 76%; with it,
# 76% and 95% (BENCHMARKS.md).
WORLD_REPLAY_FILE = "docs/train-00000.jsonl"


def world_sft_data(run_dir: Path) -> list[str]:
    """The world's SFT files in `run_dir`: its conversations, word problems and replayed documents."""
    return [str(Path(run_dir) / "world" / name) for name in WORLD_SFT_FILES + (WORLD_REPLAY_FILE,)]


def parse_data_spec(spec: str) -> tuple[Path, float | None]:
    """`path` or `path:weight` -> (path, weight or None when not given)."""
    path, sep, weight = spec.rpartition(":")
    try:
        value = float(weight) if sep else None
    except ValueError:  # a colon that is part of the path
        return Path(spec), None
    if value is not None and value <= 0:
        raise ValueError(f"{spec}: a mixture weight must be positive")
    return Path(path if sep else spec), value


def load_mixture(specs: list[str], seed: int) -> list[dict]:
    """Read each dataset. Without weights they are simply concatenated; with weights, a mixture as
    large as all of them together is drawn, each dataset's share set by its weight."""
    datasets = []
    for spec in specs:
        path, weight = parse_data_spec(spec)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such conversation file")
        datasets.append((list(read_conversations(path)), weight))
    if all(weight is None for _, weight in datasets):
        return [conversation for items, _ in datasets for conversation in items]
    weighted = [(items, 1.0 if weight is None else weight) for items, weight in datasets]
    return mix(weighted, n=sum(len(items) for items, _ in weighted), seed=seed)


def run_sft(run_dir: Path, preset: str = "cpu", cfg: TrainConfig | None = None, data: list[str] | None = None,
            init: Path | None = None, resume: bool = False, device: str = "auto") -> dict:
    run_dir = Path(run_dir)
    cfg = cfg or get_preset(preset).sft
    data = data or world_sft_data(run_dir)
    rt = setup_runtime(device)
    try:
        tok = Tokenizer.load(run_dir / "tokenizer")
        model, meta = load_model(Path(init) if init else run_dir / "base")
        if cfg.seq_len > model.config.max_seq_len:
            raise ValueError(f"--seq-len {cfg.seq_len} exceeds the model's context of {model.config.max_seq_len}")
        conversations = load_mixture(data, cfg.seed)
        loader = ConversationLoader(conversations, tok, batch_size=cfg.batch_size, seq_len=cfg.seq_len, rank=rt.rank,
                                    world_size=rt.world_size, seed=cfg.seed, show_progress=rt.is_main)
        if rt.is_main:
            print(f"sft: {len(conversations):,} conversations from {', '.join(data)}; {loader.steps_in_epoch(0)} steps per epoch, {cfg.max_steps} steps")
        summary = train(model, loader, cfg, run_dir / "sft", rt, resume=resume,
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
