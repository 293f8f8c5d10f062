"""Direct Preference Optimisation: learn from the ranked pairs directly, without a reward model.

DPO (Rafailov et al., 2023) shows that the policy maximising a reward under a KL penalty to a
reference model implies that reward: r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) up to a term that
cancels in a pair. Putting it into the reward model's Bradley-Terry loss gives a loss on the policy
itself: -log sigmoid(beta * ((log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected)))),
log-probabilities summed over the reply's tokens (and its closing `<|im_end|>`). The reference is
the SFT model, frozen; its log-probabilities are computed once, before training. Two additions that
the field uses and that the cpu preset measured (BENCHMARKS.md, "Preference tuning: online DPO"):
- `--nll`: the chosen reply's negative log-likelihood per token is added to the loss (RPO, Pang et
  al. 2024; Llama 3), which keeps the chosen replies likely: with plain DPO, the replies sampled from
  the tuned model drifted into garbled text and lost to the SFT model's as often as they won;
- `--rounds`: online (iterative) DPO on the world's pairs: after the first round, the model of the
  round before samples its own replies to the training prompts, the labeler ranks them (each pair's
  chosen reply one of the prompt's best), and DPO trains on them with that model as reference, so
  that the pairs show the policy's own mistakes, not only the SFT model's;
- `--replay-coef`: the SFT loss on a batch of the SFT conversations added to every step
  (InstructGPT's PPO-ptx, as `picochat rl` has it): the pairs are open prompts about the world, and
  without it DPO unlearnt what they never show, refusing harmful requests above all.

    picochat dpo --run runs/demo                          # <run>/prefs/pairs.jsonl -> <run>/dpo/
    picochat dpo --run runs/x --pairs prefs.jsonl --cut-long-prompts

Writes `<run>/dpo/`, a chat stage like sft and rl (chat, serve and export take `--stage dpo`), the
rounds before the last in `<run>/dpo/round-<r>/` and the pairs of round r in `pairs-round-<r>.jsonl`;
`--resume` continues a killed run. The held-out pairs measure the implicit reward's accuracy.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from picochat.config import DTYPES, add_dataclass_args, apply_overrides, knob
from picochat.data.preferences import pair_batch
from picochat.io import read_json
from picochat.run import Run
from picochat.train.loop import (
    autocast,
    build_optimizers,
    run_steps,
    setup_runtime,
    teardown_runtime,
)
from picochat.train.rl import problems_for_step, replay_loader, token_log_probs
from picochat.train.rm import add_pairs_args, load_start, train_pairs
from picochat.world.preferences import policy_pairs


@dataclass
class DPOConfig:
    """Hyperparameters of DPO (the defaults suit the cpu preset)."""

    steps: int = knob(100, "optimizer steps")
    batch_size: int = knob(16, "pairs per step")
    beta: float = knob(0.1, "strength of the implicit KL penalty to the reference: higher stays closer to it")
    lr: float = knob(3e-5, "AdamW learning rate, constant")
    rounds: int = knob(3, "rounds of online DPO on the world's pairs: each round after the first trains on the last "
                            "round's own replies, ranked by the world's labeler, with that model as the reference "
                            "(--pairs files: one round)")
    nll: float = knob(1.0, "weight of the chosen replies' negative log-likelihood per token, added to the loss "
                           "(RPO: keeps the chosen replies likely; 0: plain DPO)")
    replay_coef: float = knob(2.0, "weight of the SFT loss on a batch of SFT conversations added to every step "
                                   "(InstructGPT's PPO-ptx): keeps what SFT taught that the pairs do not show, such as "
                                   "refusing harmful requests (0: off)")
    replay_batch: int = knob(16, "replayed rows (of the model's context length) per step, with replay_coef")
    weight_decay: float = knob(0.0, "decoupled weight decay")
    grad_clip: float = knob(1.0, "clip the gradient norm to this (0: off)")
    heldout_share: float = knob(0.1, "share of the pairs held out when no --heldout file is given")
    eval_every: int = knob(50, "steps between held-out evaluations (0: only at the end)")
    ckpt_every: int = knob(50, "steps between checkpoints (0: only at the end)")
    dtype: str = knob("float32", "float32, bfloat16 (autocast) or auto (bfloat16 where native)", choices=DTYPES)
    seed: int = knob(0, "seed of the held-out split and the pair order")


def reply_log_probs(model, pairs: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(chosen reply), log p(rejected reply)) of each pair, summed over the reply's tokens."""
    inputs, targets, mask, _ = pair_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs])
    logp = (token_log_probs(model, inputs.to(device), targets.to(device)) * mask.to(device)).sum(dim=1)
    return logp[: len(pairs)], logp[len(pairs) :]


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DPO loss, implicit reward margins beta * (log-ratio chosen - log-ratio rejected))."""
    margins = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margins).mean(), margins.detach()


@torch.no_grad()
def reference_log_probs(model, pairs: list[dict], device, batch_size: int = 32) -> list[tuple[float, float]]:
    out = []
    for start in range(0, len(pairs), batch_size):
        chosen, rejected = reply_log_probs(model, pairs[start : start + batch_size], device)
        out.extend(zip(chosen.tolist(), rejected.tolist()))
    return out


def heldout_metrics(model, pairs: list[dict], ref_logps: list[tuple[float, float]], beta: float, device) -> dict:
    """The implicit reward's accuracy on held-out pairs (margin > 0), and the mean margin."""
    policy = reference_log_probs(model, pairs, device)
    margins = torch.tensor([beta * ((pc - rc) - (pr - rr)) for (pc, pr), (rc, rr) in zip(policy, ref_logps)])
    return {"heldout_accuracy": round(float((margins > 0).float().mean()), 4), "heldout_margin": round(float(margins.mean()), 4)}


