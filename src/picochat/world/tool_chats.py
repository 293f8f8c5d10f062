"""Conversations in which the assistant uses its tools, the lecture's remedies for a model's holes.

- Word problems with the calculator: every arithmetic step is a `calc:` call and the assistant
  copies the result instead of doing the sum in its head (the result's " 8" and the text's " 8" are
  one token, `chat.RESULT_LEAD`):

      4 kites cost<|tool_call|>calc: 4 * 2<|/tool_call|><|tool_result|> 8<|/tool_result|> 8 dollars. ...

- Questions about names the model never read: the assistant searches for the question's subject
  and what is asked about it, then answers from what the search put in its context window (its
  working memory), or says it does not know when nothing the search found is about the subject.
  The names are the practice entities, which only the search index knows, and names that exist
  nowhere:

      <|tool_call|>search: Dolwick country<|/tool_call|><|tool_result|> [1] Dolwick is a town in Dekfusesh.
      [2] ...<|/tool_result|>The country of Dolwick is Dekfusesh.

- Questions about the world's own entities, which the model read about in pretraining, answered
  from memory with the tools offered, without a search: the lecture's model searches when it does
  not know. (Searching them too taught the cpu model to answer after any result as it would
  without one, and to mix in the result's other facts: known-fact QA with search offered was 10 to
  17 points under QA without; BENCHMARKS.md, "Reading a value from the context".)

A share of the conversations opens with an earlier short exchange (`with_earlier_turns`), so that
the tools are called in any turn, not only in a conversation's first.

Each conversation starts with the system message `tools.TOOLS_SYSTEM_PROMPT`: tools are used when
the system message offers them, so the same model answers without tools (from memory, as it learnt
without this line) when they are not offered, and the report can compare the two. A share of them
need no tool (who the assistant is, small talk, requests), so that an offer does not make every
reply a search.

The search results are the real ones: the world's documents (with the news entities' articles) are
indexed exactly as the speedrun indexes them, and each question's result is rendered as the engine
renders it, cut to SEARCH_RESULT_TOKENS (counted at CHARS_PER_TOKEN: the tokenizer does not exist
yet when the world is written). No held-out fact, held-out unknown name or news entity is used.
"""

from __future__ import annotations

import random
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from picochat.data.index import SearchIndex, build_index
from picochat.data.tasks import ABSTAIN
from picochat.io import atomic_write_jsonl
from picochat.tools import NO_RESULTS_TEXT, TOOLS_SYSTEM_PROMPT, best_passages, calculate, render_passages, with_tools
from picochat.world.chats import (_answer, _ask_sum, _draw_sum, _idk_reply, _question, _vary, heldout_facts, rl_fact_questions,
                                  sft_conversations, unknown_names)
from picochat.world.documents import practice_entities
from picochat.world.knowledge import KINDS, RELATIONS_OF_KIND, World, fact_of, load_world
from picochat.world.phrasings import RELATIONS
from picochat.world.word_problems import task_problems

SEARCH_RESULT_TOKENS = 160  # about what a 256-token context leaves for a result after a question
CHARS_PER_TOKEN = 4.2  # the cpu preset's tokenizer on the world's documents (BENCHMARKS.md, "The split")
# The world's index cuts documents into passages of a sentence or two: a tiny model reads a fact out of
# three short passages, not out of three paragraphs (BENCHMARKS.md, "Tools").
WORLD_PASSAGE_CHARS = 120
UNKNOWN_SHARE = 0.25  # of the search conversations: questions about names the search cannot find
# Of the search conversations: questions about the practice entities, which only the search knows: the
# model has to copy the name into the query and the fact out of the result, as it must for the news
# entities. The rest ask about the world's own entities, answered from memory without a search. Half,
# not a third, since the base model copies (copying practice): with a third, news QA with search was 31%
# after SFT, with half (and 2,000 search conversations instead of 1,500) 67% (BENCHMARKS.md,
# "Copying practice"); before it, more of them taught nothing.
PRACTICE_SHARE = 0.5
SUM_SHARE = 0.15  # bare sums with the calculator, for each word problem with it
# An arithmetic step of a worked solution: "4 * 2 = 8", "12 - 3 + 4 = 13".
_STEP = re.compile(r"(\d+(?: [-+*/] \d+)+) = (\d+)")


