"""Which pre-tokenization split: bytes per token on held-out text for the candidate patterns.

    python benchmarks/bench_split.py [--world-mb 20] [--real ../shared/data/text]

Trains one tokenizer per pattern (the cpu preset's vocabulary, 2,048, on the synthetic world; 8,192
on the real text when present) and reports bytes per token on held-out documents, and how the
world's word problems' numbers are cut: the share of numbers that are one token with their space.
The candidates: picochat's former split (GPT-4's with the space kept on numbers), GPT-2's (what
llama.cpp knows as `gpt-2`), and GPT-4's / Llama 3's (`llama-bpe`), which cuts numbers off their space.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import picochat.tokenizer as tokenizer_module
from picochat.data.sources import iter_documents
from picochat.tokenizer import Tokenizer
from picochat.world.documents import write_world

PATTERNS = {
    "former picochat (GPT-4, space on numbers)":
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+| ?\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    "gpt-2 (now picochat's)": tokenizer_module.SPLIT_PATTERN,
    "llama-bpe (GPT-4)":
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
}


def train_with(pattern: str, docs: list[str], vocab: int) -> Tokenizer:
    saved = tokenizer_module.SPLIT_PATTERN
    tokenizer_module.SPLIT_PATTERN = pattern
    try:
        return Tokenizer.train(docs, vocab)
    finally:
        tokenizer_module.SPLIT_PATTERN = saved


def numbers_whole_with_space(tok: Tokenizer, texts: list[str]) -> float:
    """Share of ' <number>' occurrences (up to 3 digits) that encode to exactly one token."""
    numbers = [m.group(0) for t in texts for m in re.finditer(r"(?<= )\d{1,3}\b", t)]
    return sum(len(tok.encode(" " + n)) == 1 for n in numbers) / max(1, len(numbers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-mb", type=float, default=20)
    parser.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "text"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_world(tmp, size_mb=args.world_mb, seed=0)
        world = list(iter_documents(Path(tmp) / "docs"))
        world_val = list(iter_documents(Path(tmp) / "docs-val.jsonl"))
    real = sorted(Path(args.real).glob("*")) if Path(args.real).is_dir() else []
    real_docs = list(iter_documents(real)) if real else []
    real_train, real_val = real_docs[: int(len(real_docs) * 0.9)], real_docs[int(len(real_docs) * 0.9):]
    print("| split | world bytes/token (vocab 2,048) | numbers one token with their space | real text bytes/token (vocab 8,192) |")
    print("| --- | --- | --- | --- |")
    for name, pattern in PATTERNS.items():
        tok = train_with(pattern, world, 2048)
        bpt = tok.bytes_per_token(world_val)[0]
        whole = numbers_whole_with_space(tok, world_val)
        real_bpt = f"{train_with(pattern, real_train, 8192).bytes_per_token(real_val)[0]:.3f}" if real_docs else "–"
        print(f"| {name} | {bpt:.3f} | {whole:.1%} | {real_bpt} |", flush=True)


if __name__ == "__main__":
    main()
