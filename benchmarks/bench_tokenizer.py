"""Tokenizer benchmark: training time, encode throughput (HF tokenizers single / batch vs tiktoken on
the same merges), and bytes per token on held-out text.

    python benchmarks/bench_tokenizer.py [--world-mb 50] [--real ../shared/data/text]

Trains vocab 8,192 on the synthetic world and vocab 32,768 on the real text (when present), then
measures encoding on held-out documents of each. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from picochat.data.sources import iter_documents
from picochat.world.documents import write_world
from picochat.tokenizer import Tokenizer


def timed(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, train_docs: list[str], held_out: list[str], vocab: int) -> dict:
    t0 = time.perf_counter()
    tok = Tokenizer.train(train_docs, vocab)
    train_s = time.perf_counter() - t0
    enc = tok.as_tiktoken()
    mb = sum(len(d.encode("utf-8")) for d in held_out) / 1e6
    assert enc.encode_ordinary_batch(held_out[:50]) == tok.encode_batch(held_out[:50]), "tiktoken ids differ"
    single = timed(lambda: [tok.encode(d) for d in held_out])
    batch = timed(lambda: tok.encode_batch(held_out))
    tik = timed(lambda: [enc.encode_ordinary(d) for d in held_out])
    tik_batch = timed(lambda: enc.encode_ordinary_batch(held_out, num_threads=2))
    bpt = tok.bytes_per_token(held_out)[0]
    return {"corpus": name, "train MB": round(sum(len(d.encode()) for d in train_docs) / 1e6, 1), "vocab": tok.vocab_size,
            "train s": round(train_s, 1), "held-out MB": round(mb, 1), "tokenizers MB/s": round(mb / single, 2),
            "tokenizers batch MB/s": round(mb / batch, 2), "tiktoken MB/s": round(mb / tik, 2),
            "tiktoken batch MB/s": round(mb / tik_batch, 2), "bytes/token": round(bpt, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world-mb", type=float, default=50)
    parser.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "text"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_world(tmp, size_mb=args.world_mb, seed=0)
        docs = list(iter_documents(Path(tmp) / "docs"))
        held = list(iter_documents(Path(tmp) / "docs-val.jsonl"))
        rows.append(measure(f"world {args.world_mb:g} MB", docs, held, 8192))
    real = Path(args.real)
    if real.exists():
        docs = list(iter_documents(real))
        # Hold out every 10th document (whole books are single documents: hold out their last tenth).
        train, held = [], []
        for i, d in enumerate(docs):
            if len(d) > 1_000_000:
                cut = int(len(d) * 0.9)
                train.append(d[:cut])
                held.append(d[cut:])
            else:
                (held if i % 10 == 0 else train).append(d)
        rows.append(measure("shared/data/text", train, held, 32768))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("| " + " | ".join("---" for _ in keys) + " |")
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
