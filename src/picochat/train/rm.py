"""The reward model: a neural-network simulation of the people who ranked replies (the lecture's RLHF).

The Transformer, initialised from the SFT model, with a scalar head (`score`, a d_model -> 1 linear
layer) reading the final hidden state of the last token of `prompt + reply + <|im_end|>`. Trained on
preference pairs with the Bradley-Terry loss, -log sigmoid(r(chosen) - r(rejected)), so that only
differences of scores mean anything; judged by its accuracy on held-out pairs (r(chosen) > r(rejected)).

    picochat rm --run runs/demo                          # <run>/prefs/pairs.jsonl -> <run>/rm/
    picochat rm --run runs/x --pairs prefs.jsonl --cut-long-prompts  # real pairs; 10% held out

Writes `<run>/rm/` with the layout of every stage (its model.safetensors holds the head as
`score.weight`); `--resume` continues a killed run. `load_reward_model` reads it back and `rewards`
scores token sequences, as RLHF does.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from picochat.checkpoint import CheckpointError, load_model
from picochat.config import DTYPES, add_common_args, add_dataclass_args, apply_overrides, knob
from picochat.data.preferences import encode_pairs, read_preference_files, skipped_note
from picochat.model import ModelConfig, Transformer
from picochat.run import REWARD_STAGE, Run
from picochat.tokenizer import Tokenizer
from picochat.train.loop import autocast, run_steps, setup_runtime, teardown_runtime
from picochat.train.rl import problems_for_step


@dataclass
class RMConfig:
    """Hyperparameters of reward-model training (the defaults suit the cpu preset)."""

    steps: int = knob(100, "optimizer steps")
    batch_size: int = knob(16, "pairs per step")
    lr: float = knob(5e-5, "AdamW learning rate of the Transformer, constant")
    head_lr: float = knob(1e-3, "AdamW learning rate of the new scalar head")
    weight_decay: float = knob(0.0, "decoupled weight decay")
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)")
    heldout_share: float = knob(0.1, "share of the pairs held out for accuracy when no --heldout file is given")
    eval_every: int = knob(50, "steps between held-out evaluations (0: only at the end)")
    ckpt_every: int = knob(50, "steps between checkpoints (0: only at the end)")
    dtype: str = knob("float32", "float32, bfloat16 (autocast) or auto (bfloat16 where native)", choices=DTYPES)
    seed: int = knob(0, "seed of the head's initial weights, the held-out split and the pair order")


def with_score_head(model: Transformer, seed: int = 0) -> Transformer:
    """`model` with a scalar head `score` (d_model -> 1, no bias), drawn small from the seed."""
    generator = torch.Generator().manual_seed(seed)
    model.score = torch.nn.Linear(model.config.d_model, 1, bias=False)
    with torch.no_grad():
        model.score.weight.copy_(torch.randn(model.score.weight.shape, generator=generator) * 0.02)
    return model.to(model.lm_head.weight.device)


def reward_model(config: ModelConfig) -> Transformer:
    return with_score_head(Transformer(config))


def rewards(model: Transformer, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The score of each right-padded sequence (N,), read at its last token (lengths[i] - 1)."""
    captured = {}
    # The last layer's output, normed, is the final hidden state; the vocabulary head is not needed
    # (logits_to_keep=1 computes it for one position only).
    hook = model.model.layers[-1].register_forward_hook(lambda module, args, output: captured.__setitem__("h", output))
    try:
        model(inputs, logits_to_keep=1)
    finally:
        hook.remove()
    last = captured["h"][torch.arange(len(lengths), device=inputs.device), lengths.to(inputs.device) - 1]
    return model.score(model.model.norm(last)).squeeze(-1).float()


