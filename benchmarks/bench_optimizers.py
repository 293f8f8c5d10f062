"""AdamW against Muon on the cpu preset: training loss at equal wall time and what the model learned.

Builds the cpu preset's world, tokenizer and shards once (in --workdir), then pretrains the cpu
preset's model from the same seed with each optimizer for its number of steps (pick them so the
wall times match: Muon's steps cost more). Reports, per optimizer: wall time, median tokens/s, the
training loss (mean of the 9 steps around) at fixed elapsed times, validation bits per byte, and
greedy fact completion on held-out and on training phrasings.

    python benchmarks/bench_optimizers.py                                  # adamw:500 muon:400
    python benchmarks/bench_optimizers.py --runs adamw:300 muon:240 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
from pathlib import Path

import torch

from picochat.checkpoint import load_model
from picochat.config import get_preset
from picochat.evaluate import fact_completion
from picochat.io import read_jsonl
from picochat.speedrun import stages
from picochat.tokenizer import Tokenizer
from picochat.train.pretrain import run_pretrain


def build_data(folder: Path) -> None:
    """The cpu preset's world, tokenizer and shards, made by the speedrun's own first three stages."""
    for _name, action, _is_done in stages("cpu", "cpu")[:3]:
        action(folder)


def train_one(data: Path, optimizer: str, steps: int) -> dict:
    run = data / f"{optimizer}-{steps}"
    run.mkdir()
    for part in ("world", "tokenizer", "shards"):
        (run / part).symlink_to(data / part)
    cfg = dataclasses.replace(get_preset("cpu").pretrain, optimizer=optimizer, max_steps=steps, eval_every=0, ckpt_every=0)
    run_pretrain(run, "cpu", cfg=cfg, device="cpu")
    rows = [json.loads(line) for line in (run / "base" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r and "elapsed_s" in r]
    model, _ = load_model(run / "base")
    tok = Tokenizer.load(run / "tokenizer")
    facts = read_jsonl(run / "world" / "eval" / "fact_completion.jsonl")
    return {
        "optimizer": optimizer, "steps": steps, "seconds": train_rows[-1]["elapsed_s"],
        "tok_per_s": statistics.median(r["tok_per_s"] for r in train_rows),
        "val_bpb": [r["val_bpb"] for r in rows if "val_bpb" in r][-1],
        "loss_at": {t: loss_at(train_rows, t) for t in (60, 120, 180, 240, 300)},
        "held_out": fact_completion(model, tok, facts, "heldout"),
        "train_phrasing": fact_completion(model, tok, facts, "train"),
    }


def loss_at(rows: list[dict], seconds: float) -> float | None:
    """Mean training loss of the 9 steps around the last step logged by `seconds` of training."""
    done = [i for i, r in enumerate(rows) if r["elapsed_s"] <= seconds]
    if not done or rows[-1]["elapsed_s"] < seconds:
        return None
    window = rows[max(0, done[-1] - 4): done[-1] + 5]
    return sum(r["loss"] for r in window) / len(window)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["adamw:500", "muon:400"], help="OPTIMIZER:STEPS to train, in order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--workdir", default=None, help="folder for the data and runs (default: a temporary one)")
    args = parser.parse_args()
    for spec in args.runs:
        optimizer, _, steps = spec.partition(":")
        if optimizer not in ("adamw", "muon") or not steps.isdigit() or int(steps) < 1:
            parser.error(f"--runs {spec!r}: expected OPTIMIZER:STEPS with OPTIMIZER adamw or muon, e.g. muon:400")
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.workdir or tmp)
        data.mkdir(parents=True, exist_ok=True)
        build_data(data)
        results = []
        for spec in args.runs:
            optimizer, _, steps = spec.partition(":")
            results.append(train_one(data, optimizer, int(steps)))
    times = (60, 120, 180, 240, 300)
    print("\n| optimizer | steps | seconds | tok/s (median) | " + " | ".join(f"loss @{t}s" for t in times)
          + " | val bpb | fact completion held-out / train phrasing |")
    print("|---" * (6 + len(times)) + "|")
    for r in results:
        losses = " | ".join("-" if r["loss_at"][t] is None else f"{r['loss_at'][t]:.3f}" for t in times)
        print(f"| {r['optimizer']} | {r['steps']} | {r['seconds']:.0f} | {r['tok_per_s']:,.0f} | {losses} | "
              f"{r['val_bpb']:.3f} | {r['held_out']:.1%} / {r['train_phrasing']:.1%} |")


if __name__ == "__main__":
    main()
