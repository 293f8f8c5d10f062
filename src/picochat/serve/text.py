"""From a stream of token ids to the text a client is sent: whole UTF-8 characters, cut at stop strings.

`TextStream` is the push form of `picochat.tokenizer.iter_text` (tokens arrive one at a time from
the batcher, so the pull-based generator cannot wait for them): text is held back while the
decoded tail is an incomplete character and released once it completes. `StopStrings` holds back
text that might be the start of a stop string and cuts the reply where one appears.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_PENDING_TOKENS = 8  # as iter_text: bytes that never form a character are released anyway


class TextStream:
    """Decodes token ids pushed one by one into text made of whole characters."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._pending: list[int] = []

    def push(self, token_id: int) -> str:
        """The text that this token completes ("" while a character is still incomplete)."""
        self._pending.append(token_id)
        text = self._tokenizer.decode(self._pending)
        if text.endswith("\ufffd") and len(self._pending) <= MAX_PENDING_TOKENS:
            return ""
        self._pending = []
        return text

    def flush(self) -> str:
        """Whatever is still held back, once no token will follow."""
        text = self._tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        return text


class StopStrings:
    """Watches the text of a reply for stop strings, holding back what could be the start of one."""

    def __init__(self, stops: Sequence[str]):
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of `text` (with what was held back) that is safe to send. After a stop string
        appears, `stopped` is True and the text up to it is the last that push returns."""
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = max((_partial_match(text, s) for s in self._stops), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """The held-back text, once the reply is over without a stop string."""
        text, self._held = self._held, ""
        return text


def _partial_match(text: str, stop: str) -> int:
    """The length of the longest end of `text` that is the start of `stop` (shorter than all of it)."""
    start = text.find(stop[0], max(0, len(text) - len(stop) + 1))
    while start >= 0:
        if stop.startswith(text[start:]):
            return len(text) - start
        start = text.find(stop[0], start + 1)
    return 0
