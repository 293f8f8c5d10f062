"""picochat against karpathy/nanochat at equal wall time, on the same batches, scored on held-out text.

    git clone https://github.com/karpathy/nanochat /tmp/nanochat        # never vendored here
    python benchmarks/bench_vs_nanochat.py --nanochat /tmp/nanochat --seconds 600 --seeds 0 1
    python benchmarks/bench_vs_nanochat.py --nanochat /tmp/nanochat --seconds 300 --seeds 0 \\
        --picochat "cpu=--preset cpu" --picochat "untied=--preset cpu --no-tie-embeddings" --sides

Data (built once in --work): a 4,096-token BPE trained on the files of ../shared/data/text, which
become the training token shards (`picochat data prepare`, as picochat tokenizes any text). The
held-out text is the first --held-out passages of LAMBADA (OpenAI's version,
../shared/data/eval/lambada_openai.jsonl: paragraphs of unpublished novels from BookCorpus, context
and last word): English prose that is in none of the training files; it is the shards' validation
split, so neither side ever trains on it.

Sides. Each picochat variant is `NAME=FLAGS`, the flags of `picochat pretrain` (preset, shape,
learning rates, --no-tie-embeddings, --compile...); it runs through `run_pretrain` with
--time-budget. nanochat's GPT (same depth and width; head_dim 128 as its base_train sets, full
attention: window pattern "L", which base_train advises without FlashAttention 3) trains with its own
MuonAdamW in a loop that copies scripts/base_train.py: its learning rates, betas, warmup (40 steps),
warmdown (last 65%, to 5%), Muon momentum and weight-decay schedules, and its batch rule, which
scales every learning rate by sqrt(batch / 2^19) ("nanochat"), or with that scale left at 1
("nanochat-unscaled"). Its schedules are laid out over the seconds as picochat's are (the progress of
a step is the share of the budget spent before it) and it stops by the same rule (picochat's
`is_last_step`). Both read the same ShardLoader (same seed, same 8 x 256 batches in the same order
when the variant keeps the batch), and both are scored by `evaluate_loss` on the same held-out
batches: bits per byte of the text.

Fairness on a shared machine: every side is a process of its own with one thread, and they all run
at once (--jobs: how many at a time), so each sees the same load. picochat's budget counts every
step from the first; nanochat's leaves its first step out (there its fused optimizer steps compile,
minutes on a loaded CPU the first time; base_train itself leaves its first 10 steps out of its
training time), which favours nanochat. The first step's seconds are shown for both. Prints one row
per side and seed, then the mean over the seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
B_REF = 2**19  # nanochat's reference batch (tokens) for its learning-rate rule


def build_data(work: Path, text_dir: Path, held_out: int, vocab_size: int) -> Path:
    """The tokenizer and token shards in `work` (made once): train on `text_dir`, validate on LAMBADA."""
    from picochat.data.shards import prepare
    from picochat.data.sources import iter_documents
    from picochat.io import atomic_write_text, read_jsonl
    from picochat.tokenizer import Tokenizer

    if (work / "shards" / "manifest.json").exists():
        return work
    work.mkdir(parents=True, exist_ok=True)
    held = work / "held-out.jsonl"
    rows = read_jsonl(SHARED / "eval" / "lambada_openai.jsonl")[:held_out]
    atomic_write_text(held, "".join(json.dumps({"text": r["context"] + " " + r["continuation"]}) + "\n" for r in rows))
    print(f"tokenizer: {vocab_size} tokens from {text_dir}", flush=True)
    Tokenizer.train(iter_documents(text_dir), vocab_size=vocab_size).save(work / "tokenizer")
    prepare(text_dir, work / "tokenizer", work / "shards", val_inputs=held, workers=1)
    return work


def picochat_side(work: Path, out: Path, flags: str, seconds: float, seed: int, steps: int) -> dict:
    from picochat.config import apply_overrides, get_preset
    from picochat.train.pretrain import MODEL_FLAGS, register_cli, run_pretrain

    run = out.with_suffix("")
    run.mkdir(parents=True)
    (run / "tokenizer").symlink_to(work / "tokenizer")
    parser = argparse.ArgumentParser()
    register_cli(parser)
    args = parser.parse_args(["--run", str(run), *shlex.split(flags)])
    cfg = apply_overrides(get_preset(args.preset).pretrain, args)
    horizon = {"max_steps": steps, "max_tokens": 0, "tokens_per_param": 0, "time_budget": 0} if steps else {"time_budget": seconds}
    cfg = dataclasses.replace(cfg, **horizon, seed=seed, eval_every=0, ckpt_every=0, eval_batches=10**6)
    overrides = {name: getattr(args, name) for name in (*MODEL_FLAGS, "tie_embeddings")}
    summary = run_pretrain(run, args.preset, cfg, overrides, shards_dir=work / "shards", device="cpu")
    rows = [json.loads(line) for line in (run / "base" / "metrics.jsonl").read_text().splitlines()]
    return {"steps": len(rows), "tokens": rows[-1]["tokens"], "train_s": rows[-1].get("train_s") or round(sum(cfg.total_batch_tokens / r["tok_per_s"] for r in rows), 1),
            "first_step_s": round(rows[0]["tokens"] / rows[0]["tok_per_s"], 2), "tok_per_s": statistics.median(r["tok_per_s"] for r in rows),
            "bpb": summary["val_bpb"], "params": summary["params"], "batch": cfg.total_batch_tokens}


def nanochat_trainer(work: Path, nanochat: Path, seed: int, scaled: bool, compile_model: bool, n_layer: int,
                     d_model: int, batch: int, seq_len: int):
    """nanochat's model and a `step(step, progress)` that trains it on one batch as base_train does."""
    import torch

    sys.path.insert(0, str(nanochat))
    from nanochat.gpt import GPT, GPTConfig

    from picochat.data.loader import ShardLoader
    from picochat.tokenizer import Tokenizer

    vocab_size = Tokenizer.load(work / "tokenizer").vocab_size

    def build(depth: int, dim: int) -> GPT:
        config = GPTConfig(sequence_len=seq_len, vocab_size=vocab_size, n_layer=depth, n_head=max(1, dim // 128),
                           n_kv_head=max(1, dim // 128), n_embd=dim, window_pattern="L")
        with torch.device("meta"):
            return GPT(config)

    def scaling_params(m: GPT) -> int:  # base_train's: transformer matrices + lm_head
        counts = m.num_scaling_params()
        return counts["transformer_matrices"] + counts["lm_head"]

    torch.manual_seed(seed)
    model = build(n_layer, d_model)
    model.to_empty(device="cpu")
    model.init_weights()
    # base_train's rules, with its default horizon (12 tokens per scaling parameter) and weight decay 0.28
    target_tokens = 12 * scaling_params(model)
    d_ref = 12 * scaling_params(build(12, 768))
    lr_scale = math.sqrt(batch * seq_len / B_REF) if scaled else 1.0
    weight_decay = 0.28 * math.sqrt(batch * seq_len / B_REF) * (d_ref / target_tokens)
    optimizer = model.setup_optimizer(unembedding_lr=0.008 * lr_scale, embedding_lr=0.3 * lr_scale,
                                      scalar_lr=0.5 * lr_scale, matrix_lr=0.02 * lr_scale, weight_decay=weight_decay)
    train_model = torch.compile(model, dynamic=False) if compile_model else model
    loader = ShardLoader(work / "shards", batch_size=batch, seq_len=seq_len, seed=seed)
    warmup, warmdown, final = 40, 0.65, 0.05

    def lr_mult(step: int, progress: float) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if progress <= 1 - warmdown:
            return 1.0
        left = (1 - progress) / warmdown
        return left + (1 - left) * final

    def momentum(step: int, progress: float) -> float:
        if step < 400:
            return 0.85 + step / 400 * (0.97 - 0.85)
        if progress >= 1 - warmdown:
            done = (progress - (1 - warmdown)) / warmdown
            return 0.97 * (1 - done) + 0.90 * done
        return 0.97

    def step_fn(step: int, progress: float) -> float:
        x, y = next(loader)
        loss = train_model(x, y)
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult(step, progress)
            if group["kind"] == "muon":
                group["momentum"] = momentum(step, progress)
                group["weight_decay"] = weight_decay * 0.5 * (1 + math.cos(math.pi * progress))
        optimizer.step()
        model.zero_grad(set_to_none=True)
        value = loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"nanochat: loss became {value} at step {step + 1}")
        return value

    info = {"params": sum(p.numel() for p in model.parameters()), "batch": batch * seq_len, "lr_scale": lr_scale,
            "weight_decay": weight_decay}
    return model, step_fn, info


def nanochat_side(work: Path, nanochat: Path, seconds: float, seed: int, scaled: bool, compile_model: bool,
                  n_layer: int, d_model: int, batch: int, seq_len: int, steps: int) -> dict:
    import torch

    from picochat.data.loader import iter_val_batches
    from picochat.tokenizer import Tokenizer, token_byte_lengths
    from picochat.train.loop import TrainClock, evaluate_loss, is_last_step, setup_runtime

    model, step_fn, info = nanochat_trainer(work, nanochat, seed, scaled, compile_model, n_layer, d_model, batch, seq_len)
    clock, rates, step = TrainClock(), [], 0
    while not clock.finished:
        t0 = time.perf_counter()
        last = step + 1 == steps if steps else is_last_step(clock, seconds)
        step_fn(step, step / steps if steps else 1.0 if last else clock.seconds / seconds)
        dt = time.perf_counter() - t0
        if step == 0:  # its fused optimizer steps compile here: not counted (base_train skips its first 10 steps)
            first_step_s = dt
        else:
            clock.seconds, clock.last_step_s = clock.seconds + dt, dt
        clock.finished = last
        rates.append(batch * seq_len / dt)
        step += 1

    class Scored(torch.nn.Module):  # evaluate_loss's calling convention over nanochat's forward
        def __init__(self):
            super().__init__()
            self.gpt = model

        def forward(self, x, targets, reduction):
            return self.gpt(x, targets, loss_reduction=reduction)

    token_bytes = torch.tensor(token_byte_lengths(Tokenizer.load(work / "tokenizer")), dtype=torch.float32)
    held_out = evaluate_loss(Scored(), iter_val_batches(work / "shards", batch_size=batch, seq_len=seq_len),
                             setup_runtime("cpu", join_group=False), "float32", token_bytes)
    return {"steps": step, "tokens": step * batch * seq_len, "train_s": round(clock.seconds, 2),
            "first_step_s": round(first_step_s, 2), "tok_per_s": statistics.median(rates), "bpb": held_out["val_bpb"], **info}


def picochat_trainer(work: Path, flags: str, seed: int):
    """picochat's model and a `step(step, progress)` doing what `train` does in one step (eager, one process)."""
    import torch

    from picochat.config import apply_overrides, get_preset
    from picochat.data.loader import ShardLoader
    from picochat.model import Transformer
    from picochat.tokenizer import Tokenizer
    from picochat.train.loop import build_optimizers, lr_multiplier, set_lr
    from picochat.train.pretrain import MODEL_FLAGS, model_config_for, register_cli

    parser = argparse.ArgumentParser()
    register_cli(parser)
    args = parser.parse_args(["--run", str(work), *shlex.split(flags)])
    cfg = apply_overrides(get_preset(args.preset).pretrain, args)
    overrides = {name: getattr(args, name) for name in (*MODEL_FLAGS, "tie_embeddings")}
    config = model_config_for(get_preset(args.preset).model, Tokenizer.load(work / "tokenizer").vocab_size, cfg.seq_len, overrides)
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(seed)
    optimizers = build_optimizers(model, cfg.optimizer, cfg.lr, cfg.muon_lr, cfg.weight_decay, cfg.embedding_lr)
    train_model = torch.compile(model) if cfg.compile else model
    loader = ShardLoader(work / "shards", batch_size=cfg.total_batch_tokens // cfg.seq_len, seq_len=cfg.seq_len, seed=seed)

    def step_fn(step: int, progress: float) -> float:
        set_lr(optimizers, lr_multiplier(step, cfg, progress=progress))
        x, y = next(loader)
        loss = train_model(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step_fn, {"params": model.num_params(), "batch": cfg.total_batch_tokens}


def speed(args) -> None:
    """Steps of picochat (the first --picochat side) and nanochat in turn, in this one process: the same load
    for both, their median tokens/s and its ratio. The first --warmup steps of each are not timed."""
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    name, flags = (args.picochat or ["cpu=--preset cpu"])[0].split("=", 1)
    sides = {name: picochat_trainer(work, flags, 0),
             "nanochat": nanochat_trainer(work, Path(args.nanochat), 0, True, args.nanochat_compile, args.n_layer,
                                          args.d_model, batch=8, seq_len=256)}
    seconds = {side: [] for side in sides}
    for step in range(args.speed_warmup + args.speed):
        for side, (_, step_fn, _) in sides.items():
            t0 = time.perf_counter()
            step_fn(step, 0.0)
            if step >= args.speed_warmup:
                seconds[side].append(time.perf_counter() - t0)
    rates = {side: sides[side][2]["batch"] / statistics.median(s) for side, s in seconds.items()}
    for side, rate in rates.items():
        print(f"{side}: {rate:,.0f} tok/s (median of {args.speed} steps, {sides[side][2]['params']:,} parameters)")
    print(f"ratio {name} / nanochat: {rates[name] / rates['nanochat']:.2f}")


def worker(args) -> None:
    import torch

    from picochat.io import atomic_write_json

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    if args.side.startswith("picochat:"):
        result = picochat_side(Path(args.work), out, args.side.split(":", 1)[1], args.seconds, args.seed, args.steps)
    else:
        result = nanochat_side(Path(args.work), Path(args.nanochat), args.seconds, args.seed,
                               scaled=args.side == "nanochat", compile_model=args.nanochat_compile,
                               n_layer=args.n_layer, d_model=args.d_model, batch=8, seq_len=256, steps=args.steps)
    atomic_write_json(out, result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("--nanochat", required=True, help="a checkout of github.com/karpathy/nanochat (its folder holding nanochat/)")
    parser.add_argument("--work", default=str(REPO / "runs" / "bench-vs-nanochat"), help="data and runs (default runs/bench-vs-nanochat)")
    parser.add_argument("--text", default=str(SHARED / "text"), help="training text (default ../shared/data/text)")
    parser.add_argument("--held-out", type=int, default=500, help="LAMBADA passages held out for the bpb (default 500)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=600, help="training wall time of every side (default 600)")
    parser.add_argument("--steps", type=int, default=0, help="train every side for this many steps instead of --seconds: "
                                                                 "learning results that do not depend on the machine's load")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--picochat", action="append", default=None, metavar="NAME=FLAGS",
                        help="a picochat side: a name and `picochat pretrain` flags (repeat; default cpu=--preset cpu)")
    parser.add_argument("--sides", nargs="*", default=["nanochat", "nanochat-unscaled"], help="the nanochat sides to run")
    parser.add_argument("--nanochat-compile", action="store_true", help="torch.compile nanochat's model")
    parser.add_argument("--n-layer", type=int, default=4, help="nanochat's depth (default 4, the cpu preset's)")
    parser.add_argument("--d-model", type=int, default=256, help="nanochat's width (default 256)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per side (default 1)")
    parser.add_argument("--jobs", type=int, default=0, help="sides trained at once (default 0: all)")
    parser.add_argument("--speed", type=int, default=0, metavar="STEPS",
                        help="only the speed: this many steps of the first picochat side and of nanochat (its recipe) "
                             "in turn, in one process, and their median tokens/s (no held-out score)")
    parser.add_argument("--speed-warmup", type=int, default=3, help="untimed steps of each before --speed's (default 3)")
    parser.add_argument("--side", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        return worker(args)
    if args.speed:
        build_data(Path(args.work), Path(args.text), args.held_out, args.vocab_size)
        return speed(args)

    work = build_data(Path(args.work), Path(args.text), args.held_out, args.vocab_size)
    picochat_sides = dict(spec.split("=", 1) for spec in (args.picochat or ["cpu=--preset cpu"]))
    runs_dir = work / "runs" / time.strftime("%Y%m%d-%H%M%S")
    runs_dir.mkdir(parents=True)
    jobs = [(name, f"picochat:{flags}", seed) for name, flags in picochat_sides.items() for seed in args.seeds]
    jobs += [(side, side, seed) for side in args.sides for seed in args.seeds]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src")}
    pending, running, results = list(jobs), [], {}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped"))  # so that the sides are stopped with it
    try:
        run_jobs(args, work, runs_dir, env, pending, running, results)
    finally:
        for *_, proc in running:
            proc.terminate()
    report(args, jobs, results)


def run_jobs(args, work: Path, runs_dir: Path, env: dict, pending: list, running: list, results: dict) -> None:
    """Start the sides (at most --jobs at once) and collect their results as they finish."""
    while pending or running:
        while pending and (not args.jobs or len(running) < args.jobs):
            name, side, seed = pending.pop(0)
            out = runs_dir / f"{name}-s{seed}.json"
            cmd = [sys.executable, __file__, "--nanochat", args.nanochat, "--work", str(work), "--seconds", str(args.seconds),
                   "--steps", str(args.steps),
                   "--threads", str(args.threads), "--n-layer", str(args.n_layer), "--d-model", str(args.d_model),
                   "--side", side, "--seed", str(seed), "--out", str(out)] + (["--nanochat-compile"] if args.nanochat_compile else [])
            with open(runs_dir / f"{name}-s{seed}.log", "w") as log:
                running.append((name, seed, out, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for job in [j for j in running if j[3].poll() is not None]:
            running.remove(job)
            name, seed, out, proc = job
            if proc.returncode:
                sys.exit(f"{name} seed {seed} failed (exit {proc.returncode}): see {out.with_suffix('.log')}")
            results[name, seed] = json.loads(out.read_text())
            print(f"{name} seed {seed}: {results[name, seed]}", flush=True)


def report(args, jobs: list, results: dict) -> None:
    print(f"\n{f'{args.steps} steps' if args.steps else f'{args.seconds:g} s'} of training per side, {len(jobs)} sides at once ({args.jobs or 'all'}), "
          f"{args.threads} thread each; held-out: {args.held_out} LAMBADA passages")
    print("| side | seed | steps | tokens | train s | first step s | tok/s (median) | held-out bpb |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for (name, seed), r in results.items():
        print(f"| {name} | {seed} | {r['steps']} | {r['tokens']:,} | {r['train_s']} | {r['first_step_s']} | {r['tok_per_s']:,.0f} | {r['bpb']:.4f} |")
    for name in dict.fromkeys(name for name, _ in results):
        rows = [r for (n, _), r in results.items() if n == name]
        bpbs = [r["bpb"] for r in rows]
        spread = f" (seeds {', '.join(f'{b:.4f}' for b in bpbs)})" if len(bpbs) > 1 else ""
        print(f"{name}: held-out bpb {statistics.mean(bpbs):.4f}{spread}, tok/s {statistics.mean(r['tok_per_s'] for r in rows):,.0f}")


if __name__ == "__main__":
    main()