def score_pairs(model: Transformer, pairs: list[dict], device, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(chosen), r(rejected)) for encoded pairs."""
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            inputs, lengths = sequences_batch([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])
            scores = rewards(model, inputs.to(device), lengths).cpu()
            chosen.append(scores[: len(chunk)])
            rejected.append(scores[len(chunk) :])
    return torch.cat(chosen), torch.cat(rejected)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """-log P(chosen preferred) under Bradley-Terry, P = sigmoid(r_chosen - r_rejected), averaged."""
    return -F.logsigmoid(chosen - rejected).mean()


def accuracy(model: Transformer, pairs: list[dict], device) -> dict:
    """Held-out pair accuracy (ties count as wrong) and the mean score margin."""
    chosen, rejected = score_pairs(model, pairs, device)
    return {"heldout_accuracy": round(float((chosen > rejected).float().mean()), 4),
            "heldout_margin": round(float((chosen - rejected).mean()), 4)}


def sequences_batch(sequences: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, lengths): the full token sequences right-padded, for `rewards`."""
    width = max(len(ids) for ids, _ in sequences)
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    for row, (ids, _) in enumerate(sequences):
        inputs[row, : len(ids)] = torch.tensor(ids)
    return inputs, torch.tensor([len(ids) for ids, _ in sequences])


def split_heldout(pairs: list[dict], share: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(pairs)))
    random.Random(f"rm-heldout-{seed}").shuffle(order)
    n_held = max(1, round(share * len(pairs)))
    return [pairs[i] for i in order[n_held:]], [pairs[i] for i in order[:n_held]]


def load_pairs(tok: Tokenizer, paths: list[str], context: int, cut_prompts: bool, what: str) -> list[dict]:
    """Encoded pairs of the files, with a line saying which were left out; an error when none is left."""
    pairs = read_preference_files(paths)
    encoded, skipped = encode_pairs(pairs, tok, context, cut_prompts)
    note = skipped_note(skipped, len(pairs))
    print(f"{what}: {len(encoded):,} pairs from {', '.join(map(str, paths))}" + (f"; {note}" if note else ""))
    if not encoded:
        raise ValueError(f"{', '.join(map(str, paths))}: no pair can be trained on ({note or 'no pairs'})"
                         + ("" if cut_prompts else "; --cut-long-prompts keeps pairs whose prompt alone is too long"))
    return encoded


def train_pairs(run: Run, tok: Tokenizer, pairs: list[str] | None, heldout: str | None, context: int,
                cut_prompts: bool, share: float, seed: int, what: str) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): the given files, or the world's `<run>/prefs/` pairs; held-out
    pairs from `heldout`, the world's held-out file, or a share split off the training pairs."""
    paths = pairs or [str(run.prefs / "pairs.jsonl")]
    if not pairs and not Path(paths[0]).is_file():
        raise FileNotFoundError(f"{paths[0]}: no preference pairs; give --pairs or run `picochat prefs sample --run {run.root}`")
    train = load_pairs(tok, paths, context, cut_prompts, what)
    heldout_path = heldout or (str(run.prefs / "pairs-heldout.jsonl") if not pairs else None)
    if heldout_path:
        return train, load_pairs(tok, [heldout_path], context, cut_prompts, f"{what} (held out)")
    if len(train) < 2:
        raise ValueError(f"{what}: {len(train)} pair; at least 2 are needed to hold one out (or give --heldout)")
    return split_heldout(train, share, seed)


def load_start(run: Run, init: Path, device) -> tuple[Tokenizer, Transformer]:
    """The run's tokenizer and the model a preference stage starts from, refusing a model that was
    trained with another tokenizer."""
    tok = Tokenizer.load(run.tokenizer)
    model, meta = load_model(init, device)
    if meta.get("tokenizer") not in (None, tok.fingerprint):
        raise ValueError(f"{init}: trained with another tokenizer than {run.tokenizer}")
    return tok, model


