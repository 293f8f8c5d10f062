"""The CORE-like suite: few-shot in-context tasks scored by log-likelihood, as DCLM's CORE does.

For each task (`evals.tasks`): the prompt prefix is `<|endoftext|>` and the task's seeded shots; a
model whose context cannot hold them all gets the first of them that fit in half its context (the
result says how many). Multiple choice and schema examples are right when the gold option has the
highest mean log-likelihood per continuation token; language-modelling examples when greedy decoding
reproduces the continuation. An example whose prompt and continuation do not fit the context is
skipped and counted. Per task: accuracy, chance, and centred accuracy (acc - chance) / (1 - chance),
0 for guessing and 1 for perfect; the CORE-like score is the mean centred accuracy over the tasks.
"""

from __future__ import annotations

from pathlib import Path

from picochat.evals.models import Evaluated
from picochat.evals.scoring import score_rows
from picochat.evals.tasks import LANGUAGE_MODELING, Task, pairs, read_task, shots_text, split_shots, task_table


def prompt_prefix(ev: Evaluated, shots: list[str]) -> tuple[list[int], int]:
    """(prefix ids, shots used): as many of the shots as fit in half the model's context."""
    used = len(shots)
    while True:
        prefix = ev.bos + ev.encode("".join(shots[:used]))
        if used == 0 or len(prefix) <= ev.model.config.max_seq_len // 2:
            return prefix, used
        used -= 1


def core_task(ev: Evaluated, folder: Path, task: Task, limit: int | None = None, progress: bool = True) -> dict:
    """One task's accuracy, chance, centred accuracy, examples scored and skipped, shots used."""
    rows = read_task(folder, task)
    shot_rows, scored = split_shots(rows, task.shots)
    if limit is not None:
        scored = scored[:limit]
    prefix, used = prompt_prefix(ev, shots_text([rows[i] for i in shot_rows], task))
    room = ev.model.config.max_seq_len - len(prefix)
    examples, flat = [], []  # (row, first pair's index in flat), all pairs' token ids
    skipped = 0
    for index in scored:
        encoded = [(ev.encode(context), ev.encode(continuation)) for context, continuation in pairs(rows[index], task)]
        if any(len(c) + len(t) > room for c, t in encoded):
            skipped += 1
            continue
        examples.append((rows[index], len(flat)))
        flat.extend(encoded)
    scores = score_rows(ev.model, prefix, flat, desc=task.name if progress else None)
    correct = 0
    for row, start in examples:
        if task.kind == LANGUAGE_MODELING:
            correct += scores[start].greedy
            continue
        options = scores[start : start + len(pairs(row, task))]
        best = max(range(len(options)), key=lambda i: options[i].mean)  # the first on a tie
        correct += best == row["gold"]
    accuracy = correct / len(examples) if examples else 0.0
    return {"kind": task.kind, "shots": used, "shots_wanted": task.shots, "examples": len(examples),
            "skipped": skipped, "accuracy": accuracy, "chance": task.chance,
            "centered": (accuracy - task.chance) / (1 - task.chance)}


def core_suite(ev: Evaluated, folder: Path, limit: int | None = None, only: list[str] | None = None,
               progress: bool = True) -> dict:
    """Every task of the folder (or those named in `only`), and the CORE-like score over them."""
    tasks = task_table(folder)
    if only:
        unknown = sorted(set(only) - {task.name for task in tasks})
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; {folder} has {', '.join(t.name for t in tasks)}")
        tasks = [task for task in tasks if task.name in only]
    results = {task.name: core_task(ev, folder, task, limit, progress) for task in tasks}
    scored = [r["centered"] for r in results.values() if r["examples"]]
    return {"core": sum(scored) / len(scored) if scored else None, "tasks": results,
            "tasks_dir": str(Path(folder).resolve()), "limit": limit, "model": ev.name}
