"""Preference pairs: a prompt, the reply people preferred and the one they did not (reward model, DPO).

`read_preferences(path)` reads a JSON array or JSON-lines file (optionally gzipped) in either layout:
- `{"prompt", "chosen", "rejected"}` (TRL's, Anthropic HH's): the prompt a string (one user message)
  or a list of messages ending with a user turn; each reply a string, or a list of messages whose
  last is the assistant's reply (the conversation's earlier messages then must be the prompt's);
- the stack-exchange-paired layout `{"question", "response_j", "response_k"}`, response_j preferred.
Every pair comes back as `{"prompt": [messages], "chosen": str, "rejected": str}`; a malformed row
raises PreferenceFileError naming the file and the line (JSONL) or the array index (JSON).

`encode_pairs` renders pairs in the chat protocol for training and leaves out, with a count of each
reason, the pairs that cannot teach anything or cannot be trained on: equal replies, an empty reply,
a pair longer than the model's context (or, asked to, cuts a long prompt to fit). `pair_batch` pads encoded sequences into one batch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from picochat.chat import ConversationError, render, validate
from picochat.data.conversations import _records


class PreferenceFileError(ValueError):
    """A malformed preference file: names the file, the line and what was expected."""


LAYOUTS = ('{"prompt", "chosen", "rejected"} (strings or message lists) or the stack-exchange-paired '
           '{"question", "response_j", "response_k"}')


def _reply(value, prompt: list[dict], field: str) -> str:
    """The reply text of a `chosen` / `rejected` field: a string, or a conversation ending with it."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        *before, last = value
        if last.get("role") != "assistant" or not isinstance(last.get("content"), str):
            raise PreferenceFileError(f'"{field}": the last message must be the assistant\'s reply (a string content)')
        if before and before != prompt:
            raise PreferenceFileError(f'"{field}": the messages before the reply differ from the prompt\'s')
        return last["content"]
    raise PreferenceFileError(f'"{field}" must be a string or a list of messages ending with the assistant\'s reply')


def _prompt_of(row: dict) -> list[dict]:
    prompt = row["prompt"]
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        # A message-list `chosen` may hold the whole conversation, the prompt being the messages before it.
        return list(prompt)
    raise PreferenceFileError('"prompt" must be a string or a list of messages')


def from_record(row) -> dict:
    """One record in either layout -> {"prompt": [messages], "chosen": str, "rejected": str}."""
    if not isinstance(row, dict):
        raise PreferenceFileError(f"expected an object: {LAYOUTS}")
    if {"question", "response_j", "response_k"} <= row.keys():
        fields = {"question": row["question"], "response_j": row["response_j"], "response_k": row["response_k"]}
        for name, value in fields.items():
            if not isinstance(value, str):
                raise PreferenceFileError(f'"{name}" must be a string')
        pair = {"prompt": [{"role": "user", "content": row["question"]}], "chosen": row["response_j"], "rejected": row["response_k"]}
    elif {"chosen", "rejected"} <= row.keys():
        if "prompt" not in row:
            # TRL's implicit-prompt layout: both replies are whole conversations sharing their prompt.
            chosen = row["chosen"]
            if not isinstance(chosen, list) or not chosen:
                raise PreferenceFileError('without "prompt", "chosen" and "rejected" must be message lists sharing their prompt')
            row = {**row, "prompt": chosen[:-1]}
        prompt = _prompt_of(row)
        pair = {"prompt": prompt, "chosen": _reply(row["chosen"], prompt, "chosen"), "rejected": _reply(row["rejected"], prompt, "rejected")}
    else:
        raise PreferenceFileError(f"expected {LAYOUTS}; got the keys {sorted(row)[:6]}")
    try:
        validate(pair["prompt"], end="prompt")
    except ConversationError as e:
        raise PreferenceFileError(f'"prompt": {e}') from None
    return pair


