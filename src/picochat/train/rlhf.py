"""RLHF: the RL loop of `picochat rl`, rewarded by the reward model instead of a checked answer.

The lecture: where no answer can be checked, a reward model (a simulation of the people who ranked
replies) scores them, and the policy is optimised against it, with a KL penalty to the SFT model
(`kl_coef`), and only for a while: the reward model is a neural network, and a policy that keeps
climbing its score finds replies it rates highly that no person would (adversarial examples of the
simulator). On the world, each step also logs the simulated labeler's own score of the same replies
(`labeler_score`), so the point where the two part shows in `rlhf_reward.png` of the report.

    picochat rlhf --run runs/demo                      # <run>/sft + <run>/rm -> <run>/rlhf/
    picochat rlhf --run runs/demo --steps 160          # 4x longer: watch the labeler's score fall

The prompts default to the world's open prompts (`<run>/prefs/prompts.jsonl`); `--prompts` takes
any JSONL of `{"prompt", "answer"}` rows (the answer is not used). Writes `<run>/rlhf/`, a chat stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from picochat.chat import render
from picochat.checkpoint import CheckpointError
from picochat.config import RLConfig, add_common_args, add_dataclass_args, apply_overrides, get_preset
from picochat.io import read_json
from picochat.model import Transformer
from picochat.run import REWARD_STAGE, Run
from picochat.tokenizer import Tokenizer
from picochat.train.rl import GroupRewardFn, StepMetricsFn, problem_messages, run_rl
from picochat.train.rm import load_reward_model, rewards, sequences_batch
from picochat.world.preferences import load_labeler

STAGE = "rlhf"
# RL's preset with what RLHF changes: open prompts need shorter replies than worked problems, the
# reward model's scores are not 0/1, and the KL penalty keeps the policy near the SFT model.
RLHF_SETTINGS = {"steps": 40, "problems_per_step": 8, "group_size": 4, "max_new_tokens": 64, "lr": 3e-5, "kl_coef": 0.05,
                 "eval_problems": 0, "ckpt_every": 20, "replay_coef": 0.0}


def rlhf_config(preset: str) -> RLConfig:
    return dataclasses.replace(get_preset(preset).rl, **RLHF_SETTINGS)


def reward_model_scores(rm: Transformer, tok: Tokenizer, device, batch_size: int = 64) -> GroupRewardFn:
    """A group reward: the reward model's score of each reply, rendered as its pairs were (prompt,
    reply, `<|im_end|>`)."""

    @torch.no_grad()
    def score(texts: list[list[str]], problems: Sequence[dict]) -> torch.Tensor:
        sequences = [render([*problem_messages(problem), {"role": "assistant", "content": text.strip()}], tok)
                     for group, problem in zip(texts, problems, strict=True) for text in group]
        out = []
        for start in range(0, len(sequences), batch_size):
            inputs, lengths = sequences_batch(sequences[start : start + batch_size])
            out.append(rewards(rm, inputs.to(device), lengths).cpu())
        return torch.cat(out).view(len(texts), -1)

    return score


def labeler_metrics(run: Run) -> StepMetricsFn | None:
    """The world's labeler scoring each step's replies (`labeler_score`), or None without a world."""
    if not (run.prefs / "labeling.json").is_file():
        return None
    labeler = load_labeler(run.root)

    def metrics(texts: list[list[str]], problems: Sequence[dict]) -> dict:
        scores = [labeler.score(text.strip(), problem["subject"]) for group, problem in zip(texts, problems)
                  if "subject" in problem for text in group]
        return {"labeler_score": round(sum(scores) / len(scores), 4)} if scores else {}

    return metrics


def check_tokenizers(rm_meta: dict, policy_dir: Path, rm_dir: Path) -> None:
    """Refuse a reward model and a policy trained with different tokenizers: the reward model would
    read the policy's token ids as other text."""
    policy_tok = read_json(policy_dir / "model.json", CheckpointError).get("tokenizer")
    if rm_meta.get("tokenizer") and policy_tok and rm_meta["tokenizer"] != policy_tok:
        raise ValueError(f"{rm_dir}: the reward model was trained with tokenizer {rm_meta['tokenizer'][:12]}, the policy "
                         f"in {policy_dir} with {policy_tok[:12]}; train the reward model from this policy's run")


def run_rlhf(run_dir: Path, preset: str = "cpu", cfg: RLConfig | None = None, init: Path | None = None,
             reward_dir: Path | None = None, prompts: Sequence[str] | None = None, resume: bool = False,
             device: str = "auto", join_group: bool = True) -> dict:
    """RL from `<init or run/sft>` against the reward model `<reward_dir or run/rm>`; writes `<run>/rlhf/`.
    join_group=False: one process even under torchrun (see `setup_runtime`)."""
    run = Run(run_dir)
    cfg = cfg or rlhf_config(preset)
    init = Path(init) if init else run.stage("sft")
    reward_dir = Path(reward_dir) if reward_dir else run.stage(REWARD_STAGE)
    local_gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # each rank's own GPU under torchrun
    rm, rm_meta = load_reward_model(reward_dir, local_gpu if device == "cuda" else "cpu")
    check_tokenizers(rm_meta, init, reward_dir)
    specs = list(prompts) if prompts else [str(run.prefs / "prompts.jsonl")]
    tok = Tokenizer.load(run.tokenizer)
    return run_rl(run_dir, preset, cfg, init, specs, resume=resume, device=device, stage=STAGE,
                  group_reward=reward_model_scores(rm, tok, rm.lm_head.weight.device), step_metrics=labeler_metrics(run),
                  join_group=join_group)


def register_cli(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--init", default=None, help="policy to start from and to stay close to (default: <run>/sft)")
    parser.add_argument("--reward-model", default=None, help="reward model folder from `picochat rm` (default: <run>/rm)")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="FILE[:WEIGHT]",
                        help="prompts, JSONL of {prompt, answer} (answer unused) (default: <run>/prefs/prompts.jsonl, "
                             "the world's open prompts from `picochat prefs sample`)")
    add_dataclass_args(parser, RLConfig)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    cfg = apply_overrides(rlhf_config(args.preset), args)
    summary = run_rlhf(Path(args.run), args.preset, cfg, args.init, args.reward_model, args.prompts, args.resume, args.device)
    shown = {k: summary[k] for k in ("reward", "labeler_score", "kl", "seconds") if k in summary}
    print(f"rlhf: done {shown} -> {Path(args.run) / STAGE}")
