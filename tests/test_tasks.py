"""Tests for picochat.data.tasks: word problems, the held-out split, answer extraction, rewards, GSM8K."""

from __future__ import annotations

import json
import random
import re

import pytest

from conftest import shared_data
from picochat.data.tasks import (LEVELS, TaskDataError, extract_answer, read_gsm8k, reward, split_of, task_conversations,
                                 task_problems, worked_problem, write_tasks)
from picochat.data.world import build_world, write_world

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


@pytest.mark.parametrize("text, expected", [
    ("4 * 3 = 12\nAnswer: 12", 12),
    ("Answer: 12.", 12),
    ("answer:$1,250", 1250),
    ("Answer: $ 1,250.", 1250),
    ("Answer: 1 250", 1250),
    ("Answer: 12 dollars", 12),
    ("Answer: -7", -7),
    ("Answer: 12.0", 12),
    ("  Answer:   42  \n", 42),
    ("Answer: 3\nwait\nAnswer: 5", 5),
    ("steps...\n#### 1,000", 1000),
    ("Answer: 12.5", None),
    ("Answer: 12 or 13", None),
    ("Answer: 12, 13", None),
    ("Answer: twelve", None),
    ("The answer is 12", None),
    ("4 * 3 = 12", None),
    ("", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_read_gsm8k_real_test_set():
    problems = read_gsm8k(shared_data("gsm8k", "test.jsonl"))
    assert len(problems) == 1319
    first = problems[0]
    assert first["prompt"].startswith("Janet") and first["answer"] == 18
    assert first["solution"].endswith("\nAnswer: 18") and first["level"] == 2
    assert "Janet sells 16 - 3 - 4 = 9 duck eggs a day." in first["solution"]
    for problem in problems:
        assert "<<" not in problem["solution"] and "####" not in problem["solution"]
        assert extract_answer(problem["solution"]) == problem["answer"]
        assert problem["level"] >= 1 and problem["prompt"]
    assert any(p["answer"] >= 1000 for p in problems) and any(p["answer"] < 0 for p in problems)


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ('["question", "answer"]', "expected an object"),
    ('{"question": "Q?"}', "expected an object"),
    ('{"question": 3, "answer": "#### 3"}', "expected an object"),
    ('{"question": "Q?", "answer": "It is 3."}', "must end with '#### <integer>'"),
    ('{"question": "Q?", "answer": "Half.\\n#### 1.5"}', "must end with '#### <integer>'"),
    ('{"question": "Q?", "answer": "#### "}', "must end with '#### <integer>'"),
])
def test_read_gsm8k_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps({"question": "What is 2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"})
    path = tmp_path / "gsm.jsonl"
    path.write_text(good + "\n\n" + bad_line + "\n")
    with pytest.raises(TaskDataError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
        read_gsm8k(path)


def test_read_gsm8k_small_file(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"question": "A has 2 and gets 3. How many?", "answer": "2+3=<<2+3=5>>5\nSo 5 * 2 = <<5*2=10>>10\n#### 10"},
            {"question": "Big?", "answer": "It is 1,234 + 1 = 1,235.\n#### 1,235"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    first, second = read_gsm8k(path)
    assert first == {"prompt": "A has 2 and gets 3. How many?", "answer": 10, "level": 2,
                     "solution": "2+3=5\nSo 5 * 2 = 10\nAnswer: 10"}
    assert second["answer"] == 1235 and second["level"] == 1


def test_write_tasks(tmp_path, world):
    write_world(tmp_path, size_mb=0.05, seed=0)
    summary = write_tasks(tmp_path, n_sft=30, n_rl=20, n_eval=10, seed=0)
    assert sum(summary["sft"].values()) == 30 and sum(summary["eval"].values()) == 10
    held = [json.loads(line) for line in (tmp_path / "eval" / "tasks.jsonl").read_text().splitlines()]
    assert held == task_problems(world, 10, seed=0, split="test")
    rl = [json.loads(line) for line in (tmp_path / "tasks-rl.jsonl").read_text().splitlines()]
    assert rl == task_problems(world, 20, seed=0, split="train")
    assert len((tmp_path / "tasks-sft.jsonl").read_text().splitlines()) == 30
