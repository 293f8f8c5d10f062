"""Token shard preparation throughput and memory, and batch loader speed.

`picochat data prepare` runs as a subprocess on generated inputs of each size; the table gives
MB of document text (UTF-8) per second of wall time (process start included) and the peak memory of
its process tree (the main process and the tokenizing workers), sampled every 50 ms: the sum of RSS,
which counts pages shared between forked workers once per process, and the sum of PSS, which splits
them. Flat memory means the peak does not grow with the input size. The loader row is training
batches per second from the largest input's shards (page cache warm).

Inputs are real text from ../shared/data/text/ (Moby Dick, Python and Linux documentation) repeated
to the requested size, or synthetic sentences when that folder is absent.

    python benchmarks/bench_data.py                          # 50 MB and 500 MB, 2 workers
    python benchmarks/bench_data.py --sizes-mb 20 --workers 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from picochat.data.loader import ShardLoader
from picochat.data.shards import read_manifest
from picochat.data.sources import iter_documents
from picochat.tokenizer import Tokenizer

SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
REAL_FILES = ["moby-dick.jsonl.gz", "python-docs.jsonl.gz", "linux-docs.jsonl.gz"]
FILE_MB = 50  # the generated input is split into JSONL files of about this size


def base_documents() -> tuple[list[str], str]:
    files = [SHARED_TEXT / name for name in REAL_FILES if (SHARED_TEXT / name).exists()]
    if files:
        return list(iter_documents(files)), "real text (" + ", ".join(f.name for f in files) + ")"
    rng = random.Random(0)
    words = "the a river city people live bought apples each cost north of and in was is 12 345 2024".split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(50, 2000))) + "." for _ in range(5000)]
    return docs, "synthetic sentences"


def first_chars(docs: list[str], n: int) -> list[str]:
    """Documents from the start of `docs` holding about n characters."""
    taken, chars = [], 0
    for doc in docs:
        if chars >= n:
            break
        taken.append(doc)
        chars += len(doc)
    return taken


def write_input(folder: Path, docs: list[str], size_mb: float) -> int:
    """JSONL files holding `size_mb` MB of document text (the documents repeated); returns text bytes."""
    folder.mkdir(parents=True)
    target, written, file_index = size_mb * 1e6, 0, 0
    docs_cycle = itertools.cycle(docs)
    while written < target:
        file_end = min(target, written + FILE_MB * 1e6)
        with open(folder / f"part-{file_index:04d}.jsonl", "w", encoding="utf-8") as f:
            while written < file_end:
                doc = next(docs_cycle)
                f.write(json.dumps({"text": doc}) + "\n")
                written += len(doc.encode("utf-8"))
        file_index += 1
    return written


def process_tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in kB, (0, 0) if it is gone."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
        return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])
    except (OSError, KeyError, ValueError):
        return 0, 0


def run_prepare(input_dir: Path, tokenizer: Path, out: Path, workers: int) -> tuple[float, float, float]:
    """(seconds, peak RSS MB, peak PSS MB) of one `picochat data prepare` process tree."""
    command = [sys.executable, "-m", "picochat", "data", "prepare", "--input", str(input_dir),
               "--tokenizer", str(tokenizer), "--out", str(out), "--val-docs", "100", "--workers", str(workers)]
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        usage = [memory_kb(p) for p in process_tree(proc.pid)]
        peak_rss = max(peak_rss, sum(u[0] for u in usage))
        peak_pss = max(peak_pss, sum(u[1] for u in usage))
        time.sleep(0.05)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"prepare failed:\n{proc.stderr.read()[-3000:]}")
    return seconds, peak_rss / 1024, peak_pss / 1024


def loader_tokens_per_second(shards: Path, batch_size: int, seq_len: int, batches: int) -> float:
    loader = ShardLoader(shards, batch_size=batch_size, seq_len=seq_len)
    for _ in range(10):  # warm-up
        next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size * seq_len / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[50, 500], help="input sizes in MB of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[2], help="tokenizing processes to try")
    parser.add_argument("--vocab-size", type=int, default=8192, help="tokenizer vocabulary (trained on 5 MB of the input)")
    parser.add_argument("--batch-size", type=int, default=32, help="loader batch size")
    parser.add_argument("--seq-len", type=int, default=512, help="loader sequence length")
    parser.add_argument("--loader-batches", type=int, default=500, help="timed loader batches")
    parser.add_argument("--work-dir", default=None, help="where inputs and shards go (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
        root = Path(tmp)
        docs, what = base_documents()
        tokenizer = Tokenizer.train(first_chars(docs, 5_000_000), vocab_size=args.vocab_size).save(root / "tokenizer")
        print(f"input: {what}; tokenizer vocab {args.vocab_size}; {len(os.sched_getaffinity(0))} cores")
        print("| input MB | workers | seconds | MB/s | Mtokens | peak RSS MB (tree) | peak PSS MB (tree) |")
        print("|---------:|--------:|--------:|-----:|--------:|-------------------:|-------------------:|")
        last_out = None
        for size in args.sizes_mb:
            input_dir = root / f"input-{size:g}"
            text_bytes = write_input(input_dir, docs, size)
            for workers in args.workers:
                out = root / f"shards-{size:g}-{workers}"
                seconds, rss, pss = run_prepare(input_dir, tokenizer, out, workers)
                tokens = sum(s["tokens"] for s in read_manifest(out)["splits"].values())
                print(f"| {text_bytes / 1e6:8.0f} | {workers:7d} | {seconds:7.1f} | {text_bytes / 1e6 / seconds:4.1f} | "
                      f"{tokens / 1e6:7.1f} | {rss:18.0f} | {pss:18.0f} |", flush=True)
                last_out = out
        rate = loader_tokens_per_second(last_out, args.batch_size, args.seq_len, args.loader_batches)
        print(f"\nloader: B={args.batch_size} T={args.seq_len}: {rate / 1e6:.1f}M tokens/s "
              f"({rate / (args.batch_size * args.seq_len):.0f} batches/s)")


if __name__ == "__main__":
    main()