def run_rm(run_dir: Path, cfg: RMConfig | None = None, pairs: list[str] | None = None, heldout: str | None = None,
           init: Path | None = None, cut_prompts: bool = False, resume: bool = False, device: str = "auto") -> dict:
    """Train the reward model from `<init or run/sft>` and write `<run>/rm/`; returns the summary."""
    run = Run(run_dir)
    cfg = cfg or RMConfig()
    init = Path(init) if init else run.stage("sft")
    rt = setup_runtime(device, join_group=False)
    try:
        tok, model = load_start(run, init, rt.device)
        with_score_head(model, cfg.seed)
        train, held = train_pairs(run, tok, pairs, heldout, model.config.max_seq_len, cut_prompts, cfg.heldout_share,
                                  cfg.seed, "rm")
        model.train()
        body = [p for name, p in model.named_parameters() if not name.startswith("score.")]
        optimizers = [torch.optim.AdamW([{"params": body, "lr": cfg.lr}, {"params": model.score.parameters(), "lr": cfg.head_lr}],
                                        betas=(0.9, 0.95), weight_decay=cfg.weight_decay)]

        def step_fn(step: int) -> dict:
            t0 = time.perf_counter()
            chunk = [train[i] for i in problems_for_step(len(train), step, cfg.batch_size, cfg.seed)]
            inputs, lengths = sequences_batch([p["chosen"] for p in chunk] + [p["rejected"] for p in chunk])
            with autocast(rt, cfg.dtype):
                scores = rewards(model, inputs.to(rt.device), lengths)
            chosen, rejected = scores[: len(chunk)], scores[len(chunk) :]
            loss = bradley_terry_loss(chosen, rejected)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            record = {"loss": round(loss.item(), 5), "accuracy": round(float((chosen > rejected).float().mean()), 4),
                      "grad_norm": round(float(grad_norm), 4), "seconds": round(time.perf_counter() - t0, 3)}
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                model.eval()
                record.update(accuracy(model, held, rt.device))
                model.train()
            return record

        info = {"stage": REWARD_STAGE, "tokenizer": tok.fingerprint, "init": str(init), "pairs": pairs or "world",
                "reward_head": "score"}
        return run_steps(run.stage(REWARD_STAGE), model, optimizers, rt, cfg.steps, step_fn, resume=resume,
                         ckpt_every=cfg.ckpt_every, desc="rm", info=info, meta={"rm_config": asdict(cfg)},
                         summary={"rm_config": asdict(cfg), "train_pairs": len(train), "heldout_pairs": len(held)},
                         postfix=("loss", "accuracy", "heldout_accuracy"))
    finally:
        teardown_runtime(rt)


def load_reward_model(stage_dir: Path, device: str | torch.device = "cpu") -> tuple[Transformer, dict]:
    """(reward model in eval mode, its model.json) from a folder `picochat rm` wrote."""
    stage_dir = Path(stage_dir)
    model, meta = load_model(stage_dir, device, build=reward_model)
    if meta.get("reward_head") != "score":
        raise CheckpointError(f"{stage_dir / 'model.json'}: not a reward model (no scalar head); train one with `picochat rm`")
    return model, meta


def add_pairs_args(parser: argparse.ArgumentParser, init_help: str) -> None:
    """The flags of the stages that train on preference pairs (rm, dpo): the pairs and where to start."""
    add_common_args(parser)
    parser.add_argument("--pairs", nargs="+", default=None, metavar="FILE",
                        help="preference files: JSON or JSONL of {prompt, chosen, rejected} (strings or message lists) or "
                             "stack-exchange-paired {question, response_j, response_k} (default: the world's "
                             "<run>/prefs/pairs.jsonl from `picochat prefs sample`)")
    parser.add_argument("--heldout", default=None, metavar="FILE",
                        help="held-out pairs for accuracy (default: <run>/prefs/pairs-heldout.jsonl for the world's "
                             "pairs, else --heldout-share of --pairs)")
    parser.add_argument("--init", default=None, help=init_help)
    parser.add_argument("--cut-long-prompts", action="store_true",
                        help="keep a pair longer than the context by cutting its prompt to its end, when its replies fit "
                             "(default: such pairs are left out, with a count)")


def register_cli(parser: argparse.ArgumentParser) -> None:
    add_pairs_args(parser, "model folder to start from (default: <run>/sft)")
    add_dataclass_args(parser, RMConfig)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    cfg = apply_overrides(RMConfig(), args)
    summary = run_rm(Path(args.run), cfg, args.pairs, args.heldout, args.init, args.cut_long_prompts, args.resume, args.device)
    print(f"rm: done, held-out accuracy {summary.get('heldout_accuracy')} on {summary.get('heldout_pairs')} pairs "
          f"-> {Path(args.run) / REWARD_STAGE}")
