"""`picochat chat`: a multi-turn terminal chat with a chat model, streamed token by token.

    picochat chat --run runs/demo                 # talk; /reset starts over, /tokens shows the tokens
    picochat chat --run runs/demo --prompt "Who are you?"     # one shot

`/tokens` prints the conversation as the model sees it: the rendered protocol with its special
tokens (the tool calls and results too), each token's piece and id, and the count (the lecture's
tokenizer view).

Tools are on unless `--no-tools`: the system message offers them (`tools.with_tools`, before any
`--system` text) and the engine runs the model's calls: the calculator, and search when the run
has a search index (`<run>/index`; without one the start line says the calculator is alone). Each
call shows on dim lines of its own, with its result (a search's passages shortened), and the reply's
text without the tool markup:

    picochat> 4 kites cost
      ⚙ calc: 4 * 2 → 8
    8 dollars.

With `--no-tools` nothing is offered and a call the model writes anyway is not run (its line says
"no result").

When the next reply would not fit the model's context, the oldest exchanges are dropped (the system
prompt stays; `chat.fit_to_context`) and a notice says so; the chat goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import textwrap
from collections.abc import Iterator

import torch

from picochat.chat import (
    REPLY_STOP_IDS,
    ConversationError,
    fit_to_context,
    parse,
    render_for_reply,
    reply_reserve,
    token_view,
)
from picochat.engine import Sampling, stream
from picochat.reply import ReplyReader, ToolStep
from picochat.run import Run
from picochat.tokenizer import Tokenizer, render_pieces
from picochat.tools import Tools, with_tools

HELP = "commands: /reset (new conversation), /tokens (show the tokens the model sees), /quit"
SHOWN_CHARS = 100  # a tool result or passage longer than this shows shortened


class ChatSession:
    """A conversation with a model: holds the messages and streams each reply.

    `tools` are offered in the system message and run the model's calls; None: no tools (none
    offered, and a call the model writes anyway is not run)."""

    def __init__(self, model, tok: Tokenizer, sampling: Sampling, system: str | None = None, max_tokens: int = 256,
                 tools: Tools | None = None):
        self.model, self.tok, self.system, self.tools = model, tok, system, tools
        self.sampling = dataclasses.replace(sampling, stop_ids=REPLY_STOP_IDS)
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        messages = [{"role": "system", "content": self.system}] if self.system else []
        self.messages = messages if self.tools is None else with_tools(messages)

    def reply(self, user_text: str) -> tuple[int, Iterator[str | ToolStep]]:
        """(how many of the oldest messages were dropped to fit the model's context, the assistant's
        reply to `user_text` while it streams: text pieces and tool steps); the messages are updated at
        the end of it. A message too long for the context even alone raises chat.ContextOverflowError
        (a ValueError)."""
        context = self.model.config.max_seq_len
        reserve = reply_reserve(self.max_tokens, context)
        kept, dropped = fit_to_context(self.messages + [{"role": "user", "content": user_text}], self.tok, context, reserve)
        return dropped, self._stream(kept)

    def _stream(self, kept: list[dict]) -> Iterator[str | ToolStep]:
        prompt = render_for_reply(kept, self.tok)
        generated: list[int] = []
        shown: list[str] = []
        reader = ReplyReader(self.tok)

        def pieces():
            # tools=None and no tokenizer: the engine runs no calls at all.
            for token_id in stream(self.model, prompt, self.max_tokens, self.sampling, tools=self.tools):
                generated.append(token_id)
                yield from reader.push(token_id)
            yield from reader.finish()

        with torch.inference_mode():
            for piece in pieces():
                if isinstance(piece, str):
                    shown.append(piece)
                yield piece
        self.messages = self._with_reply(kept, prompt, generated, "".join(shown))

    def _with_reply(self, kept: list[dict], prompt: list[int], generated: list[int], shown: str) -> list[dict]:
        """The conversation after a reply, parsed from its tokens (tool calls and results included). A
        reply that breaks the protocol (a tool call cut short or not answered, a stray header) is kept
        as the text `shown`, as the server keeps what it sent; a blank one (the model ended at once)
        leaves the exchange out."""
        try:
            return parse(prompt + generated + [self.tok.im_end_id], self.tok)
        except ConversationError:
            return kept + [{"role": "assistant", "content": shown}] if shown.strip() else kept[:-1]

    def token_view(self) -> str:
        """The conversation so far as the model sees it: coloured pieces, ids, count."""
        ids = token_view(self.messages, self.tok)[0] if self.messages else [self.tok.eot_id]
        return "\n".join([render_pieces(self.tok, ids, colour=sys.stdout.isatty()), str(ids), f"{len(ids)} tokens"])


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (e.g. runs/demo)")
    parser.add_argument("--stage", default=None, help="sft, rl, dpo or rlhf (default: the most advanced finished stage)")
    parser.add_argument("--prompt", default=None, help="ask one question, print the reply and exit")
    parser.add_argument("--system", default=None, help="a system prompt placed before the conversation")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default 0.7)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0 = all)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    parser.add_argument("--max-tokens", type=int, default=256,
                        help="longest reply in tokens (default 256); the oldest messages are dropped to keep room for "
                             "it, or for half the model's context if that is less")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible replies")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--no-tools", action="store_true",
                        help="offer the model no tools and run none of its calls (default: the calculator, and "
                             "search when the run has a search index)")
    parser.set_defaults(func=_cmd)


def drop_notice(dropped: int, context: int) -> str:
    """The line that tells the user the oldest messages left the conversation."""
    return f"({dropped} older message{'s' if dropped != 1 else ''} dropped to fit the model's {context}-token context)"


def step_lines(step: ToolStep) -> list[str]:
    """How the terminal shows a tool step: the call and its result on one line (a search's number of
    passages), then each passage shortened on a line of its own."""
    icon = "🔎" if step.tool == "search" else "⚙"
    passages = step.passages()
    if step.result is None:
        outcome = "no result"
    elif passages:
        outcome = f"{passages} passage{'s' if passages != 1 else ''}"
    else:
        outcome = _shorten(step.result)
    head = f"  {icon} {_shorten(step.call)} → {outcome}"
    return [head] + ([f"    {_shorten(line)}" for line in step.result.splitlines()] if passages else [])


def _shorten(text: str) -> str:
    return textwrap.shorten(text, SHOWN_CHARS, placeholder=" …") or text.strip()


def _dim(line: str) -> str:
    return f"\033[2m{line}\033[0m" if sys.stdout.isatty() else line


def _print_reply(session: ChatSession, text: str, prefix: str = "") -> None:
    dropped, pieces = session.reply(text)
    if dropped:
        print(_dim(drop_notice(dropped, session.model.config.max_seq_len)))
    sys.stdout.write(prefix)
    line_open = bool(prefix)
    for piece in pieces:
        if isinstance(piece, ToolStep):
            sys.stdout.write("\n" if line_open else "")
            sys.stdout.write("".join(_dim(line) + "\n" for line in step_lines(piece)))
            line_open = False
        else:
            sys.stdout.write(piece)
            line_open = not piece.endswith("\n")
        sys.stdout.flush()
    sys.stdout.write("\n")


def tools_note(tools: Tools | None) -> str:
    """What the start line says about the tools."""
    if tools is None:
        return "tools off"
    if tools.index is None:
        return "tools: calc only (this run has no search index)"
    return f"tools: calc, search ({tools.index.directory})"


def _cmd(args) -> int:
    model, tok, stage_dir = Run(args.run).load(args.stage, args.device)
    sampling = Sampling(args.temperature, args.top_k or None, args.top_p, args.seed)
    tools = None if args.no_tools else Tools(tok, Run(args.run).open_index())
    session = ChatSession(model, tok, sampling, args.system, args.max_tokens, tools)
    if args.prompt is not None:
        _print_reply(session, args.prompt)
        return 0
    print(f"picochat: chatting with {stage_dir} ({model.num_params() / 1e6:.1f}M parameters; {tools_note(tools)}). {HELP}")
    while True:
        try:
            text = input("\nyou> ").strip()
        except EOFError:
            print()
            return 0
        if not text:
            continue
        if text in ("/quit", "/exit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(new conversation)")
        elif text == "/tokens":
            print(session.token_view())
        elif text.startswith("/"):
            print(HELP)
        else:
            try:
                _print_reply(session, text, prefix="picochat> ")
            except ValueError as e:
                print(f"\n[{e}]")