def run_dpo(run_dir: Path, cfg: DPOConfig | None = None, pairs: list[str] | None = None, heldout: str | None = None,
            init: Path | None = None, cut_prompts: bool = False, resume: bool = False, device: str = "auto",
            replay: list[str] | None = None) -> dict:
    """DPO from `<init or run/sft>` (also the reference) on the pairs, in `cfg.rounds` rounds; writes
    `<run>/dpo/` (the rounds before the last in `<run>/dpo/round-<r>/`, with the pairs they sampled).
    With cfg.replay_coef > 0, `replay` (FILE[:WEIGHT] specs, default the world's SFT mixture when the run
    has one) is replayed with the SFT loss."""
    run = Run(run_dir)
    cfg = cfg or DPOConfig()
    if cfg.rounds < 1 or cfg.replay_batch < 1 or min(cfg.nll, cfg.replay_coef) < 0:
        raise ValueError(f"--rounds and --replay-batch must be at least 1, --nll and --replay-coef at least 0; got "
                         f"{cfg.rounds}, {cfg.replay_batch}, {cfg.nll} and {cfg.replay_coef}")
    if cfg.rounds > 1 and pairs:
        print("dpo: one round: --pairs files have no labeler to rank the policy's own replies (online rounds are for the "
              "world's pairs)")
        cfg = replace(cfg, rounds=1)  # what the stage records is what it ran
    rounds = cfg.rounds
    if cfg.replay_coef > 0 and not replay:
        replay = [str(path) for path in run.world_sft_data if path.is_file()]
        if not replay:
            print("dpo: no SFT conversations to replay (give --replay FILE...); training on the pairs alone")
    init = Path(init) if init else run.stage("sft")
    final = run.stage("dpo")
    summary = {}
    for r in range(1, rounds + 1):
        out = final if r == rounds else final / f"round-{r}"
        online = None
        if r > 1:
            # The world's held-out pairs (the SFT model's replies) measure every round alike.
            heldout = heldout or str(run.prefs / "pairs-heldout.jsonl")
            online = final / f"pairs-round-{r}.jsonl"
            pairs = [str(online)]
        if resume and (out / "done.json").is_file() and r < rounds:
            summary = read_json(out / "done.json")
        else:
            summary = _dpo_round(run, cfg, pairs, heldout, init, out, cut_prompts, resume, device, online, cfg.seed + r,
                                 replay if cfg.replay_coef > 0 else None)
        init = out
    return summary


