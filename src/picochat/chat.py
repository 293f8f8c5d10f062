"""The chat protocol: how a conversation becomes one token sequence (with a loss mask), and back.

The lecture's GPT-4o format, exactly, after the document-start token every document begins with:

    <|endoftext|><|im_start|>user<|im_sep|>What is 2+2?<|im_end|><|im_start|>assistant<|im_sep|>2+2 = 4<|im_end|>

A conversation is a list of messages `{"role": ..., "content": str}` with roles system (optional,
first only), user and assistant (alternating), and tool. Content is encoded as plain text
(`allow_special=False`): a user who types `<|im_end|>` gets those characters, never the token.

Tool use happens inside one assistant turn, the way the engine runs it: the assistant message
carries `"tool_call": "name: argument"`, the next message is the tool's result (role tool), and the
assistant's turn goes on in the message after that, without a new header:

    <|im_start|>assistant<|im_sep|>12 * 7 is<|tool_call|>calc: 12 * 7<|/tool_call|><|tool_result|> 84<|/tool_result|> 84.<|im_end|>

    [{"role": "assistant", "content": "12 * 7 is", "tool_call": "calc: 12 * 7"},
     {"role": "tool", "content": "84"},
     {"role": "assistant", "content": " 84."}]

A result is rendered after one space (`RESULT_LEAD`), which is not part of the tool message's
content: the tokenizer keeps a number's space with it, so the result's " 84" is the very token the
assistant writes when it copies the number into its text.

A call is a tool's name, a colon and its argument (`TOOLS` names them): `calc: 8 + 6` (an arithmetic
expression; result "14") or `search: capital of Dekfusesh` (words to look up in the search index;
result the best passages, `[1] ...` one per line, or "no results"). A call the tools refuse gets
`error: <what was wrong>` as its result (picochat.tools says how each tool answers). Validation does
not check the call's text: a conversation may hold a malformed call the model wrote and the error it
read back. In OpenAI-style messages a call is a function call whose JSON arguments hold one field,
`{"expression": ...}` or `{"query": ...}` (`to_openai_tool_call`, `from_openai_tool_call`).

Loss mask: `mask[i] == 1` means token i is trained (predicted from the tokens before it). Only what
the assistant writes is trained: its content, its tool calls and its closing `<|im_end|>`; headers,
user/system text and tool results (which the engine inserts) have mask 0.

A conversation longer than the model's context is fitted to it by `fit_to_context`, which drops
whole exchanges, oldest first, and keeps the system message. A reply ends at any of `REPLY_STOP_IDS`.

`CHAT_TEMPLATE` is the same format as a Hugging Face Jinja chat template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from picochat.tokenizer import (SPECIAL_TOKENS, EOT_ID as EOT, IM_END_ID as IM_END, IM_SEP_ID as IM_SEP, IM_START_ID as IM_START,
                                TOOL_CALL_END_ID as TOOL_CALL_END, TOOL_CALL_ID as TOOL_CALL,
                                TOOL_RESULT_END_ID as TOOL_RESULT_END, TOOL_RESULT_ID as TOOL_RESULT)
ROLES = ("system", "user", "assistant", "tool")
# Roles written in a `<|im_start|>role<|im_sep|>` header (tool results are inline in the assistant turn).
HEADER_ROLES = ("system", "user", "assistant")

# Tool name -> the name of its one argument in OpenAI-style function calls.
TOOLS = {"calc": "expression", "search": "query"}

Message = dict
Segment = tuple[int | str, bool]  # (special token id or plain text, trained?)

# What a tool result's text starts with, before the tool's own answer. Without it a result "84" was
# the digit tokens "8" "4", and the cpu model copied them wrong into its text (" 84", another token)
# and into its final answer (BENCHMARKS.md, "A tool result's number is the token the model copies").
RESULT_LEAD = " "

# The ids that end an assistant reply: <|im_end|> closes the turn; <|endoftext|> would begin a new
# document, which a reply must not run on into when a model emits it.
REPLY_STOP_IDS = frozenset({IM_END, EOT})


class ConversationError(ValueError):
    """A conversation (or a rendered token sequence) that breaks the chat protocol."""


class ToolCallError(ValueError):
    """A tool call's text or OpenAI-style form that is not a call of a known tool."""


