"""RL over seeds: the same SFT model trained with RL under several seeds, every report metric as
mean and spread, so that an RL setting is judged by what holds across seeds and not by one run.

Each seed gets its own run folder `<out>/seed-<N>/` whose `tokenizer/`, `world/` and `sft/` are
links to the source run's; RL writes `rl/` there and `picochat eval` its `rl/eval.json`. A seed
whose evaluation is already on disk is read, not rerun, so an interrupted sweep continues.

    python benchmarks/bench_rl_seeds.py --run runs/demo --seeds 0 1 2
    python benchmarks/bench_rl_seeds.py --run runs/demo --out runs/demo-noreplay --replay-coef 0

Any RL setting is a flag (`--lr`, `--steps`, `--replay-coef`, ...; default: the preset's). Prints a
table (metric, the SFT model, each seed, mean, standard deviation, min, the mean's change) and
writes it to `<out>/seeds.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

import torch

from picochat.config import RLConfig, add_dataclass_args, apply_overrides, get_preset
from picochat.evaluate import evaluate_stage
from picochat.report import cpu_model
from picochat.train.rl import run_rl

LINKED = ("tokenizer", "world", "sft")
METRICS = ("known_fact_qa", "seen_fact_qa", "known_fact_idk", "known_fact_wrong", "unknown_idk", "pass@1", "pass@k",
           "fact_completion", "fact_completion_train_phrasing")


def seed_run(source: Path, out: Path, seed: int) -> Path:
    """`<out>/seed-<seed>` with the source run's tokenizer, world and SFT model linked in."""
    folder = out / f"seed-{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    for name in LINKED:
        link = folder / name
        if not link.exists():
            link.symlink_to((source / name).resolve(), target_is_directory=True)
    return folder


def rl_figures(source: Path, out: Path, seed: int, cfg: RLConfig, preset: str, device: str,
               problems: list[str] | None = None) -> dict:
    """RL with `seed`, then its evaluation (both skipped when already on disk)."""
    folder = seed_run(source, out, seed)
    evaluation = folder / "rl" / "eval.json"
    if not evaluation.exists():
        if not (folder / "rl" / "done.json").exists():
            run_rl(folder, preset, dataclasses.replace(cfg, seed=seed), problems=problems, resume=True, device=device)
        evaluate_stage(folder, "rl", k=cfg.eval_k, n_problems=cfg.eval_problems, device=device)
    figures = json.loads(evaluation.read_text())
    figures["rl_seconds"] = json.loads((folder / "rl" / "done.json").read_text())["seconds"]
    return figures


def summarize(sft: dict, per_seed: dict[int, dict]) -> list[dict]:
    rows = []
    for metric in METRICS + ("rl_seconds",):
        values = [figures[metric] for figures in per_seed.values() if metric in figures]
        if len(values) != len(per_seed):
            continue
        mean = statistics.mean(values)
        rows.append({"metric": metric, "sft": sft.get(metric), "seeds": values, "mean": mean,
                     "std": statistics.pstdev(values), "min": min(values), "max": max(values),
                     "change": None if sft.get(metric) is None else mean - sft[metric]})
    return rows


def print_table(rows: list[dict], seeds: list[int]) -> None:
    fmt = lambda v: "–" if v is None else f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"  # noqa: E731
    print("| metric | sft | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std | min | max | change of mean |")
    print("| --- " * (len(seeds) + 7) + "|")
    for r in rows:
        print(f"| {r['metric']} | {fmt(r['sft'])} | " + " | ".join(fmt(v) for v in r["seeds"])
              + f" | {fmt(r['mean'])} | {fmt(r['std'])} | {fmt(r['min'])} | {fmt(r['max'])} | {fmt(r['change'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a run with tokenizer/, world/ and a finished sft/")
    parser.add_argument("--out", type=Path, default=None, help="folder of the seed runs (default: <run>-rl-seeds)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--problems", nargs="+", default=None, metavar="FILE[:WEIGHT]",
                        help="RL problems (default: the world's, as `picochat rl`)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core); 1 keeps a sweep steady on a shared machine")
    add_dataclass_args(parser, RLConfig)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = apply_overrides(get_preset(args.preset).rl, args)
    out = args.out or args.run.with_name(args.run.name + "-rl-seeds")
    sft_eval = args.run / "sft" / "eval.json"
    if not sft_eval.exists():
        evaluate_stage(args.run, "sft", k=cfg.eval_k, n_problems=cfg.eval_problems, device=args.device)
    sft = json.loads(sft_eval.read_text())
    per_seed = {seed: rl_figures(args.run, out, seed, cfg, args.preset, args.device, args.problems) for seed in args.seeds}
    rows = summarize(sft, per_seed)
    print(f"\nRL over seeds {args.seeds} from {args.run / 'sft'} on {cpu_model()}, {torch.get_num_threads()} threads; "
          f"lr {cfg.lr}, steps {cfg.steps}, replay_coef {cfg.replay_coef}\n")
    print_table(rows, args.seeds)
    (out / "seeds.json").write_text(json.dumps({"cpu": cpu_model(), "threads": torch.get_num_threads(), "rl_config": dataclasses.asdict(cfg),
                                                "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
