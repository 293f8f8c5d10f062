"""Tests for picochat.world.chats: SFT conversations, held-out facts and phrasings, the QA eval."""

from __future__ import annotations

import json
import re
from collections import Counter
from itertools import islice

import pytest

from picochat.data.tasks import abstains, read_problems, says_answer
from picochat.world.chats import (EVAL_SETS, HELDOUT_PRONOUN_QUESTIONS, KIND_OPEN_PROMPTS, MIXTURE, OPEN_PROMPTS, PRONOUN_QUESTIONS,
                                  _answer, heldout_entities,
                                  followup_eval_set, heldout_facts, qa_eval_set, sft_conversations,
                                  rl_system_problems, system_eval_set, system_qa_eval_set, unknown_names, write_chat)
from picochat.world.system_prompts import (FORMAT_PROMPTS, GENERIC_PROMPTS, PERSONA_NAMES, PERSONA_PROMPTS,
                                           follows)
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


def user_messages(conversations: list[dict]) -> list[str]:
    return [m["content"] for row in conversations for m in row["messages"] if m["role"] == "user"]


def test_conversations_are_deterministic_by_seed(world, conversations):
    assert sft_conversations(world, 3000, seed=0) == conversations
    assert sft_conversations(world, 50, seed=1) != conversations[:50]


def test_messages_alternate_user_then_assistant_after_a_system_message_in_the_system_kinds(conversations):
    for row in conversations:
        roles = [m["role"] for m in row["messages"]]
        has_system = roles[0] == "system"
        assert has_system == (row["kind"] in ("system", "persona", "format")), row
        roles = roles[1:] if has_system else roles
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
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
    counts = Counter(row["kind"] for row in conversations)
    for kind, share in MIXTURE.items():
        assert abs(counts[kind] / len(conversations) - share) < 0.025, kind


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
        for message in row["messages"]:
            if message["role"] != "assistant":
                continue
            if row["kind"] == "arithmetic":
                assert re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", message["content"])
            for a, op, b, result in re.findall(r"(\d+) ([-+*]) (\d+) = (-?\d+)", message["content"]):
                assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(result)
                checked += 1
    assert checked > 100


def test_unknown_entities_are_not_in_the_world_or_its_documents(world, conversations):
    corpus_words = {w for _, text in islice(generate_documents(world, 0), 3000) for w in re.findall(r"\w+", text)}
    for kind in KINDS:
        train, heldout = unknown_names(world, kind, "train"), unknown_names(world, kind, "heldout")
        assert train and heldout and not set(train) & set(heldout)
        for name in train + heldout:
            assert name not in world and name not in corpus_words
    unknown_rows = [row for row in conversations if row["kind"] == "unknown"]
    assert len(unknown_rows) > 100
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
    for name, make in EVAL_SETS.items():
        written = [json.loads(line) for line in (tmp_path / "eval" / name).read_text().splitlines()]
        assert written == make(world) and summary["eval"][name] == len(written), name
    # The RL problem files read back as problems (their "follow" and request answers included).
    assert read_problems(tmp_path / "tasks-rl-system.jsonl") == rl_system_problems(world, seed=0)
    assert len(read_problems(tmp_path / "tasks-rl-requests.jsonl")) == sum(summary["rl_request_problems"].values())


# --- follow-ups -----------------------------------------------------------------------------------
def stated_fact(world, reply: str):
    """(subject, relation) of the canonical answer `reply`, or None."""
    for entity in world.entities:
        for relation, value in entity.attrs.items():
            if reply == fill(RELATIONS[relation].templates[0], entity.name, value):
                return entity.name, relation
    return None


def test_pronoun_follow_ups_ask_another_fact_of_the_previous_answer_s_subject(world, conversations):
    pronoun_questions = {q for questions in PRONOUN_QUESTIONS.values() for q in questions}
    checked = 0
    for row in conversations:
        if row["kind"] != "followup":
            continue
        messages = row["messages"]
        for i in range(2, len(messages), 2):
            if messages[i]["content"] in pronoun_questions:
                before, after = stated_fact(world, messages[i - 1]["content"]), stated_fact(world, messages[i + 1]["content"])
                assert before[0] == after[0] and before[1] != after[1], messages
                assert messages[i]["content"] in PRONOUN_QUESTIONS[after[1]]
                checked += 1
    assert checked > 100


