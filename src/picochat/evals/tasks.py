"""The CORE-like suite's tasks: the task table, reading a task file, and the few-shot prompt texts.

A task folder holds JSONL files in llm-foundry's "gauntlet" layout, one example a line:
- multiple choice: `{"query", "choices": [...], "gold": i}`, scored by the log-likelihood of each
  choice after the query;
- schema (Winogrande): `{"context_options": [...], "continuation", "gold": i}`, scored by the
  likelihood of the shared continuation after each context;
- language modelling (LAMBADA): `{"context", "continuation"}`, right when greedy decoding gives the
  continuation exactly.

The table says, per task: its name, its file, its kind, how many shots precede each question,
chance accuracy (what guessing scores; BoolQ's is its majority class, as in DCLM), and the text
between a question and its answer. Without a `tasks.json` in the folder the built-in table
(DCLM's CORE settings for the tasks it shares) is used, for the files present; a `tasks.json`
(a list of objects with the table's fields) replaces it.

Shots are drawn once per task with a fixed seed from the task's own rows and left out of the scored
examples, so every model sees the same prompts. A prompt is `<|endoftext|>`, the shots (each a
whole solved example and a newline), the question and the delimiter without its trailing space;
the continuation is the delimiter's trailing space and the answer, tokenized on its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from picochat.io import iter_jsonl, read_json

MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING = "multiple_choice", "schema", "language_modeling"
KINDS = (MULTIPLE_CHOICE, SCHEMA, LANGUAGE_MODELING)
TASK_TABLE_FILE = "tasks.json"
SHOT_SEED = 1234
EXAMPLE_DELIMITER = "\n"


class TaskError(ValueError):
    """A task table or task file that cannot be scored: names the file, the line and what was expected."""


@dataclass(frozen=True)
class Task:
    name: str
    file: str
    kind: str
    shots: int
    chance: float
    delimiter: str = " "


# DCLM's CORE settings (its eval yaml) for the tasks of the shared gauntlet folder.
DEFAULT_TASKS = (
    Task("arc_easy", "arc_easy.jsonl", MULTIPLE_CHOICE, 10, 0.25, "\nAnswer: "),
    Task("arc_challenge", "arc_challenge.jsonl", MULTIPLE_CHOICE, 10, 0.25, "\nAnswer: "),
    Task("piqa", "piqa.jsonl", MULTIPLE_CHOICE, 10, 0.5, "\nAnswer: "),
    Task("copa", "copa.jsonl", MULTIPLE_CHOICE, 0, 0.5),
    Task("openbook_qa", "openbook_qa.jsonl", MULTIPLE_CHOICE, 0, 0.25),
    Task("commonsense_qa", "commonsense_qa.jsonl", MULTIPLE_CHOICE, 10, 0.25),
    Task("boolq", "boolq.jsonl", MULTIPLE_CHOICE, 10, 0.62, "\nAnswer: "),
    Task("winogrande", "winogrande.jsonl", SCHEMA, 0, 0.5),
    Task("lambada_openai", "lambada_openai.jsonl", LANGUAGE_MODELING, 0, 0.0),
)


def task_table(folder: Path) -> list[Task]:
    """The tasks of a folder: its tasks.json, else the built-in table's tasks whose file is there."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such task folder")
    table = folder / TASK_TABLE_FILE
    if not table.exists():
        tasks = [task for task in DEFAULT_TASKS if (folder / task.file).exists()]
        if not tasks:
            raise TaskError(f"{folder}: none of the built-in tasks' files ({', '.join(t.file for t in DEFAULT_TASKS)}) "
                            f"and no {TASK_TABLE_FILE}")
        return tasks
    rows = read_json(table, TaskError)
    if not isinstance(rows, list) or not rows:
        raise TaskError(f"{table}: expected a non-empty list of tasks")
    return [_task_of(row, f"{table}: task {number}") for number, row in enumerate(rows, 1)]


