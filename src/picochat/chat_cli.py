"""`picochat chat`: a multi-turn terminal chat with a chat model, streamed token by token.

    picochat chat --run runs/demo                 # talk; /reset starts over, /tokens shows the tokens
    picochat chat --run runs/demo --prompt "Who are you?"     # one shot

`/tokens` prints the conversation as the model sees it: the rendered protocol with its special
tokens, each token's piece and id, and the count (the lecture's tokenizer view).

When the next reply would not fit the model's context, the oldest exchanges are dropped (the system
prompt stays; `chat.fit_to_context`) and a notice says so; the chat goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
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
from picochat.run import Run
from picochat.tokenizer import Tokenizer, iter_text, render_pieces
from picochat.tools import Tools

HELP = "commands: /reset (new conversation), /tokens (show the tokens the model sees), /quit"


class ChatSession:
    """A conversation with a model: holds the messages and streams each reply."""

    def __init__(self, model, tok: Tokenizer, sampling: Sampling, system: str | None = None, max_tokens: int = 256,
                 tools: Tools | None = None):
        self.model, self.tok, self.system, self.tools = model, tok, system, tools
        self.sampling = dataclasses.replace(sampling, stop_ids=REPLY_STOP_IDS)
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str) -> tuple[int, Iterator[str]]:
        """(how many of the oldest messages were dropped to fit the model's context, the assistant's
        reply to `user_text` as text while it streams); the messages are updated at the end of it.
        A message too long for the context even alone raises chat.ContextOverflowError (a ValueError)."""
        context = self.model.config.max_seq_len
        reserve = reply_reserve(self.max_tokens, context)
        kept, dropped = fit_to_context(self.messages + [{"role": "user", "content": user_text}], self.tok, context, reserve)
        return dropped, self._stream(kept)

    def _stream(self, kept: list[dict]) -> Iterator[str]:
        prompt = render_for_reply(kept, self.tok)
        generated: list[int] = []

        def tokens():
            for token_id in stream(self.model, prompt, self.max_tokens, self.sampling, tokenizer=self.tok, tools=self.tools):
                generated.append(token_id)
                yield token_id

        with torch.inference_mode():
            yield from iter_text(self.tok, tokens())
        self.messages = self._with_reply(kept, prompt, generated)

    def _with_reply(self, kept: list[dict], prompt: list[int], generated: list[int]) -> list[dict]:
        """The conversation after a reply, parsed from its tokens. A reply that breaks the protocol
        (a tool call cut short, a stray header) is kept as the text it printed, as the server keeps
        what it sent; a blank one (the model ended at once) leaves the exchange out."""
        try:
            return parse(prompt + generated + [self.tok.im_end_id], self.tok)
        except ConversationError:
            text = self.tok.decode(generated)
            return kept + [{"role": "assistant", "content": text}] if text.strip() else kept[:-1]

    def token_view(self) -> str:
        """The conversation so far as the model sees it: coloured pieces, ids, count."""
        ids = token_view(self.messages, self.tok)[0] if self.messages else [self.tok.eot_id]
        return "\n".join([render_pieces(self.tok, ids, colour=sys.stdout.isatty()), str(ids), f"{len(ids)} tokens"])


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (e.g. runs/demo)")
    parser.add_argument("--stage", default=None, help="sft or rl (default: the most advanced finished stage)")
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
    parser.set_defaults(func=_cmd)


def drop_notice(dropped: int, context: int) -> str:
    """The line that tells the user the oldest messages left the conversation."""
    return f"({dropped} older message{'s' if dropped != 1 else ''} dropped to fit the model's {context}-token context)"


def _print_reply(session: ChatSession, text: str, prefix: str = "") -> None:
    dropped, pieces = session.reply(text)
    if dropped:
        notice = drop_notice(dropped, session.model.config.max_seq_len)
        print(f"\033[2m{notice}\033[0m" if sys.stdout.isatty() else notice)
    sys.stdout.write(prefix)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _cmd(args) -> int:
    model, tok, stage_dir = Run(args.run).load(args.stage, args.device)
    sampling = Sampling(args.temperature, args.top_k or None, args.top_p, args.seed)
    tools = Tools(tok, Run(args.run).open_index())
    session = ChatSession(model, tok, sampling, args.system, args.max_tokens, tools)
    if args.prompt is not None:
        _print_reply(session, args.prompt)
        return 0
    searching = f", searching {tools.index.directory}" if tools.index else ""
    print(f"picochat: chatting with {stage_dir} ({model.num_params() / 1e6:.1f}M parameters{searching}). {HELP}")
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
