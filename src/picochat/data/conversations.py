"""Conversation datasets for SFT: readers for the formats users bring, mixtures, and the batch loader.

Readers. `read_conversations(path, format="auto")` yields `{"messages": [...]}` in the chat
protocol's form (see `picochat.chat`) from:
- OpenAI messages: `{"messages": [{"role", "content"}, ...]}` per line (JSONL) or in a JSON array;
- ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}, ...]}`;
- Alpaca: `{"instruction", "input", "output"}`, `input` appended to the instruction when non-empty;
- documents: `{"text": ...}` (pretraining's JSONL, TRL's "language modeling" rows), yielded as
  `{"text": str}` and trained on every token: replayed beside the conversations, they keep what
  pretraining taught while SFT teaches the manner.
Files may be JSON arrays or JSON lines, optionally gzipped; "auto" reads the format off the first
record. Every conversation is validated as it is read; a malformed one raises ConversationError
naming the file and the line (JSONL) or the array index (JSON). `from_messages`, `from_sharegpt`
and `from_alpaca` convert single records already in memory.

Conversations that do not end with an assistant reply (prompt sets, or a trailing user turn) are
valid data but cannot be trained on as they are: for training, `trim_to_last_reply` cuts a
conversation back to its last complete assistant reply, and one with no reply at all is skipped.
`ConversationLoader` does this and counts both in its `stats`.

`mix(...)` draws a deterministic weighted mixture of datasets.

`ConversationLoader` serves SFT batches with the pretraining loader's interface (see its docstring).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from picochat.chat import ConversationError, render_batch, validate

FORMATS = ("messages", "sharegpt", "alpaca", "text")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
}
# Packing looks at this many conversations at a time (in the epoch's shuffled order) to fill rows.
PACK_WINDOW = 1024
RENDER_CHUNK = 512


# --- record converters --------------------------------------------------------------------------------
def from_messages(record) -> list[dict]:
    """An OpenAI-style record `{"messages": [{"role", "content"}, ...]}` -> messages."""
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        raise ConversationError("expected an object with a 'messages' list")
    messages = []
    for i, m in enumerate(record["messages"]):
        if not isinstance(m, dict):
            raise ConversationError(f"message {i}: expected an object with 'role' and 'content', got {type(m).__name__}")
        messages.append({k: m[k] for k in ("role", "content", "tool_call") if k in m})
    return messages


def from_sharegpt(record) -> list[dict]:
    """A ShareGPT record `{"conversations": [{"from", "value"}, ...]}` -> messages."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        raise ConversationError("expected an object with a 'conversations' list")
    messages = []
    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ConversationError(f"turn {i}: expected an object with 'from' and 'value'")
        role = SHAREGPT_ROLES.get(turn["from"])
        if role is None:
            raise ConversationError(f"turn {i}: unknown speaker {turn['from']!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        messages.append({"role": role, "content": turn["value"]})
    return messages


def from_alpaca(record) -> list[dict]:
    """An Alpaca record `{"instruction", "input", "output"}` -> a user message and the reply."""
    if not isinstance(record, dict):
        raise ConversationError(f"expected an object with 'instruction' and 'output', got {type(record).__name__}")
    instruction, extra, output = record.get("instruction"), record.get("input") or "", record.get("output")
    if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
        raise ConversationError("expected string fields 'instruction' and 'output' (and optionally 'input')")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def from_text(record) -> str:
    """A document `{"text": str}` -> its text."""
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
        raise ConversationError("expected an object with a non-empty string 'text'")
    return record["text"]


CONVERTERS = {"messages": from_messages, "sharegpt": from_sharegpt, "alpaca": from_alpaca, "text": from_text}


def detect_format(record) -> str:
    """The format a record is written in, from its keys."""
    if isinstance(record, dict):
        if "messages" in record:
            return "messages"
        if "conversations" in record:
            return "sharegpt"
        if "instruction" in record and "output" in record:
            return "alpaca"
        if "text" in record:
            return "text"
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ConversationError(
        f"unknown conversation format (keys {keys}); expected 'messages' (OpenAI), 'conversations' (ShareGPT) "
        "'instruction' and 'output' (Alpaca) or 'text' (a document)"
    )


# --- files ------------------------------------------------------------------------------------------
def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON array or JSON-lines file."""
    try:
        with _open_text(path) as f:
            head = f.read(4096).lstrip()
            f.seek(0)
            if head.startswith("["):
                try:
                    records = json.load(f)
                except json.JSONDecodeError as e:
                    raise ConversationError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
                for index, record in enumerate(records):
                    yield f"{path}[{index}]", record
                return
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConversationError(f"{path}:{lineno}: not valid JSON ({e.msg}); expected one JSON object a line") from None
                yield f"{path}:{lineno}", record
    except UnicodeDecodeError as e:
        raise ConversationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ConversationError(f"{path}: not a complete gzip file ({e})") from None


def read_conversations(path: str | Path, format: str = "auto") -> Iterator[dict]:
    """Yield `{"messages": [...]}` for each conversation in a file, `{"text": str}` for each document
    of a documents file (see the module docstring)."""
    path = Path(path)
    if format != "auto" and format not in CONVERTERS:
        raise ValueError(f"unknown conversation format {format!r}; expected auto or one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such conversation file")
    convert = None if format == "auto" else CONVERTERS[format]
    for where, record in _records(path):
        try:
            if convert is None:
                convert = CONVERTERS[detect_format(record)]
            converted = convert(record)
            if convert is not from_text:
                validate(converted, end="any")
        except ConversationError as e:
            raise ConversationError(f"{where}: {e}") from None
        yield {"text": converted} if convert is from_text else {"messages": converted}


# --- training preparation and mixtures ----------------------------------------------------------------
def trim_to_last_reply(messages: Sequence[dict]) -> list[dict] | None:
    """The conversation up to its last complete assistant reply, or None if it has no reply."""
    for end in range(len(messages), 0, -1):
        last = messages[end - 1]
        if last["role"] == "assistant" and last.get("tool_call") is None:
            return list(messages[:end])
    return None


def mix(datasets: Sequence[tuple[Sequence, float]], n: int, seed: int = 0) -> list:
    """n items drawn from weighted datasets, deterministic given the seed.

    Dataset i contributes round(n * w_i / sum(w)) items (largest remainders make the total n),
    taken from fresh shuffles of it, so items repeat only once a dataset is used up; the result is
    shuffled.
    """
    if not datasets:
        raise ValueError("mix needs at least one (dataset, weight) pair")
    for k, (items, weight) in enumerate(datasets):
        if not weight > 0:
            raise ValueError(f"dataset {k}: weight must be positive, got {weight}")
        if len(items) == 0:
            raise ValueError(f"dataset {k} is empty")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    weights = np.array([w for _, w in datasets], dtype=np.float64)
    shares = n * weights / weights.sum()
    counts = np.floor(shares).astype(np.int64)
    for k in np.argsort(-(shares - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    rng = np.random.default_rng(seed)
    out = []
    for (items, _), count in zip(datasets, counts):
        repeats = -(-int(count) // len(items))
        order = np.concatenate([rng.permutation(len(items)) for _ in range(repeats)]) if repeats else []
        out += [items[i] for i in order[:count]]
    return [out[i] for i in rng.permutation(len(out))]


def parse_data_spec(spec: str) -> tuple[Path, float | None]:
    """`path` or `path:weight` -> (path, weight or None when not given)."""
    path, sep, weight = spec.rpartition(":")
    try:
        value = float(weight) if sep else None
    except ValueError:  # a colon that is part of the path
        return Path(spec), None
    if value is not None and value <= 0:
        raise ValueError(f"{spec}: a mixture weight must be positive")
    return Path(path if sep else spec), value


def load_mixture(specs: list[str], seed: int) -> list[dict]:
    """Read each dataset. Without weights they are simply concatenated; with weights, a mixture as
    large as all of them together is drawn, each dataset's share set by its weight."""
    datasets = []
    for spec in specs:
        path, weight = parse_data_spec(spec)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such conversation file")
        datasets.append((list(read_conversations(path)), weight))
    if all(weight is None for _, weight in datasets):
        return [conversation for items, _ in datasets for conversation in items]
    weighted = [(items, 1.0 if weight is None else weight) for items, weight in datasets]
    return mix(weighted, n=sum(len(items) for items, _ in weighted), seed=seed)


def render_all(conversations: Sequence, tokenizer, capacity: int, too_long: str, show_progress: bool):
    """Render the trainable conversations (and documents) into flat token / trained arrays, with counts
    of what was cut."""
    stats = {"conversations": len(conversations), "documents": 0, "used": 0, "trimmed_to_last_reply": 0,
             "skipped_no_reply": 0, "truncated": 0, "dropped_too_long": 0, "trained_tokens": 0}
    bos = tokenizer.eot_id
    tokens, trained, lengths = [], [], []
    bar = tqdm(total=len(conversations), desc="render conversations", unit="conv", disable=not show_progress)
    for first in range(0, len(conversations), RENDER_CHUNK):
        chunk, documents = [], []  # documents: (position in chunk, text)
        for k in range(first, min(first + RENDER_CHUNK, len(conversations))):
            item = conversations[k]
            if isinstance(item, dict) and "text" in item and "messages" not in item:
                documents.append((len(chunk) + len(documents), item["text"]))
                continue
            messages = item["messages"] if isinstance(item, dict) else item
            try:
                validate(messages, end="any")
            except ConversationError as e:
                raise ConversationError(f"conversation {k}: {e}") from None
            trimmed = trim_to_last_reply(messages)
            if trimmed is None:
                stats["skipped_no_reply"] += 1
                continue
            stats["trimmed_to_last_reply"] += len(trimmed) < len(messages)
            chunk.append(trimmed)
        rendered = render_batch(chunk, tokenizer)
        # A document is trained on every token after its `<|endoftext|>`, as in pretraining.
        for (at, _), ids in zip(documents, tokenizer.encode_batch([text for _, text in documents])):
            rendered.insert(at, ([bos] + ids, [0] + [1] * len(ids)))
        stats["documents"] += len(documents)
        for ids, mask in rendered:
            if len(ids) > capacity:
                # Position 0 is never a target, so a cut conversation must keep a trained token after it.
                if too_long == "drop" or not any(mask[1:capacity]):
                    stats["dropped_too_long"] += 1
                    continue
                stats["truncated"] += 1
                ids, mask = ids[:capacity], mask[:capacity]
            tokens.append(np.asarray(ids, dtype=np.int32))
            trained.append(np.asarray(mask, dtype=bool))
            lengths.append(len(ids))
            stats["trained_tokens"] += sum(mask)
        bar.update(min(RENDER_CHUNK, len(conversations) - first))
    bar.close()
    stats["used"] = len(lengths)
    lengths = np.asarray(lengths, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(lengths) else lengths
    flat_tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    flat_trained = np.concatenate(trained) if trained else np.zeros(0, bool)
    return flat_tokens, flat_trained, starts, lengths, stats
