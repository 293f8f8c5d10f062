"""`picochat chat`: a multi-turn terminal chat with a chat model, streamed token by token.

    picochat chat --run runs/demo                 # talk; /reset starts over, /tokens shows the tokens
    picochat chat --run runs/demo --prompt "Who are you?"     # one shot

`/tokens` prints the conversation as the model sees it: the rendered protocol with its special
tokens, each token's piece and id, and the count (the lecture's tokenizer view).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterator

import torch

from picochat.chat import parse, render_for_reply, token_view
from picochat.engine import Sampling, context_room, stream
from picochat.run import Run
from picochat.tokenizer import Tokenizer, iter_text, render_pieces
from picochat.tools import Tools

HELP = "commands: /reset (new conversation), /tokens (show the tokens the model sees), /quit"


class ChatSession:
    """A conversation with a model: holds the messages and streams each reply."""

    def __init__(self, model, tok: Tokenizer, sampling: Sampling, system: str | None = None, max_tokens: int = 256,
                 tools: Tools | None = None):
        self.model, self.tok, self.system, self.tools = model, tok, system, tools
        self.sampling = dataclasses.replace(sampling, stop_ids=[tok.im_end_id])  # a reply ends at <|im_end|>
        self.max_tokens = max_tokens
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, user_text: str) -> Iterator[str]:
        """Stream the assistant's reply to `user_text` as text; the messages are updated at the end."""
        prompt = render_for_reply(self.messages + [{"role": "user", "content": user_text}], self.tok)
        context = self.model.config.max_seq_len
        if context_room(context, len(prompt)) < 1:
            raise ValueError(f"the conversation ({len(prompt)} tokens) fills the model's context ({context}); /reset to start over")
        generated: list[int] = []

        def tokens():
            for token_id in stream(self.model, prompt, self.max_tokens, self.sampling, tokenizer=self.tok, tools=self.tools):
                generated.append(token_id)
                yield token_id

        with torch.inference_mode():
            yield from iter_text(self.tok, tokens())
        self.messages = parse(prompt + generated + [self.tok.im_end_id], self.tok)

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
    parser.add_argument("--max-tokens", type=int, default=256, help="longest reply in tokens (default 256)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible replies")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.set_defaults(func=_cmd)


def _print_reply(session: ChatSession, text: str) -> None:
    for piece in session.reply(text):
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
            sys.stdout.write("picochat> ")
            try:
                _print_reply(session, text)
            except ValueError as e:
                print(f"\n[{e}]")
