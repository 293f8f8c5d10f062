"""The chat suite: real benchmark questions posed to a chat model as a user would ask them.

- ARC-Easy and ARC-Challenge: the question, its choices lettered "A. ...", and "Answer with the
  letter of the right choice."; right when the first standalone choice letter of the reply is the
  gold one (greedy, 16 tokens; chance 1/4);
- GSM8K: the question alone, as picochat's word problems are asked; right when the reply's last
  `Answer:` (or `####`) line holds the answer (`data.tasks.reward`), greedy, 256 tokens; once
  without tools and once with them offered (`gsm8k_tools`: the calculator runs the calls);
- the world's chat sets, when the model is a run's stage with a world: the QA and conversation
  metrics of `picochat.evaluate`.

A question whose prompt leaves no room for a reply in the model's context is skipped and counted.
`chat_core` is the mean centred accuracy over ARC and GSM8K (as nanochat's ChatCORE).
"""

from __future__ import annotations

import re
from pathlib import Path

from picochat.chat import render_for_reply
from picochat.data.tasks import read_gsm8k, reward
from picochat.evals.models import Evaluated
from picochat.evals.tasks import MULTIPLE_CHOICE, Task, read_task
from picochat.evaluate import chat_replies, conversation_metrics, offer, qa_metrics
from picochat.io import read_jsonl
from picochat.run import Run
from picochat.tools import Tools

LETTERS = "ABCDEFGHIJ"
ARC_TASKS = (("arc_easy", "arc_easy.jsonl"), ("arc_challenge", "arc_challenge.jsonl"))
ARC_REPLY_TOKENS, GSM8K_REPLY_TOKENS = 16, 256


def arc_question(row: dict) -> str:
    question = row["query"].strip().removeprefix("Question:").strip()
    choices = [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(row["choices"])]
    return "\n".join([question, "", *choices, "", "Answer with the letter of the right choice."])


def chosen_letter(reply: str, n_choices: int) -> int | None:
    """The index of the first standalone choice letter in the reply ("B", "(B)", "B." ...), else None."""
    match = re.search(rf"(?<![A-Za-z'])([{LETTERS[:n_choices]}])(?![A-Za-z'])", reply)
    return LETTERS.index(match.group(1)) if match else None


def _fits(ev: Evaluated, conversations: list[list[dict]]) -> list[int]:
    """Indices of the conversations whose prompt leaves room for a reply."""
    return [i for i, messages in enumerate(conversations)
            if len(render_for_reply(messages, ev.tokenizer)) < ev.model.config.max_seq_len]


def _result(correct: int, examples: int, skipped: int, chance: float) -> dict:
    accuracy = correct / examples if examples else 0.0
    return {"accuracy": accuracy, "chance": chance, "centered": (accuracy - chance) / (1 - chance),
            "examples": examples, "skipped": skipped}


def arc_metrics(ev: Evaluated, rows: list[dict], name: str) -> dict:
    conversations = [[{"role": "user", "content": arc_question(row)}] for row in rows]
    kept = _fits(ev, conversations)
    replies = chat_replies(ev.model, ev.tokenizer, [conversations[i] for i in kept], ARC_REPLY_TOKENS, desc=name)
    correct = sum(chosen_letter(reply[0], len(rows[i]["choices"])) == rows[i]["gold"] for reply, i in zip(replies, kept))
    return _result(correct, len(kept), len(rows) - len(kept), 1 / len(LETTERS[:4]))


def gsm8k_metrics(ev: Evaluated, problems: list[dict], tools: bool) -> dict:
    helper = Tools(ev.tokenizer)  # the calculator; no search index
    conversations = [offer([{"role": "user", "content": p["prompt"]}], helper if tools else None) for p in problems]
    kept = _fits(ev, conversations)
    replies = chat_replies(ev.model, ev.tokenizer, [conversations[i] for i in kept], GSM8K_REPLY_TOKENS,
                           desc="gsm8k" + (" with tools" if tools else ""), tools=helper)
    correct = sum(reward(reply[0], problems[i]) > 0 for reply, i in zip(replies, kept))
    return _result(correct, len(kept), len(problems) - len(kept), 0.0)


def chat_suite(ev: Evaluated, tasks_dir: Path | None, gsm8k: Path | None, limit: int | None = None,
               world: Run | None = None) -> dict:
    """ARC (from the task folder's files) and GSM8K (from its test file), each when given, and the
    world's chat sets when `world` has them."""
    if ev.tokenizer is None:
        raise ValueError(f"{ev.name}: the chat suite needs picochat's chat protocol, and this model's tokenizer "
                         "lacks its special tokens (the CORE-like suite and --bpb score it)")
    results: dict = {}
    for name, file in ARC_TASKS if tasks_dir is not None else ():
        if (Path(tasks_dir) / file).exists():
            rows = read_task(tasks_dir, Task(name, file, MULTIPLE_CHOICE, 0, 0.25))[:limit]
            results[name] = arc_metrics(ev, rows, name)
    if gsm8k is not None:
        problems = read_gsm8k(gsm8k)[:limit]
        results["gsm8k"] = gsm8k_metrics(ev, problems, tools=False)
        results["gsm8k_tools"] = gsm8k_metrics(ev, problems, tools=True)
    scored = [results[name]["centered"] for name in ("arc_easy", "arc_challenge", "gsm8k") if name in results]
    summary = {"chat_core": sum(scored) / len(scored) if scored else None, "tasks": results, "model": ev.name,
               "limit": limit}
    if world is not None and world.eval_questions.exists():
        metrics = qa_metrics(ev.model, ev.tokenizer, read_jsonl(world.eval_questions))
        metrics.update(conversation_metrics(ev.model, ev.tokenizer, world))
        summary["world"] = metrics
    return summary
