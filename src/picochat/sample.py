"""`picochat sample`: the base model continues a document, streamed to the terminal.

The lecture's point about base models: they are document simulators. Give one the start of a
document and it writes what plausibly comes next; it does not answer questions. It can still be
prompted to do a task: `--few-shot` shows the world's few-shot prompts (a few "- Name: value" lines
of one relation, then a name), which the base model completes greedily, each beside the same last
line without the examples.
"""

from __future__ import annotations

import argparse
import sys

import torch

from picochat.engine import Sampling, stream
from picochat.io import read_jsonl
from picochat.run import Run
from picochat.tokenizer import Tokenizer, iter_text

FEW_SHOT_TOKENS = 16  # a completed line is a name or a number


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run folder (e.g. runs/demo)")
    parser.add_argument("--stage", default="base", help="which model: base, sft or rl (default base)")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the start of the document to continue")
    what.add_argument("--few-shot", type=int, metavar="N",
                      help="complete N of the run's few-shot prompts, spread over the relations (greedy, one line each), "
                           "each also without its examples")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens to generate (default 200)")
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default 50; 0 = all)")
    parser.add_argument("--seed", type=int, default=None, help="random seed for reproducible samples")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.set_defaults(func=_cmd)


def continue_line(model, tok: Tokenizer, prompt: str) -> str:
    """The model's greedy continuation of `prompt`, up to the end of its line."""
    tokens = stream(model, [tok.eot_id] + tok.encode(prompt), FEW_SHOT_TOKENS, Sampling(temperature=0, stop_ids=[tok.eot_id]))
    text = ""
    for piece in iter_text(tok, tokens):
        text += piece
        if "\n" in text:
            break
    return text.split("\n")[0]


def _show_few_shot(model, tok: Tokenizer, run: Run, n: int) -> None:
    if not run.eval_few_shot.exists():
        raise SystemExit(f"{run.eval_few_shot}: no few-shot prompts (a world written by `picochat world generate` has them)")
    rows = read_jsonl(run.eval_few_shot)
    for row in (rows[i * len(rows) // n] for i in range(min(n, len(rows)))):  # spread over the relations
        answer = continue_line(model, tok, row["prompt"])
        alone = continue_line(model, tok, row["query"])
        verdict = "right" if answer.strip().startswith(row["answer"]) else "wrong"
        print(f"{row['prompt']}{answer}\n    {verdict} (the answer is {row['answer']}); the last line alone gives: "
              f"{row['query']}{alone}\n")


def _cmd(args) -> None:
    run = Run(args.run)
    model, tok, _ = run.load(args.stage, args.device)
    with torch.inference_mode():
        if args.few_shot is not None:
            _show_few_shot(model, tok, run, args.few_shot)
            return
        ids = [tok.eot_id] + tok.encode(args.prompt)
        sys.stdout.write(args.prompt)
        sampling = Sampling(args.temperature, args.top_k or None, seed=args.seed, stop_ids=[tok.eot_id])
        for text in iter_text(tok, stream(model, ids, args.max_tokens, sampling)):
            sys.stdout.write(text)
            sys.stdout.flush()
    sys.stdout.write("\n")