def _dpo_round(run: Run, cfg: DPOConfig, pairs: list[str] | None, heldout: str | None, init: Path, out: Path,
               cut_prompts: bool, resume: bool, device: str, online: Path | None, seed: int,
               replay: list[str] | None) -> dict:
    """One round of DPO from `init`, also the reference, written to `out`; first, for an `online` round,
    `init`'s own replies ranked by the labeler are written there (kept when already written)."""
    rt = setup_runtime(device, join_group=False)
    try:
        tok, model = load_start(run, init, rt.device)
        if online and not online.is_file():
            with torch.no_grad():
                counts = policy_pairs(run.root, model.eval(), tok, online, seed)
            print(f"dpo: {counts['pairs']} pairs from {init}'s replies (labeler's mean score {counts['mean_score']}) -> {online}")
        train, held = train_pairs(run, tok, pairs, heldout, model.config.max_seq_len, cut_prompts, cfg.heldout_share,
                                  cfg.seed, "dpo")
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        with autocast(rt, cfg.dtype):
            ref_train = reference_log_probs(reference, train, rt.device)
            ref_held = reference_log_probs(reference, held, rt.device)
        model.train()
        optimizers = build_optimizers(model, "adamw", cfg.lr, weight_decay=cfg.weight_decay)
        stateful = {}
        if replay:
            stateful["replay_loader"] = replay_loader(replay, tok, model.config.max_seq_len, cfg.replay_batch, cfg.seed, rt)
            print(f"dpo: replaying {cfg.replay_batch} rows a step of {', '.join(replay)}")

        def step_fn(step: int) -> dict:
            t0 = time.perf_counter()
            chosen_rows = problems_for_step(len(train), step, cfg.batch_size, cfg.seed)
            ref = torch.tensor([ref_train[i] for i in chosen_rows], device=rt.device)
            with autocast(rt, cfg.dtype):
                chosen, rejected = reply_log_probs(model, [train[i] for i in chosen_rows], rt.device)
            loss, margins = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], cfg.beta)
            if cfg.nll:
                tokens = torch.tensor([sum(train[i]["chosen"][1]) for i in chosen_rows], device=rt.device)
                loss = loss - cfg.nll * (chosen / tokens).mean()
            replay_loss = None
            if stateful:
                inputs, targets = next(stateful["replay_loader"])
                with autocast(rt, cfg.dtype):
                    replay_loss = model(inputs.to(rt.device), targets.to(rt.device))
                loss = loss + cfg.replay_coef * replay_loss
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else torch.tensor(0.0)
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            record = {"loss": round(loss.item(), 5), "accuracy": round(float((margins > 0).float().mean()), 4),
                      "margin": round(float(margins.mean()), 4), "chosen_logp": round(float(chosen.detach().mean()), 3),
                      "rejected_logp": round(float(rejected.detach().mean()), 3), "grad_norm": round(float(grad_norm), 4),
                      **({"replay_loss": round(replay_loss.item(), 4)} if replay_loss is not None else {}),
                      "seconds": round(time.perf_counter() - t0, 3)}
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                model.eval()
                with autocast(rt, cfg.dtype):
                    record.update(heldout_metrics(model, held, ref_held, cfg.beta, rt.device))
                model.train()
            return record

        info = {"stage": "dpo", "tokenizer": tok.fingerprint, "init": str(init), "pairs": pairs or "world"}
        return run_steps(out, model, optimizers, rt, cfg.steps, step_fn, resume=resume, stateful=stateful,
                         ckpt_every=cfg.ckpt_every, desc="dpo", info=info, meta={"dpo_config": asdict(cfg)},
                         summary={"dpo_config": asdict(cfg), "train_pairs": len(train), "heldout_pairs": len(held)},
                         postfix=("loss", "accuracy", "margin", "heldout_accuracy"))
    finally:
        teardown_runtime(rt)


def register_cli(parser: argparse.ArgumentParser) -> None:
    add_pairs_args(parser, "model folder to start from and to stay close to (default: <run>/sft)")
    add_dataclass_args(parser, DPOConfig)
    parser.add_argument("--replay", nargs="+", default=None, metavar="FILE[:WEIGHT]",
                        help="with --replay-coef > 0: conversation or document files replayed with the SFT loss "
                             "(default: the world's SFT mixture, when the run has one)")
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    cfg = apply_overrides(DPOConfig(), args)
    summary = run_dpo(Path(args.run), cfg, args.pairs, args.heldout, args.init, args.cut_long_prompts, args.resume, args.device,
                      args.replay)
    print(f"dpo: done, held-out accuracy {summary.get('heldout_accuracy')} -> {Path(args.run) / 'dpo'}")
