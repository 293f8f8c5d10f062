"""`picochat sample`: the base model continues a document, streamed to the terminal.

The lecture's point about base models: they are document simulators. Give one the start of a
document and it writes what plausibly comes next; it does not answer questions.
"""

from __future__ import annotations

import argparse
import sys

import torch

from picochat.engine import Sampling, stream
from picochat.run import Run
from picochat.tokenizer import iter_text


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (e.g. runs/demo)")
    parser.add_argument("--stage", default="base", help="which model: base, sft or rl (default base)")
    parser.add_argument("--prompt", required=True, help="the start of the document to continue")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    model, tok, _ = Run(args.run).load(args.stage, args.device)
    ids = [tok.eot_id] + tok.encode(args.prompt)
    sys.stdout.write(args.prompt)
    with torch.inference_mode():
        sampling = Sampling(args.temperature, args.top_k or None, seed=args.seed, stop_ids=[tok.eot_id])
        tokens = stream(model, ids, args.max_tokens, sampling)
        for text in iter_text(tok, tokens):
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
