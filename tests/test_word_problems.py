"""Tests for picochat.world.word_problems: word problems, the held-out split, worked solutions, the files."""

from __future__ import annotations

import json
import random
import re

import pytest

from picochat.data.tasks import extract_answer, reward
from picochat.world.documents import write_world
from picochat.world.knowledge import build_world
from picochat.world.word_problems import LEVELS, split_of, task_conversations, task_problems, worked_problem, write_tasks

STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def problems(world):
    return task_problems(world, 600, seed=0, split="train")


def test_problems_are_deterministic_distinct_and_of_their_split(world, problems):
    assert task_problems(world, 600, seed=0, split="train") == problems
    assert task_problems(world, 50, seed=1, split="train") != problems[:50]
    assert len({p["prompt"] for p in problems}) == len(problems)
    test = task_problems(world, 300, seed=0, split="test")
    assert all(split_of(p["prompt"]) == "train" for p in problems)
    assert all(split_of(p["prompt"]) == "test" for p in test)
    assert not {p["prompt"] for p in problems} & {p["prompt"] for p in test}


def test_split_is_about_a_fifth_test():
    prompts = [f"problem number {i}" for i in range(5000)]
    share = sum(split_of(p) == "test" for p in prompts) / len(prompts)
    assert 0.17 < share < 0.23


def test_solutions_are_worked_steps_ending_in_the_answer(problems):
    for problem in problems:
        lines = problem["solution"].splitlines()
        assert lines[-1] == f"Answer: {problem['answer']}"
        steps = lines[:-1]
        assert len(steps) == problem["level"]
        results = []
        for step in steps:
            (a, op, b, result), = STEP.findall(step)
            a, b, result = int(a), int(b), int(result)
            assert {"+": a + b, "-": a - b, "*": a * b, "/": a / b}[op] == result, step
            results.append(result)
        assert results[-1] == problem["answer"] >= 0
        assert extract_answer(problem["solution"]) == problem["answer"]
        assert reward(problem["solution"], problem) == 1.0
        assert reward(problem["solution"].replace(f"Answer: {problem['answer']}", f"Answer: {problem['answer'] + 1}"),
                      problem) == 0.0


def test_every_step_comes_from_a_small_table(world):
    """The steps are lookups a tiny model can memorise (a number up to 999 is one token): 688
    distinct (a, op, b) over 25,000 problems, where addends up to 30 gave 3,250."""
    table = {op: set() for op in "+-*/"}
    for problem in task_problems(world, 5000, seed=1, split="train"):
        for a, op, b, _ in STEP.findall(problem["solution"]):
            table[op].add((int(a), int(b)))
    assert all(a <= 12 and b <= 12 for a, b in table["*"]) and all(b <= 12 and a // b <= 12 for a, b in table["/"])
    assert all(a <= 25 and b <= 25 for a, b in table["+"]) and all(a <= 100 for a, _ in table["-"])
    assert sum(len(facts) for facts in table.values()) < 800


def test_worked_problem_documents_are_train_problems_with_correct_working(world):
    rng = random.Random(0)
    docs = [worked_problem(world, rng) for _ in range(300)]
    levels = set()
    for doc in docs:
        title, blank, prompt, *steps, answer = doc.splitlines()
        assert (title, blank) == ("Word problem", "") and split_of(prompt) == "train"
        for step in steps:
            (a, op, b, result), = STEP.findall(step)
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b), "/": int(a) / int(b)}[op] == int(result)
        assert answer == f"Answer: {result}"
        levels.add(len(steps))
    assert levels == set(LEVELS)


def test_problems_use_the_world_and_state_their_numbers(world, problems):
    people = {e.name for e in world.of_kind("person")}
    for problem in problems:
        assert any(name in problem["prompt"] for name in people)
        # Every number a solution starts from is given in the prompt (nothing is looked up).
        first_step = problem["solution"].splitlines()[0]
        a, _, b, _ = STEP.findall(first_step)[0]
        assert re.search(rf"(?<!\d)\$?{a}(?!\d)", problem["prompt"]) and re.search(rf"(?<!\d)\$?{b}(?!\d)", problem["prompt"])


def test_levels_are_balanced_and_can_be_chosen(world, problems):
    counts = {level: sum(p["level"] == level for p in problems) for level in LEVELS}
    assert all(150 < c < 250 for c in counts.values())
    assert {p["level"] for p in task_problems(world, 40, seed=0, split="test", levels=(3,))} == {3}
    with pytest.raises(ValueError, match="levels"):
        task_problems(world, 5, levels=(7,))
    with pytest.raises(ValueError, match="split"):
        task_problems(world, 5, split="validation")


def test_task_conversations_teach_the_solution_format(world, problems):
    rows = task_conversations(world, 200, seed=0)
    assert rows == task_conversations(world, 200, seed=0)
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert split_of(user["content"]) == "train"
        assert extract_answer(assistant["content"]) is not None and row["kind"] == "task"
    # Other instances than the RL problems of the same seed.
    overlap = {r["messages"][0]["content"] for r in rows} & {p["prompt"] for p in problems}
    assert len(overlap) < 10


def test_write_tasks(tmp_path, world):
    write_world(tmp_path, size_mb=0.05, seed=0)
    summary = write_tasks(tmp_path, n_sft=30, n_rl=20, n_eval=10, seed=0)
    assert sum(summary["sft"].values()) == 30 and sum(summary["eval"].values()) == 10
    held = [json.loads(line) for line in (tmp_path / "eval" / "tasks.jsonl").read_text().splitlines()]
    assert held == task_problems(world, 10, seed=0, split="test")
    rl = [json.loads(line) for line in (tmp_path / "tasks-rl.jsonl").read_text().splitlines()]
    assert rl == task_problems(world, 20, seed=0, split="train")
    assert len((tmp_path / "tasks-sft.jsonl").read_text().splitlines()) == 30
