"""A reply as a person sees it while it streams: its text, and the tool steps the engine ran in it.

The engine's tokens of an assistant reply interleave the model's text with tool steps (the call the
model wrote, then the result the engine fed back; picochat.chat, picochat.tools):

    4 kites cost<|tool_call|>calc: 4 * 2<|/tool_call|><|tool_result|> 8<|/tool_result|> 8 dollars.

`ReplyReader` takes those ids one at a time and gives back, in order, text pieces (whole UTF-8
characters, the tool markup left out: "4 kites cost", " 8 dollars.") and a `ToolStep` for each
step once it is complete (`ToolStep("calc: 4 * 2", "8")`). The terminal chat prints the steps on
lines of their own; the server returns them beside the reply's text.

A call that got no result is a step whose result is None: the engine ran no tools (they were
off, and the model wrote a call anyway), or the reply ended inside the step. Result and call-end
tokens outside a step are text (their markup shows), as in any decoded text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from picochat.chat import result_content
from picochat.tokenizer import TOOL_CALL_END_ID, TOOL_CALL_ID, TOOL_RESULT_END_ID, TOOL_RESULT_ID, TextStream

_PASSAGE = re.compile(r"^\[\d+\] ", re.MULTILINE)  # how a search result numbers its passages

_TEXT, _CALL, _CALLED, _RESULT = "text", "call", "called", "result"  # where the reader is


@dataclass(frozen=True)
class ToolStep:
    """One tool call in a reply: the call's text ("calc: 4 * 2", the protocol's `tool_call`) and the
    result the engine fed back ("8"), None when none came."""

    call: str
    result: str | None

    @property
    def tool(self) -> str:
        """The tool's name: the call's text before its colon ("" when it has none)."""
        name, colon, _ = self.call.partition(":")
        return name.strip() if colon else ""

    def passages(self) -> int:
        """How many numbered passages (`[1] ...`) the result holds: a search's hits."""
        return len(_PASSAGE.findall(self.result or ""))


class ReplyReader:
    """Token ids of a reply in, what a person sees out: text pieces and `ToolStep`s, in order."""

    def __init__(self, tokenizer):
        self._tok = tokenizer
        self._text = TextStream(tokenizer)
        self._state = _TEXT
        self._call: list[int] = []
        self._result: list[int] = []

    def push(self, token_id: int) -> list[str | ToolStep]:
        """What this token completes: text, a step, or nothing yet."""
        if self._state == _TEXT:
            if token_id == TOOL_CALL_ID:
                self._state, self._call = _CALL, []
                return self._flush_text()
            text = self._text.push(token_id)
            return [text] if text else []
        if self._state == _CALL:
            if token_id == TOOL_CALL_END_ID:
                self._state = _CALLED
            else:
                self._call.append(token_id)
            return []
        if self._state == _CALLED:
            if token_id == TOOL_RESULT_ID:
                self._state, self._result = _RESULT, []
                return []
            return [self._step(None), *self.push(token_id)]  # no result came: the model went on writing
        if token_id == TOOL_RESULT_END_ID:
            return [self._step(result_content(self._tok.decode(self._result)))]
        self._result.append(token_id)
        return []

    def finish(self) -> list[str | ToolStep]:
        """What is still held once the reply has ended: its last characters, or a step without result."""
        return self._flush_text() if self._state == _TEXT else [self._step(None)]

    def _flush_text(self) -> list[str]:
        text = self._text.flush()
        return [text] if text else []

    def _step(self, result: str | None) -> ToolStep:
        self._state = _TEXT
        return ToolStep(self._tok.decode(self._call), result)
