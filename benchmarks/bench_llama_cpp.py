"""Stock llama.cpp on a picochat GGUF export: same tokens, same greedy replies, and its decode speed.

Exports a run's stage with `picochat export --format gguf` (float32 and q8_0), loads the files in
llama-cpp-python (llama.cpp's own code, unpatched, built from PyPI's source distribution), and checks:
- tokenization: every held-out world document, the world's eval questions, varied probe text and
  (when ../shared/data is beside the clone) real text give the same ids in llama.cpp as in picochat;
- greedy replies: the world's eval questions, rendered with the chat protocol, decoded greedily by
  picochat's engine and by llama.cpp (float32; q8_0 for reference) give the same tokens;
- decode speed: one reply at a time (batch 1, prefill included), new tokens per second, median of
  --repeats after a warm-up, picochat's engine (float32) beside llama.cpp float32 and q8_0.

    python benchmarks/bench_llama_cpp.py --install          # pip-installs llama-cpp-python from source first
    python benchmarks/bench_llama_cpp.py --run runs/demo --stage sft --threads 2
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from picochat.chat import render_for_reply
from picochat.data.sources import iter_documents
from picochat.engine import Sampling, generate
from picochat.gguf_export import export_gguf
from picochat.io import read_jsonl
from picochat.run import Run

LLAMA_CPP_PYTHON = "llama-cpp-python"
SHARED_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "text"
PROBES = [
    "I'm sure they'll say it's fine. I'M SURE THEY'LL SAY IT'S FINE.",
    "Prices: $3.50, 1234567890 and -42 ... wait!!! ?!? 50% 3/4",
    "two  spaces,   three\n\nnew paragraph\n  indented\n\n\n\ttabbed\r\nwindows",
    "Ünïcödé café — “quotes” 日本語 😀🎉 Ελληνικά русский",
    "def f(x):\n    return x ** 2  # code\n",
]


def install_llama_cpp() -> None:
    """Build llama-cpp-python (and so llama.cpp) from its source distribution on PyPI."""
    print(f"installing {LLAMA_CPP_PYTHON} from source (builds llama.cpp: minutes on 2 cores) ...", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-binary", LLAMA_CPP_PYTHON, LLAMA_CPP_PYTHON], check=True)
    print(f"installed in {time.perf_counter() - start:.0f} s", flush=True)


def tokenization_mismatches(llm, tok, texts: list[str]) -> list[str]:
    return [text for text in texts if llm.tokenize(text.encode(), add_bos=False, special=False) != tok.encode(text)]


def llama_greedy(llm, prompt: list[int], new_tokens: int, stop: set[int]) -> list[int]:
    llm.reset()
    out: list[int] = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        if token in stop:
            break
        out.append(token)
        if len(out) == new_tokens:
            break
    return out


def median_tokens_per_second(decode, repeats: int) -> float:
    decode()  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        produced = decode()
        rates.append(produced / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="run folder with a finished stage")
    parser.add_argument("--stage", default="sft")
    parser.add_argument("--install", action="store_true", help=f"pip-install {LLAMA_CPP_PYTHON} from source if absent")
    parser.add_argument("--questions", type=int, default=100, help="eval questions whose greedy replies are compared")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per reply at most")
    parser.add_argument("--speed-tokens", type=int, default=200, help="tokens decoded per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    try:
        llama_cpp = importlib.import_module("llama_cpp")
    except ImportError:
        if not args.install:
            sys.exit(f"{LLAMA_CPP_PYTHON} is not installed: pass --install to build it from source")
        install_llama_cpp()
        llama_cpp = importlib.import_module("llama_cpp")
    torch.set_num_threads(args.threads)
    run = Run(Path(args.run))
    model, tok, stage_dir = run.load(args.stage)
    context = model.config.max_seq_len
    with tempfile.TemporaryDirectory() as tmp:
        files = {dtype: export_gguf(run.root, Path(tmp) / f"{dtype}.gguf", args.stage, dtype) for dtype in ("float32", "q8_0")}
        sizes = {dtype: path.stat().st_size / 1e6 for dtype, path in files.items()}
        llms = {dtype: llama_cpp.Llama(model_path=str(path), n_ctx=context, n_batch=context, n_threads=args.threads,
                                       seed=0, verbose=False) for dtype, path in files.items()}

        questions = [row["messages"][-1]["content"] for row in read_jsonl(run.eval_questions)][: args.questions]
        texts = {"world held-out documents": list(iter_documents(run.world_val_docs)),
                 "eval questions": questions, "probes": PROBES}
        if SHARED_TEXT.is_dir():
            texts["../shared/data/text (first 200 documents)"] = list(iter_documents(sorted(SHARED_TEXT.glob("*"))))[:200]
        print(f"llama_cpp {llama_cpp.__version__}; {run.root}/{stage_dir.name}: {model.num_params():,} parameters; "
              f"GGUF float32 {sizes['float32']:.1f} MB, q8_0 {sizes['q8_0']:.1f} MB")
        print("\n| tokenization | texts | identical to picochat |\n| --- | --- | --- |")
        for name, group in texts.items():
            bad = tokenization_mismatches(llms["float32"], tok, group)
            print(f"| {name} | {len(group)} | {len(group) - len(bad)} |" + (f" first mismatch: {bad[0][:60]!r}" if bad else ""))

        prompts = [render_for_reply([{"role": "user", "content": q}], tok) for q in questions]
        prompts = [p for p in prompts if len(p) + args.new_tokens <= context]
        ours = [c.tokens for [c] in generate(model, prompts, args.new_tokens, Sampling(temperature=0, stop_ids={tok.im_end_id}))]
        print("\n| greedy replies (chat protocol) | prompts | identical tokens to picochat's engine |\n| --- | --- | --- |")
        for dtype, llm in llms.items():
            same = sum(llama_greedy(llm, p, args.new_tokens, {tok.im_end_id}) == o for p, o in zip(prompts, ours))
            print(f"| llama.cpp {dtype} | {len(prompts)} | {same} ({same / len(prompts):.0%}) |")
        print(f"\nexample: {questions[0]!r} -> picochat {tok.decode(ours[0])!r}; "
              f"llama.cpp {tok.decode(llama_greedy(llms['float32'], prompts[0], args.new_tokens, {tok.im_end_id}))!r}")

        prompt = [tok.eot_id, *tok.encode("The capital of")]
        new = min(args.speed_tokens, context - len(prompt))
        rates = {"picochat engine float32": median_tokens_per_second(
            lambda: len(generate(model, [prompt], new, Sampling(temperature=0))[0][0].tokens), args.repeats)}
        for dtype, llm in llms.items():
            rates[f"llama.cpp {dtype}"] = median_tokens_per_second(lambda llm=llm: len(llama_greedy(llm, prompt, new, set())), args.repeats)
        print(f"\n| decode, batch 1, {new} new tokens, {args.threads} thread(s) | tokens/s (median of {args.repeats}) |\n| --- | --- |")
        for name, rate in rates.items():
            print(f"| {name} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
