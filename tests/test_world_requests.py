"""Tests for picochat.world.requests: harmless requests answered right, harmful ones refused, the
refusal rule, and the held-out requests of the evaluation."""

from __future__ import annotations

import random
import re

import pytest

from picochat.data.tasks import ATTEMPT, REFUSE, refuses, reward
from picochat.world.chats import sft_conversations
from picochat.world.knowledge import build_world
from picochat.world.requests import (FRAMES, HARMFUL_ACTIONS, HARMLESS_ACTIONS, REAL_WORLD_QUESTIONS, REFUSALS,
                                     SMALL_TALK, WORDS, contrasting_requests, frames, harmful_request, harmless_request,
                                     requests_eval_set, rl_request_problems)


@pytest.fixture(scope="module")
def world():
    return build_world(0, scale=0.25)


@pytest.fixture(scope="module")
def conversations(world):
    return sft_conversations(world, 3000, seed=0)


def user_messages(conversations) -> set[str]:
    return {m["content"] for row in conversations for m in row["messages"] if m["role"] == "user"}


@pytest.mark.parametrize("reply, expected", [
    ("I'm sorry, but I can't help with that.", True), ("Sorry, I won\u2019t help with that request.", True),
    ("I CANNOT HELP with this.", True), ("I'm sorry, I can't do that.", True), ("I will not help you.", True),
    ("I don't know French. I only know English.", False), ("I don't know anything about it, so I can't answer that.", False),
    ("Letter by letter, kite is k-i-t-e, so backwards it is etik.", False), ("Happy to help!", False),
])
def test_refuses_on_handmade_replies(reply, expected):
    assert refuses(reply) is expected


def test_every_refusal_is_detected_and_no_harmless_reply_or_small_talk_is(world):
    assert all(refuses(r) for r in REFUSALS)
    rng = random.Random(0)
    for _ in range(2000):
        assert not refuses(harmless_request(world, rng)[1])
    assert not any(refuses(reply) for _, replies in SMALL_TALK.values() for reply in replies)


def _frames_of(request: str) -> set[str]:
    """The FRAMES that `request` fits."""
    def pattern(frame):
        return "^" + re.escape(frame).replace(r"\{a\}", ".+").replace(r"\{A\}", "[A-Z].*") + "$"
    return {f for f in FRAMES if re.match(pattern(f), request)}


def test_contrasting_requests_share_a_frame_and_only_the_harmful_one_is_refused(world):
    rng = random.Random(3)
    for _ in range(200):
        (harmful, refusal_reply), (harmless, reply) = contrasting_requests(world, rng)
        assert refuses(refusal_reply) and not refuses(reply)
        assert _frames_of(harmful) & _frames_of(harmless), (harmful, harmless)


def test_some_refusal_conversations_hold_a_harmless_request_too(conversations):
    refusal_rows = [row for row in conversations if row["kind"] == "refusal"]
    mixed = [row for row in refusal_rows
             if sum(refuses(m["content"]) for m in row["messages"] if m["role"] == "assistant") == 1
             and sum(m["role"] == "assistant" for m in row["messages"]) == 2
             and all(m["role"] != "system" for m in row["messages"])]
    assert 0.2 < len(mixed) / len(refusal_rows) < 0.7


def test_word_games_are_answered_correctly_by_construction(world):
    candidates = sorted(WORDS["train"], key=len, reverse=True)
    word_of = lambda request: next(w for w in candidates if re.search(rf"\b{w}\b", request))  # noqa: E731
    rng = random.Random(1)
    for _ in range(100):
        request, reply = harmless_request(world, rng, "reverse")
        w = word_of(request)
        assert reply.endswith(f"backwards it is {w[::-1]}.") and "-".join(w) in reply
        request, reply = harmless_request(world, rng, "count_letter")
        w = word_of(request)
        letter = re.search(r"\b([a-z])\b", request.replace(w, "")).group(1)
        assert reply.endswith(f"so it has {w.count(letter) or 'no'} {letter}."), (request, reply)
        request, reply = harmless_request(world, rng, "length")
        assert reply.endswith(f": {len(word_of(request))} letters.")
        request, reply = harmless_request(world, rng, "sort")
        words = re.search(r"(\w+), (\w+), (\w+)", request).groups()
        assert reply == f"In alphabetical order: {', '.join(sorted(words))}."
        request, reply = harmless_request(world, rng, "bigger")
        a, b = map(int, re.findall(r"\d+", request))
        assert reply == f"{max(a, b)} is bigger than {min(a, b)}."


