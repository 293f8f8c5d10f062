"""The OpenAI-compatible request bodies the server accepts, and its error type.

Fields follow the OpenAI API (chat completions and legacy completions); fields the server does
not use are ignored, as OpenAI-compatible servers do. A field sent as null means its default.
Text must be Unicode: JSON can carry lone UTF-16 surrogates ("\ud800"), which no encoder takes.
Extensions: `top_k` (sample among the k most likely tokens), `tool_call` on assistant messages
(the chat protocol's tool call, "calc: 8 + 6", answered by the next message, role tool),
`truncation` on chat completions (named after the OpenAI Responses API's field: "auto" drops the
oldest exchanges of a conversation too long for the context, the system message kept, and the
response header `X-Picochat-Dropped-Messages` counts the request messages dropped; "disabled", the
default, answers 400), and the `/v1/tokenize` body for the token view.

The server's own tools (calc, and search when it has an index; like ChatGPT's built-in tools, they
run on the server, never in the client): unless the server was started with `--no-tools`, a chat
completion offers them to the model and runs its calls. `tool_choice` (OpenAI's field, with its
meaning) says whether: "auto" (the default here, the tools being built in) or "none" (no tools for
this request: none offered, a call the model writes anyway is not run); other values get 400. The
reply's `content` is its text without the tool markup, and its assistant message carries the steps:

    "tool_steps": [{"call": "calc: 4 * 2", "result": "8", "offset": 13}]

`call` is the call as the model wrote it (the chat protocol's `tool_call` text), `result` what the
tool answered (a search's is numbered passages `[1] ...` one per line; an error reads `error: ...`;
null when no result came: tools off, or the reply ended inside the step), `offset` where in
`content` the call was made (in characters, i.e. Unicode code points). A stream sends each step, once
its result is in, as a chunk whose delta is `{"tool_steps": [step]}`, between the content deltas
before and after it. `tool_steps` is left out when a reply made no call. An assistant message sent
back with its `tool_steps` is read as the conversation the model had (each step's call and result
at its offset), so a client that returns the messages it got keeps the steps in the model's view;
steps the protocol cannot hold (no result, a blank call) are left out.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

# torch.Generator.manual_seed accepts this range.
MIN_SEED, MAX_SEED = -(2**63), 2**64 - 1
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # each stop string is checked against the reply's end at every token


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _unicode(value):
    """`value` (text, a list of texts or text parts, or None) if all its text is Unicode."""
    texts = [value] if isinstance(value, str) else [getattr(v, "text", v) for v in value or []]
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise ValueError(f"holds a lone surrogate ({text[error.start]!r} at character {error.start}), which is "
                             "not Unicode text") from None
    return value


UNICODE = AfterValidator(_unicode)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ToolStep(BaseModel):
    """A step the server's tools ran inside an assistant reply: the call, its result (None: none came)
    and where in the reply's content the call was made (module docstring)."""

    call: Annotated[str, UNICODE]
    result: Annotated[str | None, UNICODE] = None
    offset: Annotated[int, Field(ge=0)]


class ChatMessage(BaseModel):
    role: Annotated[str, UNICODE]
    content: Annotated[str | list[TextPart] | None, UNICODE] = None
    tool_call: Annotated[str | None, UNICODE] = None
    tool_steps: list[ToolStep] | None = None

    @model_validator(mode="after")
    def _steps_inside_an_assistant_reply(self):
        if not self.tool_steps:
            return self
        if self.role != "assistant":
            raise ValueError(f"only assistant messages may carry tool_steps, not {self.role}")
        offsets = [step.offset for step in self.tool_steps]
        if offsets != sorted(offsets) or offsets[-1] > len(self.text()):
            raise ValueError(f"tool_steps offsets must not decrease and must be at most the content's length "
                             f"({len(self.text())} characters), got {offsets}")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    include_usage: bool | None = None


Stop = Annotated[str | list[str] | None, UNICODE]
ToolChoice = Literal["none", "auto"] | None  # the server's tools for this request: "auto" (default) or "none"
Seed = Annotated[int | None, Field(ge=MIN_SEED, le=MAX_SEED)]


class SamplingRequest(BaseModel):
    """What chat and text completions share."""

    model: Annotated[str, UNICODE]
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(gt=0, le=1)] = None
    top_k: Annotated[int | None, Field(ge=1)] = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    n: Annotated[int | None, Field(ge=1)] = None
    stop: Stop = None
    seed: Seed = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops_few_short_and_not_empty(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            longest = max(len(s) for s in stops)
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return stop

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "demo-sft", "messages": [{"role": "user", "content": "What is 2+2?"}], "max_tokens": 16},
        {"model": "demo-sft", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
         "temperature": 0.7, "top_p": 0.9, "n": 2, "stop": ["\n"], "stream": True, "stream_options": {"include_usage": True}},
    ]})

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    truncation: Literal["auto", "disabled"] | None = None
    tool_choice: ToolChoice = None


class CompletionRequest(SamplingRequest):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"model": "demo-base", "prompt": "The capital of", "max_tokens": 8, "temperature": 0, "stream": True}]})

    prompt: Annotated[str | Annotated[list[str], Field(min_length=1, max_length=1)], UNICODE]

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TokenizeRequest(BaseModel):
    """Either a conversation (rendered as the chat model sees it) or a document prompt."""

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"messages": [{"role": "user", "content": "What is 2+2?"}]}, {"prompt": "The capital of"}]})

    messages: list[ChatMessage] | None = None
    prompt: Annotated[str | None, UNICODE] = None
    tool_choice: ToolChoice = None  # as in a chat completion: "none" shows the conversation without the tools' offer
