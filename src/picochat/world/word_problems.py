"""Word problems about the synthetic world, with worked solutions: SFT teaches them, RL practises them.

A problem is a dict `{"prompt": str, "answer": int, "level": int, "solution": str}` (the form
`picochat.data.tasks` reads and grades). Its solution is worked steps, one a line, then a final
line `Answer: <integer>`:

    Drava buys 4 pears. Each pear costs $3. How many dollars does Drava spend?
    ->  4 pears cost 4 * 3 = 12 dollars.
        Answer: 12

The level is the number of arithmetic steps (1 to 3). Every step stays inside a small table a
tiny model can memorise from pretraining, where a number up to 999 is one token and a sum is a
lookup, not a procedure: products and quotients of one-digit numbers, sums and differences of
numbers up to 12, a product less a one-digit number, a bill less a price: with larger addends the
model never learnt its sums, which left RL nothing to sharpen (BENCHMARKS.md). So SFT teaches the
steps and RL still has room to get more of them right. People and towns come from the world; prices
and counts are stated in each problem, so every problem is self-contained and checkable.

The held-out split is decided by a hash of the prompt (`split_of`): about 20% of all possible
problems are "test", the rest "train", whatever the seed, so no evaluation problem can ever be
trained on. `write_tasks` writes the SFT conversations, the RL problems and the held-out problems.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from picochat.io import atomic_write_jsonl
from picochat.world.knowledge import World, load_world
from picochat.world.phrasings import article

TEST_SHARE = 0.2
LEVELS = (1, 2, 3)
GOODS = (("apple", "apples"), ("pear", "pears"), ("egg", "eggs"), ("pencil", "pencils"), ("book", "books"),
         ("cup", "cups"), ("candle", "candles"), ("ribbon", "ribbons"), ("kite", "kites"), ("orange", "oranges"),
         ("loaf of bread", "loaves of bread"), ("basket of berries", "baskets of berries"))


def split_of(prompt: str) -> str:
    """"test" for a fixed ~20% of prompts, "train" for the rest (a hash, so it never changes)."""
    digest = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return "test" if digest / 2**64 < TEST_SHARE else "train"


# --- problem makers: (rng, world) -> (prompt, steps, answer) --------------------------------------
Made = tuple[str, list[str], int]


def _cast(rng: random.Random, world: World) -> tuple[str, str, str, str, str]:
    """Two different people, a town, and one kind of goods (singular, plural)."""
    p, q = rng.sample(world.of_kind("person"), 2)
    item, items = rng.choice(GOODS)
    return p.name, q.name, rng.choice(world.of_kind("town")).name, item, items


def _buy(rng: random.Random, world: World) -> Made:
    p, _, town, item, items = _cast(rng, world)
    a, c = rng.randint(2, 9), rng.randint(2, 9)
    prompt = f"{p} buys {a} {items} in {town}. Each {item} costs ${c}. How many dollars does {p} spend?"
    return prompt, [f"{a} {items} cost {a} * {c} = {a * c} dollars."], a * c


def _more(rng: random.Random, world: World) -> Made:
    p, q, _, _, items = _cast(rng, world)
    a, b = rng.randint(2, 12), rng.randint(2, 12)
    prompt = f"{p} has {a} {items}. {q} gives {p} {b} more. How many {items} does {p} have now?"
    return prompt, [f"{p} has {a} + {b} = {a + b} {items}."], a + b


def _left(rng: random.Random, world: World) -> Made:
    p, q, _, _, items = _cast(rng, world)
    b, r = rng.randint(2, 12), rng.randint(1, 12)
    prompt = f"{p} has {b + r} {items} and gives {b} of them to {q}. How many {items} does {p} have left?"
    return prompt, [f"{p} has {b + r} - {b} = {r} {items} left."], r


def _share(rng: random.Random, world: World) -> Made:
    p, _, _, _, items = _cast(rng, world)
    k, r = rng.randint(2, 6), rng.randint(2, 9)
    prompt = f"{p} shares {k * r} {items} equally among {k} friends. How many {items} does each friend get?"
    return prompt, [f"Each friend gets {k * r} / {k} = {r} {items}."], r


def _change(rng: random.Random, world: World) -> Made:
    p, _, town, item, items = _cast(rng, world)
    a, c = rng.randint(2, 9), rng.randint(2, 9)
    cost = a * c
    bill = next(b for b in (10, 20, 50, 100) if b >= cost)
    prompt = (f"At the market in {town}, {p} buys {a} {items} at ${c} each and pays with a ${bill} note. "
              f"How many dollars of change does {p} get?")
    return prompt, [f"{a} {items} cost {a} * {c} = {cost} dollars.", f"The change is {bill} - {cost} = {bill - cost} dollars."], bill - cost


def _packs(rng: random.Random, world: World) -> Made:
    p, q, _, _, items = _cast(rng, world)
    a, k = rng.randint(2, 6), rng.randint(2, 6)
    b = rng.randint(1, min(9, a * k - 1))
    prompt = (f"{p} buys {a} packs of {items} with {k} {items} in each pack, then gives {b} {items} to {q}. "
              f"How many {items} does {p} have left?")
    steps = [f"{p} buys {a} * {k} = {a * k} {items}.", f"{p} has {a * k} - {b} = {a * k - b} {items} left."]
    return prompt, steps, a * k - b


def _sell(rng: random.Random, world: World) -> Made:
    p, _, town, item, items = _cast(rng, world)
    a, b, c = rng.randint(2, 6), rng.randint(2, 6), rng.randint(2, 9)
    prompt = (f"In {town}, {p} sells {a} {items} in the morning and {b} {items} in the afternoon, for ${c} each. "
              f"How many dollars does {p} earn?")
    steps = [f"{p} sells {a} + {b} = {a + b} {items}.", f"{p} earns {a + b} * {c} = {(a + b) * c} dollars."]
    return prompt, steps, (a + b) * c


def _two_goods(rng: random.Random, world: World) -> Made:
    p, _, town, item, items = _cast(rng, world)
    item2, items2 = rng.choice([g for g in GOODS if g[0] != item])
    a, c, b, d = rng.randint(2, 5), rng.randint(2, 5), rng.randint(2, 5), rng.randint(2, 5)
    prompt = (f"{p} buys {a} {items} at ${c} each and {b} {items2} at ${d} each in {town}. "
              f"How many dollars does {p} spend in total?")
    steps = [f"{a} {items} cost {a} * {c} = {a * c} dollars.", f"{b} {items2} cost {b} * {d} = {b * d} dollars.",
             f"In total {p} spends {a * c} + {b * d} = {a * c + b * d} dollars."]
    return prompt, steps, a * c + b * d


def _boxes_shared(rng: random.Random, world: World) -> Made:
    p, _, _, _, items = _cast(rng, world)
    a, k = rng.randint(2, 6), rng.randint(2, 6)
    total = a * k
    n = rng.randint(2, min(5, total - 1))
    r = rng.randint(1, min(12, (total - 1) // n))
    kept = total - n * r  # at least one
    prompt = (f"{p} buys {a} boxes of {items} with {k} {items} in each box, keeps {kept} {items}, and shares the rest "
              f"equally among {n} friends. How many {items} does each friend get?")
    steps = [f"{p} buys {a} * {k} = {total} {items}.", f"{total} - {kept} = {total - kept} {items} are shared.",
             f"Each friend gets {total - kept} / {n} = {r} {items}."]
    return prompt, steps, r


def _savings(rng: random.Random, world: World) -> Made:
    p, q, town, item, _ = _cast(rng, world)
    a, w = rng.randint(2, 5), rng.randint(2, 5)
    b = rng.randint(1, min(9, a * w - 1))
    c = rng.randint(2, 9)
    prompt = (f"{p} saves ${a} every week for {w} weeks, then spends ${b} on {article(item)} {item} in {town}. "
              f"Then {q} gives {p} ${c}. How many dollars does {p} have now?")
    steps = [f"{p} saves {a} * {w} = {a * w} dollars.", f"After shopping, {p} has {a * w} - {b} = {a * w - b} dollars.",
             f"Now {p} has {a * w - b} + {c} = {a * w - b + c} dollars."]
    return prompt, steps, a * w - b + c


MAKERS: dict[int, tuple[Callable[[random.Random, World], Made], ...]] = {
    1: (_buy, _more, _left, _share),
    2: (_change, _packs, _sell),
    3: (_two_goods, _boxes_shared, _savings),
}


def _problems(world: World, n: int, rng: random.Random, split: str, levels: tuple[int, ...]) -> list[dict]:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    unknown = set(levels) - set(MAKERS)
    if unknown:
        raise ValueError(f"levels must be among {sorted(MAKERS)}, got {sorted(unknown)}")
    problems, seen = [], set()
    while len(problems) < n:
        level = rng.choice(levels)
        prompt, steps, answer = rng.choice(MAKERS[level])(rng, world)
        if prompt in seen or split_of(prompt) != split:
            continue
        seen.add(prompt)
        problems.append({"prompt": prompt, "answer": answer, "level": level,
                         "solution": "\n".join(steps) + f"\nAnswer: {answer}"})
    return problems


def worked_problem(world: World, rng: random.Random) -> str:
    """A pretraining document: one train-split problem of any level and its worked solution, the
    kind of text a textbook puts on the web (so the base model has seen numbers copied from a
    question into working before SFT asks for it)."""
    while True:
        prompt, steps, answer = rng.choice(MAKERS[rng.choice(LEVELS)])(rng, world)
        if split_of(prompt) == "train":
            return "\n".join(["Word problem", "", prompt, *steps, f"Answer: {answer}"])


def task_problems(world: World, n: int, seed: int = 0, split: str = "train", levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """n distinct problems of `split` ("train" or "test"), levels drawn uniformly from `levels`."""
    return _problems(world, n, random.Random(f"task-problems-{split}-{seed}"), split, levels)


def task_conversations(world: World, n: int, seed: int = 0, split: str = "train",
                       levels: tuple[int, ...] = LEVELS) -> list[dict]:
    """n SFT rows `{"messages": [user problem, assistant solution], "kind": "task", "level"}`.
    The problems are other instances than `task_problems` gives for the same seed."""
    problems = _problems(world, n, random.Random(f"task-chat-{split}-{seed}"), split, levels)
    return [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["solution"]}],
             "kind": "task", "level": p["level"]} for p in problems]


def write_tasks(out_dir: str | Path, n_sft: int, n_rl: int, n_eval: int, seed: int = 0) -> dict:
    """For the world saved in out_dir: tasks-sft.jsonl (SFT conversations), tasks-rl.jsonl (train
    problems for RL) and eval/tasks.jsonl (held-out problems). Returns counts per level."""
    out = Path(out_dir)
    world = load_world(out)
    sft = task_conversations(world, n_sft, seed)
    rl = task_problems(world, n_rl, seed, "train")
    held = task_problems(world, n_eval, seed, "test")
    atomic_write_jsonl(out / "tasks-sft.jsonl", sft)
    atomic_write_jsonl(out / "tasks-rl.jsonl", rl)
    atomic_write_jsonl(out / "eval" / "tasks.jsonl", held)
    return {"sft": _level_counts(sft), "rl": _level_counts(rl), "eval": _level_counts(held)}


def _level_counts(rows: list[dict]) -> dict[int, int]:
    return dict(sorted(Counter(r["level"] for r in rows).items()))