def read_preferences(path: str | Path) -> list[dict]:
    """Every pair of a preference file (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference file")
    pairs = []
    try:
        for where, record in _records(path):
            try:
                pairs.append(from_record(record))
            except PreferenceFileError as e:
                raise PreferenceFileError(f"{where}: {e}") from None
    except ConversationError as e:  # unreadable JSON, gzip or text: already names the file and line
        raise PreferenceFileError(str(e)) from None
    if not pairs:
        raise PreferenceFileError(f"{path}: no preference pairs in the file; expected {LAYOUTS}")
    return pairs


def read_preference_files(paths: Sequence[str | Path]) -> list[dict]:
    return [pair for path in paths for pair in read_preferences(path)]


MIN_PROMPT_CHARS = 64  # a prompt cut shorter than this no longer says what was asked


def _render_pair(prompt: list[dict], chosen: str, rejected: str, tokenizer) -> dict:
    return {name: render([*prompt, {"role": "assistant", "content": reply}], tokenizer)
            for name, reply in (("chosen", chosen), ("rejected", rejected))}


def _cut_prompt(prompt: list[dict], chosen: str, rejected: str, tokenizer, context: int) -> dict | None:
    """The pair rendered with its last message cut to its end (where a question usually asks), short
    enough for the context; None when even MIN_PROMPT_CHARS of it do not fit."""
    *before, last = prompt
    keep = len(last["content"])
    while keep >= MIN_PROMPT_CHARS:
        cut = [*before, {**last, "content": "..." + last["content"][-keep:]}]
        rendered = _render_pair(cut, chosen, rejected, tokenizer)
        longest = max(len(ids) for ids, _ in rendered.values())
        if longest <= context:
            return rendered
        keep = min(keep - 1, int(keep * context / longest * 0.95))
    return None


def encode_pairs(pairs: Sequence[dict], tokenizer, context: int, cut_prompts: bool = False) -> tuple[list[dict], Counter]:
    """([{"chosen": (ids, mask), "rejected": (ids, mask)}], Counter of the pairs left out or changed, by reason).

    The mask is 1 on the reply's tokens and its closing `<|im_end|>`, as SFT trains them. A pair
    longer than the context is left out, or with `cut_prompts` kept with its prompt cut to its end
    when the replies fit (real prompts are often far longer than a small model's context)."""
    encoded, skipped = [], Counter()
    too_long = f"longer than the context of {context} tokens"
    for pair in pairs:
        chosen, rejected = pair["chosen"].strip(), pair["rejected"].strip()
        if not chosen or not rejected:
            skipped["empty reply"] += 1
            continue
        if chosen == rejected:
            skipped["equal replies"] += 1
            continue
        rendered = _render_pair(pair["prompt"], chosen, rejected, tokenizer)
        if max(len(ids) for ids, _ in rendered.values()) > context:
            rendered = _cut_prompt(pair["prompt"], chosen, rejected, tokenizer, context) if cut_prompts else None
            if rendered is None:
                skipped[too_long] += 1
                continue
            skipped["kept with the prompt cut to fit"] += 1
        encoded.append(rendered)
    return encoded, skipped


def skipped_note(skipped: Counter, total: int) -> str:
    """"12 of 25 pairs left out (10 longer than ..., 2 equal replies)", or "" when none was."""
    left_out = {reason: n for reason, n in skipped.items() if not reason.startswith("kept")}
    kept = {reason: n for reason, n in skipped.items() if reason.startswith("kept")}
    parts = [f"{sum(left_out.values())} of {total} pairs left out ("
             + ", ".join(f"{n} {reason}" for reason, n in left_out.items()) + ")"] if left_out else []
    parts += [f"{n} {reason}" for reason, n in kept.items()]
    return "; ".join(parts)


def pair_batch(sequences: Sequence[tuple[list[int], list[int]]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask, lengths) of right-padded sequences: position t predicts targets[:, t];
    mask[:, t] is 1 where that target is a reply token; lengths are the sequences' token counts."""
    width = max(len(ids) for ids, _ in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), width)
    for row, (seq, seq_mask) in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = torch.tensor(seq_mask, dtype=torch.float)
    lengths = torch.tensor([len(seq) for seq, _ in sequences])
    return ids[:, :-1], ids[:, 1:], mask[:, 1:], lengths