def test_follow_ups_include_corrections_and_identity_asked_late(conversations):
    followups = [row["messages"] for row in conversations if row["kind"] == "followup"]
    assert any(m[2]["content"].startswith(("Sorry, I meant", "No, I meant")) for m in followups)
    assert all(not m[i]["content"].startswith(("Sorry, I meant", "No, I meant")) for m in followups for i in range(4, len(m), 2))
    late_identity = [m for m in followups if m[-2]["content"] in ("Who are you?", "What is your name?")]
    assert late_identity and all("picochat" in m[-1]["content"] for m in late_identity)


def test_heldout_pronoun_follow_ups_are_never_asked_in_sft(conversations):
    openings = [q[: q.index("{pos}")] for q in HELDOUT_PRONOUN_QUESTIONS]
    for message in user_messages(conversations):
        assert not any(message.startswith(opening + pos) for opening in openings for pos in ("its ", "their ")), message


def test_followup_eval_asks_heldout_facts_whose_subject_is_only_in_the_first_turn(world):
    rows = followup_eval_set(world)
    assert rows == followup_eval_set(world) and len(rows) >= 100
    held = {(f.subject, f.relation) for f in heldout_facts(world)}
    assert {(r["fact"]["subject"], r["fact"]["relation"]) for r in rows} == held
    assert {r["phrasing"] for r in rows} == {"train", "heldout"}
    for row in rows:
        first, answer, followup = row["messages"]
        subject = row["fact"]["subject"]
        assert subject in first["content"] and stated_fact(world, answer["content"])[0] == subject
        assert subject not in followup["content"] and row["answer"] == world[subject].attrs[row["fact"]["relation"]]


# --- system prompts -------------------------------------------------------------------------------
def system_messages(conversations: list[dict]) -> list[str]:
    return [row["messages"][0]["content"] for row in conversations if row["messages"][0]["role"] == "system"]


def test_format_conversations_follow_their_instruction_in_every_reply(conversations):
    checked = 0
    for row in conversations:
        if row["kind"] == "format":
            system = row["messages"][0]["content"]
            fmt = next(f for f, prompts in FORMAT_PROMPTS.items() if any(p in system for p in prompts["train"]))
            assert all(follows(fmt, m["content"]) for m in row["messages"] if m["role"] == "assistant"), row
            checked += 1
    assert checked > 200


def test_persona_conversations_answer_who_it_is_with_the_name(conversations, world):
    templates = [re.compile(re.escape(p).replace(re.escape("{name}"), r"(\w+)") + "$") for p in PERSONA_PROMPTS["train"]]
    world_names = {e.name for e in world.entities}
    kinds = Counter()
    for row in (r for r in conversations if r["kind"] == "persona"):
        name = next(m.group(1) for t in templates if (m := t.match(row["messages"][0]["content"])))
        replies = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        assert any(follows("name", reply, name) for reply in replies) and not any("picochat" in r for r in replies)
        assert name not in world_names and name not in PERSONA_NAMES["heldout"]
        kinds["listed" if name in PERSONA_NAMES["train"] else "invented"] += 1
    # Half the names are invented for their conversation: copied from the system message, not learnt by heart.
    assert kinds["invented"] > 0.3 * sum(kinds.values()) and kinds["listed"] > 0.3 * sum(kinds.values())


