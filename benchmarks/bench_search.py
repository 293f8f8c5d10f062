"""The search index: build time, size, query latency and memory (SQLite FTS5; bm25s to compare).

For each corpus: `build_index` time (median of --builds), index file size, then --queries queries in
a fresh process (page cache warm: the index was just written): p50 / p99 latency of
`SearchIndex.search` (k=3), and that process's resident memory before opening the index, after the
queries, and at its peak. Queries are 2 to 8 consecutive words of random passages (seeded), so
common words ("the", "of") are in most of them, as in questions. With --qa (a world's
eval/qa.jsonl), its questions about known facts are asked too: the share whose answer is in one of
the 3 passages found ("QA found"), and their p50 / p99.

    python benchmarks/bench_search.py --docs runs/demo/world/docs --qa runs/demo/world/eval/qa.jsonl
    python benchmarks/bench_search.py --docs ../shared/data/text
    python benchmarks/bench_search.py --world-mb 1200 --seeds 6      # generated in a temporary folder, then deleted
    python benchmarks/bench_search.py --docs runs/demo/world/docs --bm25s   # also bm25s (pip install bm25s)

The generated world corpus is N worlds (seeds 1..N), so its --qa is the first world's
(world-docs/seed1/eval/qa.jsonl), used when --qa is not given.

With --bm25s the same passages and queries go through bm25s (sparse-matrix BM25 in memory, its own
tokenizer with English stopwords removed): index time (passages already cut), index size saved,
query latency (bm25s.retrieve, k=3, one query at a time) and resident memory after loading the index
(the passages are held in memory too, as a bm25s search needs them to return text).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from picochat.data.index import INDEX_FILE, SearchIndex, build_index
from picochat.data.passages import split_passages
from picochat.data.sources import iter_documents


def memory_mb() -> dict:
    """This process's resident memory now and at its peak (Linux /proc)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_mb": int(fields["VmHWM"].split()[0]) / 1024}


def make_queries(docs: list[str], n: int, seed: int = 0) -> list[str]:
    """n queries of 2 to 8 consecutive words from random passages of random documents."""
    rng = random.Random(seed)
    queries = []
    while len(queries) < n:
        passage = rng.choice(split_passages(rng.choice(docs)) or [""]).split()
        if len(passage) >= 2:
            size = rng.randint(2, min(8, len(passage)))
            start = rng.randrange(len(passage) - size + 1)
            queries.append(" ".join(passage[start:start + size]))
    return queries


def sample_documents(paths: list[str], n: int, seed: int = 0) -> list[str]:
    """About n documents spread over the corpus (reservoir sampling in one pass)."""
    rng = random.Random(seed)
    chosen: list[str] = []
    for i, doc in enumerate(iter_documents(paths)):
        if i < n:
            chosen.append(doc)
        elif (j := rng.randrange(i + 1)) < n:
            chosen[j] = doc
    return chosen


def read_qa(path: str | None, n: int = 500) -> list[tuple[str, str]]:
    """(question, answer) of the first n questions about known facts of a world's eval/qa.jsonl."""
    if not path:
        return []
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [(row["messages"][0]["content"], row["answer"]) for row in rows if row.get("kind") == "known"][:n]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(search, queries: list[str]) -> tuple[list[float], list[list[str]]]:
    """Each query's seconds and the texts found."""
    seconds, found = [], []
    for query in queries:
        t0 = time.perf_counter()
        texts = search(query)
        seconds.append(time.perf_counter() - t0)
        found.append(texts)
    return seconds, found


def figures(seconds: list[float], found: list[list[str]], qa: list[tuple[str, str]], qa_seconds: list[float],
            qa_found: list[list[str]]) -> dict:
    answered = [any(answer.lower() in text.lower() for text in texts) for (_, answer), texts in zip(qa, qa_found)]
    return {"p50_ms": percentile(seconds, 0.5) * 1e3, "p99_ms": percentile(seconds, 0.99) * 1e3,
            "hit_rate": sum(map(bool, found)) / len(found),
            "qa_found": sum(answered) / len(qa) if qa else None,
            "qa_p50_ms": percentile(qa_seconds, 0.5) * 1e3 if qa else None,
            "qa_p99_ms": percentile(qa_seconds, 0.99) * 1e3 if qa else None}


def query_fts5(index_dir: str, queries_file: str, qa_file: str) -> dict:
    """Run in a fresh process: the queries' latencies and this process's memory."""
    queries, qa = json.loads(Path(queries_file).read_text()), read_qa(qa_file)
    before = memory_mb()
    index = SearchIndex(index_dir)

    def search(query):
        return [p.text for p in index.search(query)]

    timed(search, queries[:20])  # warm-up
    seconds, found = timed(search, queries)
    qa_seconds, qa_found = timed(search, [q for q, _ in qa])
    after = memory_mb()
    return {**figures(seconds, found, qa, qa_seconds, qa_found), "rss_before_mb": before["rss_mb"],
            "rss_mb": after["rss_mb"], "peak_mb": after["peak_mb"]}