def _system() -> dict:
    return {"role": "system", "content": TOOLS_SYSTEM_PROMPT}


def calc_messages(prompt: str, solution: str) -> list[dict]:
    """A worked word problem with a `calc:` call for every step (the result checked against the
    solution's own), as messages: system, user, then the assistant's turn in pieces. The text goes
    on after a result with a space, as the result itself starts ("cost" call " 8" " 8 dollars")."""
    messages = [_system(), {"role": "user", "content": prompt}]
    pending = ""
    for line in solution.split("\n"):
        position = 0
        for step in _STEP.finditer(line):
            expression, stated = step.groups()
            result = calculate(expression)
            if result != stated:
                raise ValueError(f"the solution says {expression} = {stated}, the calculator {result}")
            messages += [{"role": "assistant", "content": (pending + line[position:step.start()]).rstrip(" "),
                          "tool_call": f"calc: {expression}"},
                         {"role": "tool", "content": result}]
            pending, position = " ", step.end() - len(stated)
        pending += line[position:] + "\n"
    messages.append({"role": "assistant", "content": pending.rstrip("\n")})
    return messages


def calc_conversations(world: World, n: int, seed: int = 0) -> list[dict]:
    """n SFT rows of train-split word problems solved with the calculator (other instances than the
    plain ones of word_problems.task_conversations)."""
    problems = task_problems(world, n, seed=f"calc-{seed}", split="train")
    return [{"messages": calc_messages(p["prompt"], p["solution"]), "kind": "calc", "level": p["level"]} for p in problems]


def sum_conversations(n: int, seed: int = 0) -> list[dict]:
    """n SFT rows of a bare sum ("What is 17 * 34?") answered with one `calc:` call: without them the
    calculator was called inside word problems only, and a plain question was done in the head."""
    rng = random.Random(f"calc-sum-{seed}")
    rows = []
    for _ in range(n):
        a, op, b = _draw_sum(rng, high_product=99, high_sum=999)  # sums one would hand to a calculator
        solution = f"The answer is {a} {op} {b} = {calculate(f'{a} {op} {b}')}."
        rows.append({"messages": calc_messages(_ask_sum(a, op, b, rng), solution), "kind": "calc-sum"})
    return rows


def search_result(index: SearchIndex, query: str) -> str:
    """The search tool's answer to `query`, as the engine renders it within SEARCH_RESULT_TOKENS."""
    passages = best_passages(index, query)
    if not passages:
        return NO_RESULTS_TEXT
    return render_passages(passages, SEARCH_RESULT_TOKENS, lambda text: round(len(text) / CHARS_PER_TOKEN))


def search_query(subject: str, relation: str) -> str:
    """What the assistant searches for: the question's subject by name, and what is asked about it
    (the relation's name, which its canonical phrasing contains: "Dekfusesh capital")."""
    return f"{subject} {relation.replace('_', ' ')}"


def _searched(question: str, query: str, result: str, reply: str) -> list[dict]:
    return [_system(), {"role": "user", "content": question},
            {"role": "assistant", "content": "", "tool_call": f"search: {query}"},
            {"role": "tool", "content": result}, {"role": "assistant", "content": reply}]


