"""The text a client is sent, cut at stop strings: `StopStrings` holds back text that might be the
start of a stop string and cuts the reply where one appears. (Token ids become whole UTF-8
characters in `picochat.tokenizer.TextStream`.)
"""

from __future__ import annotations

from collections.abc import Sequence


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
