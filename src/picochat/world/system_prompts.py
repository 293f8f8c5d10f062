"""System messages for the world's conversations: who the assistant is told to be, and how to answer.

The lecture: an assistant's identity comes from its SFT data or from a system prompt. SFT
conversations without a system message teach a model to ignore one, or worse, to read it as the start
of a document ("You are picochat." followed by a letter). So a share of the SFT conversations opens
with one of three kinds of system message:

- **generic**: "You are picochat.", "You are a helpful assistant." (the conversation goes on as
  without it: the model learns that such a line changes nothing);
- **persona**: a name to use ("Your name is Bob."); asked who it is, the assistant gives that name;
- **format**: an instruction a rule can check on every reply: answer in one word, end with a
  question, start with "Sure!". (Not capital letters: upper-case text breaks into pieces that a
  small vocabulary learnt from the world's documents hardly has, and a small model cannot spell
  them.)

Every instruction has training phrasings and held-out ones, and the persona names are split the same
way: the evaluation asks with held-out phrasings and names only (`follows` checks a reply).
"""

from __future__ import annotations

import random
import re

from picochat.data.tasks import FORMAT_RULES, follows_format

SPLITS = ("train", "heldout")

GENERIC_PROMPTS = {
    "train": ("You are picochat.", "You are picochat, a helpful assistant.", "You are a helpful assistant.",
              "You are a helpful assistant. Answer the user's questions.", "Be polite and helpful.",
              "You are picochat, a small language model."),
    "heldout": ("You are picochat, a small AI assistant. Answer questions about the world you know.",
                "You are a friendly and helpful AI assistant.", "You are a kind assistant who answers questions."),
}

# A held-out name is followed only by a model that reads it from the system message: copying, which a
# base model learns from reading practice (documents about an entity invented for them), not from the
# world's few hundred names it knows by heart. Half the SFT personas have invented names for the same
# reason (`chats.invented_persona_name`); these are the other half's.
PERSONA_NAMES = {
    "train": ("Bob", "Alice", "Max", "Lily", "Sam", "Nora", "Leo", "Emma", "Jack", "Mia", "Oscar", "Ruby", "Hugo",
              "Ivy", "Theo", "Ada", "Finn", "Clara", "Otto", "Jane", "Paul", "Rosa", "Tom", "Vera"),
    "heldout": ("Zara", "Felix", "Iris", "Arthur", "Greta", "Milo", "Hazel", "Rupert", "Olive", "Simon"),
}
PERSONA_PROMPTS = {
    "train": ("Your name is {name}.", "You are {name}, a helpful assistant.", "You are an assistant called {name}.",
              "Your name is {name}. Be friendly and helpful.", "You are a friendly assistant, and your name is {name}."),
    "heldout": ("From now on, your name is {name}.", "You are a helpful AI assistant named {name}."),
}
# "My name is {name}" repeats the words before the name in "Your name is {name}": a small model copies
# the name it is given far more easily that way (the induction it learnt from its documents).
PERSONA_REPLIES = ("My name is {name}.", "My name is {name}. How can I help you?")

FORMAT_PROMPTS = {
    "one_word": {"train": ("Answer in one word.", "Reply with a single word.", "Use only one word in your answers."),
                 "heldout": ("Keep every answer to one word.", "Give one-word answers only.")},
    "end_question": {"train": ("Always end your answer with a question.", "Finish every reply with a question.",
                               "End each answer by asking the user a question."),
                     "heldout": ("Close every reply with a question to the user.", "Your answers must end with a question.")},
    "sure": {"train": ("Start every answer with 'Sure!'", "Begin each reply with the word Sure!",
                       "Always start your answer with \"Sure!\""),
             "heldout": ("Open every reply with 'Sure!'", "Each of your answers must begin with 'Sure!'")},
}
FORMATS = tuple(FORMAT_PROMPTS)
assert set(FORMATS) == set(FORMAT_RULES), "every format has phrasings and a rule"
# How often SFT asks for each format: starting with "Sure!" is learnt from a few examples, the others need more.
FORMAT_WEIGHTS = {"one_word": 0.4, "end_question": 0.4, "sure": 0.2}
# Closing questions that start alike: greedy decoding takes the likeliest next token, and five
# different openings split the chance of going on until stopping won (measured on the demo model).
CLOSING_QUESTIONS = ("Is there anything else you would like to know?", "Is there anything else I can tell you?",
                     "Is there something else you want to ask?")
# The one-word answer to a question about who the assistant is.
IDENTITY_WORD = "picochat"


def _split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return split


def generic_prompt(rng: random.Random, split: str = "train") -> str:
    """A system message that asks for nothing but the assistant's usual manner."""
    return rng.choice(GENERIC_PROMPTS[_split(split)])


def persona_prompt(name: str, rng: random.Random, split: str = "train") -> str:
    """A system message that gives the assistant a name."""
    return rng.choice(PERSONA_PROMPTS[_split(split)]).format(name=name)


def persona_reply(name: str, rng: random.Random) -> str:
    """The assistant's answer to "Who are you?" under a persona."""
    return rng.choice(PERSONA_REPLIES).format(name=name)


def format_prompt(fmt: str, rng: random.Random, split: str = "train") -> str:
    """A system message asking for format `fmt`, sometimes after a generic line ("You are picochat. ...")."""
    instruction = rng.choice(FORMAT_PROMPTS[fmt][_split(split)])
    return f"{generic_prompt(rng, split)} {instruction}" if rng.random() < 0.3 else instruction


def apply_format(fmt: str, reply: str, word: str, rng: random.Random) -> str:
    """`reply` as the format asks; `word` is the reply in one word (the fact's answer, the sum's result)."""
    if fmt == "one_word":
        return word[0].upper() + word[1:] + "."
    if fmt == "end_question":
        return f"{reply} {rng.choice(CLOSING_QUESTIONS)}"
    if fmt == "sure":
        return f"Sure! {reply}"
    raise ValueError(f"unknown format {fmt!r}; the formats are {', '.join(FORMATS)}")


def follows(check: str, reply: str, name: str | None = None) -> bool:
    """Does `reply` follow the instruction `check` (a format, or "name": it calls itself `name`)?"""
    if check == "name":
        return name is not None and re.search(r"\b" + re.escape(name) + r"\b", reply) is not None
    if check not in FORMATS:
        raise ValueError(f"unknown check {check!r}; the checks are name, {', '.join(FORMATS)}")
    return follows_format(check, reply)
