"""Tests for picochat.data.tasks: problem files (picochat and GSM8K), answer extraction, rewards."""

from __future__ import annotations

import json
import re

import pytest

from conftest import shared_data
from picochat.data.tasks import ProblemFileError, extract_answer, read_gsm8k, read_problems, reward


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
    with pytest.raises(ProblemFileError, match=re.escape(f"{path}:3: ") + ".*" + re.escape(message)):
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


def test_read_problems_reads_picochat_and_gsm8k_rows_and_names_bad_lines(tmp_path):
    world = tmp_path / "tasks.jsonl"
    world.write_text(json.dumps({"prompt": "2 + 3?", "answer": 5, "level": 1}) + "\n\n" + json.dumps({"prompt": "x", "answer": 1}) + "\n")
    assert [p["answer"] for p in read_problems(world)] == [5, 1]
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "Ann has 2 cats and 3 dogs. How many pets?", "answer": "2+3=<<2+3=5>>5\n#### 5"}) + "\n")
    assert read_problems(gsm8k)[0]["answer"] == 5
    bad = tmp_path / "bad.jsonl"
    for wrong in (" ", 1.5, True, None):
        bad.write_text(json.dumps({"prompt": "ok", "answer": 1}) + "\n" + json.dumps({"prompt": "no", "answer": wrong}) + "\n")
        with pytest.raises(ProblemFileError, match=r"bad.jsonl:2: .*integer or non-empty string \"answer\""):
            read_problems(bad)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"prompt": "What is the capital of Varnia?", "answer": "Oskel"}) + "\n")
    assert read_problems(facts)[0]["answer"] == "Oskel"
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ProblemFileError, match=r"broken.jsonl:1: not valid JSON"):
        read_problems(broken)
    for tool in ("browse", 3, None):
        bad.write_text(json.dumps({"prompt": "Where is Zog?", "answer": "I don't know", "must_call": tool}) + "\n")
        with pytest.raises(ProblemFileError, match=r'bad.jsonl:1: "must_call" must name a tool \(calc, search\)'):
            read_problems(bad)


def test_a_problem_names_a_format_its_reply_must_follow():
    problem = {"prompt": "What is the capital of Varnia?", "answer": "Oskel", "follow": "sure"}
    assert reward("Sure! The capital of Varnia is Oskel.", problem) == 1.0
    assert reward("The capital of Varnia is Oskel.", problem) == 0.0  # right, but not in the format
    assert reward("Sure! The capital of Varnia is Brelby.", problem) == 0.0  # in the format, but wrong
    assert reward("Oskel.", {**problem, "follow": "one_word"}) == 1.0
    assert reward("Oskel is the capital.", {**problem, "follow": "one_word"}) == 0.0
    assert reward("It is Oskel. Anything else?", {**problem, "follow": "end_question"}) == 1.0


def test_a_problem_file_with_an_unknown_format_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Who are you?", "answer": "Bob"}) + "\n"
                   + json.dumps({"prompt": "Who are you?", "answer": "Bob", "follow": "shout"}) + "\n")
    with pytest.raises(ProblemFileError, match=r'bad.jsonl:2: "follow" must name a format \(one_word, end_question, sure\)'):
        read_problems(bad)


def test_a_problem_that_must_call_a_tool_is_rewarded_only_after_the_call():
    problem = {"prompt": "What does the zog eat?", "answer": "I don't know", "must_call": "search"}
    searched = "<|tool_call|>search: zog food<|/tool_call|><|tool_result|> no results<|/tool_result|>I don't know."
    assert reward(searched, problem) == 1.0
    assert reward("I don't know.", problem) == 0.0  # the same words without the search
    assert reward(searched.replace("search:", "calc:"), problem) == 0.0  # another tool


@pytest.mark.parametrize("reply, answer, expected", [
    ("The capital of Varnia is Oskel.", "Oskel", 1.0),
    ("The capital of Varnia is Brelby.", "Oskel", 0.0),
    ("I don't know. Maybe Oskel?", "Oskel", 0.0),  # an answer hedged with "I don't know" is not an answer
    ("The population is 340.", "34", 0.0),
    ("I don\u2019t know. I have never heard of Zogundo.", "I don't know", 1.0),
    ("The price of the Zogundo is 5 crowns.", "I don't know", 0.0),
])
def test_text_answers_are_rewarded_when_said_and_abstaining_when_asked_to(reply, answer, expected):
    assert reward(reply, {"prompt": "?", "answer": answer}) == expected
