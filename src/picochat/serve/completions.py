"""Chat and text completions: from a validated request to the OpenAI response, whole or streamed.

A chat request's messages are rendered with the chat protocol (`chat.render_for_reply`) and the
reply stops at `<|im_end|>` or `<|endoftext|>` (`chat.REPLY_STOP_IDS`); a text completion continues
a document (`<|endoftext|>` + the prompt) and stops at the next `<|endoftext|>`. Both decode through
the model's `Batcher`, turn tokens into whole characters, cut at the request's stop strings, and
count usage. Streams are server-sent events (`data: {json}`) ending with `data: [DONE]`.

The server's tools: when a chat request uses them (`offers_tools`), its conversation offers them
(`tools.with_tools`) and the engine runs the model's calls; the reply is read with
`picochat.reply.ReplyReader`: its text without the tool markup is the `content`, and each step goes
in `tool_steps` with its offset in that text (schemas.py documents the form). A stop string is looked
for in the text between tool steps. An assistant message sent back with `tool_steps` becomes the
protocol's tool messages again.

Replies are limited to the room left in the model's context: a max_tokens larger than that room
ends the reply with finish_reason "length" when the context is full. A conversation too long for
the context gets 400 (code context_length_exceeded), as from OpenAI, unless the request says
`"truncation": "auto"`: then its oldest exchanges are dropped (`chat.fit_to_context`, the system
message kept) until max_tokens fits, or half the context when max_tokens is unset or larger, and
the header `X-Picochat-Dropped-Messages` says how many of the request's messages went. Preparing a
request takes time that grows with its text, so the server runs `chat_generation` and
`text_generation` in a worker thread, and they refuse text too long for the context before
tokenizing it (`least_tokens`) unless truncation may shorten it.
"""

from __future__ import annotations

import functools
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass

from picochat.chat import (
    REPLY_STOP_IDS,
    ContextOverflowError,
    ConversationError,
    fit_to_context,
    render_for_reply,
    reply_reserve,
    result_content,
)
from picochat.engine import Sampling, context_room
from picochat.reply import ReplyReader, ToolStep
from picochat.serve.batcher import RequestFailed, Submission
from picochat.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    SamplingRequest,
    ToolChoice,
)
from picochat.serve.schemas import ToolStep as SentToolStep
from picochat.serve.text import StopStrings
from picochat.tokenizer import SPECIAL_TOKENS, TextStream
from picochat.tools import with_tools

DEFAULT_TEXT_MAX_TOKENS = 16  # the OpenAI default for /v1/completions
DROPPED_MESSAGES_HEADER = "X-Picochat-Dropped-Messages"  # how many messages "truncation": "auto" dropped
CHAT, TEXT = "chat", "text"

# An assistant reply with its tool steps written inline, as clients may send it back:
# text <|tool_call|>call<|/tool_call|><|tool_result|>result<|/tool_result|> text ...
_CALL, _CALL_END_RESULT, _RESULT_END = "<|tool_call|>", "<|/tool_call|><|tool_result|>", "<|/tool_result|>"


@dataclass
class Generation:
    """What to decode for one request, and how to answer it."""

    kind: str  # CHAT or TEXT
    model_id: str
    prompt: list[int]
    n: int
    options: dict  # ContinuousBatch.add keyword arguments
    stops: list[str]
    stream: bool
    include_usage: bool
    dropped_messages: int | None = None  # request messages dropped to fit the context; None: no truncation asked

    def headers(self) -> dict[str, str]:
        """The response headers beyond the content type: how many messages truncation dropped."""
        return {} if self.dropped_messages is None else {DROPPED_MESSAGES_HEADER: str(self.dropped_messages)}


def offers_tools(server_tools: bool, tool_choice: ToolChoice) -> bool:
    """Whether a chat request uses the server's tools: the server has them and the request does not say "none"."""
    return server_tools and tool_choice != "none"


def conversation(messages: list[ChatMessage], offer_tools: bool = False) -> list[dict]:
    """The request's messages in the chat protocol's form: "developer" is the system role, an
    assistant reply's `tool_steps` (or tool calls written inline in it) become the protocol's tool
    messages, and with `offer_tools` the system message offers the tools."""
    messages = [converted for message in messages for converted in _protocol_messages(message)]
    return with_tools(messages) if offer_tools else messages