def query_bm25s(paths_json: str, queries_file: str, qa_file: str, folder: str) -> dict:
    """Run in a fresh process: bm25s over the same passages; index time, size, latency, memory."""
    import bm25s

    paths = json.loads(paths_json)
    queries, qa = json.loads(Path(queries_file).read_text()), read_qa(qa_file)
    before = memory_mb()
    t0 = time.perf_counter()
    passages = [p for doc in iter_documents(paths) for p in split_passages(doc)]
    split_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize(passages, stopwords="en", show_progress=False), show_progress=False)
    index_s = time.perf_counter() - t0
    retriever.save(folder)
    size = sum(f.stat().st_size for f in Path(folder).iterdir())
    loaded = memory_mb()

    def search(query):
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        if not tokens.vocab:
            return []
        rows, scores = retriever.retrieve(tokens, k=min(3, len(passages)), show_progress=False, n_threads=1)
        return [passages[i] for i, score in zip(rows[0], scores[0]) if score > 0]

    seconds, found = timed(search, queries)
    qa_seconds, qa_found = timed(search, [q for q, _ in qa])
    return {**figures(seconds, found, qa, qa_seconds, qa_found), "split_s": split_s, "index_s": index_s,
            "size_mb": size / 2**20, "rss_before_mb": before["rss_mb"], "rss_mb": loaded["rss_mb"],
            "peak_mb": memory_mb()["peak_mb"]}


def in_child(function: str, *args: str) -> dict:
    """One of this module's functions in a fresh Python process (its own memory figures)."""
    code = f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_search as b; " \
           f"print(json.dumps(b.{function}(*sys.argv[1:])))"
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_checked(command: list[str]) -> None:
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} exited with {out.returncode}:\n{out.stderr[-2000:]}")


def generate_world(folder: Path, size_mb: float, seeds: int) -> list[str]:
    """World documents of `size_mb` MB in all, from `seeds` worlds (seeds 1..N), generated in parallel."""
    commands = [[sys.executable, "-m", "picochat", "world", "generate", "--out", str(folder / f"seed{seed}"),
                 "--size-mb", str(size_mb / seeds), "--seed", str(seed), "--conversations", "10",
                 "--task-conversations", "10", "--rl-problems", "10", "--eval-problems", "10"] for seed in range(1, seeds + 1)]
    with ThreadPoolExecutor(max_workers=os.cpu_count()) as pool:  # each runs a process
        list(pool.map(run_checked, commands))
    return [str(folder / f"seed{seed}" / "docs") for seed in range(1, seeds + 1)]


def qa_cells(result: dict) -> str:
    if result["qa_found"] is None:
        return "– | –"
    return f"{result['qa_found']:.0%} | {result['qa_p50_ms']:.2f} / {result['qa_p99_ms']:.1f}"


def bench_corpus(name: str, paths: list[str], qa_file: str | None, args, scratch: Path) -> None:
    folder = scratch / name.replace("/", "_")
    builds = []
    for _ in range(args.builds):
        shutil.rmtree(folder / "index", ignore_errors=True)
        t0 = time.perf_counter()
        info = build_index(paths, folder / "index", progress=False)
        builds.append(time.perf_counter() - t0)
    build_s = statistics.median(builds)
    size_mb = (folder / "index" / INDEX_FILE).stat().st_size / 2**20
    text_mb = info["characters"] / 1e6  # characters, as iter_documents yields them (UTF-8 bytes are close)
    queries_file = folder / "queries.json"
    queries_file.write_text(json.dumps(make_queries(sample_documents(paths, 2000), args.queries)))
    fts = in_child("query_fts5", str(folder / "index"), str(queries_file), qa_file or "")
    print(f"| {name} | {text_mb:,.1f} M chars | {info['documents']:,} | {info['passages']:,} | {build_s:.1f} s "
          f"({text_mb / build_s:.0f} M chars/s) | {size_mb:,.1f} MB | {fts['p50_ms']:.2f} | {fts['p99_ms']:.1f} | "
          f"{fts['hit_rate']:.0%} | {qa_cells(fts)} | {fts['rss_before_mb']:.0f} -> {fts['rss_mb']:.0f} MB "
          f"(peak {fts['peak_mb']:.0f}) |", flush=True)
    if args.bm25s:
        bm = in_child("query_bm25s", json.dumps(paths), str(queries_file), qa_file or "", str(folder / "bm25s"))
        print(f"| {name}, bm25s | | | | {bm['index_s']:.1f} s (+ {bm['split_s']:.1f} s passages) | {bm['size_mb']:,.1f} MB | "
              f"{bm['p50_ms']:.2f} | {bm['p99_ms']:.1f} | {bm['hit_rate']:.0%} | {qa_cells(bm)} | "
              f"{bm['rss_before_mb']:.0f} -> {bm['rss_mb']:.0f} MB (peak {bm['peak_mb']:.0f}) |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", nargs="+", default=[], help="corpora: each a file, folder or glob of documents")
    parser.add_argument("--world-mb", type=float, default=None, help="also a generated world corpus of this many MB")
    parser.add_argument("--seeds", type=int, default=5, help="worlds the generated corpus is made of (default 5)")
    parser.add_argument("--queries", type=int, default=1000, help="queries per corpus (default 1000)")
    parser.add_argument("--builds", type=int, default=1, help="index builds per corpus; the median is shown (default 1)")
    parser.add_argument("--qa", default=None, help="a world's eval/qa.jsonl: its questions are asked of every corpus")
    parser.add_argument("--bm25s", action="store_true", help="also bm25s (must be importable)")
    parser.add_argument("--scratch", default=None, help="folder for indexes and generated documents (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="bench_search."))
    print("| corpus | text | documents | passages | build | index file | p50 ms | p99 ms | queries with a hit | "
          "QA found | QA p50 / p99 ms | RSS querying |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    try:
        for docs in args.docs:
            bench_corpus(docs, [docs], args.qa, args, scratch)
        if args.world_mb:
            paths = generate_world(scratch / "world-docs", args.world_mb, args.seeds)
            bench_corpus(f"world x {args.seeds} seeds", paths, args.qa or str(scratch / "world-docs" / "seed1" / "eval" / "qa.jsonl"),
                         args, scratch)
    finally:
        if args.scratch is None:
            shutil.rmtree(scratch)


if __name__ == "__main__":
    main()
