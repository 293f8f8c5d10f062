"""RL rollout throughput: batched group sampling against sampling one completion at a time.

An RL step samples a group of G completions for each of P problems. Three ways, same model, same
prompts, sampling at temperature 1 until `<|im_end|>` or --new-tokens:
- batched: one `generate` call, all P prompts prefilled together, `num_samples=G` (what picochat rl does);
- per problem: P calls, each prefilling one prompt once for its G samples;
- one at a time: P * G calls of one completion each.
Completions/s and new tokens/s are the median of --repeats runs after one warm-up.

    python benchmarks/bench_rollout.py                          # random weights, the cpu preset's shape
    python benchmarks/bench_rollout.py --run runs/demo --stage sft --problems 8 --group 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from picochat.config import get_preset
from picochat.engine import Sampling, generate
from picochat.model import ModelConfig, Transformer


def real_setup(run: Path, stage: str, n_problems: int):
    """The stage's model, its tokenizer's `<|im_end|>` id and prompts of the run's RL problems."""
    from picochat.checkpoint import load_model
    from picochat.data.tasks import read_problems
    from picochat.tokenizer import Tokenizer
    from picochat.train.rl import prompt_ids

    model, _ = load_model(run / stage)
    tok = Tokenizer.load(run / "tokenizer")
    problems = read_problems(run / "world" / "tasks-rl.jsonl")[:n_problems]
    return model, tok.im_end_id, prompt_ids(tok, problems)


def random_setup(preset: str, n_problems: int):
    """Random weights in the preset's shape and random prompts as long as the world's word problems."""
    p = get_preset(preset)
    model = Transformer(ModelConfig(vocab_size=p.vocab_size, **p.model))
    model.init_weights(0)
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(45, 86, (n_problems,), generator=generator).tolist()
    prompts = [torch.randint(9, p.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    return model, 3, prompts  # 3: <|im_end|>


def batched(model, prompts, group, new_tokens, stop_id):
    return [c for g in generate(model, prompts, new_tokens, Sampling(seed=1, stop_ids=[stop_id]), num_samples=group) for c in g]


def per_problem(model, prompts, group, new_tokens, stop_id):
    return [c for i, p in enumerate(prompts)
            for c in generate(model, [p], new_tokens, Sampling(seed=i, stop_ids=[stop_id]), num_samples=group)[0]]


def one_at_a_time(model, prompts, group, new_tokens, stop_id):
    return [generate(model, [p], new_tokens, Sampling(seed=i * group + j, stop_ids=[stop_id]))[0][0]
            for i, p in enumerate(prompts) for j in range(group)]


def measure(sampler, args, model, prompts, stop_id) -> tuple[float, float]:
    """(completions/s, new tokens/s), medians over the repeats."""
    sampler(model, prompts, args.group, args.new_tokens, stop_id)  # warm-up
    rates = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        completions = sampler(model, prompts, args.group, args.new_tokens, stop_id)
        seconds = time.perf_counter() - start
        rates.append((len(completions) / seconds, sum(len(c.tokens) for c in completions) / seconds))
    return statistics.median(r[0] for r in rates), statistics.median(r[1] for r in rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder with a trained stage (default: random weights)")
    parser.add_argument("--stage", default="sft", help="the run's stage to sample from (default sft)")
    parser.add_argument("--preset", default="cpu", help="model shape for random weights (default cpu)")
    parser.add_argument("--problems", type=int, default=8, help="problems per RL step, P (default 8)")
    parser.add_argument("--group", type=int, default=8, help="completions per problem, G (default 8)")
    parser.add_argument("--new-tokens", type=int, default=64, help="most new tokens per completion (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.run:
        model, stop_id, prompts = real_setup(args.run, args.stage, args.problems)
        source = f"{args.run / args.stage}"
    else:
        model, stop_id, prompts = random_setup(args.preset, args.problems)
        source = f"random weights, {args.preset} preset shape"
    model.eval()
    print(f"model: {source}, {model.num_params() / 1e6:.2f}M parameters; {args.problems} problems x {args.group} samples, "
          f"<= {args.new_tokens} new tokens, temperature 1, float32, {torch.get_num_threads()} threads, median of {args.repeats}")
    print("| sampling | completions/s | new tokens/s | speedup |")
    print("|:---------|--------------:|-------------:|--------:|")
    rows = [("batched (P prompts, num_samples=G)", batched), ("per problem (num_samples=G)", per_problem),
            ("one at a time", one_at_a_time)]
    results = [(name, *measure(sampler, args, model, prompts, stop_id)) for name, sampler in rows]
    baseline = results[-1][1]
    for name, completions, tokens in results:
        print(f"| {name} | {completions:13.1f} | {tokens:12.0f} | {completions / baseline:6.1f}x |")


if __name__ == "__main__":
    main()
