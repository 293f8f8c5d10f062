"""Cut documents into passages: the pieces of text a search returns.

A search result is a passage, not a whole document, so that a few of them fit in the model's
context. A document is cut at paragraph breaks, then line breaks, then sentence ends, then spaces,
going down a level only for pieces still longer than `max_chars` (a piece with no break left is
cut every `max_chars` characters); consecutive pieces are then packed into passages of at most
`max_chars` characters. A passage is an exact, stripped substring of its document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

MAX_PASSAGE_CHARS = 600

# From the coarsest break to the finest.
_BREAKS = (re.compile(r"\n\s*\n"), re.compile(r"\n"), re.compile(r"(?<=[.!?])\s+"), re.compile(r"\s+"))


def split_passages(document: str, max_chars: int = MAX_PASSAGE_CHARS) -> list[str]:
    """The passages of a document, in order, each at most `max_chars` characters and not blank."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be at least 1, got {max_chars}")
    passages = []
    first = last = 0  # the span of the passage being packed
    for start, end in _pieces(document, 0, len(document), 0, max_chars):
        if end - first > max_chars:
            passages.append(document[first:last])
            first = start
        last = end
    passages.append(document[first:last])
    return [p.strip() for p in passages if p.strip()]


def _pieces(text: str, start: int, end: int, level: int, max_chars: int) -> Iterator[tuple[int, int]]:
    """Spans of `text[start:end]` no longer than max_chars, cut at the breaks of `level` and finer."""
    if end - start <= max_chars:
        yield start, end
    elif level == len(_BREAKS):
        for cut in range(start, end, max_chars):
            yield cut, min(cut + max_chars, end)
    else:
        position = start
        for match in _BREAKS[level].finditer(text, start, end):
            if match.start() > position:
                yield from _pieces(text, position, match.start(), level + 1, max_chars)
            position = match.end()
        if position < end:
            yield from _pieces(text, position, end, level + 1, max_chars)