def _protocol_messages(message: ChatMessage) -> list[dict]:
    """One request message as the chat protocol's messages (several for a reply with tool steps)."""
    role = "system" if message.role == "developer" else message.role
    if role == "assistant" and message.tool_steps:
        converted = _split_at_steps(message.text(), message.tool_steps)
    elif role == "assistant" and message.tool_call is None:
        return _split_tool_markup(message.text())
    else:
        converted = [{"role": role, "content": message.text()}]
    if message.tool_call is not None:
        converted[-1]["tool_call"] = message.tool_call
    return converted


def _split_at_steps(content: str, steps: list[SentToolStep]) -> list[dict]:
    """A reply's text cut at its steps' offsets, each step's call and result between the pieces;
    steps the protocol cannot hold (no result, a blank call) are left out."""
    messages, start = [], 0
    for step in steps:
        if step.result is None or not step.call.strip():
            continue
        messages += [{"role": "assistant", "content": content[start:step.offset], "tool_call": step.call},
                     {"role": "tool", "content": step.result}]
        start = step.offset
    return messages + [{"role": "assistant", "content": content[start:]}]


def _split_tool_markup(content: str) -> list[dict]:
    """Each complete call with its result becomes an assistant message and a tool message. One
    left-to-right scan: a regular expression for this backtracked in time cubic in the text."""
    messages, end = [], 0
    while (call := content.find(_CALL, end)) >= 0:
        call_end = content.find(_CALL_END_RESULT, call + len(_CALL))
        result_end = content.find(_RESULT_END, call_end + len(_CALL_END_RESULT)) if call_end >= 0 else -1
        if result_end < 0:
            break
        messages += [{"role": "assistant", "content": content[end:call], "tool_call": content[call + len(_CALL):call_end]},
                     {"role": "tool", "content": result_content(content[call_end + len(_CALL_END_RESULT):result_end])}]
        end = result_end + len(_RESULT_END)
    return messages + [{"role": "assistant", "content": content[end:]}]


@functools.cache
def _longest_token_bytes(tokenizer) -> int:
    return max(len(tokenizer.token_bytes(i)) for i in range(len(SPECIAL_TOKENS), tokenizer.vocab_size))


