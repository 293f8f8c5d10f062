"""Tests for picochat.world.chats: SFT conversations, held-out facts and phrasings, the QA eval."""

from __future__ import annotations

import json
import re
from itertools import islice

import pytest

from picochat.data.tasks import abstains, says_answer
from picochat.world.chats import (MIXTURE, heldout_facts, qa_eval_set, sft_conversations, unknown_names,
                                  write_chat)
from picochat.world.documents import generate_documents, write_world
from picochat.world.knowledge import KINDS, build_world
from picochat.world.phrasings import RELATIONS, fill


@pytest.fixture(scope="module")
def world():
    return build_world(0)


@pytest.fixture(scope="module")
def conversations(world):
    return sft_conversations(world, 3000, seed=0)


def text_of(row: dict) -> str:
    return "\n".join(m["content"] for m in row["messages"])


def mentions(text: str, word: str) -> bool:
    return re.search(r"(?<![\w,])" + re.escape(word) + r"(?![\w]|,\d)", text) is not None


def test_conversations_are_deterministic_by_seed(world, conversations):
    assert sft_conversations(world, 3000, seed=0) == conversations
    assert sft_conversations(world, 50, seed=1) != conversations[:50]


def test_messages_alternate_user_then_assistant(conversations):
    for row in conversations:
        roles = [m["role"] for m in row["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and len(roles) % 2 == 0
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        assert all(isinstance(m["content"], str) and m["content"].strip() for m in row["messages"])
        assert set(row) == {"messages", "kind"}
        json.dumps(row)  # plain JSON


def test_every_kind_of_conversation_is_in_the_mixture(conversations):
    kinds = {row["kind"] for row in conversations}
    assert kinds == set(MIXTURE)
    multi_turn = [row for row in conversations if len(row["messages"]) > 2]
    assert len(multi_turn) > 200
    identity = [row for row in conversations if row["kind"] == "identity"]
    assert all("picochat" in row["messages"][1]["content"] for row in identity)
    assert any(row["messages"][2]["content"] in ("What if it was *?", "What if it was +?", "What if it was -?")
               for row in conversations if row["kind"] == "arithmetic" and len(row["messages"]) == 4)


def test_heldout_facts_never_appear_in_sft_conversations(world, conversations):
    held = heldout_facts(world)
    assert 0.2 <= len(held) / len(world.facts()) < 0.21
    assert held == heldout_facts(build_world(0))
    by_subject = {}
    for fact in held:
        by_subject.setdefault(fact.subject, []).append(fact)
    # Every answer is one sentence that names its subject, so a fact is stated when its subject and
    # its answer are in the same message.
    for row in conversations:
        for message in row["messages"]:
            for subject, facts in by_subject.items():
                if mentions(message["content"], subject):
                    for fact in facts:
                        assert not mentions(message["content"], fact.answer), (fact, row)


def test_fact_answers_are_the_knowledge_base_answers(world, conversations):
    held = heldout_facts(world)
    checked = 0
    for row in conversations:
        if row["kind"] != "fact":
            continue
        question, reply = row["messages"][0]["content"], row["messages"][1]["content"]
        subject = next(e for e in world.entities if mentions(question, e.name))
        candidates = {fill(RELATIONS[rel].templates[0], subject.name, value): rel for rel, value in subject.attrs.items()}
        relation = candidates[reply]
        assert (subject.name, relation) not in {(f.subject, f.relation) for f in held}
        asked = {q.format(s=subject.name).lower().rstrip("?.") for q in RELATIONS[relation].questions}
        plain = re.sub(r"^(hi! |hello\. |hey, )", "", question.lower()).rstrip("?.")
        assert plain in asked, (question, relation)
        checked += 1
    assert checked > 1000


def test_arithmetic_answers_are_correct(conversations):
    checked = 0
    for row in conversations:
        if row["kind"] != "arithmetic":
            continue
        for message in row["messages"][1::2]:
            a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", message["content"]).groups()
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
            checked += 1
    assert checked > 300


def test_unknown_entities_are_not_in_the_world_or_its_documents(world, conversations):
    corpus_words = {w for _, text in islice(generate_documents(world, 0), 3000) for w in re.findall(r"\w+", text)}
    for kind in KINDS:
        train, heldout = unknown_names(world, kind, "train"), unknown_names(world, kind, "heldout")
        assert train and heldout and not set(train) & set(heldout)
        for name in train + heldout:
            assert name not in world and name not in corpus_words
    unknown_rows = [row for row in conversations if row["kind"] == "unknown"]
    assert len(unknown_rows) > 300
    sft_unknown = {n for kind in KINDS for n in unknown_names(world, kind, "train")}
    for row in unknown_rows:
        question, reply = row["messages"][-2]["content"], row["messages"][-1]["content"]
        assert abstains(reply) and "I don't know" in reply
        assert any(mentions(question, name) and mentions(reply, name) for name in sft_unknown)
    eval_unknown = {n for kind in KINDS for n in unknown_names(world, kind, "heldout")}
    assert not any(mentions(text_of(row), name) for row in conversations for name in eval_unknown)


def test_heldout_question_phrasings_are_never_asked_in_sft(conversations):
    user_messages = [m["content"].lower() for row in conversations for m in row["messages"] if m["role"] == "user"]
    for rel in RELATIONS.values():
        for template in rel.heldout_questions:
            opening = template[: template.index("{s}")].lower()
            assert len(opening) >= 10
            assert not any(opening in message for message in user_messages), template


def test_a_tiny_world_still_makes_every_kind_of_conversation():
    tiny = build_world(3, scale=0.05)
    rows = sft_conversations(tiny, 400, seed=0)
    assert {row["kind"] for row in rows} == set(MIXTURE)
    assert qa_eval_set(tiny, "heldout")


def test_qa_eval_heldout_covers_heldout_facts_and_eval_unknowns(world):
    rows = qa_eval_set(world, "heldout")
    assert rows == qa_eval_set(world, "heldout")
    known = [r for r in rows if r["kind"] == "known"]
    held = heldout_facts(world)
    for phrasing in ("train", "heldout"):
        facts = {(r["fact"]["subject"], r["fact"]["relation"]) for r in known if r["phrasing"] == phrasing}
        assert facts == {(f.subject, f.relation) for f in held}
    for fact in held:  # every question phrasing of its relation, once each
        asked = sorted(r["messages"][0]["content"] for r in known if r["fact"]["subject"] == fact.subject
                       and r["fact"]["relation"] == fact.relation)
        templates = RELATIONS[fact.relation].questions + RELATIONS[fact.relation].heldout_questions
        assert asked == sorted(q.format(s=fact.subject) for q in templates)
    for row in known:
        assert row["answer"] == world[row["fact"]["subject"]].attrs[row["fact"]["relation"]]
        assert [m["role"] for m in row["messages"]] == ["user"] and row["fact"]["subject"] in row["messages"][0]["content"]
        questions = RELATIONS[row["fact"]["relation"]]
        templates = questions.heldout_questions if row["phrasing"] == "heldout" else questions.questions
        assert row["messages"][0]["content"] in {q.format(s=row["fact"]["subject"]) for q in templates}
    unknown = [r for r in rows if r["kind"] == "unknown"]
    eval_names = {n for kind in KINDS for n in unknown_names(world, kind, "heldout")}
    assert len(unknown) == 2 * len(eval_names)
    for row in unknown:
        assert row["answer"] == "I don't know" and row["fact"] is None
        assert any(mentions(row["messages"][0]["content"], name) for name in eval_names)


def test_qa_eval_train_split_uses_facts_seen_in_sft(world):
    rows = qa_eval_set(world, "train")
    held = {(f.subject, f.relation) for f in heldout_facts(world)}
    known = [r for r in rows if r["kind"] == "known"]
    assert len({(r["fact"]["subject"], r["fact"]["relation"]) for r in known}) == len(held)
    assert not any((r["fact"]["subject"], r["fact"]["relation"]) in held for r in known)
    with pytest.raises(ValueError, match="split"):
        qa_eval_set(world, "test")


@pytest.mark.parametrize("reply, expected", [
    ("I don't know.", True), ("i dont know who that is", True), ("I do not know anything about it.", True),
    ("I don\u2019t know that town.", True), ("Sorry, I DON'T KNOW.", True),
    ("The capital of Varnia is Oskel.", False), ("I know: it is Oskel.", False), ("Nobody knows", False),
])
def test_abstains(reply, expected):
    assert abstains(reply) is expected


@pytest.mark.parametrize("reply, answer, expected", [
    ("The capital of Varnia is Oskel.", "Oskel", True), ("oskel", "Oskel", True),
    ("The capital is Oskelby.", "Oskel", False), ("Tamrin is 34 years old.", "34", True),
    ("Tamrin is 340 years old.", "34", False), ("About 12,000 people live there.", "12,000", True),
    ("About 112,000 people live there.", "12,000", False), ("About 12,0001 people.", "12,000", False),
    ("It costs 4 dollars.", "14", False), ("I don't know, maybe Oskel?", "Oskel", False),
])
def test_says_answer(reply, answer, expected):
    assert says_answer(reply, answer) is expected


def test_write_chat_writes_sft_and_eval_files(tmp_path, world):
    write_world(tmp_path, size_mb=0.05, seed=0)
    summary = write_chat(tmp_path, 40, seed=0)
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert rows == sft_conversations(world, 40, seed=0) and summary["conversations"] == 40
    qa = [json.loads(line) for line in (tmp_path / "eval" / "qa.jsonl").read_text().splitlines()]
    assert qa == qa_eval_set(world, "heldout")
    assert len((tmp_path / "eval" / "qa-train.jsonl").read_text().splitlines()) == summary["qa_train"]
