"""The world's tool conversations: the calculator steps reproduce the worked solution, search answers
come from real search results, and the RL problems that offer the tools carry the system line."""

import json
import re

import pytest

from picochat.chat import render, to_text
from picochat.data.tasks import answer_text, extract_answer, read_problems, reward
from picochat.tokenizer import TOOL_RESULT_END_ID, TOOL_RESULT_ID
from picochat.tools import TOOLS_SYSTEM_PROMPT, calculate, tools_offered, with_tools
from picochat.world import generate
from picochat.world.chats import _answer, heldout_facts, unknown_names
from picochat.world.documents import practice_entities
from picochat.world.knowledge import KINDS, load_world
from picochat.world.tool_chats import calc_messages, rl_offered_questions


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    generate(out, size_mb=0.3, scale=0.25, seed=0, n_chats=50, n_sft_tasks=20, n_rl_tasks=20, n_eval_tasks=10,
             shard_mb=0.1, val_kb=20, n_calc_chats=40, n_search_chats=60, n_rl_calc_tasks=30)
    return out


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_calculator_steps_rebuild_the_worked_solution():
    solution = "4 kites cost 4 * 2 = 8 dollars.\n3 cups cost 3 * 2 = 6 dollars.\nIn total Vuktin spends 8 + 6 = 14 dollars.\nAnswer: 14"
    messages = calc_messages("Vuktin buys ...", solution)
    assert messages[0] == {"role": "system", "content": TOOLS_SYSTEM_PROMPT}
    calls = [m["tool_call"] for m in messages if m.get("tool_call")]
    results = [m["content"] for m in messages if m["role"] == "tool"]
    assert calls == ["calc: 4 * 2", "calc: 3 * 2", "calc: 8 + 6"] and results == ["8", "6", "14"]
    written = "".join(m["content"] for m in messages[2:] if m["role"] == "assistant")
    assert written == "4 kites cost 8 dollars.\n3 cups cost 6 dollars.\nIn total Vuktin spends 14 dollars.\nAnswer: 14"
    with pytest.raises(ValueError, match="the calculator 8"):
        calc_messages("x", "4 kites cost 4 * 2 = 9 dollars.\nAnswer: 9")


def test_the_text_copies_a_result_token_for_token(small_tokenizer):
    """The result's number is the same ids as where the text repeats it and as the final answer's."""
    messages = calc_messages("q", "4 kites cost 4 * 12 = 48 dollars.\nAnswer: 48")
    ids, _ = render(messages, small_tokenizer)
    start, end = ids.index(TOOL_RESULT_ID), ids.index(TOOL_RESULT_END_ID)
    result = ids[start + 1:end]
    assert small_tokenizer.decode(result) == " 48"
    assert ids[end + 1:end + 1 + len(result)] == result  # " 48 dollars."
    assert ids[-1 - len(result):-1] == result  # "Answer: 48" then <|im_end|>


