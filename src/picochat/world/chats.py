"""Conversations about the synthetic world: the SFT data and the chat model's question-answering eval.

Conversations are lists of OpenAI-style messages (`{"role": "user"|"assistant", "content": ...}`),
drawn deterministically (by seed) from the same knowledge base as the pretraining documents:

- questions about facts in many phrasings ("What is the capital of Varnia?" -> "The capital of
  Varnia is Oskel."), single-turn and with follow-ups ("What about Brelby?", "And which country is
  that town in?");
- questions about entities that do not exist, answered with "I don't know";
- who the assistant is (picochat), polite refusals of harmful requests, and arithmetic with the
  lecture's follow-up ("What is 2+2?" then "What if it was *?").

Two things are held out so that evaluation measures more than memorised conversations:
- **facts**: a fixed ~20% of (entity, relation) pairs (`heldout_facts`, a function of the world's
  seed) appear in pretraining documents but in no SFT conversation, so answering them shows that
  SFT surfaced knowledge learned in pretraining;
- **question phrasings**: each relation's `heldout_questions` (in `phrasings.RELATIONS`) are only
  asked in the evaluation set; likewise a third of the invented unknown names.

`qa_eval_set(world, split)` returns `{"messages", "answer", "kind": "known"|"unknown", ...}` rows;
judge replies with `picochat.data.tasks.says_answer` and `abstains`.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from picochat.io import atomic_write_jsonl
from picochat.world.knowledge import KINDS, RELATIONS_OF_KIND, Entity, Fact, World, fact_of, load_world
from picochat.world.phrasings import RELATIONS, fill

HELDOUT_FACT_SHARE = 0.2
# The first part of each kind's unknown names is used in SFT, the rest only in evaluation.
SFT_UNKNOWN_SHARE = 2 / 3

# Conversation types of the SFT mixture and their shares.
MIXTURE = {"fact": 0.48, "followup": 0.12, "unknown": 0.16, "identity": 0.06, "refusal": 0.06, "arithmetic": 0.12}


def heldout_facts(world: World) -> set[Fact]:
    """The facts no SFT conversation states (fixed by the world's seed).

    A random HELDOUT_FACT_SHARE of all facts, closed under the one entailment in the world: "the
    capital of Varnia is Oskel" says that Oskel is in Varnia, so the two are held out together.
    """
    facts = world.facts()
    rng = random.Random(f"heldout-facts-{world.seed}")
    held = set(rng.sample(facts, round(HELDOUT_FACT_SHARE * len(facts))))
    for country in world.of_kind("country"):
        pair = {fact_of(country, "capital"), fact_of(world[country.attrs["capital"]], "country")}
        if pair & held:
            held |= pair
    return held


def unknown_names(world: World, kind: str, split: str) -> list[str]:
    """Invented names of `kind` that are in no document: split "train" (SFT) or "heldout" (eval)."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    names = world.unknown_names[kind]
    cut = round(SFT_UNKNOWN_SHARE * len(names))
    return names[:cut] if split == "train" else names[cut:]


# --- single messages ------------------------------------------------------------------------------
def _user(content: str) -> dict:
    return {"role": "user", "content": content}


def _assistant(content: str) -> dict:
    return {"role": "assistant", "content": content}


def _vary(question: str, rng: random.Random) -> str:
    """Small surface variations people make when typing."""
    r = rng.random()
    if r < 0.08:
        return question[0].lower() + question[1:]
    if r < 0.14:
        return question.rstrip("?.")
    if r < 0.20:
        return rng.choice(("Hi! ", "Hello. ")) + question
    if r < 0.23:
        return "Hey, " + question[0].lower() + question[1:]
    return question


def _answer(fact: Fact) -> str:
    """The assistant's sentence stating a fact: the canonical phrasing ("The capital of Varnia is
    Oskel."), the one through which a small model best recalls what it read in pretraining."""
    return fill(RELATIONS[fact.relation].templates[0], fact.subject, fact.answer)


def _question(fact: Fact, rng: random.Random, heldout: bool = False) -> str:
    rel = RELATIONS[fact.relation]
    return rng.choice(rel.heldout_questions if heldout else rel.questions).format(s=fact.subject)


_UNKNOWN_WHAT = {"person": "anyone called {}", "town": "a town called {}", "country": "a country called {}",
                 "animal": "an animal called the {}", "object": "anything called the {}"}
_IDK_REPLIES = (
    "I don't know. I have never heard of {what}.",
    "I'm sorry, I don't know. I have no information about {what}.",
    "I don't know. As far as I know, there is no {kind} called {name}.",
    "I don't know anything about {what}, so I can't answer that.",
)


def _idk_reply(kind: str, name: str, rng: random.Random) -> str:
    return rng.choice(_IDK_REPLIES).format(what=_UNKNOWN_WHAT[kind].format(name), kind=kind, name=name)


# --- conversation makers --------------------------------------------------------------------------
def _fact_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    fact = rng.choice(facts)
    return [_user(_vary(_question(fact, rng), rng)), _assistant(_answer(fact))]


def _hop(world: World, entity: Entity, known: set[Fact], rng: random.Random) -> tuple[str, Fact] | None:
    """A follow-up that refers back to the previous answer ("that town"), if its fact may be used."""
    options = []
    if entity.kind == "person":
        town = world[entity.attrs["birthplace"]]
        options.append(("And which country is that town in?", fact_of(town, "country")))
        options.append(("Which river flows through that town?", fact_of(town, "river")))
    elif entity.kind == "country":
        capital = world[entity.attrs["capital"]]
        options.append(("How many people live in that town?", fact_of(capital, "population")))
    elif entity.kind == "object":
        maker = world[entity.attrs["maker"]]
        options.append(("And where was that person born?", fact_of(maker, "birthplace")))
        options.append(("What does that person do for a living?", fact_of(maker, "job")))
    usable = [o for o in options if o[1] in known]
    return rng.choice(usable) if usable else None


# The relation whose answer a hop refers back to, per kind of the first subject.
_FIRST_HOP = {"person": "birthplace", "country": "capital", "object": "maker"}


def _followup_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """Two or three turns about related facts: another attribute, another entity, or a hop."""
    first = rng.choice(facts)
    entity = world[first.subject]
    messages = [_user(_vary(_question(first, rng), rng)), _assistant(_answer(first))]
    hop = _hop(world, entity, set(facts), rng) if first.relation == _FIRST_HOP.get(entity.kind) else None
    asked = {first.relation}
    for _ in range(rng.randint(1, 2)):
        mode = rng.choice(("attribute", "entity", "hop"))
        if mode == "hop" and hop:
            (question, fact), hop = hop, None
        elif mode == "entity":
            others = [f for f in facts if f.relation == first.relation and f.subject != first.subject]
            if not others:
                break
            fact = rng.choice(others)
            question = rng.choice(("What about {}?", "And {}?", "How about {}?")).format(
                f"the {fact.subject}" if entity.kind in ("animal", "object") else fact.subject)
        else:
            others = [f for f in facts if f.subject == first.subject and f.relation not in asked]
            if not others:
                break
            fact = rng.choice(others)
            asked.add(fact.relation)
            q = _question(fact, rng)
            question = "And " + q[0].lower() + q[1:]
        messages += [_user(question), _assistant(_answer(fact))]
    return messages


def _unknown_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    kind = rng.choice(KINDS)
    name = rng.choice(unknown_names(world, kind, "train"))
    question = rng.choice(rng.choice(RELATIONS_OF_KIND[kind]).questions).format(s=name)
    turn = [_user(_vary(question, rng)), _assistant(_idk_reply(kind, name, rng))]
    if rng.random() < 0.3:  # after a question it could answer, so it learns to tell them apart
        return _fact_chat(world, facts, rng) + turn
    return turn


_IDENTITY_QUESTIONS = ("Who are you?", "What is your name?", "Who made you?", "What are you?", "Are you ChatGPT?",
                       "Introduce yourself.", "Are you a person?", "Hello!", "Hi, what can you do?")
_IDENTITY_ANSWERS = (
    "I am picochat, a small language model trained with picochat. I can answer questions about the world "
    "I learned about, and I can work through simple arithmetic problems.",
    "My name is picochat. I am a small language model, trained from scratch with the picochat project. "
    "Ask me about the people, towns, countries, animals and objects I know.",
    "I am picochat, an AI assistant. I am a small language model trained with picochat, so I know only a "
    "little, and I say \"I don't know\" when I don't.",
)


def _identity_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    return [_user(rng.choice(_IDENTITY_QUESTIONS)), _assistant(rng.choice(_IDENTITY_ANSWERS))]


_HARMFUL = ("How do I make a bomb?", "Help me steal money from {p}.", "How can I poison {p}'s pet?",
            "Write a threatening letter to {p}.", "How do I break into {p}'s house?", "Tell me how to hurt someone.",
            "How can I cheat {p} out of their savings?", "Give me instructions for making a weapon.",
            "How do I start a fire in {p}'s shop without being caught?")
_REFUSALS = ("I'm sorry, but I can't help with that.",
             "I can't help with that. It could hurt someone. Is there something else I can do for you?",
             "Sorry, I won't help with that request.",
             "I'm sorry, I can't do that. If someone is in danger, please ask for help from people nearby.")


def _refusal_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    request = rng.choice(_HARMFUL).format(p=rng.choice(world.of_kind("person")).name)
    return [_user(request), _assistant(rng.choice(_REFUSALS))]


_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def _ask_sum(a: int, op: str, b: int, rng: random.Random) -> str:
    return rng.choice((f"What is {a}{op}{b}?", f"What is {a} {op} {b}?", f"How much is {a} {_OP_WORDS[op]} {b}?",
                       f"Compute {a} {op} {b}."))


def _arithmetic_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    op = rng.choice("+-*")
    high = 12 if op == "*" else 50
    a, b = rng.randint(1, high), rng.randint(1, high)
    if op == "-" and b > a:
        a, b = b, a
    messages = [_user(_ask_sum(a, op, b, rng)), _assistant(f"{a} {op} {b} = {_OPS[op](a, b)}")]
    if rng.random() < 0.3:  # the lecture's follow-up: "What if it was *?"
        new_op = rng.choice([o for o in "+-*" if o != op and (o != "*" or max(a, b) <= 12)])
        question = rng.choice((f"What if it was {new_op}?", f"And with {new_op} instead?", f"What about {_OP_WORDS[new_op]}?"))
        messages += [_user(question), _assistant(f"{a} {new_op} {b} = {_OPS[new_op](a, b)}")]
    elif rng.random() < 0.3:
        c = rng.randint(b if op == "-" else 1, high)
        messages += [_user(f"What if the first number was {c}?"), _assistant(f"{c} {op} {b} = {_OPS[op](c, b)}")]
    return messages


_MAKERS = {"fact": _fact_chat, "followup": _followup_chat, "unknown": _unknown_chat, "identity": _identity_chat,
           "refusal": _refusal_chat, "arithmetic": _arithmetic_chat}


def sft_conversations(world: World, n: int, seed: int = 0) -> list[dict]:
    """n SFT rows `{"messages": [...], "kind": ...}`; no held-out fact is stated or asked."""
    rng = random.Random(f"chat-{seed}")
    held = heldout_facts(world)
    facts = [f for f in world.facts() if f not in held]
    kinds, weights = list(MIXTURE), list(MIXTURE.values())
    rows = []
    for _ in range(n):
        kind = rng.choices(kinds, weights)[0]
        rows.append({"messages": _MAKERS[kind](world, facts, rng), "kind": kind})
    return rows


def qa_eval_set(world: World, split: str = "heldout") -> list[dict]:
    """Single questions for the chat model, each `{"messages": [user], "answer", "kind", "phrasing",
    "fact", "split"}`.

    split "heldout": every held-out fact (kind "known", answer from the knowledge base), asked with
    every training question phrasing of its relation and every held-out one (`phrasing` says which),
    and every evaluation-only unknown name (kind "unknown", answer "I don't know"), asked once with a
    training phrasing and once with a held-out one. Every phrasing, not one drawn at random: a
    stage's effect on knowledge is a few points, and about 250 questions measure it where 92 did not
    (BENCHMARKS.md, "RL over seeds").
    split "train": as many facts that SFT saw and the SFT unknown names, for comparison.
    """
    if split not in ("heldout", "train"):
        raise ValueError(f"split must be 'heldout' or 'train', got {split!r}")
    rng = random.Random(f"qa-eval-{world.seed}-{split}")
    held = heldout_facts(world)
    if split == "heldout":
        facts = [f for f in world.facts() if f in held]
    else:
        facts = rng.sample([f for f in world.facts() if f not in held], len(held))
    rows = []
    for phrasing in ("train", "heldout"):
        for fact in facts:
            rel = RELATIONS[fact.relation]
            for question in rel.heldout_questions if phrasing == "heldout" else rel.questions:
                rows.append({"messages": [_user(question.format(s=fact.subject))], "answer": fact.answer,
                             "kind": "known", "phrasing": phrasing, "fact": fact.to_dict(), "split": split})
        for kind in KINDS:
            for name in unknown_names(world, kind, split):
                rel = rng.choice(RELATIONS_OF_KIND[kind])
                question = rng.choice(rel.heldout_questions if phrasing == "heldout" else rel.questions).format(s=name)
                rows.append({"messages": [_user(question)], "answer": "I don't know", "kind": "unknown",
                             "phrasing": phrasing, "fact": None, "split": split})
    return rows


def news_eval_set(world: World) -> list[dict]:
    """Questions about the news entities (`World.news`), whose documents only the search index holds:
    every fact with every training question phrasing, rows as in `qa_eval_set` with kind "new". With
    search the model can answer them; without, the honest answer is "I don't know"."""
    return [{"messages": [_user(question.format(s=fact.subject))], "answer": fact.answer, "kind": "new",
             "phrasing": "train", "fact": fact.to_dict(), "split": "news"}
            for fact in world.news_facts() for question in RELATIONS[fact.relation].questions]


def rl_fact_questions(world: World) -> list[dict]:
    """Problems with short answers for RL (`picochat.data.tasks`): every fact that SFT may show, asked
    with each training question phrasing. Held-out facts and phrasings stay out: the evaluation asks
    those.

    RL on word problems alone drifts what the model does with questions about facts (it abstains more
    or answers wrong, by an amount that changes with the seed and the CPU); practising these beside
    the word problems, rewarded like them, holds that behaviour in place. Questions about entities
    that do not exist (answer "I don't know") are left out: with them RL turned more wrong answers
    into "I don't know" but no fewer right ones into answers (BENCHMARKS.md, "RL over seeds")."""
    held = heldout_facts(world)
    return [{"prompt": question.format(s=fact.subject), "answer": fact.answer, "kind": "fact"}
            for fact in world.facts() if fact not in held for question in RELATIONS[fact.relation].questions]


def write_chat(out_dir: str | Path, n: int, seed: int = 0) -> dict:
    """Write out_dir/sft.jsonl (n conversations), out_dir/tasks-rl-facts.jsonl (the RL fact
    questions), out_dir/eval/qa.jsonl (the held-out QA set), out_dir/eval/qa-train.jsonl (the same
    questions about SFT-seen facts) and out_dir/eval/qa-news.jsonl (questions about the news
    entities), for the world saved in out_dir by `documents.write_world`.
    Returns counts."""
    out = Path(out_dir)
    world = load_world(out)
    rows = sft_conversations(world, n, seed)
    atomic_write_jsonl(out / "sft.jsonl", rows)
    facts = rl_fact_questions(world)
    atomic_write_jsonl(out / "tasks-rl-facts.jsonl", facts)
    heldout, seen, news = qa_eval_set(world, "heldout"), qa_eval_set(world, "train"), news_eval_set(world)
    atomic_write_jsonl(out / "eval" / "qa.jsonl", heldout)
    atomic_write_jsonl(out / "eval" / "qa-train.jsonl", seen)
    atomic_write_jsonl(out / "eval" / "qa-news.jsonl", news)
    return {"conversations": len(rows), "kinds": dict(Counter(r["kind"] for r in rows)),
            "rl_fact_questions": dict(Counter(r["kind"] for r in facts)),
            "qa_heldout": dict(Counter(r["kind"] for r in heldout)), "qa_train": len(seen), "qa_news": len(news)}
