"""A training step of a preset's model in float32 against bfloat16 autocast, on this machine.

What `--dtype auto` decides: bfloat16 where the device computes it natively (CUDA, a CPU with
AVX512-BF16 or AMX), float32 elsewhere. One forward and backward of one micro-batch (the preset's
batch size and sequence length, random tokens), the two precisions taking turns, each figure the
median of --repeats rounds of --steps steps after a warm-up; the ratio is float32's time over
bfloat16's.

    python benchmarks/bench_dtype.py                  # the cpu preset, 2 threads
    python benchmarks/bench_dtype.py --preset cpu-text --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from picochat.config import get_preset
from picochat.model import ModelConfig, Transformer
from picochat.train.muon import native_bfloat16


def step_seconds(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, bfloat16: bool, steps: int) -> float:
    """Mean seconds of one forward and backward over `steps` of them."""
    start = time.perf_counter()
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            loss = model(inputs, targets)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of each precision, taking turns")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    preset = get_preset(args.preset)
    model = Transformer(ModelConfig(vocab_size=preset.vocab_size, **preset.model))
    shape = (preset.pretrain.batch_size, preset.pretrain.seq_len)
    inputs, targets = torch.randint(0, preset.vocab_size, shape), torch.randint(0, preset.vocab_size, shape)
    times = {False: [], True: []}
    for bfloat16 in (False, True):  # warm-up
        step_seconds(model, inputs, targets, bfloat16, 1)
    for _ in range(args.repeats):
        for bfloat16 in (False, True):
            times[bfloat16].append(step_seconds(model, inputs, targets, bfloat16, args.steps))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"preset {args.preset}, micro-batch {shape[0]} x {shape[1]}, {args.threads} threads, "
          f"native bfloat16: {native_bfloat16(torch.device('cpu'))}")
    print(f"float32   {1000 * fp32:7.1f} ms a step (median of {args.repeats})")
    print(f"bfloat16  {1000 * bf16:7.1f} ms a step (median of {args.repeats})")
    print(f"ratio     {fp32 / bf16:.2f}x")


if __name__ == "__main__":
    main()