# --- validation -------------------------------------------------------------------------------------
def validate(messages: Sequence[Message], end: Literal["reply", "prompt", "any"] = "reply") -> None:
    """Raise ConversationError unless `messages` follows the protocol.

    end="reply": ends with an assistant reply (a conversation to train on);
    end="prompt": ends waiting for the assistant (last message is user or tool);
    end="any": any valid prefix of a conversation.
    """
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ConversationError("a conversation is a non-empty list of messages")
    previous: Message | None = None
    for i, message in enumerate(messages):
        _check_message(message, i)
        _check_order(previous, message, i)
        previous = message
    last = messages[-1]
    if end == "reply" and (last["role"] != "assistant" or last.get("tool_call") is not None):
        what = "a tool call" if last["role"] == "assistant" else f"{_a(last['role'])} message"
        raise ConversationError(f"the conversation ends with {what}; a conversation to train on ends with an assistant reply")
    if end == "prompt" and last["role"] not in ("user", "tool"):
        raise ConversationError(
            f"the conversation ends with {_a(last['role'])} message; to prime a reply it must end with a user message or a tool result"
        )


def _check_message(message: Message, i: int) -> None:
    if not isinstance(message, dict):
        raise ConversationError(f"message {i}: expected an object with 'role' and 'content', got {type(message).__name__}")
    role = message.get("role")
    if role not in ROLES:
        raise ConversationError(f"message {i}: unknown role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ConversationError(f"message {i}: content must be a string, got {type(content).__name__}")
    tool_call = message.get("tool_call")
    if tool_call is not None:
        if role != "assistant":
            raise ConversationError(f"message {i}: only assistant messages may carry a tool_call, not {role}")
        if not isinstance(tool_call, str) or not tool_call.strip():
            raise ConversationError(f"message {i}: tool_call must be a non-empty string")
    elif not content.strip():
        raise ConversationError(f"message {i}: empty {role} message")


def _check_order(previous: Message | None, message: Message, i: int) -> None:
    role = message["role"]
    if role == "system" and previous is not None:
        raise ConversationError(f"message {i}: a system message can only be the first message")
    if role == "tool" and not (previous and previous["role"] == "assistant" and previous.get("tool_call") is not None):
        raise ConversationError(f"message {i}: a tool result must follow an assistant message with a tool_call")
    if previous is None:
        allowed, why = ("system", "user"), "a conversation opens with an optional system message, then a user message"
    elif previous["role"] == "system":
        allowed, why = ("user",), "the system message is followed by a user message"
    elif previous["role"] == "user":
        allowed, why = ("assistant",), "user and assistant turns alternate"
    elif previous["role"] == "tool":
        allowed, why = ("assistant",), "after a tool result the assistant continues its turn"
    elif previous.get("tool_call") is not None:
        allowed, why = ("tool",), "a tool call is answered by a tool result"
    else:
        allowed, why = ("user",), "user and assistant turns alternate"
    if role not in allowed:
        after = "first" if previous is None else f"after {_a(previous['role'])} message"
        raise ConversationError(f"message {i}: {_a(role)} message cannot come {after} ({why}); expected {' or '.join(allowed)}")


def _a(role: str) -> str:
    return f"an {role}" if role == "assistant" else f"a {role}"


# --- rendering --------------------------------------------------------------------------------------
def _segments(messages: Sequence[Message], reply_prompt: bool = False) -> list[Segment]:
    """The conversation as special tokens and plain texts, each marked trained or not."""
    segments: list[Segment] = [(EOT, False)]
    for i in range(len(messages)):
        segments += _message_segments(messages, i)
    if reply_prompt:
        segments += _reply_header(messages)
    return segments


def _message_segments(messages: Sequence[Message], i: int) -> list[Segment]:
    """Message i's part of the rendered conversation."""
    message = messages[i]
    role, content = message["role"], message["content"]
    if role == "tool":
        return [(TOOL_RESULT, False), (result_text(content), False), (TOOL_RESULT_END, False)]
    trained = role == "assistant"
    continues_turn = trained and i > 0 and messages[i - 1]["role"] == "tool"
    segments: list[Segment] = [] if continues_turn else [(IM_START, False), (role, False), (IM_SEP, False)]
    segments.append((content, trained))
    if message.get("tool_call") is not None:
        segments += [(TOOL_CALL, True), (message["tool_call"], True), (TOOL_CALL_END, True)]
    else:
        segments.append((IM_END, trained))
    return segments


def result_text(content: str) -> str:
    """A tool's answer as it stands between `<|tool_result|>` and `<|/tool_result|>`."""
    return RESULT_LEAD + content


def result_content(text: str) -> str:
    """The tool's answer in the text between `<|tool_result|>` and `<|/tool_result|>`."""
    return text.removeprefix(RESULT_LEAD)


def _reply_header(messages: Sequence[Message]) -> list[Segment]:
    """What opens the assistant's reply after `messages`: nothing after a tool result (the turn is open)."""
    return [] if messages[-1]["role"] == "tool" else [(IM_START, False), ("assistant", False), (IM_SEP, False)]


def _encode(conversations_segments: list[list[Segment]], tokenizer) -> list[tuple[list[int], list[int]]]:
    texts = [piece for segments in conversations_segments for piece, _ in segments if isinstance(piece, str)]
    encoded = iter(tokenizer.encode_batch(texts, allow_special=False))
    rendered = []
    for segments in conversations_segments:
        ids: list[int] = []
        mask: list[int] = []
        for piece, trained in segments:
            piece_ids = next(encoded) if isinstance(piece, str) else [piece]
            ids += piece_ids
            mask += [int(trained)] * len(piece_ids)
        rendered.append((ids, mask))
    return rendered


def render(messages: Sequence[Message], tokenizer, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of a conversation to train on; it must end with an assistant reply."""
    validate(messages, end="reply")
    ids, mask = _encode([_segments(messages)], tokenizer)[0]
    if max_len is not None and len(ids) > max_len:
        raise ConversationError(f"the conversation is {len(ids)} tokens, longer than the context of {max_len}")
    return ids, mask


def render_batch(conversations: Sequence[Sequence[Message]], tokenizer) -> list[tuple[list[int], list[int]]]:
    """`render` for many conversations (one batched encoding call); errors name the conversation index."""
    all_segments = []
    for k, messages in enumerate(conversations):
        try:
            validate(messages, end="reply")
        except ConversationError as e:
            raise ConversationError(f"conversation {k}: {e}") from None
        all_segments.append(_segments(messages))
    return _encode(all_segments, tokenizer)


def render_for_reply(messages: Sequence[Message], tokenizer) -> list[int]:
    """Token ids that prime the assistant's reply: the conversation, then `<|im_start|>assistant<|im_sep|>`.

    After a tool result the assistant's turn is already open, so nothing is appended.
    """
    validate(messages, end="prompt")
    return _encode([_segments(messages, reply_prompt=True)], tokenizer)[0][0]


def to_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    """The rendered conversation as a string with the special tokens visible (for the token view)."""
    validate(messages, end="prompt" if add_generation_prompt else "any")
    return "".join(piece if isinstance(piece, str) else SPECIAL_TOKENS[piece] for piece, _ in _segments(messages, add_generation_prompt))


# --- fitting a conversation to the model's context --------------------------------------------------
class ContextOverflowError(ConversationError):
    """A conversation whose newest exchange (with the system message) leaves too little room for a reply."""


def reply_reserve(max_tokens: int | None, context: int) -> int:
    """The room `fit_to_context` keeps for a reply of at most `max_tokens` tokens: that many, but at most
    half the context (half when max_tokens is None), so that long replies do not crowd out the conversation."""
    half = max(1, context // 2)
    return half if max_tokens is None else max(1, min(max_tokens, half))


def fit_to_context(messages: Sequence[Message], tokenizer, context: int, reserve: int) -> tuple[list[Message], int]:
    """(the messages to prompt with, how many were dropped) for a conversation that ends waiting for
    the assistant: its oldest exchanges are dropped until the rendered prompt leaves `reserve` tokens
    of the `context` for the reply.

    A leading system message is always kept. An exchange is a user message with everything up to the
    next one (the assistant's turn, its tool calls and their results), dropped whole, oldest first.
    ContextOverflowError when even the newest exchange alone (with the system message) does not fit.
    """
    validate(messages, end="prompt")
    reserve = max(1, reserve)
    pieces = [_message_segments(messages, i) for i in range(len(messages))] + [[(EOT, False)] + _reply_header(messages)]
    sizes = [len(ids) for ids, _ in _encode(pieces, tokenizer)]
    total = sum(sizes)  # == len(render_for_reply(messages, tokenizer))
    first = 1 if messages[0]["role"] == "system" else 0
    starts = [i for i, message in enumerate(messages) if message["role"] == "user"]
    keep_from = starts[0]
    for start in starts[1:]:
        if total + reserve <= context:
            break
        total -= sum(sizes[keep_from:start])
        keep_from = start
    if total + reserve > context:
        with_system = " with the system message" if first else ""
        raise ContextOverflowError(f"the newest message{with_system} needs {total} tokens and {reserve} are kept for "
                                   f"the reply: more than the model's context of {context} tokens")
    return list(messages[:first]) + list(messages[keep_from:]), keep_from - first


# --- parsing ----------------------------------------------------------------------------------------
def token_view(messages: Sequence[dict], tokenizer) -> tuple[list[int], str]:
    """A conversation as the model sees it now, (ids, protocol text): rendered whole when it ends with
    an assistant reply, else with the `<|im_start|>assistant<|im_sep|>` that primes the next one."""
    if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_call") is None:
        return render(messages, tokenizer)[0], to_text(messages)
    return render_for_reply(messages, tokenizer), to_text(messages, add_generation_prompt=True)


def parse(ids: Sequence[int], tokenizer) -> list[Message]:
    """The messages of a rendered sequence (the inverse of `render`); ConversationError if malformed."""
    ids = list(ids)
    if not ids or ids[0] != EOT:
        raise ConversationError("token 0: expected <|endoftext|> (a rendered conversation starts with it)")

    def text_until(pos: int, stops: tuple[int, ...]) -> tuple[str, int]:
        end = pos
        while end < len(ids) and ids[end] >= len(SPECIAL_TOKENS):
            end += 1
        expected = " or ".join(SPECIAL_TOKENS[s] for s in stops)
        if end == len(ids):
            raise ConversationError(f"token {end}: the sequence ends inside a message; expected {expected}")
        if ids[end] not in stops:
            raise ConversationError(f"token {end}: unexpected {SPECIAL_TOKENS[ids[end]]}; expected {expected}")
        return tokenizer.decode(ids[pos:end]), end

    messages: list[Message] = []
    pos = 1
    while pos < len(ids):
        awaiting_result = bool(messages) and messages[-1].get("tool_call") is not None
        if awaiting_result:
            if ids[pos] != TOOL_RESULT:
                raise ConversationError(f"token {pos}: expected <|tool_result|> after a tool call, got {_show(ids[pos])}")
            result, pos = text_until(pos + 1, (TOOL_RESULT_END,))
            messages.append({"role": "tool", "content": result_content(result)})
            role, pos = "assistant", pos + 1
        elif ids[pos] == IM_START:
            role, pos = text_until(pos + 1, (IM_SEP,))
            if role not in HEADER_ROLES:
                raise ConversationError(f"token {pos}: unknown role {role!r} in a message header; expected one of {', '.join(HEADER_ROLES)}")
            pos += 1
        else:
            raise ConversationError(f"token {pos}: expected <|im_start|> (a new message), got {_show(ids[pos])}")
        content, pos = text_until(pos, (IM_END, TOOL_CALL) if role == "assistant" else (IM_END,))
        message: Message = {"role": role, "content": content}
        if ids[pos] == TOOL_CALL:
            message["tool_call"], pos = text_until(pos + 1, (TOOL_CALL_END,))
        messages.append(message)
        pos += 1
    validate(messages, end="any")
    return messages


def _show(token_id: int) -> str:
    return SPECIAL_TOKENS[token_id] if 0 <= token_id < len(SPECIAL_TOKENS) else f"text token {token_id}"


# --- tool calls -------------------------------------------------------------------------------------
def parse_tool_call(text: str) -> tuple[str, str]:
    """(tool name, argument) of a call's text `name: argument`, both stripped; ToolCallError if it is
    not the call of a known tool with a non-empty argument."""
    name, colon, argument = text.partition(":")
    name, argument = name.strip(), argument.strip()
    if not colon or not name:
        raise ToolCallError(f"a call is `tool: argument`, the tool one of {', '.join(TOOLS)}")
    if name not in TOOLS:
        raise ToolCallError(f"unknown tool {name[:20]!r}; the tools are {', '.join(TOOLS)}")
    if not argument:
        raise ToolCallError(f"{name} needs an argument after the `:`")
    return name, argument


def to_openai_tool_call(text: str, call_id: str) -> dict:
    """A call's text as an OpenAI-style tool call: `search: x` -> function "search", arguments `{"query": "x"}`."""
    name, argument = parse_tool_call(text)
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": json.dumps({TOOLS[name]: argument}, ensure_ascii=False)}}


def from_openai_tool_call(call: dict) -> str:
    """The call text `name: argument` of an OpenAI-style tool call (the inverse of `to_openai_tool_call`)."""
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if name not in TOOLS:
        raise ToolCallError(f"a tool call names a function, one of {', '.join(TOOLS)}; got {name!r}")
    try:
        arguments = json.loads(function.get("arguments") or "")
    except (TypeError, json.JSONDecodeError):
        arguments = None
    field = TOOLS[name]
    if not isinstance(arguments, dict) or not isinstance(arguments.get(field), str) or not arguments[field].strip():
        raise ToolCallError(f"the arguments of {name} are a JSON object with a non-empty string {field!r}")
    return f"{name}: {arguments[field].strip()}"


# --- Hugging Face chat template ---------------------------------------------------------------------
# The same rendering as `to_text`, in the Jinja dialect transformers' `apply_chat_template` runs
# (a sandboxed environment; `bos_token` must be "<|endoftext|>" in the exported tokenizer config).
CHAT_TEMPLATE = (
    "{#- picochat's chat protocol (picochat.chat): <|im_start|>role<|im_sep|>content<|im_end|> per message. An"
    " assistant message may end in a tool call instead, its 'tool_call' being 'name: argument' ('calc: 8 + 6',"
    " 'search: capital of Dekfusesh'); the next message (role tool) holds the result, inline between"
    " <|tool_result|> and <|/tool_result|> after one space, and the assistant's turn goes on without a new header. -#}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|tool_result|> ' + message['content'] + '<|/tool_result|>' -}}"
    "{%- else -%}"
    "{%- if message['role'] != 'assistant' or loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>' + message['role'] + '<|im_sep|>' -}}"
    "{%- endif -%}"
    "{{- message['content'] -}}"
    "{%- if message['tool_call'] is defined and message['tool_call'] is not none -%}"
    "{{- '<|tool_call|>' + message['tool_call'] + '<|/tool_call|>' -}}"
    "{%- else -%}"
    "{{- '<|im_end|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'tool') -%}"
    "{{- '<|im_start|>assistant<|im_sep|>' -}}"
    "{%- endif -%}"
)