def _task_of(row, where: str) -> Task:
    expected = ('an object {"name", "file", "kind": one of ' + ", ".join(KINDS) +
                ', "shots": integer >= 0, "chance": number in [0, 1), optional "delimiter": string}')
    if not isinstance(row, dict) or set(row) - {"name", "file", "kind", "shots", "chance", "delimiter"}:
        raise TaskError(f"{where}: expected {expected}")
    ok = (isinstance(row.get("name"), str) and row["name"] and isinstance(row.get("file"), str) and row["file"]
          and row.get("kind") in KINDS and _is_int(row.get("shots")) and row["shots"] >= 0
          and isinstance(row.get("chance"), (int, float)) and not isinstance(row["chance"], bool)
          and 0 <= row["chance"] < 1 and isinstance(row.get("delimiter", " "), str))
    if not ok:
        raise TaskError(f"{where}: expected {expected}, got {row}")
    return Task(row["name"], row["file"], row["kind"], row["shots"], float(row["chance"]), row.get("delimiter", " "))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_task(folder: Path, task: Task) -> list[dict]:
    """The task's examples, checked: a malformed row, a gold index out of range or an empty choice
    raises TaskError naming the file and line."""
    path = Path(folder) / task.file
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such task file (task {task.name})")
    rows = []
    for where, row in iter_jsonl(path, TaskError):
        _check_row(row, task.kind, where)
        rows.append(row)
    if not rows:
        raise TaskError(f"{path}: no examples")
    return rows


def _check_row(row, kind: str, where: str) -> None:
    if not isinstance(row, dict):
        raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if kind == LANGUAGE_MODELING:
        if not isinstance(row.get("context"), str) or not _text(row.get("continuation")):
            raise TaskError(f'{where}: expected "context" (string) and "continuation" (non-empty string)')
        return
    options_key, text_key = ("choices", "query") if kind == MULTIPLE_CHOICE else ("context_options", "continuation")
    options = row.get(options_key)
    if not isinstance(options, list) or len(options) < 2:
        raise TaskError(f'{where}: expected "{options_key}", a list of at least 2 strings')
    empty = [i for i, option in enumerate(options) if not _text(option)]
    if empty:
        raise TaskError(f'{where}: "{options_key}" item {empty[0]} is empty or not a string')
    if not isinstance(row.get(text_key), str) or (kind == SCHEMA and not row[text_key].strip()):
        raise TaskError(f'{where}: expected "{text_key}", a {"non-empty " if kind == SCHEMA else ""}string')
    gold = row.get("gold")
    if not _is_int(gold) or not 0 <= gold < len(options):
        raise TaskError(f'{where}: "gold" must be an index into "{options_key}" (0..{len(options) - 1}), got {gold!r}')


def _text(value) -> bool:
    return isinstance(value, str) and bool(value.strip())


def split_shots(rows: list[dict], shots: int, seed: int = SHOT_SEED) -> tuple[list[int], list[int]]:
    """(shot indices, scored indices): `shots` rows drawn with a fixed seed, the rest in file order."""
    shots = min(shots, len(rows) - 1)
    chosen = random.Random(seed).sample(range(len(rows)), shots) if shots > 0 else []
    taken = set(chosen)
    return chosen, [i for i in range(len(rows)) if i not in taken]


def solved_text(row: dict, task: Task) -> str:
    """A whole solved example, as a shot: the question, the delimiter and the right answer."""
    context, continuation = pairs(row, task)[gold_index(row)]
    return context + continuation


def pairs(row: dict, task: Task) -> list[tuple[str, str]]:
    """(context, continuation) texts to score for one example, one pair per option; the delimiter's
    trailing whitespace starts the continuation (" Paris", not "Paris" after "Answer: ")."""
    head = task.delimiter.rstrip()
    tail = task.delimiter[len(head):]
    if task.kind == MULTIPLE_CHOICE:
        return [(row["query"] + head, tail + choice) for choice in row["choices"]]
    if task.kind == SCHEMA:
        return [(option + head, tail + row["continuation"]) for option in row["context_options"]]
    return [(row["context"] + head, tail + row["continuation"])]


def gold_index(row: dict) -> int:
    return row.get("gold", 0)


def shots_text(rows: list[dict], task: Task) -> list[str]:
    """Each shot as it appears in the prompt, its delimiter after it."""
    return [solved_text(row, task) + EXAMPLE_DELIMITER for row in rows]
