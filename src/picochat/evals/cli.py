"""`picochat eval --suite core|chat` and `picochat eval --bpb FILE...`: the options `picochat eval`
gains, and running them on a run's stage or a Hugging Face folder.

    picochat eval --run runs/demo --stage base --suite core --limit 200   # -> runs/demo/base/eval-core.json
    picochat eval --run runs/demo --stage sft --suite chat                # -> runs/demo/sft/eval-chat.json
    picochat eval --run runs/demo --stage base --bpb held-out.jsonl.gz    # -> runs/demo/base/eval-bpb.json
    picochat eval --hf exports/demo-sft --suite core chat --out demo-sft.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from picochat.io import atomic_write_json

SUITES = ("core", "chat")
SHARED_TASKS = Path("../shared/data/eval")  # the folder beside a clone of the repository, when present
SHARED_GSM8K = Path("../shared/data/gsm8k/test.jsonl")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("real benchmarks (--suite, --bpb; on --run/--stage or --hf)")
    group.add_argument("--suite", nargs="+", choices=SUITES, default=None,
                       help="core: few-shot multiple choice, Winogrande and LAMBADA scored by log-likelihood "
                            "(a CORE-like score); chat: ARC and GSM8K asked as chat questions, plus the world's chat sets")
    group.add_argument("--bpb", nargs="+", type=Path, default=None, metavar="FILE",
                       help="bits per byte on held-out documents (text, JSONL, parquet, gzip; folders too)")
    group.add_argument("--hf", type=Path, default=None, metavar="FOLDER",
                       help="evaluate a Hugging Face Qwen3 folder instead of a run's stage")
    group.add_argument("--tasks-dir", type=Path, default=None, metavar="DIR",
                       help=f"task files in llm-foundry's layout, and optionally tasks.json (default {SHARED_TASKS} "
                            "when present)")
    group.add_argument("--tasks", nargs="+", default=None, metavar="NAME", help="only these tasks of the core suite")
    group.add_argument("--gsm8k", type=Path, default=None, metavar="FILE",
                       help=f"GSM8K test file for the chat suite (default {SHARED_GSM8K} when present)")
    group.add_argument("--limit", type=int, default=None, metavar="N",
                       help="score at most N examples per task (default: all), for a quick look")
    group.add_argument("--max-bytes", type=int, default=None, metavar="N",
                       help="--bpb: the first documents up to N bytes (default: all)")
    group.add_argument("--out", type=Path, default=None, metavar="FILE",
                       help="write the results here as JSON (default for a run: <run>/<stage>/eval-<suite>.json)")


def wanted(args) -> bool:
    """Did the command line ask for a real benchmark (else `picochat eval` runs the world's evaluation)?"""
    return bool(args.suite or args.bpb or args.hf)


def run(args) -> None:
    from picochat.evals.models import load_evaluated
    from picochat.run import Run

    if not (args.suite or args.bpb):
        raise ValueError("--hf needs --suite core/chat or --bpb FILE (what to evaluate)")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    run_dir = Path(args.run) if args.run else None
    ev = load_evaluated(run_dir, args.stage, args.hf, args.device)
    results = {}
    if "core" in (args.suite or ()):
        from picochat.evals.core import core_suite

        results["core"] = core_suite(ev, _default(args.tasks_dir, SHARED_TASKS, "--tasks-dir"), args.limit, args.tasks)
        print_core(results["core"])
    if "chat" in (args.suite or ()):
        from picochat.evals.chat_suite import chat_suite

        tasks_dir = args.tasks_dir or (SHARED_TASKS if SHARED_TASKS.is_dir() else None)
        gsm8k = args.gsm8k or (SHARED_GSM8K if SHARED_GSM8K.exists() else None)
        results["chat"] = chat_suite(ev, tasks_dir, gsm8k, args.limit, Run(run_dir) if run_dir else None)
        print_chat(results["chat"])
    if args.bpb:
        from picochat.evals.bpb import bits_per_byte

        results["bpb"] = bits_per_byte(ev, args.bpb, args.max_bytes)
        bpb = results["bpb"]
        print(f"bits per byte: {bpb['bpb']:.4f} ({bpb['documents']:,} documents, {bpb['bytes']:,} bytes, "
              f"{bpb['tokens']:,} tokens)")
    if args.out:
        atomic_write_json(args.out, results)
    elif ev.folder is not None:
        for suite, result in results.items():
            atomic_write_json(ev.folder / f"eval-{suite}.json", result)


def _default(path: Path | None, shared: Path, flag: str) -> Path:
    if path is not None:
        return path
    if shared.is_dir():
        return shared
    raise FileNotFoundError(f"no task folder: pass {flag} (a folder of llm-foundry JSONL task files)")


def core_lines(result: dict) -> list[str]:
    """The core suite as a Markdown table: each task's accuracy with chance beside it."""
    lines = ["| task | shots | examples (skipped) | accuracy | chance | centred |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in result["tasks"].items():
        lines.append(f"| {name} | {r['shots']}/{r['shots_wanted']} | {r['examples']} ({r['skipped']}) | "
                     f"{r['accuracy']:.3f} | {r['chance']:.2f} | {r['centered']:+.3f} |")
    core = result["core"]
    lines.append(f"| **CORE-like** (mean centred) | | | | | **{core:+.3f}** |" if core is not None else "| CORE-like | | | | | – |")
    return lines


def print_core(result: dict) -> None:
    print(f"CORE-like suite: {result['model']}" + (f" (at most {result['limit']} examples a task)" if result["limit"] else ""))
    print("\n".join(core_lines(result)))


def print_chat(result: dict) -> None:
    print(f"chat suite: {result['model']}")
    for name, r in result["tasks"].items():
        print(f"{name:>16}: {r['accuracy']:.3f} (chance {r['chance']:.2f}; {r['examples']} asked, {r['skipped']} skipped)")
    if result["chat_core"] is not None:
        print(f"{'chat_core':>16}: {result['chat_core']:+.3f} (mean centred)")
    for name, value in result.get("world", {}).items():
        print(f"{name:>16}: {value:.3f}" if isinstance(value, float) else f"{name:>16}: {value}")
