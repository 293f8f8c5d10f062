"""Does a base model copy from its context? The induction probe behind search and follow-ups.

To answer from a search result about a name it never saw, a model has to copy the name and the fact
out of its context. This probe reads the articles about the world's news entities (in no pretraining
document) through a stage's model and scores the tokens of the entity's name, after its first
token: at the name's first mention nothing in the context gives them away; at its later mentions a
model that copies predicts them from the earlier one. Reported per run: the share of those tokens
predicted (argmax) and their mean loss, at the first mention and at later ones.

    python benchmarks/bench_copy.py --run runs/demo [--run runs/other ...] [--stage base]
"""

from __future__ import annotations

import argparse
import re
import statistics

import torch

from picochat.checkpoint import load_model
from picochat.io import iter_jsonl
from picochat.run import Run
from picochat.tokenizer import Tokenizer
from picochat.world.knowledge import load_world


def token_starts(tok: Tokenizer, ids: list[int]) -> list[int]:
    """The character offset at which each token's text starts (the text is ASCII)."""
    return [len(tok.decode(ids[:i])) for i in range(len(ids))]


def name_scores(model, tok: Tokenizer, text: str, name: str) -> list[tuple[int, bool, float]]:
    """(mention number, predicted, loss) for each token of each mention of `name` after its first token."""
    ids = tok.encode(text)[: model.config.max_seq_len]
    starts = token_starts(tok, ids) + [len(text)]
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for mention, match in enumerate(re.finditer(rf"\b{re.escape(name)}\b", text)):
        inside = [i for i in range(1, len(ids)) if starts[i] < match.end() and starts[i + 1] > match.start()]
        for i in inside[1:]:  # the name's first token is a guess; the rest are copied or not
            scores.append((mention, int(log_probs[i - 1].argmax()) == ids[i], -float(log_probs[i - 1, ids[i]])))
    return scores


def probe(run: Run, stage: str) -> dict:
    tok = Tokenizer.load(run.tokenizer)
    model, _ = load_model(run.stage(stage))
    world = load_world(run.world)
    texts = [row["text"] for _, row in iter_jsonl(run.world_news_docs, ValueError)]
    scores = []
    for e in world.news:
        for text in texts:
            if text.startswith(e.name[0].upper() + e.name[1:] + "\n"):
                scores += name_scores(model, tok, text, e.name)
    first = [s for s in scores if s[0] == 0]
    later = [s for s in scores if s[0] > 0]
    return {"first_tokens": len(first), "later_tokens": len(later),
            "first_acc": statistics.fmean(s[1] for s in first), "later_acc": statistics.fmean(s[1] for s in later),
            "first_loss": statistics.fmean(s[2] for s in first), "later_loss": statistics.fmean(s[2] for s in later)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a run folder (repeat to compare runs)")
    parser.add_argument("--stage", default="base", help="stage to probe (default base)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    print("| run | name tokens (first / later mentions) | predicted, first mention | predicted, later mentions | loss, first | loss, later |")
    print("| --- | --- | --- | --- | --- | --- |")
    for path in args.run:
        r = probe(Run(path), args.stage)
        print(f"| {path} | {r['first_tokens']} / {r['later_tokens']} | {r['first_acc']:.1%} | {r['later_acc']:.1%} | "
              f"{r['first_loss']:.2f} | {r['later_loss']:.2f} |")


if __name__ == "__main__":
    main()