def test_heldout_system_prompts_and_names_are_never_in_sft(conversations, world):
    systems = system_messages(conversations)
    held = [*GENERIC_PROMPTS["heldout"], *(p for prompts in FORMAT_PROMPTS.values() for p in prompts["heldout"])]
    held_openings = [p[: p.index("{name}")] for p in PERSONA_PROMPTS["heldout"]]
    assert not any(p in system for p in held for system in systems)
    assert not any(system.startswith(opening) for opening in held_openings for system in systems)
    texts = [text_of(row) for row in conversations]
    assert not any(re.search(rf"\b{name}\b", text) for name in PERSONA_NAMES["heldout"] for text in texts)
    names = {e.name for e in world.entities} | {n for names in world.unknown_names.values() for n in names}
    assert not names & set(PERSONA_NAMES["train"] + PERSONA_NAMES["heldout"])


def test_system_eval_uses_heldout_prompts_and_names_with_a_rule_for_each_row(world, conversations):
    rows = system_eval_set(world)
    assert rows == system_eval_set(world) and len(rows) >= 100
    assert {r["check"] for r in rows} == {"name", *FORMAT_PROMPTS}
    sft_systems = set(system_messages(conversations))
    for row in rows:
        assert row["messages"][0]["role"] == "system" and row["messages"][0]["content"] not in sft_systems
        assert row["messages"][-1]["role"] == "user"
        if row["check"] == "name":
            assert row["name"] in PERSONA_NAMES["heldout"] and row["name"] in row["messages"][0]["content"]
        else:
            assert row["messages"][0]["content"] in FORMAT_PROMPTS[row["check"]]["heldout"]


def test_rl_system_problems_use_training_prompts_and_names_and_a_checkable_answer(world):
    rows = rl_system_problems(world, seed=0)
    assert rows == rl_system_problems(world, seed=0)
    assert Counter(r["kind"] for r in rows) == {"persona": 160, "one_word": 120, "end_question": 120, "sure": 120}
    heldout_prompts = {p for prompts in FORMAT_PROMPTS.values() for p in prompts["heldout"]}
    held = {(f.subject, f.answer) for f in heldout_facts(world)}
    known = {e.name for e in world.entities}
    for row in rows:
        assert not any(p in row["system"] for p in heldout_prompts)
        if row["kind"] == "persona":
            assert row["answer"] in row["system"] and row["answer"] not in PERSONA_NAMES["heldout"]
            assert row["answer"] not in known and "follow" not in row
        else:
            assert row["follow"] == row["kind"] and any(i in row["system"] for i in FORMAT_PROMPTS[row["kind"]]["train"])
            assert not any(subject in row["prompt"] and answer == row["answer"] for subject, answer in held)
    invented = [r for r in rows if r["kind"] == "persona" and r["answer"] not in PERSONA_NAMES["train"]]
    assert len(invented) == 80


def test_system_qa_eval_asks_the_known_questions_under_a_heldout_generic_prompt(world):
    known = [r for r in qa_eval_set(world, "heldout") if r["kind"] == "known"]
    rows = system_qa_eval_set(world)
    assert [r["messages"][1:] for r in rows] == [r["messages"] for r in known]
    assert {r["messages"][0]["content"] for r in rows} == set(GENERIC_PROMPTS["heldout"])
    assert [r["answer"] for r in rows] == [r["answer"] for r in known]


def test_open_prompts_are_answered_with_facts_of_the_subject_and_never_about_held_out_subjects(world, conversations):
    held_subjects, held_facts = heldout_entities(world), heldout_facts(world)
    rows = [row["messages"] for row in conversations if row["kind"] == "describe"]
    counts = Counter()
    for user, reply in rows:
        subject = next((e for e in world.entities if user["content"] in
                        [t.format(s=e.name) for t in OPEN_PROMPTS + KIND_OPEN_PROMPTS[e.kind]]), None)
        if subject is None:  # a name that does not exist
            assert abstains(reply["content"]), reply
            counts["unknown"] += 1
            continue
        assert subject.name not in held_subjects
        stated = [f for f in world.facts() if f.subject == subject.name and _answer(f) in reply["content"]]
        assert 1 <= len(stated) <= 3 and not set(stated) & held_facts, reply
        counts[len(stated)] += 1
    assert counts["unknown"] > 5 and all(counts[n] > 5 for n in (1, 2, 3))  # replies that say more and less