def least_tokens(texts: list[str], tokenizer) -> int:
    """The fewest tokens these texts can be encoded into, counted without encoding them: a token
    stands for at most as many bytes as the tokenizer's longest one."""
    longest = _longest_token_bytes(tokenizer)
    return sum(-(-len(text.encode("utf-8")) // longest) for text in texts)


def least_conversation_tokens(messages: list[dict], tokenizer) -> int:
    """The fewest tokens a conversation (in the chat protocol's form) renders into: its texts, and
    at least one special token a message."""
    return len(messages) + least_tokens([m.get(key) or "" for m in messages for key in ("content", "tool_call")], tokenizer)


def chat_generation(request: ChatCompletionRequest, model_id: str, tokenizer, context: int, max_batch: int,
                    server_tools: bool = False) -> Generation:
    """What to decode for a chat request; `server_tools`: the server runs tools (unless the request says "none")."""
    if request.max_completion_tokens is not None:
        limit, limit_param = request.max_completion_tokens, "max_completion_tokens"
    else:
        limit, limit_param = request.max_tokens, "max_tokens"
    tools = offers_tools(server_tools, request.tool_choice)
    if request.truncation == "auto":
        prompt, dropped = _fitted_prompt(request.messages, tokenizer, context, reply_reserve(limit, context), tools)
    else:
        prompt, dropped = _whole_prompt(request.messages, tokenizer, context, tools), None
    generation = _generation(CHAT, request, model_id, prompt, "messages", limit, limit_param, REPLY_STOP_IDS, context, max_batch,
                             run_tools=tools)
    generation.dropped_messages = dropped
    return generation


def _whole_prompt(request_messages: list[ChatMessage], tokenizer, context: int, offer_tools: bool) -> list[int]:
    """The prompt of the whole conversation; one that cannot fit the context is refused before rendering."""
    messages = conversation(request_messages, offer_tools)
    at_least = least_conversation_tokens(messages, tokenizer)
    if at_least >= context:
        raise _no_room("messages", f"at least {at_least}", context)
    try:
        return render_for_reply(messages, tokenizer)
    except ConversationError as error:
        raise APIError(400, str(error), param="messages") from None


def _fitted_prompt(request_messages: list[ChatMessage], tokenizer, context: int, reserve: int,
                   offer_tools: bool) -> tuple[list[int], int]:
    """(the prompt of the newest exchanges that leave `reserve` tokens of the context for the reply,
    how many of the request's messages were dropped)."""
    parts = [_protocol_messages(message) for message in request_messages]
    messages = [converted for part in parts for converted in part]
    try:
        # The tools' offer is in the system message, which is never dropped.
        kept, dropped = fit_to_context(with_tools(messages) if offer_tools else messages, tokenizer, context, reserve)
    except ContextOverflowError as error:
        raise APIError(400, str(error), param="messages", code="context_length_exceeded") from None
    except ConversationError as error:
        raise APIError(400, str(error), param="messages") from None
    system = 1 if messages[0]["role"] == "system" else 0
    # Cuts fall before user messages, which are one protocol message each: request messages drop whole.
    dropped_requests = sum(end <= system + dropped for end in itertools.accumulate(map(len, parts))) - system
    return render_for_reply(kept, tokenizer), dropped_requests


def text_generation(request: CompletionRequest, model_id: str, tokenizer, context: int, max_batch: int) -> Generation:
    at_least = 1 + least_tokens([request.text()], tokenizer)
    if at_least >= context:
        raise _no_room("prompt", f"at least {at_least}", context)
    # encode_batch releases the GIL while it works (encode does not): the event loop goes on meanwhile.
    prompt = [tokenizer.eot_id] + tokenizer.encode_batch([request.text()])[0]
    limit = DEFAULT_TEXT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    return _generation(TEXT, request, model_id, prompt, "prompt", limit, "max_tokens", [tokenizer.eot_id], context, max_batch,
                       run_tools=False)


def _generation(kind: str, request: SamplingRequest, model_id: str, prompt: list[int], prompt_param: str, limit: int | None,
                limit_param: str, stop_ids: Collection[int], context: int, max_batch: int, run_tools: bool) -> Generation:
    room = context_room(context, len(prompt))
    if room < 1:
        raise _no_room(prompt_param, str(len(prompt)), context)
    if limit is not None and limit >= context:
        raise APIError(400, f"{limit_param} must be between 1 and {context - 1} (the model's context is {context} tokens), got {limit}",
                       param=limit_param)
    n = request.n or 1
    if n > max_batch:
        raise APIError(400, f"n must be at most {max_batch} (the server's --max-batch), got {n}", param="n")
    options = dict(
        max_new_tokens=min(limit or room, room),
        sampling=Sampling(
            temperature=1.0 if request.temperature is None else request.temperature,
            top_k=request.top_k,
            top_p=None if request.top_p in (None, 1.0) else request.top_p,
            seed=request.seed,
            stop_ids=stop_ids,
        ),
        run_tools=run_tools,
    )
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Generation(kind, model_id, prompt, n, options, request.stop_strings(), bool(request.stream), include_usage)


def _no_room(param: str, tokens: str, context: int) -> APIError:
    return APIError(400, f"the {param} take {tokens} tokens; the model's context is {context} tokens, so no room is left "
                    "for a reply", param=param, code="context_length_exceeded")


Output = str | dict  # a piece of a reply's text, or one of its tool steps (as returned in `tool_steps`)


class _ChoiceReply:
    """One choice's reply as the client gets it, token by token: text cut at the stop strings and,
    in a chat reply, its tool steps, each with the number of text characters before it."""

    def __init__(self, tokenizer, stops: list[str], chat: bool):
        self._reader = ReplyReader(tokenizer) if chat else None
        self._text = TextStream(tokenizer)
        self._watcher = StopStrings(stops)
        self._sent = 0  # characters of text given out

    @property
    def stopped(self) -> bool:
        return self._watcher.stopped

    def push(self, token: int) -> list[Output]:
        return self._out(self._reader.push(token) if self._reader else [self._text.push(token)])

    def finish(self) -> list[Output]:
        """What is held back, once the reply is over without a stop string."""
        out = self._out(self._reader.finish() if self._reader else [self._text.flush()])
        return out if self.stopped else out + self._give(self._watcher.flush())

    def _out(self, pieces: list[str | ToolStep]) -> list[Output]:
        out: list[Output] = []
        for piece in pieces:
            if self.stopped:
                break
            if isinstance(piece, ToolStep):  # the text before a step is final: a stop string does not span a step
                out += self._give(self._watcher.flush())
                out.append({"call": piece.call, "result": piece.result, "offset": self._sent})
            else:
                out += self._give(self._watcher.push(piece))
        return out

    def _give(self, text: str) -> list[Output]:
        self._sent += len(text)
        return [text] if text else []


async def choice_outputs(submission: Submission, tokenizer, generation: Generation,
                         usage: dict) -> AsyncIterator[tuple[int, list[Output], str | None]]:
    """(choice index, new text pieces and tool steps in order, finish reason or None) as the
    submission decodes; counts usage["completion_tokens"]. A choice that meets a stop string is
    cancelled there."""
    replies = [_ChoiceReply(tokenizer, generation.stops, generation.kind == CHAT) for _ in range(submission.job.n)]
    async for moved in submission:
        for choice, token, finish_reason in moved:
            reply = replies[choice]
            out = []
            if token is not None:
                usage["completion_tokens"] += 1
                out += reply.push(token)
            if finish_reason is not None and not reply.stopped:
                out += reply.finish()
            if reply.stopped:
                submission.cancel(choice)
                finish_reason = "stop"
            if out or finish_reason:
                yield choice, out, finish_reason


def _joined(out: list[Output]) -> list[Output]:
    """The outputs with neighbouring text pieces joined."""
    joined: list[Output] = []
    for item in out:
        if isinstance(item, str) and joined and isinstance(joined[-1], str):
            joined[-1] += item
        else:
            joined.append(item)
    return joined


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _header(generation: Generation, chunk: bool) -> dict:
    if generation.kind == CHAT:
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        obj = "text_completion"
    return {"object": obj, "created": int(time.time()), "model": generation.model_id, "system_fingerprint": None}


def _new_id(generation: Generation) -> str:
    return ("chatcmpl-" if generation.kind == CHAT else "cmpl-") + uuid.uuid4().hex[:24]


async def complete(generation: Generation, submission: Submission, tokenizer) -> dict:
    """The whole response body of a request that does not stream."""
    usage = {"completion_tokens": 0}
    texts, finish_reasons = [""] * generation.n, [None] * generation.n
    steps: list[list[dict]] = [[] for _ in range(generation.n)]
    async with submission:
        async for choice, out, finish_reason in choice_outputs(submission, tokenizer, generation, usage):
            for item in out:
                if isinstance(item, str):
                    texts[choice] += item
                else:
                    steps[choice].append(item)
            finish_reasons[choice] = finish_reason or finish_reasons[choice]
    if generation.kind == CHAT:
        choices = [{"index": i, "message": _message(text, choice_steps), "logprobs": None, "finish_reason": reason}
                   for i, (text, choice_steps, reason) in enumerate(zip(texts, steps, finish_reasons))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(zip(texts, finish_reasons))]
    return {"id": _new_id(generation), **_header(generation, chunk=False), "choices": choices,
            "usage": _usage(len(generation.prompt), usage["completion_tokens"])}


def _message(content: str, steps: list[dict]) -> dict:
    """A reply's assistant message: its text, and its tool steps when it made calls."""
    return {"role": "assistant", "content": content, **({"tool_steps": steps} if steps else {})}


def _event(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(generation: Generation, submission: Submission, tokenizer) -> AsyncIterator[str]:
    """The response of a streaming request, as server-sent events."""
    usage = {"completion_tokens": 0}
    chunk_id = _new_id(generation)
    extra = {"usage": None} if generation.include_usage else {}

    def chunk(choices: list[dict]) -> str:
        return _event({"id": chunk_id, **_header(generation, chunk=True), "choices": choices, **extra})

    def choice(index: int, delta: dict, finish_reason: str | None = None) -> dict:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def text_choice(index: int, text: str, finish_reason: str | None) -> dict:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}

    async with submission:
        try:
            if generation.kind == CHAT:
                for index in range(generation.n):
                    yield chunk([choice(index, {"role": "assistant", "content": ""})])
            async for index, out, finish_reason in choice_outputs(submission, tokenizer, generation, usage):
                if generation.kind == TEXT:
                    yield chunk([text_choice(index, "".join(out), finish_reason)])
                    continue
                for item in _joined(out):
                    yield chunk([choice(index, {"content": item} if isinstance(item, str) else {"tool_steps": [item]})])
                if finish_reason:
                    yield chunk([choice(index, {}, finish_reason)])
        except ValueError as error:  # the engine refused the request after the stream had started
            yield _event(APIError(400, str(error)).body())
        except RequestFailed as error:
            yield _event(APIError(500, str(error), type="server_error").body())
        else:
            if generation.include_usage:
                yield _event({"id": chunk_id, **_header(generation, chunk=True), "choices": [],
                              "usage": _usage(len(generation.prompt), usage["completion_tokens"])})
        yield _event("[DONE]")
