"""Decode speed with the KV cache against recomputing the whole sequence at every step.

Same model, same prompts, greedy decoding; tokens/s is new tokens (all rows) per second of
decoding, prefill included; each figure is the median of --repeats runs after one warm-up, the two ways taking turns.

    python benchmarks/bench_decode.py                       # ~5M-parameter model, batch 1 and 8
    python benchmarks/bench_decode.py --new-tokens 256 --batch-sizes 1 4 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from picochat.engine import Sampling, generate
from picochat.model import ModelConfig, Transformer


def bench_config(max_seq_len: int) -> ModelConfig:
    return ModelConfig(vocab_size=4096, n_layer=6, d_model=256, n_head=4, n_kv_head=2,
                       max_seq_len=max_seq_len, tie_embeddings=True)


@torch.no_grad()
def decode_by_recomputing(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy decoding without a cache: a full forward over the growing sequence per token."""
    ids = prompts
    for _ in range(new_tokens):
        next_ids = model(ids)[:, -1].argmax(dim=-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
    return ids[:, prompts.shape[1]:].tolist()


def decode_with_cache(model: Transformer, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    result = generate(model, prompts.tolist(), new_tokens, Sampling(temperature=0))
    return [completion.tokens for [completion] in result]


def median_seconds(runs: dict, repeats: int) -> dict[str, tuple[float, list[list[int]]]]:
    """(median seconds, tokens) of each run after one warm-up; the runs take turns, so a busy machine
    slows them alike."""
    tokens = {name: run() for name, run in runs.items()}  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), tokens[name]) for name in runs}


def add_decode_args(parser: argparse.ArgumentParser) -> None:
    """The flags every decode benchmark shares."""
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="rows decoded together")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens per row")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per row")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the median is shown)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_decode_args(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = Transformer(bench_config(args.prompt_len + args.new_tokens)).eval()
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layer} layers, "
          f"d_model {model.config.d_model}; prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, "
          f"float32, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| batch | KV cache tok/s | recompute tok/s | speedup | same tokens |")
    print("|------:|---------------:|----------------:|--------:|:-----------:|")
    for batch in args.batch_sizes:
        prompts = torch.randint(0, model.config.vocab_size, (batch, args.prompt_len),
                                generator=torch.Generator().manual_seed(batch))
        results = median_seconds({"cache": lambda: decode_with_cache(model, prompts, args.new_tokens),
                                  "recompute": lambda: decode_by_recomputing(model, prompts, args.new_tokens)},
                                 args.repeats)
        (cached_s, cached), (full_s, full) = results["cache"], results["recompute"]
        produced = batch * args.new_tokens
        print(f"| {batch:5d} | {produced / cached_s:14.0f} | {produced / full_s:15.0f} | "
              f"{full_s / cached_s:6.1f}x | {'yes' if cached == full else 'no':^11} |")


if __name__ == "__main__":
    main()
