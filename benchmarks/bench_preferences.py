"""Preference tuning over seeds: from one SFT model, per seed, the labeler's pairs, the reward model,
DPO and RLHF, each judged against the SFT model; and RLHF run `--long` times longer to show the
reward model being gamed (its score still rising while the labeler's falls).

Each seed gets `<out>/seed-<N>/` with the source run's `tokenizer/`, `world/`, `index/` and `sft/`
linked in; the long RLHF run gets `<out>/seed-<N>-long/` with that seed's `prefs/` and `rm/` linked
too. A step whose output is on disk is read, not rerun, so an interrupted sweep continues.

    python benchmarks/bench_preferences.py --run runs/demo --seeds 0 1 2 --threads 1

Prints a table (metric, the SFT model, each seed, mean, standard deviation) and each stage's
seconds, writes `<out>/preferences.json` and `<out>/overoptimisation.png` (reward model's score and
labeler's score per step of the long runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from picochat.evaluate import evaluate_stage
from picochat.report import cpu_model
from picochat.train.dpo import DPOConfig, run_dpo
from picochat.train.rlhf import rlhf_config, run_rlhf
from picochat.train.rm import RMConfig, run_rm
from picochat.world.preferences import judge_stage, sample_pairs

LINKED = ("tokenizer", "world", "index", "sft")
EVAL_METRICS = ("known_fact_qa", "known_fact_wrong", "unknown_idk", "seen_fact_qa", "pass@1")


def linked_run(folder: Path, sources: dict[str, Path]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        link = folder / name
        if not link.exists() and source.exists():
            link.symlink_to(source.resolve(), target_is_directory=True)
    return folder


def timed(seconds: dict, name: str, done: Path, action) -> None:
    """Run `action` unless `done` exists; record its wall seconds."""
    if done.exists():
        return
    t0 = time.perf_counter()
    action()
    seconds[name] = round(time.perf_counter() - t0, 1)


def seed_figures(source: Path, out: Path, seed: int, preset: str, long: int, k: int, n_problems: int) -> dict:
    folder = linked_run(out / f"seed-{seed}", {name: source / name for name in LINKED})
    seconds_path = folder / "seconds.json"
    seconds = json.loads(seconds_path.read_text()) if seconds_path.exists() else {}
    cfg = dataclasses.replace(rlhf_config(preset), seed=seed)
    steps = [
        ("prefs", folder / "prefs" / "pairs-heldout.jsonl", lambda: sample_pairs(folder, seed=seed)),
        ("rm", folder / "rm" / "done.json", lambda: run_rm(folder, RMConfig(seed=seed), resume=True, device="cpu")),
        ("dpo", folder / "dpo" / "done.json", lambda: run_dpo(folder, DPOConfig(seed=seed), resume=True, device="cpu")),
        ("judge dpo", folder / "dpo" / "winrate.json", lambda: judge_stage(folder, "dpo")),
        ("rlhf", folder / "rlhf" / "done.json", lambda: run_rlhf(folder, preset, cfg, resume=True, device="cpu")),
        ("judge rlhf", folder / "rlhf" / "winrate.json", lambda: judge_stage(folder, "rlhf")),
        ("eval dpo", folder / "dpo" / "eval.json", lambda: evaluate_stage(folder, "dpo", k=k, n_problems=n_problems)),
        ("eval rlhf", folder / "rlhf" / "eval.json", lambda: evaluate_stage(folder, "rlhf", k=k, n_problems=n_problems)),
    ]
    for name, done, action in steps:
        timed(seconds, name, done, action)
        seconds_path.write_text(json.dumps(seconds, indent=1))
    figures = {"seconds": seconds, "rm_accuracy": json.loads((folder / "rm" / "done.json").read_text())["heldout_accuracy"]}
    for stage in ("dpo", "rlhf"):
        figures[f"{stage}_win_rate"] = json.loads((folder / stage / "winrate.json").read_text())["win_rate"]
        evaluation = json.loads((folder / stage / "eval.json").read_text())
        figures.update({f"{stage}_{m}": evaluation[m] for m in EVAL_METRICS})
    if long:
        long_folder = linked_run(out / f"seed-{seed}-long", {**{name: source / name for name in LINKED},
                                                             "prefs": folder / "prefs", "rm": folder / "rm"})
        long_cfg = dataclasses.replace(cfg, steps=cfg.steps * long, ckpt_every=cfg.steps)
        timed(seconds, f"rlhf x{long}", long_folder / "rlhf" / "done.json",
              lambda: run_rlhf(long_folder, preset, long_cfg, resume=True, device="cpu"))
        seconds_path.write_text(json.dumps(seconds, indent=1))
        records = [json.loads(line) for line in (long_folder / "rlhf" / "metrics.jsonl").read_text().splitlines()]
        figures["long"] = [{k: r[k] for k in ("step", "reward", "labeler_score", "kl", "response_len") if k in r} for r in records]
    return figures


def smoothed(values: list[float], window: int = 10) -> list[float]:
    return [statistics.mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def plot_long(per_seed: dict[int, dict], path: Path, window: int = 10) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    ax2 = ax.twinx()
    for figures in per_seed.values():
        records = figures.get("long", [])
        steps = [r["step"] for r in records]
        ax.plot(steps, smoothed([r["reward"] for r in records], window), color="tab:blue", lw=1, alpha=0.9)
        ax2.plot(steps, smoothed([r["labeler_score"] for r in records], window), color="tab:red", lw=1, alpha=0.9)
    ax.set_xlabel("RLHF step")
    ax.set_ylabel("reward model's score", color="tab:blue")
    ax2.set_ylabel("labeler's score", color="tab:red")
    ax.set_title(f"RLHF 4x longer: reward model vs labeler (mean of {window} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run with tokenizer/, world/, index/ and a finished sft/")
    parser.add_argument("--out", type=Path, default=None, help="folder of the seed runs (default: <run>-prefs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--long", type=int, default=4, help="the long RLHF run is this many times the preset's (0: none)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or args.run.with_name(args.run.name + "-prefs")
    rl = rlhf_config(args.preset)
    k, n_problems = rl.eval_k, 100
    sft_eval = args.run / "sft" / "eval.json"
    if not sft_eval.exists():
        evaluate_stage(args.run, "sft", k=k, n_problems=n_problems)
    sft = json.loads(sft_eval.read_text())
    per_seed = {seed: seed_figures(args.run, out, seed, args.preset, args.long, k, n_problems) for seed in args.seeds}
    metrics = ["rm_accuracy", "dpo_win_rate", "rlhf_win_rate"] + [f"{s}_{m}" for s in ("dpo", "rlhf") for m in EVAL_METRICS]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"
    print(f"\nPreference tuning over seeds {args.seeds} from {args.run / 'sft'} on {cpu_model()}, {torch.get_num_threads()} threads\n")
    print("| metric | sft | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean | std |")
    print("| --- " * (len(args.seeds) + 4) + "|")
    rows = []
    for metric in metrics:
        values = [per_seed[s][metric] for s in args.seeds]
        base = sft.get(metric.split("_", 1)[1]) if metric.startswith(("dpo_", "rlhf_")) and "win" not in metric else None
        rows.append({"metric": metric, "sft": base, "seeds": values, "mean": statistics.mean(values), "std": statistics.pstdev(values)})
        print(f"| {metric} | {fmt(base)} | " + " | ".join(fmt(v) for v in values) + f" | {fmt(rows[-1]['mean'])} | {fmt(rows[-1]['std'])} |")
    print("\nseconds per stage:")
    for seed in args.seeds:
        print(f"  seed {seed}: {per_seed[seed]['seconds']}")
    if args.long:
        plot_long(per_seed, out / "overoptimisation.png")
    (out / "preferences.json").write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "rows": rows,
                                                      "per_seed": per_seed}, indent=1))


if __name__ == "__main__":
    main()