def search_conversations(world: World, index: SearchIndex, n: int, seed: int = 0) -> list[dict]:
    """n SFT rows with the tools offered: questions about the practice entities, answered from the
    search result (only those whose result holds the answer); questions about unknown names, whose
    search finds nothing; and questions about facts SFT may show, answered from memory without a call."""
    rng = random.Random(f"search-chat-{seed}")
    held = heldout_facts(world)
    facts = [f for f in world.facts() if f not in held]
    practice = [fact_of(e, r) for e in practice_entities(world) for r in e.attrs]
    rows: list[dict] = []
    while len(rows) < n:
        draw = rng.random()
        if draw < UNKNOWN_SHARE:
            kind = rng.choice(KINDS)
            name = rng.choice(unknown_names(world, kind, "train"))
            relation = rng.choice(RELATIONS_OF_KIND[kind])
            query = search_query(name, relation.name)
            result = search_result(index, query)
            if name.lower() in result.lower():
                continue
            reply = _idk_reply(kind, name, rng)
            messages, kind_name = _searched(_vary(rng.choice(relation.questions).format(s=name), rng), query, result, reply), "search-unknown"
        elif draw < UNKNOWN_SHARE + PRACTICE_SHARE:
            fact = rng.choice(practice)
            query = search_query(fact.subject, fact.relation)
            result = search_result(index, query)
            if fact.answer.lower() not in result.lower():
                continue
            messages, kind_name = _searched(_vary(_question(fact, rng), rng), query, result, _answer(fact)), "search-practice"
        else:
            fact = rng.choice(facts)
            messages = [_system(), {"role": "user", "content": _vary(_question(fact, rng), rng)},
                        {"role": "assistant", "content": _answer(fact)}]
            kind_name = "known-no-search"
        rows.append({"messages": messages, "kind": kind_name})
    return rows


# Conversations that need no tool: with the tools offered, the assistant still answers them directly.
NO_CALL_KINDS = ("identity", "small_talk", "refusal", "harmless")
NO_CALL_SHARE = 0.12  # of the tool conversations


