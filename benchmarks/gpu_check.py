"""The first thing to run on a GPU: a few training steps of each preset in bf16 with torch.compile,
reporting tokens/s, MFU, peak memory (beside the plan's estimate) and whether the loss falls.

    python benchmarks/gpu_check.py                         # every GPU preset, 20 steps each (minutes)
    python benchmarks/gpu_check.py --presets gpu-135m --steps 30
    python benchmarks/gpu_check.py --tiny --device cpu     # the same code on a tiny shape, in seconds (the tests run this)

Each step is one micro-batch of the preset's size (batch_size x seq_len) of a fixed random batch,
so the loss must fall (the model memorises it); the first steps include compilation and are left
out of the speed. MFU is against the GPU's measured bf16 matmul peak (`measured_peak_flops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from picochat.config import PRESETS, get_preset
from picochat.model import Transformer
from picochat.plan import make_plan, model_config
from picochat.train.loop import Runtime, autocast, build_optimizers, measured_peak_flops

TINY = dict(n_layer=2, d_model=64, n_head=2, n_kv_head=1)
WARMUP = 3  # steps left out of the speed: compilation, allocator warm-up


def check(name: str, steps: int, device: torch.device, tiny: bool, peak: float | None) -> dict:
    preset = get_preset(name)
    cfg = preset.pretrain
    overrides = TINY if tiny else {}
    if tiny:
        cfg = dataclasses.replace(cfg, batch_size=2, seq_len=64, total_batch_tokens=128, compile=False,
                                  dtype="float32" if device.type == "cpu" else cfg.dtype)
        preset = dataclasses.replace(preset, vocab_size=512)
    config = model_config(preset, cfg.seq_len, overrides)
    rt = Runtime(device, 0, 1, 0)
    torch.manual_seed(0)
    model = Transformer(config).to(device).train()
    model.checkpoint_layers = cfg.activation_checkpointing
    optimizers = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.muon_lr, cfg.weight_decay)
    step_model = torch.compile(model) if cfg.compile else model
    x = torch.randint(0, config.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        with autocast(rt, cfg.dtype):
            loss = step_model(x[:, :-1], targets=x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # also waits for the GPU
        times.append(time.perf_counter() - t0)
    tokens = cfg.batch_size * cfg.seq_len
    seconds = statistics.median(times[WARMUP:] or times)
    plan_cfg = dataclasses.replace(cfg, total_batch_tokens=tokens, max_steps=1, max_tokens=0, tokens_per_param=0)
    estimate = make_plan(name, plan_cfg, 1, model_overrides=overrides, device=device.type).memory["total"] if not tiny else None
    result = {"preset": name, "params": model.num_params(), "tok_per_s": tokens / seconds,
              "first_loss": losses[0], "last_loss": losses[-1], "loss_falls": losses[-1] < losses[0] - 0.1,
              "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
              "plan_memory_gb": estimate / 1e9 if estimate else None}
    if peak:
        result["mfu"] = model.flops_per_token(cfg.seq_len) * tokens / seconds / peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=[name for name in PRESETS if name != "cpu"], help="presets to check")
    parser.add_argument("--steps", type=int, default=20, help="steps per preset (default 20)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda (default when present) or cpu")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer shape of each preset, float32 on CPU: checks the script, not the GPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    peak = measured_peak_flops(device)
    if peak:
        print(f"{torch.cuda.get_device_name(device)}: measured bf16 matmul peak {peak / 1e12:.0f} TFLOP/s")
    print("| preset | parameters | tokens/s | MFU | peak memory | plan's estimate | loss first -> last | falls |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    failed = False
    for name in args.presets:
        r = check(name, args.steps, device, args.tiny, peak)
        failed |= not r["loss_falls"]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"| {name} | {r['params'] / 1e6:.1f}M | {r['tok_per_s']:,.0f} | {fmt(r.get('mfu'), '.1%')} | "
              f"{fmt(r['peak_memory_gb'], '.1f')} GB | {fmt(r['plan_memory_gb'], '.1f')} GB | "
              f"{r['first_loss']:.3f} -> {r['last_loss']:.3f} | {'yes' if r['loss_falls'] else 'NO'} |", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
