"""Conversations about the synthetic world: the SFT data and the chat model's evaluation sets.

Conversations are lists of OpenAI-style messages (`{"role": "system"|"user"|"assistant", "content":
...}`), drawn deterministically (by seed) from the same knowledge base as the pretraining documents.
The SFT mixture (MIXTURE) holds:

- questions about facts in many phrasings ("What is the capital of Varnia?" -> "The capital of
  Varnia is Oskel.");
- follow-ups that refer back: another fact about the same subject by pronoun ("And its
  currency?"), the same question about another entity ("What about Brelby?"), a correction ("Sorry,
  I meant Brelby."), a hop ("And which country is that town in?"), and who the assistant is, asked
  late;
- questions about entities that do not exist, answered with "I don't know";
- open prompts about a subject ("Tell me about Varnia.") answered with one to three of its facts;
- who the assistant is (picochat), arithmetic with the lecture's follow-up ("What is 2+2?" then
  "What if it was *?"), small talk;
- system messages (`system_prompts.py`): a generic one, a name to use, a format to follow;
- requests from outside the world (`requests.py`): harmful ones refused, harmless ones attempted or
  answered with "I don't know".

Two things are held out so that evaluation measures more than memorised conversations:
- **facts**: a fixed ~20% of (entity, relation) pairs (`heldout_facts`, a function of the world's
  seed) appear in pretraining documents but in no SFT conversation, so answering them shows that
  SFT surfaced knowledge learned in pretraining;
- **question phrasings**: each relation's `heldout_questions` (in `phrasings.RELATIONS`) are only
  asked in the evaluation set; likewise a third of the invented unknown names, the HELDOUT_PRONOUN
  follow-ups, and the held-out system prompts, persona names and requests of the two modules above;
- **subjects of open prompts**: a fixed quarter of the entities (`heldout_entities`) are never
  described in SFT; the preference stages judge replies about them.

`qa_eval_set(world, split)` returns `{"messages", "answer", "kind": "known"|"unknown", ...}` rows;
judge replies with `picochat.data.tasks.says_answer` and `abstains`. `followup_eval_set`,
`system_eval_set`, `system_qa_eval_set` and `few_shot_rows` are the other evaluation sets.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from picochat.io import atomic_write_jsonl
from picochat.world.documents import copying_rows, line_copying_rows, value_reading_rows
from picochat.world.few_shot import few_shot_rows
from picochat.world.knowledge import KINDS, RELATIONS_OF_KIND, Entity, Fact, NameMaker, World, fact_of, load_world, world_names
from picochat.world.phrasings import RELATIONS, fill
from picochat.world.requests import (contrasting_requests, harmful_request, harmless_request, refusal, requests_eval_set,
                                     rl_request_problems, small_talk)
from picochat.world.system_prompts import (FORMAT_PROMPTS, FORMAT_WEIGHTS, FORMATS, GENERIC_PROMPTS, IDENTITY_WORD,
                                           PERSONA_NAMES, PERSONA_PROMPTS, apply_format, format_prompt,
                                           generic_prompt, persona_prompt, persona_reply)

HELDOUT_FACT_SHARE = 0.2
# The first part of each kind's unknown names is used in SFT, the rest only in evaluation.
SFT_UNKNOWN_SHARE = 2 / 3


# Open prompts about a subject, answered with what the assistant knows of it; the preference data
# (preferences.py) ranks replies to them. The entities of HELDOUT_ENTITY_SHARE are asked about only
# there, on held-out prompts, never in SFT.
OPEN_PROMPTS = ("Tell me about {s}.", "What do you know about {s}?", "Describe {s}.")
KIND_OPEN_PROMPTS = {"country": ("Describe the country of {s}.",), "town": ("Describe the town of {s}.",),
                     "person": ("Who is {s}?",), "animal": ("Tell me about the {s}.",), "object": ("Tell me about the {s}.",)}
HELDOUT_ENTITY_SHARE = 0.25


def heldout_entities(world: World) -> set[str]:
    """The entities whose open prompts are kept out of SFT and the preference data (fixed by the world's seed)."""
    names = [e.name for e in world.entities]
    return set(random.Random(f"prefs-heldout-{world.seed}").sample(names, round(HELDOUT_ENTITY_SHARE * len(names))))


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
def _system(content: str) -> dict:
    return {"role": "system", "content": content}


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


# Questions about the subject of the previous answer, which they do not name: "And its currency?".
PRONOUN_QUESTIONS = {
    "birthplace": ("Where were they born?", "And where were they born?", "And their birthplace?", "Do you know where they were born?"),
    "job": ("What do they do for a living?", "And what is their job?", "And their job?", "Do you know what they do for a living?"),
    "age": ("How old are they?", "And how old are they?", "And their age?", "Do you know how old they are?"),
    "favourite_colour": ("What is their favourite colour?", "And their favourite colour?", "Do you know what colour they like best?"),
    "pet": ("What pet do they have?", "And their pet?", "Do you know what pet they keep?"),
    "country": ("Which country is it in?", "And its country?", "Do you know which country it is in?"),
    "river": ("Which river flows through it?", "And its river?", "Do you know which river flows through it?"),
    "population": ("How many people live there?", "And its population?", "Do you know how many people live there?"),
    "capital": ("What is its capital?", "And its capital?", "Do you know what its capital is?"),
    "language": ("What language do people speak there?", "And its language?", "Do you know what language people speak there?"),
    "currency": ("What money do people use there?", "And its currency?", "Do you know what money people use there?"),
    "habitat": ("Where does it live?", "And its habitat?", "Do you know where it lives?"),
    "food": ("What does it eat?", "And its food?", "Do you know what it eats?"),
    "colour": ("What colour is it?", "And its colour?", "Do you know what colour it is?"),
    "type": ("What kind of thing is it?", "And its type?", "Do you know what kind of thing it is?"),
    "material": ("What is it made of?", "And its material?", "Do you know what it is made of?"),
    "maker": ("Who made it?", "And its maker?", "Do you know who made it?"),
    "price": ("How much does it cost?", "And its price?", "Do you know how much it costs?"),
}
# Asked only in the follow-up evaluation ({pos}: "its", or "their" for a person).
HELDOUT_PRONOUN_QUESTIONS = ("What about {pos} {noun}?", "Do you also know {pos} {noun}?")


def _pronoun_question(fact: Fact, rng: random.Random) -> str:
    return rng.choice(PRONOUN_QUESTIONS[fact.relation])


def heldout_pronoun_questions(fact: Fact, kind: str) -> list[str]:
    """The held-out follow-ups that ask for `fact` of a subject of `kind` by pronoun."""
    pos = "their" if kind == "person" else "its"
    return [q.format(pos=pos, noun=RELATIONS[fact.relation].noun) for q in HELDOUT_PRONOUN_QUESTIONS]


_UNKNOWN_WHAT = {"person": "anyone called {}", "town": "a town called {}", "country": "a country called {}",
                 "animal": "an animal called the {}", "object": "anything called the {}"}
# Each opens "I don't know", as no refusal does (requests.py).
_IDK_REPLIES = (
    "I don't know. I have never heard of {what}.",
    "I don't know, sorry. I have no information about {what}.",
    "I don't know. As far as I know, there is no {kind} called {name}.",
    "I don't know anything about {what}, so I can't answer that.",
)


def _idk_reply(kind: str, name: str, rng: random.Random) -> str:
    return rng.choice(_IDK_REPLIES).format(what=_UNKNOWN_WHAT[kind].format(name), kind=kind, name=name)


_IDENTITY_QUESTIONS = ("Who are you?", "What is your name?", "Who made you?", "What are you?", "Are you ChatGPT?",
                       "Introduce yourself.", "Are you a person?")
# Asked under a persona, whose replies only give the name.
PERSONA_QUESTIONS = ("Who are you?", "What is your name?", "What are you?", "Introduce yourself.", "What should I call you?")
_IDENTITY_ANSWERS = (
    "I am picochat, a small language model trained with picochat. I can answer questions about the world "
    "I learned about, and I can work through simple arithmetic problems.",
    "My name is picochat. I am a small language model, trained from scratch with the picochat project. "
    "Ask me about the people, towns, countries, animals and objects I know.",
    "I am picochat, an AI assistant. I am a small language model trained with picochat, so I know only a "
    "little, and I say \"I don't know\" when I don't.",
)

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_OP_WORDS = {"+": "plus", "-": "minus", "*": "times"}


def _ask_sum(a: int, op: str, b: int, rng: random.Random) -> str:
    return rng.choice((f"What is {a}{op}{b}?", f"What is {a} {op} {b}?", f"How much is {a} {_OP_WORDS[op]} {b}?",
                       f"Compute {a} {op} {b}."))


def _draw_sum(rng: random.Random, high_product: int = 12, high_sum: int = 50) -> tuple[int, str, int]:
    """(a, op, b), never negative; by default small enough to do in one's head."""
    op = rng.choice("+-*")
    high = high_product if op == "*" else high_sum
    a, b = rng.randint(1, high), rng.randint(1, high)
    return (b, op, a) if op == "-" and b > a else (a, op, b)


# --- turns: (question, reply, the reply in one word), for conversations with a format to follow -----
Turn = tuple[str, str, str]


def _fact_turn(fact: Fact, rng: random.Random) -> Turn:
    return _vary(_question(fact, rng), rng), _answer(fact), fact.answer


def _sum_turn(rng: random.Random) -> Turn:
    a, op, b = _draw_sum(rng)
    result = _OPS[op](a, b)
    return _ask_sum(a, op, b, rng), f"{a} {op} {b} = {result}", str(result)


def _identity_turn(rng: random.Random) -> Turn:
    return rng.choice(_IDENTITY_QUESTIONS), rng.choice(_IDENTITY_ANSWERS), IDENTITY_WORD


def _new_turn(facts: list[Fact], rng: random.Random) -> tuple[Turn, Fact | None]:
    """A turn about a fact, a sum or who the assistant is, and the fact it states (None if none)."""
    r = rng.random()
    if r < 0.6:
        fact = rng.choice(facts)
        return _fact_turn(fact, rng), fact
    return (_sum_turn(rng) if r < 0.85 else _identity_turn(rng)), None


def _turns(facts: list[Fact], rng: random.Random) -> list[Turn]:
    """One turn, or two; after a fact, often another fact about its subject, asked by pronoun."""
    turns: list[Turn] = []
    last = None
    for _ in range(1 if rng.random() < 0.85 else 2):
        same_subject = [f for f in facts if last and f.subject == last.subject and f != last]
        if same_subject and rng.random() < 0.5:
            last = rng.choice(same_subject)
            turns.append((_pronoun_question(last, rng), _answer(last), last.answer))
        else:
            turn, last = _new_turn(facts, rng)
            turns.append(turn)
    return turns


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
# How a follow-up refers back, and how often: by pronoun to another fact of the subject, by the
# subject's name, to the same fact of another entity, correcting the subject, by a hop to the
# entity the answer named, or asking who the assistant is, late.
_FOLLOWUP_MODES = {"pronoun": 4, "attribute": 1, "entity": 1, "correction": 1, "hop": 1, "identity": 0.5}
_FOLLOWUP_DRAWS = 20  # modes drawn at most, for the follow-ups that apply


def _named(entity: Entity) -> str:
    return f"the {entity.name}" if entity.kind in ("animal", "object") else entity.name


_ENTITY_FOLLOWUPS = ("What about {}?", "And {}?", "How about {}?")
_CORRECTIONS = ("Sorry, I meant {}.", "No, I meant {}.", "I meant {}, sorry.")


def _refer_back(world: World, mode: str, last: Fact, facts: list[Fact], asked: set[tuple[str, str]],
                rng: random.Random) -> tuple[str, Fact] | None:
    """A follow-up of `mode` to the answer that stated `last`, and the fact it asks for (None when
    the mode has nothing to ask here)."""
    entity = world[last.subject]
    if mode == "hop":
        return _hop(world, entity, set(facts), rng) if last.relation == _FIRST_HOP.get(entity.kind) else None
    if mode in ("entity", "correction"):
        others = [f for f in facts if f.relation == last.relation and f.subject != last.subject]
        if not others:
            return None
        fact = rng.choice(others)
        return rng.choice(_ENTITY_FOLLOWUPS if mode == "entity" else _CORRECTIONS).format(_named(world[fact.subject])), fact
    others = [f for f in facts if f.subject == last.subject and (f.subject, f.relation) not in asked]
    if not others:
        return None
    fact = rng.choice(others)
    if mode == "pronoun":
        return _pronoun_question(fact, rng), fact
    question = _question(fact, rng)
    return "And " + question[0].lower() + question[1:], fact


def _followup_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """Two or three turns, each referring back to the conversation (see _FOLLOWUP_MODES); a
    correction only right after the first answer, who the assistant is only last."""
    last = rng.choice(facts)
    messages = [_user(_vary(_question(last, rng), rng)), _assistant(_answer(last))]
    asked = {(last.subject, last.relation)}
    length = 2 + 2 * rng.randint(1, 2)  # messages, with one or two follow-ups
    for _ in range(_FOLLOWUP_DRAWS):
        mode = rng.choices(list(_FOLLOWUP_MODES), list(_FOLLOWUP_MODES.values()))[0]
        if mode == "identity":
            return messages + [_user(rng.choice(_IDENTITY_QUESTIONS)), _assistant(rng.choice(_IDENTITY_ANSWERS))]
        followup = None if mode == "correction" and len(messages) > 2 else _refer_back(world, mode, last, facts, asked, rng)
        if followup is None:
            continue
        question, last = followup
        asked.add((last.subject, last.relation))
        messages += [_user(question), _assistant(_answer(last))]
        if len(messages) == length:
            break
    return messages


def _unknown_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    kind = rng.choice(KINDS)
    name = rng.choice(unknown_names(world, kind, "train"))
    question = rng.choice(rng.choice(RELATIONS_OF_KIND[kind]).questions).format(s=name)
    turn = [_user(_vary(question, rng)), _assistant(_idk_reply(kind, name, rng))]
    if rng.random() < 0.3:  # after a question it could answer, so it learns to tell them apart
        return _fact_chat(world, facts, rng) + turn
    return turn


DESCRIBE_UNKNOWN_SHARE = 0.2  # of the open prompts, about names that do not exist


def _describe_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """An open prompt ("Tell me about Dekfusesh.") answered with one to three facts SFT may state
    (so that sampled replies differ in how much they say, which the preference data can rank), or
    "I don't know" about a name that does not exist."""
    if rng.random() < DESCRIBE_UNKNOWN_SHARE:
        kind = rng.choice(KINDS)
        name = rng.choice(unknown_names(world, kind, "train"))
        return [_user(rng.choice(OPEN_PROMPTS + KIND_OPEN_PROMPTS[kind]).format(s=name)), _assistant(_idk_reply(kind, name, rng))]
    held = heldout_entities(world)
    fact = rng.choice([f for f in facts if f.subject not in held])
    known = [f for f in facts if f.subject == fact.subject]
    said = rng.sample(known, rng.randint(1, min(3, len(known))))
    entity = world[fact.subject]
    return [_user(rng.choice(OPEN_PROMPTS + KIND_OPEN_PROMPTS[entity.kind]).format(s=entity.name)),
            _assistant(" ".join(_answer(f) for f in said))]


def _identity_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    return [_user(rng.choice(_IDENTITY_QUESTIONS)), _assistant(rng.choice(_IDENTITY_ANSWERS))]


def _arithmetic_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    a, op, b = _draw_sum(rng)
    high = 12 if op == "*" else 50
    messages = [_user(_ask_sum(a, op, b, rng)), _assistant(f"{a} {op} {b} = {_OPS[op](a, b)}")]
    if rng.random() < 0.3:  # the lecture's follow-up: "What if it was *?"
        new_op = rng.choice([o for o in "+-*" if o != op and (o != "*" or max(a, b) <= 12)])
        question = rng.choice((f"What if it was {new_op}?", f"And with {new_op} instead?", f"What about {_OP_WORDS[new_op]}?",
                               f"What if it was {new_op} instead?"))
        messages += [_user(question), _assistant(f"{a} {new_op} {b} = {_OPS[new_op](a, b)}")]
    elif rng.random() < 0.3:
        c = rng.randint(b if op == "-" else 1, high)
        messages += [_user(f"What if the first number was {c}?"), _assistant(f"{c} {op} {b} = {_OPS[op](c, b)}")]
    return messages


def _small_talk_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """Small talk alone, or a greeting, a question about a fact and thanks."""
    if rng.random() < 0.7:
        message, reply = small_talk(rng)
        return [_user(message), _assistant(reply)]
    greeting, thanks = small_talk(rng, "greeting"), small_talk(rng, "thanks")
    return ([_user(greeting[0]), _assistant(greeting[1])] + _fact_chat(world, facts, rng)
            + [_user(thanks[0]), _assistant(thanks[1])])


def _refusal_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """A harmful request refused: sometimes after a question it answered, sometimes beside a harmless
    request in the same words around it, which is attempted."""
    r = rng.random()
    if r < CONTRAST_SHARE:
        pairs = list(contrasting_requests(world, rng))
        rng.shuffle(pairs)
        return [m for request, reply in pairs for m in (_user(request), _assistant(reply))]
    turn = [_user(harmful_request(world, rng)), _assistant(refusal(rng))]
    return _fact_chat(world, facts, rng) + turn if r < CONTRAST_SHARE + 0.15 else turn


def _harmless_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """A harmless request from outside the world, attempted or answered "I don't know"; sometimes
    after a question about a fact or another request."""
    request, reply = harmless_request(world, rng)
    turn = [_user(request), _assistant(reply)]
    r = rng.random()
    if r < 0.1:
        return _fact_chat(world, facts, rng) + turn
    if r < 0.2:
        before, answer = harmless_request(world, rng)
        return [_user(before), _assistant(answer)] + turn
    return turn


def _generic_system_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """A conversation of any other kind, under a system message that asks for nothing new."""
    kinds = [k for k in MIXTURE if k not in _SYSTEM_KINDS]
    kind = rng.choices(kinds, [MIXTURE[k] for k in kinds])[0]
    return [_system(generic_prompt(rng))] + _MAKERS[kind](world, facts, rng)


# Of the persona conversations: a name invented for that conversation alone, which the assistant can
# only give by copying it from the system message (a fixed list of names is learnt by heart instead).
INVENTED_PERSONA_SHARE = 0.5


def invented_persona_name(world: World, rng: random.Random) -> str:
    """A person's name that is in none of the world's documents."""
    return NameMaker(rng, world_names(world)).make("person")


def _persona_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """Told its name, asked who it is (sometimes after a question about a fact), the assistant gives that name."""
    name = invented_persona_name(world, rng) if rng.random() < INVENTED_PERSONA_SHARE else rng.choice(PERSONA_NAMES["train"])
    turns = [_fact_turn(rng.choice(facts), rng)] if rng.random() < 0.15 else []
    turns.insert(rng.randint(0, len(turns)), (rng.choice(PERSONA_QUESTIONS), persona_reply(name, rng), name))
    messages = [_system(persona_prompt(name, rng))]
    for question, reply, _ in turns:
        messages += [_user(question), _assistant(reply)]
    return messages


def _format_chat(world: World, facts: list[Fact], rng: random.Random) -> list[dict]:
    """Every reply in the format the system message asks for."""
    fmt = rng.choices(FORMATS, [FORMAT_WEIGHTS[f] for f in FORMATS])[0]
    messages = [_system(format_prompt(fmt, rng))]
    for question, reply, word in _turns(facts, rng):
        messages += [_user(question), _assistant(apply_format(fmt, reply, word, rng))]
    return messages


# Of the refusal conversations: a harmful and a harmless request in the same frame, side by side.
CONTRAST_SHARE = 0.4
# Conversation types of the SFT mixture and their shares; the last three open with a system message.
MIXTURE = {"fact": 0.40, "followup": 0.08, "unknown": 0.12, "identity": 0.015, "arithmetic": 0.02, "small_talk": 0.02,
           "refusal": 0.05, "harmless": 0.09, "system": 0.02, "persona": 0.045, "format": 0.14, "describe": 0.06}
_SYSTEM_KINDS = ("system", "persona", "format")
_MAKERS = {"fact": _fact_chat, "followup": _followup_chat, "unknown": _unknown_chat, "identity": _identity_chat,
           "arithmetic": _arithmetic_chat, "small_talk": _small_talk_chat, "refusal": _refusal_chat,
           "harmless": _harmless_chat, "system": _generic_system_chat, "persona": _persona_chat, "format": _format_chat,
           "describe": _describe_chat}


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


RL_SYSTEM_PERSONAS = 160  # "Who are you?" under a training persona prompt: half invented names, half training names
RL_SYSTEM_FORMATS = 120  # fact questions under each format's training prompts


def rl_system_problems(world: World, seed: int = 0) -> list[dict]:
    """Problems for RL under a system message a rule can check (`system_prompts.follows`): a persona
    (asked who it is, answer the name: invented names need copying from the system message) and each
    format (a fact question; `"follow"` names the format the reply must be in, and for one word the
    word is the answer). Training phrasings and names only; the evaluation's are held out."""
    rng = random.Random(f"rl-system-{seed}")
    held = heldout_facts(world)
    facts = [f for f in world.facts() if f not in held]
    rows = []
    for i in range(RL_SYSTEM_PERSONAS):
        name = invented_persona_name(world, rng) if i % 2 == 0 else rng.choice(PERSONA_NAMES["train"])
        rows.append({"prompt": rng.choice(PERSONA_QUESTIONS), "answer": name, "system": persona_prompt(name, rng),
                     "kind": "persona"})
    for fmt in FORMATS:
        for _ in range(RL_SYSTEM_FORMATS):
            fact = rng.choice(facts)
            rows.append({"prompt": _fact_turn(fact, rng)[0], "answer": fact.answer, "system": format_prompt(fmt, rng),
                         "follow": fmt, "kind": fmt})
    return rows


def followup_eval_set(world: World) -> list[dict]:
    """Second-turn questions whose subject is only in the first turn, about held-out facts (which no
    SFT conversation states, so they measure generalisation). For every held-out fact: a first turn
    about another fact of its subject (a training question and the canonical answer), then the
    held-out fact asked by pronoun, in each training phrasing of PRONOUN_QUESTIONS and each held-out
    one. Rows `{"messages", "answer", "phrasing", "fact"}`; judge the reply with `says_answer`."""
    rng = random.Random(f"followup-eval-{world.seed}")
    held = heldout_facts(world)
    rows = []
    for fact in (f for f in world.facts() if f in held):
        entity = world[fact.subject]
        first = fact_of(entity, rng.choice([r for r in entity.attrs if r != fact.relation]))
        opening = [_user(_question(first, rng)), _assistant(_answer(first))]
        for phrasing, questions in (("train", PRONOUN_QUESTIONS[fact.relation]),
                                    ("heldout", heldout_pronoun_questions(fact, entity.kind))):
            rows += [{"messages": opening + [_user(question)], "answer": fact.answer, "phrasing": phrasing,
                      "fact": fact.to_dict()} for question in questions]
    return rows


SYSTEM_EVAL_QUESTIONS = 12  # per format and held-out phrasing of it
_PERSONA_EVAL_QUESTIONS = ("Who are you?", "What is your name?")


def system_eval_set(world: World) -> list[dict]:
    """System messages with held-out phrasings and persona names only, each reply checked by a rule
    (`system_prompts.follows`): rows `{"messages", "check", "name"}`, `check` "name" or a format.

    Every held-out name under every held-out persona prompt, asked who it is in two ways, and once
    more after a question about a fact; every format under each held-out phrasing of it, with
    SYSTEM_EVAL_QUESTIONS single questions (facts SFT shows, sums)."""
    rng = random.Random(f"system-eval-{world.seed}")
    held = heldout_facts(world)
    facts = [f for f in world.facts() if f not in held]
    rows = []
    for name in PERSONA_NAMES["heldout"]:
        for template in PERSONA_PROMPTS["heldout"]:
            rows += [{"messages": [_system(template.format(name=name)), _user(question)], "check": "name", "name": name}
                     for question in _PERSONA_EVAL_QUESTIONS]
        (question, reply, _), _ = _new_turn(facts, rng)
        late = [_system(persona_prompt(name, rng, "heldout")), _user(question), _assistant(reply), _user("Who are you?")]
        rows.append({"messages": late, "check": "name", "name": name})
    for fmt in FORMATS:
        for instruction in FORMAT_PROMPTS[fmt]["heldout"]:
            for _ in range(SYSTEM_EVAL_QUESTIONS):
                question = _fact_turn(rng.choice(facts), rng)[0] if rng.random() < 0.7 else _sum_turn(rng)[0]
                rows.append({"messages": [_system(instruction), _user(question)], "check": fmt, "name": None})
    return rows


def system_qa_eval_set(world: World) -> list[dict]:
    """The known-fact questions of `qa_eval_set(world, "heldout")`, each under a held-out generic
    system message (in turn): answered as often as without one, a system message is no obstacle."""
    prompts = GENERIC_PROMPTS["heldout"]
    known = [row for row in qa_eval_set(world, "heldout") if row["kind"] == "known"]
    return [{**row, "messages": [_system(prompts[i % len(prompts)])] + row["messages"]} for i, row in enumerate(known)]


# The evaluation sets write_chat writes under eval/, beside the QA sets.
EVAL_SETS = {"followups.jsonl": followup_eval_set, "system.jsonl": system_eval_set,
             "qa-system.jsonl": system_qa_eval_set, "requests.jsonl": requests_eval_set, "few-shot.jsonl": few_shot_rows,
             "copying.jsonl": copying_rows, "reading.jsonl": value_reading_rows,
             "line-copying.jsonl": line_copying_rows}


def write_chat(out_dir: str | Path, n: int, seed: int = 0) -> dict:
    """Write out_dir/sft.jsonl (n conversations), out_dir/tasks-rl-facts.jsonl (the RL fact
    questions), out_dir/tasks-rl-system.jsonl (`rl_system_problems`), out_dir/tasks-rl-requests.jsonl
    (`requests.rl_request_problems`), out_dir/eval/qa.jsonl (the held-out QA set), out_dir/eval/qa-train.jsonl (the same
    questions about SFT-seen facts), out_dir/eval/qa-news.jsonl (questions about the news
    entities) and the EVAL_SETS (follow-ups, system prompts, generic system prompt with the QA
    questions, harmless and harmful requests, few-shot, copying and reading prompts for the base model), for the world
    saved in out_dir by `documents.write_world`. Returns counts."""
    out = Path(out_dir)
    world = load_world(out)
    rows = sft_conversations(world, n, seed)
    atomic_write_jsonl(out / "sft.jsonl", rows)
    facts = rl_fact_questions(world)
    atomic_write_jsonl(out / "tasks-rl-facts.jsonl", facts)
    system = rl_system_problems(world, seed)
    atomic_write_jsonl(out / "tasks-rl-system.jsonl", system)
    requests = rl_request_problems(world, seed)
    atomic_write_jsonl(out / "tasks-rl-requests.jsonl", requests)
    heldout, seen, news = qa_eval_set(world, "heldout"), qa_eval_set(world, "train"), news_eval_set(world)
    atomic_write_jsonl(out / "eval" / "qa.jsonl", heldout)
    atomic_write_jsonl(out / "eval" / "qa-train.jsonl", seen)
    atomic_write_jsonl(out / "eval" / "qa-news.jsonl", news)
    counts = {}
    for name, make in EVAL_SETS.items():
        eval_rows = make(world)
        atomic_write_jsonl(out / "eval" / name, eval_rows)
        counts[name] = len(eval_rows)
    return {"conversations": len(rows), "kinds": dict(Counter(r["kind"] for r in rows)),
            "rl_fact_questions": dict(Counter(r["kind"] for r in facts)),
            "rl_system_problems": dict(Counter(r["kind"] for r in system)),
            "rl_request_problems": dict(Counter(r["kind"] for r in requests)),
            "qa_heldout": dict(Counter(r["kind"] for r in heldout)), "qa_train": len(seen), "qa_news": len(news),
            "eval": counts}