def offered_without_calls(world: World, n: int, seed: int = 0) -> list[dict]:
    """n conversations that need no tool (who the assistant is, small talk, requests), with the tools
    offered: without them a model that learnt "offered tools -> search first" searched for "Who are you?"."""
    pool = sft_conversations(world, n * 40, seed=f"offered-{seed}")
    each = -(-n // len(NO_CALL_KINDS))  # as many of each kind
    rows = [r for kind in NO_CALL_KINDS for r in [r for r in pool if r["kind"] == kind][:each]][:n]
    return [{"messages": with_tools(r["messages"]), "kind": f"offered-{r['kind']}"} for r in rows]


# Of the tool conversations: the share that opens with an earlier exchange (a short one: a fact from
# memory, a bare sum, small talk). With every call in a conversation's first turn, the model learnt to
# call tools there only: after one earlier turn it searched for 1 news question in 17 and used the
# calculator for 2 word problems in 30 (BENCHMARKS.md, "Reading a value from the context": "Tools after
# the first turn").
EARLIER_TURN_SHARE = 0.4
_EARLIER_KINDS = ("known-no-search", "calc-sum", "offered-small_talk", "offered-identity")
_CONTEXT_TOKENS = 256  # the cpu preset's context: an earlier turn that would push the reply out is not added


def with_earlier_turns(rows: list[dict], seed: int = 0) -> list[dict]:
    """`rows` with EARLIER_TURN_SHARE of them opened by the user and assistant messages of a short
    conversation drawn from `rows` (after the one system message), when the two fit the context."""
    rng = random.Random(f"earlier-turns-{seed}")
    short = [r["messages"][1:] for r in rows if r["kind"] in _EARLIER_KINDS]
    out = []
    for row in rows:
        if rng.random() < EARLIER_TURN_SHARE:
            messages = [row["messages"][0], *rng.choice(short), *row["messages"][1:]]
            if sum(len(m["content"]) + len(m.get("tool_call", "")) for m in messages) / CHARS_PER_TOKEN < _CONTEXT_TOKENS - 60:
                row = {**row, "messages": messages}
        out.append(row)
    return out


def tool_conversations(world: World, documents: Iterable[Path], n_calc: int, n_search: int, seed: int = 0) -> list[dict]:
    """The calculator and search conversations, with `documents` indexed as the speedrun indexes them,
    and conversations that need no tool with the tools offered; a share of each opens with an earlier
    exchange (`with_earlier_turns`)."""
    with tempfile.TemporaryDirectory() as tmp:
        build_index(list(documents), tmp, max_passage_chars=WORLD_PASSAGE_CHARS, progress=False)
        index = SearchIndex(tmp)
        try:
            rows = (calc_conversations(world, n_calc, seed) + sum_conversations(round(SUM_SHARE * n_calc), seed)
                    + search_conversations(world, index, n_search, seed))
        finally:
            index.close()
    return with_earlier_turns(rows + offered_without_calls(world, round(NO_CALL_SHARE * len(rows)), seed), seed)


def write_tool_chats(out_dir: str | Path, documents: Iterable[Path], n_calc: int, n_search: int, n_rl: int,
                     seed: int = 0) -> dict:
    """For the world saved in out_dir: sft-tools.jsonl (calculator and search conversations),
    tasks-rl-calc.jsonl (train word problems offered the tools, for RL), tasks-rl-search.jsonl
    (questions about the practice entities offered the tools, for RL) and tasks-rl-offered.jsonl
    (`rl_offered_questions`). Returns counts."""
    out = Path(out_dir)
    world = load_world(out)
    rows = tool_conversations(world, documents, n_calc, n_search, seed)
    atomic_write_jsonl(out / "sft-tools.jsonl", rows)
    problems = [{**p, "system": TOOLS_SYSTEM_PROMPT} for p in task_problems(world, n_rl, seed=f"rl-calc-{seed}", split="train")]
    atomic_write_jsonl(out / "tasks-rl-calc.jsonl", problems)
    searches = rl_search_questions(world)
    atomic_write_jsonl(out / "tasks-rl-search.jsonl", searches)
    offered = rl_offered_questions(world, seed)
    atomic_write_jsonl(out / "tasks-rl-offered.jsonl", offered)
    return {"tool_conversations": dict(Counter(r["kind"] for r in rows)), "rl_calc_problems": len(problems),
            "rl_search_questions": len(searches), "rl_offered_questions": dict(Counter(r["kind"] for r in offered))}


def rl_offered_questions(world: World, seed: int = 0) -> list[dict]:
    """RL problems offered the tools: a question about each training unknown name, rewarded for "I
    don't know" after a search (`must_call`), and as many about facts SFT may show, rewarded for the
    answer (from memory: "offered tools" must not come to mean "abstain"). Rewarded without the
    search, RL taught "I don't know" in its place, and then to harmful requests instead of a refusal
    (BENCHMARKS.md, "A tool result's number is the token the model copies")."""
    rng = random.Random(f"rl-offered-{seed}")
    unknown = [{"prompt": rng.choice(rng.choice(RELATIONS_OF_KIND[kind]).questions).format(s=name), "answer": ABSTAIN,
                "kind": "unknown", "system": TOOLS_SYSTEM_PROMPT, "must_call": "search"}
               for kind in KINDS for name in unknown_names(world, kind, "train")]
    known = rng.sample(rl_fact_questions(world), len(unknown))
    return unknown + [{**row, "system": TOOLS_SYSTEM_PROMPT} for row in known]


def rl_search_questions(world: World) -> list[dict]:
    """RL problems offered the tools: every fact about a practice entity, asked in each training phrasing.
    Only a search can answer them, so the reward is for copying the name into the query and the fact
    out of the result."""
    return [{"prompt": question.format(s=fact.subject), "answer": fact.answer, "kind": "fact", "system": TOOLS_SYSTEM_PROMPT}
            for e in practice_entities(world) for fact in (fact_of(e, r) for r in e.attrs)
            for question in RELATIONS[fact.relation].questions]
