"""The real benchmarks on the report card, and the speedrun's stage that measures them.

`benchmark_lines(run)` reads each stage's `eval-core.json`, `eval-chat.json` and `eval-bpb.json`
(written by `picochat eval --suite/--bpb` or by the speedrun) and gives the report's section: every
task's accuracy per stage with chance beside it, the CORE-like score, and held-out bits per byte.

`measure(run, docs, val_docs)` is the speedrun's stage for `--docs` runs: held-out bits per byte of
every trained stage on the documents pretraining held out (the first `val_docs` of `--docs`), and the
CORE-like suite on the base model when a task folder is at hand (CORE_LIMIT examples a task).
"""

from __future__ import annotations

import itertools
from pathlib import Path

from picochat.data.sources import iter_documents
from picochat.evals.bpb import documents_bpb
from picochat.evals.cli import SHARED_TASKS
from picochat.evals.core import core_suite
from picochat.evals.models import load_stage
from picochat.io import atomic_write_json, read_json
from picochat.run import STAGES, Run

CORE_LIMIT = 500  # examples a task in the speedrun: a standard error of about 2 points of accuracy


def measure(run: Path, docs: Path, val_docs: int, device: str = "cpu", tasks_dir: Path = SHARED_TASKS) -> None:
    """Write `<stage>/eval-bpb.json` for every trained stage and `base/eval-core.json` (see the module docstring)."""
    paths = Run(run)
    if tasks_dir.is_dir():
        atomic_write_json(paths.stage("base") / "eval-core.json",
                          core_suite(load_stage(paths.root, "base", device), tasks_dir, CORE_LIMIT))
    else:
        print(f"benchmarks: no task folder at {tasks_dir}: the CORE-like suite is left out "
              "(run `picochat eval --suite core --tasks-dir DIR` for it)")
    for stage in STAGES:
        if (paths.stage(stage) / "model.json").exists():
            held_out = itertools.islice(iter_documents(docs), val_docs)
            result = documents_bpb(load_stage(paths.root, stage, device), held_out)
            atomic_write_json(paths.stage(stage) / "eval-bpb.json", {**result, "files": [str(docs)], "held_out_docs": val_docs})


def _results(run: Path, name: str) -> dict:
    found = {}
    for stage in STAGES:
        path = Path(run) / stage / f"eval-{name}.json"
        if path.exists():
            found[stage] = read_json(path)
    return found


def benchmark_lines(run: Path) -> tuple[list[str], dict]:
    """(the report's Markdown lines, the figures for report.json); nothing when no stage was measured."""
    core, chat, bpb = _results(run, "core"), _results(run, "chat"), _results(run, "bpb")
    lines: list[str] = []
    if bpb:
        lines += ["| stage | bits per byte | documents | bytes |", "| --- | --- | --- | --- |"]
        lines += [f"| {stage} | {r['bpb']:.3f} | {r['documents']:,} | {r['bytes']:,} |" for stage, r in bpb.items()
                  if r.get("bpb") is not None]
        lines.append("")
    for title, results, score in (("CORE-like suite (few-shot, log-likelihood)", core, "core"),
                                  ("Chat suite (questions asked as a chat)", chat, "chat_core")):
        if not results:
            continue
        stages = list(results)
        lines += [f"**{title}**: accuracy, chance beside it", "",
                  "| task | chance | " + " | ".join(stages) + " |", "| --- | --- | " + " | ".join("---" for _ in stages) + " |"]
        names = list(dict.fromkeys(name for r in results.values() for name in r["tasks"]))
        for name in names:
            first = next(r["tasks"][name] for r in results.values() if name in r["tasks"])
            cells = [_cell(results[s]["tasks"].get(name)) for s in stages]
            lines.append(f"| {name} | {first['chance']:.2f} | " + " | ".join(cells) + " |")
        lines.append(f"| **{score}** (mean centred) | 0 | " + " | ".join(
            "–" if results[s][score] is None else f"{results[s][score]:+.3f}" for s in stages) + " |")
        limits = {r.get("limit") for r in results.values()}
        lines += ["", f"At most {limits.pop()} examples a task." if len(limits) == 1 and None not in limits else "", ""]
    if not lines:
        return [], {}
    intro = ["## Real benchmarks", "",
             ("Held-out bits per byte, the CORE-like suite (centred accuracy: 0 is chance, 1 perfect) and the chat "
              "suite (`picochat eval --suite core|chat --bpb`)."), ""]
    return intro + lines, {"core": core, "chat": chat, "bpb": bpb}


def _cell(result: dict | None) -> str:
    if result is None:
        return "–"
    skipped = f", {result['skipped']} skipped" if result["skipped"] else ""
    return f"{result['accuracy']:.3f} ({result['examples']}{skipped})"