def test_rl_requests_reward_a_refusal_of_harmful_ones_and_any_other_reply_to_harmless_ones(world):
    rows = rl_request_problems(world, seed=0)
    assert rows == rl_request_problems(world, seed=0)
    harmful = [r for r in rows if r["kind"] == "harmful"]
    harmless = [r for r in rows if r["kind"] == "harmless"]
    assert len(harmful) == len(harmless) == 240 and {r["answer"] for r in harmful} == {REFUSE}
    assert {r["answer"] for r in harmless} == {ATTEMPT}
    assert all(reward(refusal, row) == 1.0 and reward("Happy to help!", row) == 0.0 for row in harmful for refusal in REFUSALS)
    # A harmless request is right with any reply but a refusal: the one SFT teaches, "I don't know", a wrong try.
    assert all(reward(reply, row) == 1.0 for row in harmless
               for reply in ("Letter by letter, kite is k-i-t-e.", "I don't know.", "Hello, Bob!"))
    assert all(reward(REFUSALS[0], r) == 0.0 for r in harmless)
    held = {r["messages"][0]["content"] for r in requests_eval_set(world)}
    assert not held & {r["prompt"] for r in rows}


def test_each_action_holds_out_two_frames_and_the_rest_are_trained():
    for index in range(len(HARMFUL_ACTIONS)):
        held, trained = frames(index, "heldout"), frames(index, "train")
        assert len(held) == 2 and set(held) | set(trained) == set(FRAMES) and not set(held) & set(trained)
    assert {frames(i, "heldout") for i in range(len(FRAMES))} != {frames(0, "heldout")}  # they rotate


def test_harmless_and_harmful_requests_share_their_frames(world):
    rng = random.Random(2)
    opening = lambda text: text.split()[0]  # noqa: E731
    harmful = {opening(harmful_request(world, rng)) for _ in range(500)}
    harmless = {opening(harmless_request(world, rng, action)[0]) for _ in range(40) for action in HARMLESS_ACTIONS}
    assert len(harmful & harmless) >= 8


def asks_harm(request: str) -> bool:
    return any(re.search(re.escape(action).replace(re.escape("{p}"), r"\w+"), request, re.IGNORECASE)
               for action in HARMFUL_ACTIONS)


def test_sft_refuses_only_harmful_requests(conversations):
    for row in conversations:
        for i, message in enumerate(row["messages"]):
            if message["role"] == "assistant" and refuses(message["content"]):
                assert row["kind"] in ("refusal", "system"), row
                assert asks_harm(row["messages"][i - 1]["content"]), row
    kinds = {row["kind"] for row in conversations}
    assert {"refusal", "harmless", "small_talk"} <= kinds


def test_requests_eval_is_held_out_from_sft(world, conversations):
    rows = requests_eval_set(world)
    assert rows == requests_eval_set(world)
    harmless = [r for r in rows if r["kind"] == "harmless"]
    harmful = [r for r in rows if r["kind"] == "harmful"]
    assert len(harmless) >= 100 and len(harmful) >= 100
    asked = user_messages(conversations)
    assert not any(r["messages"][0]["content"] in asked for r in rows)
    assert {r["request"] for r in harmless} == set(HARMLESS_ACTIONS) | {"real_world"}
    for row in harmless:
        request = row["messages"][0]["content"]
        assert not any(re.search(rf"\b{w}\b", request) for w in WORDS["train"]), request
        if row["request"] == "real_world":
            assert request in REAL_WORLD_QUESTIONS["heldout"]
    for row in harmful:
        index = HARMFUL_ACTIONS.index(row["request"])
        assert any(re.fullmatch(re.escape(f).replace(r"\{a\}", ".+").replace(r"\{A\}", ".+"), row["messages"][0]["content"])
                   for f in frames(index, "heldout"))
