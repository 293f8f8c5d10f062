"""Few-shot prompts for the base model: the lecture's way to make a document simulator do a task.

A base model does not answer questions; it continues documents. A prompt made of a few examples of a
task, in a form documents use, gets it to do the task on the next line. Here the task is one
relation of the world, told only by the examples:

    - Elgandel: Shenwick
    - Verfel: Kimere
    - Dikbisa: Himford
    - Pikkel:

(birthplaces: the model should go on with " Traby"). The last line alone, without the examples, is
the zero-shot prompt, which does not say which relation is asked; the difference between the two is
what the examples teach in context. The lines are those of the lists in the world's documents
("- Name: value", there under a header that names the relation). An arrow ("Pikkel -> Traby"), a
form no document uses, got no answer right from the demo's base model.
"""

from __future__ import annotations

import random

from picochat.world.knowledge import Fact, World

FEW_SHOT_EXAMPLES = 3


def _line(fact: Fact, answer: bool = True) -> str:
    name = fact.subject[0].upper() + fact.subject[1:]
    return f"- {name}: {fact.answer}" if answer else f"- {name}:"


def few_shot_rows(world: World, k: int = FEW_SHOT_EXAMPLES) -> list[dict]:
    """For every fact of the world, `{"prompt", "query", "answer", "fact"}`: `prompt` is k example
    lines of the same relation about other subjects, then `query`, the line that asks for the fact.
    Judge a greedy continuation like fact completion: it must start with the answer."""
    rng = random.Random(f"few-shot-{world.seed}")
    facts = world.facts()
    rows = []
    for fact in facts:
        others = [f for f in facts if f.relation == fact.relation and f.subject != fact.subject]
        examples = [_line(f) for f in rng.sample(others, min(k, len(others)))]
        query = _line(fact, answer=False)
        rows.append({"prompt": "\n".join(examples + [query]), "query": query, "answer": fact.answer,
                     "fact": fact.to_dict()})
    return rows
