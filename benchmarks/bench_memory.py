"""The plan's memory estimate against the measured peak of real training steps on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/bench_memory.py

For each model (the cpu preset; a ~100M model: gpu-small's shape with an 8k vocabulary), a fresh
process builds the model and optimizers, runs 3 optimizer steps in float32 (optimizer state exists
from the first, so the later steps reach the steady peak), and reports the peak resident memory
above the process's memory before the model was built (ru_maxrss delta), beside
`picochat.plan.memory_per_device`.
"""

from __future__ import annotations

import json
import subprocess
import sys

CASES = {  # name: (preset, model overrides, vocab, micro-batch, seq_len)
    "cpu preset": ("cpu", {}, 2048, 8, 256),
    "~100M (gpu-small shape, vocab 8192)": ("gpu-small", {}, 8192, 2, 512),
}

CHILD = r"""
import dataclasses, json, resource, sys
import torch
from picochat.config import get_preset
from picochat.plan import make_plan, model_config
from picochat.model import Transformer
from picochat.train.loop import build_optimizers
preset, overrides, vocab, micro, seq = json.loads(sys.argv[1])
p = dataclasses.replace(get_preset(preset), vocab_size=vocab)
cfg = dataclasses.replace(p.pretrain, batch_size=micro, seq_len=seq, total_batch_tokens=micro * seq, max_steps=3,
                          max_tokens=0, tokens_per_param=0, dtype="float32", compile=False)
import picochat.plan as plan_module
plan_module.get_preset = lambda name: p
plan = make_plan(preset, cfg, 1, model_overrides=overrides, device="cpu")
x = torch.randint(0, vocab, (micro, seq)); y = torch.randint(0, vocab, (micro, seq))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = Transformer(model_config(p, seq, overrides)).train()
optimizers = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.muon_lr)
for _ in range(3):
    model(x, targets=y).backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps({"estimate": plan.memory, "measured": peak}))
"""


def main() -> None:
    print("| model | estimate | measured peak | estimate / measured | estimate by part |")
    print("| --- | --- | --- | --- | --- |")
    for name, case in CASES.items():
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case)], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        est, measured = result["estimate"], result["measured"]
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in est.items() if k != "total")
        print(f"| {name} | {est['total'] / 2**20:.0f} MiB | {measured / 2**20:.0f} MiB | {est['total'] / measured:.2f} | {parts} MiB |")


if __name__ == "__main__":
    main()