def own_turn(messages: list[dict]) -> list[dict]:
    """The system message and the conversation's last turn (from its last user message on)."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return [messages[0], *messages[last_user:]]


def test_a_share_of_tool_conversations_opens_with_an_earlier_short_exchange(world_dir):
    chats = rows(world_dir / "sft-tools.jsonl")
    openers = [c for c in chats if c["kind"] in ("calc", "search-practice", "search-unknown")
               and sum(m["role"] == "user" for m in c["messages"]) > 1]
    mine = [c for c in chats if c["kind"] in ("calc", "search-practice", "search-unknown")]
    assert 0.2 < len(openers) / len(mine) < 0.6  # EARLIER_TURN_SHARE, less what would not fit
    for chat in openers:
        messages = chat["messages"]
        assert [m["role"] for m in messages[:2]] == ["system", "user"] and messages[0]["content"] == TOOLS_SYSTEM_PROMPT
        assert sum(m["role"] == "system" for m in messages) == 1
        assert messages[-1]["role"] == "assistant" and len(own_turn(messages)) < len(messages)


def test_tool_conversations_render_and_use_only_what_sft_may_show(world_dir):
    world = load_world(world_dir)
    chats = rows(world_dir / "sft-tools.jsonl")
    kinds = [c["kind"] for c in chats]
    assert kinds.count("calc") == 40 and kinds.count("calc-sum") == 6
    assert sum(kinds.count(k) for k in ("known-no-search", "search-unknown", "search-practice")) == 60
    assert min(kinds.count(k) for k in ("known-no-search", "search-unknown", "search-practice")) > 5
    offered = [c for c in chats if c["kind"].startswith("offered-")]
    assert len(offered) == 13 and not any(m.get("tool_call") for c in offered for m in own_turn(c["messages"]))
    held = {(f.subject, f.answer) for f in heldout_facts(world)}
    news = {e.name for e in world.news}
    train_unknown = {name for kind in world.unknown_names for name in unknown_names(world, kind, "train")}
    practice = {e.name.lower() for e in practice_entities(world)}
    sft_answers = {_answer(f) for f in world.facts() if f not in heldout_facts(world)}
    from picochat.tokenizer import Tokenizer

    tok = Tokenizer.train([json.dumps(c) for c in chats], vocab_size=400)
    for chat in chats:
        render(chat["messages"], tok)  # a valid conversation in the chat protocol
        messages = own_turn(chat["messages"])  # the system message and the last turn, after any earlier one
        assert messages[0]["role"] == "system" and messages[0]["content"].startswith(TOOLS_SYSTEM_PROMPT)
        if chat["kind"].startswith("offered-"):
            continue
        if chat["kind"] == "calc":
            assert extract_answer(messages[-1]["content"]) is not None
            continue
        if chat["kind"] == "known-no-search":  # a fact of the world's own entities: from memory
            assert len(messages) == 3 and not messages[2].get("tool_call")
            assert messages[2]["content"] in sft_answers  # a fact SFT may state, not a practice entity's
            continue
        if chat["kind"] == "calc-sum":
            expression = messages[2]["tool_call"].removeprefix("calc: ")
            assert messages[3]["content"] == calculate(expression)
            assert messages[-1]["content"] == f" {messages[3]['content']}."  # after a space, as the result
            continue
        subject, _, relation = messages[2]["tool_call"].removeprefix("search: ").partition(" ")
        result, reply = messages[3]["content"], messages[4]["content"]
        assert subject not in news and relation
        if chat["kind"] == "search-unknown":
            assert subject in train_unknown and subject.lower() not in result.lower() and "I don't know" in reply
        else:
            assert (subject.lower() in practice) == (chat["kind"] == "search-practice")
            assert result.startswith("[1] ") and subject in result
            assert not any(s == subject and answer in reply for s, answer in held)
            passages = [line.split("] ", 1)[1] for line in result.split("\n")]
            assert len(passages) == len(set(passages)) <= 3  # distinct passages


def test_rl_problems_offering_the_tools_carry_the_system_line(world_dir):
    problems = read_problems(world_dir / "tasks-rl-calc.jsonl")
    assert len(problems) == 30 and all(p["system"] == TOOLS_SYSTEM_PROMPT for p in problems)
    searches = read_problems(world_dir / "tasks-rl-search.jsonl")
    practice = {e.name: e for e in practice_entities(load_world(world_dir))}
    assert len(searches) > len(practice) and all(p["system"] == TOOLS_SYSTEM_PROMPT for p in searches)
    for problem in searches:  # about a practice entity, by name, with one of its facts as the answer
        name = next(n for n in practice if re.search(rf"\b{n}\b", problem["prompt"]))
        assert problem["answer"] in practice[name].attrs.values()
    bad = world_dir / "bad.jsonl"
    bad.write_text('{"prompt": "q", "answer": 1, "system": 3}\n')
    with pytest.raises(ValueError, match=r'bad.jsonl:1: "system" must be a string'):
        read_problems(bad)


def test_a_reply_is_graded_on_what_follows_the_last_tool_result():
    reply = "<|tool_call|>search: Oskel<|/tool_call|><|tool_result|>[1] The capital of Varnia is Oskel.<|/tool_result|>I don't know."
    assert answer_text(reply) == "I don't know."
    assert reward(reply, {"prompt": "capital of Varnia?", "answer": "Oskel"}) == 0.0  # the search said it, not the model
    calc = "4 kites cost<|tool_call|>calc: 4 * 2<|/tool_call|><|tool_result|> 8<|/tool_result|> 8 dollars.\nAnswer: 8"
    assert reward(calc, {"prompt": "p", "answer": 8}) == 1.0


def test_with_tools_offers_them_in_the_system_message():
    assert with_tools([{"role": "user", "content": "hi"}])[0] == {"role": "system", "content": TOOLS_SYSTEM_PROMPT}
    offered = with_tools([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert offered[0]["content"] == f"{TOOLS_SYSTEM_PROMPT}\nBe brief." and len(offered) == 2
    assert to_text(offered).count("<|im_start|>system") == 1
    assert tools_offered(offered) and tools_offered(with_tools([{"role": "user", "content": "hi"}]))
    assert not tools_offered([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert not tools_offered([{"role": "user", "content": TOOLS_SYSTEM_PROMPT}])


def test_rl_offered_questions_pair_each_invented_name_with_a_known_fact(world_dir):
    world = load_world(world_dir)
    offered = rows(world_dir / "tasks-rl-offered.jsonl")
    assert offered == rl_offered_questions(world, seed=0)
    unknown = [r for r in offered if r["kind"] == "unknown"]
    known = [r for r in offered if r["kind"] == "fact"]
    assert len(unknown) == len(known) > 0 and all(r["system"] == TOOLS_SYSTEM_PROMPT for r in offered)
    assert {r["answer"] for r in unknown} == {"I don't know"} and {r["must_call"] for r in unknown} == {"search"}
    train_names = {name for kind in KINDS for name in unknown_names(world, kind, "train")}
    assert all(any(name in r["prompt"] for name in train_names) for r in unknown)  # never a held-out name
    assert all(r["answer"] != "I don't know" and "must_call" not in r for r in known)
    read_problems(world_dir / "tasks-rl-offered.jsonl")  # a valid problem file
