"""Chunked cross-entropy (`picochat.model.head_cross_entropy`) against the plain loss over all float32
logits: peak memory and time of a forward + backward through the output head, on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_chunked_loss.py --positions 2048 --repeats 3

Each (vocab, loss) runs in a fresh process: peak resident memory above the process's memory once
the inputs exist (ru_maxrss delta), and the median time of --repeats runs. The loss values are
printed too: they must agree.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, statistics, sys, time
import torch
import torch.nn.functional as F
from picochat.model import IGNORE_INDEX, head_cross_entropy
vocab, positions, d, chunked, repeats = json.loads(sys.argv[1])
torch.manual_seed(0)
head = torch.nn.Linear(d, vocab, bias=False)
hidden = torch.randn(positions, d, requires_grad=True)
targets = torch.randint(0, vocab, (positions,))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
times = []
for _ in range(repeats):
    t0 = time.perf_counter()
    if chunked:
        loss = head_cross_entropy(hidden, head, targets, "sum") / positions
    else:
        loss = F.cross_entropy(head(hidden).float(), targets, ignore_index=IGNORE_INDEX)
    loss.backward()
    times.append(time.perf_counter() - t0)
    hidden.grad = head.weight.grad = None
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"peak": peak, "seconds": statistics.median(times), "loss": loss.item()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=2048, help="positions in the batch (default 2048)")
    parser.add_argument("--d-model", type=int, default=768, help="hidden width (default 768, gpu-small's)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=[32768, 65536], help="vocabulary sizes (default 32k 64k)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forward+backward runs per case; the median is reported")
    args = parser.parse_args()
    print("| vocab | loss | peak memory | time (median) | loss value |")
    print("| --- | --- | --- | --- | --- |")
    for vocab in args.vocabs:
        for chunked in (False, True):
            spec = json.dumps([vocab, args.positions, args.d_model, chunked, args.repeats])
            out = subprocess.run([sys.executable, "-c", CHILD, spec], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {vocab:,} | {'chunked' if chunked else 'plain'} | {r['peak'] / 2**20:,.0f} MiB | {r['seconds']:.2f} s | {r['loss']:.5f} |")


if __name__ == "__main__":
    main()
