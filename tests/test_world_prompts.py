"""Tests for picochat.world.system_prompts (formats and the rules that check them) and
picochat.world.few_shot (prompts for the base model)."""

from __future__ import annotations

import random
import re

import pytest

from picochat.world.few_shot import FEW_SHOT_EXAMPLES, few_shot_rows
from picochat.world.knowledge import build_world
from picochat.world.system_prompts import FORMATS, apply_format, follows, format_prompt, persona_prompt


@pytest.mark.parametrize("check, reply, expected", [
    ("one_word", "Oskel.", True), ("one_word", " 12,000 ", True), ("one_word", "The capital is Oskel.", False),
    ("one_word", "...", False), ("one_word", "", False),
    ("end_question", "Oskel. Anything else?", True), ("end_question", "Is it Oskel? It is.", False),
    ("sure", "Sure! The capital of Varnia is Oskel.", True), ("sure", "The capital is Oskel. Sure!", False),
    ("sure", "sure! Oskel", False),
])
def test_format_rules_on_handmade_replies(check, reply, expected):
    assert follows(check, reply) is expected


@pytest.mark.parametrize("reply, name, expected", [
    ("I am Zara, an AI assistant.", "Zara", True), ("My name is Zara.", "Zara", True),
    ("I am picochat.", "Zara", False), ("I am Zarathustra.", "Zara", False), ("I am Zara.", None, False),
])
def test_name_rule_on_handmade_replies(reply, name, expected):
    assert follows("name", reply, name) is expected


def test_unknown_rules_and_splits_are_refused():
    with pytest.raises(ValueError, match="unknown check"):
        follows("capitals", "OSKEL")
    with pytest.raises(ValueError, match="unknown format"):
        apply_format("capitals", "The capital is Oskel.", "Oskel", random.Random(0))
    with pytest.raises(ValueError, match="split"):
        persona_prompt("Zara", random.Random(0), "test")


def test_every_format_applied_to_a_reply_follows_its_rule():
    rng = random.Random(0)
    for fmt in FORMATS:
        for reply, word in (("The capital of Varnia is Oskel.", "Oskel"), ("4 + 5 = 9", "9"), ("I am picochat.", "picochat")):
            assert follows(fmt, apply_format(fmt, reply, word, rng))
        assert format_prompt(fmt, rng)


@pytest.fixture(scope="module")
def world():
    return build_world(0, scale=0.25)


def test_few_shot_prompts_show_other_subjects_of_the_same_relation_then_ask(world):
    rows = few_shot_rows(world)
    assert rows == few_shot_rows(world) and len(rows) == len(world.facts())
    for row, fact in zip(rows, world.facts()):
        *examples, last = row["prompt"].split("\n")
        assert last == row["query"] == f"- {fact.subject[0].upper() + fact.subject[1:]}:" and row["answer"] == fact.answer
        assert 2 <= len(examples) <= FEW_SHOT_EXAMPLES
        for line in examples:
            name, value = re.fullmatch(r"- (\S+): (.+)", line).groups()
            entity = next(e for e in world.entities if e.name.lower() == name.lower())
            assert entity.name != fact.subject and entity.attrs[fact.relation] == value
