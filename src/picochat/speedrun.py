"""`picochat speedrun`: every stage end to end, then a report card.

    picochat speedrun --preset cpu --run runs/demo

world -> tokenizer -> shards -> pretrain -> eval -> SFT -> eval -> RL -> eval -> report. A stage whose
output is complete is skipped; an interrupted training stage resumes from its last checkpoint, so
rerunning the same command after a crash picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from picochat.config import get_preset


def _world(run: Path, preset) -> None:
    from picochat.data.tasks import write_tasks
    from picochat.data.world import write_world
    from picochat.data.world_chat import write_chat

    world = run / "world"
    write_world(world, size_mb=preset.world_mb, seed=0, shard_mb=max(1.0, preset.world_mb / 4), scale=preset.world_scale)
    write_chat(world, 6000, seed=0)
    write_tasks(world, n_sft=2000, n_rl=2000, n_eval=500, seed=0)  # eval/tasks.jsonl last: it marks the stage done


def _tokenizer(run: Path, preset) -> None:
    from picochat.data.sources import iter_documents
    from picochat.tokenizer import Tokenizer

    if not (run / "tokenizer" / "tokenizer.json").exists():
        Tokenizer.train(iter_documents(run / "world" / "docs"), preset.vocab_size).save(run / "tokenizer")


def _shards(run: Path, preset) -> None:
    from picochat.data.shards import prepare

    prepare(run / "world" / "docs", run / "tokenizer", run / "shards", val_inputs=run / "world" / "docs-val.jsonl")


def _pretrain(run: Path, preset_name: str, device: str) -> None:
    from picochat.train.pretrain import run_pretrain

    run_pretrain(run, preset_name, resume=True, device=device)


def _sft(run: Path, preset_name: str, device: str) -> None:
    from picochat.train.sft import run_sft

    run_sft(run, preset_name, resume=True, device=device)


def _rl(run: Path, preset_name: str, device: str) -> None:
    from picochat.train.rl import run_rl

    run_rl(run, preset_name, resume=True, device=device)


def _evaluate(stage: str, preset, device: str) -> Callable:
    def run_eval(run: Path, *_):
        import torch

        from picochat.evaluate import evaluate_stage

        resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        evaluate_stage(run, stage, k=preset.rl.eval_k, n_problems=preset.rl.eval_problems, device=resolved)

    return run_eval


def _report(run: Path, *_) -> None:
    from picochat.report import write_report

    write_report(run)


def stages(preset_name: str, device: str) -> list[tuple[str, Callable, Callable[[Path], bool]]]:
    """(name, action(run, preset), is_done(run)) in pipeline order."""
    preset = get_preset(preset_name)
    exists = lambda *parts: (lambda run: run.joinpath(*parts).exists())  # noqa: E731
    return [
        ("world", lambda run: _world(run, preset), exists("world", "eval", "tasks.jsonl")),
        ("tokenizer", lambda run: _tokenizer(run, preset), exists("tokenizer", "tokenizer.json")),
        ("shards", lambda run: _shards(run, preset), exists("shards", "manifest.json")),
        ("pretrain", lambda run: _pretrain(run, preset_name, device), exists("base", "done.json")),
        ("eval base", _evaluate("base", preset, device), exists("base", "eval.json")),
        ("sft", lambda run: _sft(run, preset_name, device), exists("sft", "done.json")),
        ("eval sft", _evaluate("sft", preset, device), exists("sft", "eval.json")),
        ("rl", lambda run: _rl(run, preset_name, device), exists("rl", "done.json")),
        ("eval rl", _evaluate("rl", preset, device), exists("rl", "eval.json")),
        ("report", _report, lambda run: False),
    ]


def speedrun(run: Path, preset_name: str = "cpu", device: str = "auto") -> None:
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    plan = stages(preset_name, device)
    timings_path = run / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
    t_all = time.time()
    for i, (name, action, is_done) in enumerate(plan, 1):
        header = f"[{i}/{len(plan)}] {name}"
        if is_done(run):
            print(f"{header}: already complete, skipped", flush=True)
            continue
        print(f"{header} ... (total elapsed {time.time() - t_all:.0f}s)", flush=True)
        t0 = time.time()
        action(run)
        timings[name] = round(timings.get(name, 0) + time.time() - t0, 2)
        timings_path.write_text(json.dumps(timings, indent=2))
        print(f"{header}: done in {time.time() - t0:.0f}s", flush=True)
    print(f"\nspeedrun finished in {time.time() - t_all:.0f}s. Report card: {run / 'report.md'}")
    print(f"Chat with your model:  picochat chat --run {run}")
    print(f"Or serve it:           picochat serve --run {run}   (then open http://127.0.0.1:8000)")


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--preset", default="cpu", help="cpu, gpu-small or gpu-d20 (default cpu)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    parser.set_defaults(func=lambda args: speedrun(Path(args.run), args.preset, args.device))
