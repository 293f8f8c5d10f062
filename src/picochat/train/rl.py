"""Reinforcement learning on verifiable problems: the model practises problems with checkable answers
and is pushed toward the sampled replies that get them right (the lecture's third stage).

Each step takes `problems_per_step` training problems and samples a group of `group_size` replies
to each with the engine (all problems in one batch; the samples of a problem share its prefill).
A reply's reward is 1 when it is right (`picochat.data.tasks.reward`: the final `Answer:` line of a
word problem, the short answer of a question, "I don't know" about what does not exist); its
advantage is the reward minus its group's mean (divided by the group's standard deviation with
`normalize_std`), so no value network is needed (GRPO family). Groups whose replies all got the
same reward carry no signal and are dropped. The loss is the policy gradient on the sampled tokens
only (the prompt, and tool results the engine forced in, are masked), summed over tokens and
divided by the number of trained tokens in the whole step (token-level normalisation, as in DAPO
and nanochat). Optional: a KL penalty to the frozen starting model (`kl_coef`), PPO-style ratio
clipping over several updates on the same samples (`clip_eps`, `ppo_epochs`), and replay
(`replay_coef`, InstructGPT's "PPO-ptx"): the SFT loss on a batch of the SFT mixture added to
every step's loss.

On the world, the problems are its word problems mixed 3 : 1 with questions about facts the model
knows. A policy gradient that only ever sees word problems is
free to move what the model does with a question about a fact, and how far it moves changes with the
seed and the CPU's rounding; practising those questions too holds that behaviour in place
(BENCHMARKS.md, "RL over seeds").

    picochat rl --run runs/demo                        # <run>/sft -> <run>/rl, problems from the world
    picochat rl --run runs/x --problems gsm8k/train.jsonl --heldout gsm8k/test.jsonl --preset gpu-135m

Writes `<run>/rl/` with the layout of every stage (see picochat.checkpoint); `--resume` continues
a killed run to the same weights (sampling is seeded per step and problem, problem order per epoch).

Under torchrun every rank samples and rewards its share of each step's problems (`problems_per_step`
must split evenly) and computes its groups' advantages; the ranks' gradients are summed, each loss
already divided by the whole step's trained tokens, so the update is one process's on the same
samples; the held-out pass@k is split over the ranks too, and rank 0 writes the stage.

    torchrun --standalone --nproc_per_node=8 -m picochat -- rl --run runs/gpu --preset gpu-135m
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from picochat.chat import REPLY_STOP_IDS, render_for_reply
from picochat.checkpoint import load_model
from picochat.config import RLConfig, add_common_args, add_dataclass_args, apply_overrides, get_preset
from picochat.data.conversations import load_mixture, mix, parse_data_spec
from picochat.data.loader import ConversationLoader
from picochat.data.tasks import read_problems, reward
from picochat.engine import FINISH_STOP, Completion, Sampling, generate
from picochat.evaluate import problem_metrics
from picochat.model import IGNORE_INDEX, Transformer
from picochat.run import Run
from picochat.tokenizer import TOOL_RESULT_END_ID, TOOL_RESULT_ID, Tokenizer
from picochat.tools import Tools, tools_offered
from picochat.train.loop import Runtime, TrainingError, autocast, build_optimizers, run_steps, setup_runtime, teardown_runtime

RewardFn = Callable[[str, dict], float]
# Rewards of a whole step at once: (replies as text, [problem][sample]; the problems) -> (problems, group)
# tensor. RLHF scores replies with a reward model this way, in batches, instead of checking each.
GroupRewardFn = Callable[[list[list[str]], Sequence[dict]], torch.Tensor]
# Extra metrics of a step's replies, logged beside the reward (RLHF: the labeler's own score).
StepMetricsFn = Callable[[list[list[str]], Sequence[dict]], dict]


# --- problems -------------------------------------------------------------------------------------
def problems_for_step(n_problems: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of the problems of `step`: epochs over a permutation drawn per epoch from the seed,
    so a resumed run sees exactly the problems an uninterrupted one would."""
    orders: dict[int, list[int]] = {}
    chosen = []
    for position in range(step * per_step, (step + 1) * per_step):
        epoch, offset = divmod(position, n_problems)
        if epoch not in orders:
            orders[epoch] = list(range(n_problems))
            random.Random(f"rl-problems-{seed}-{epoch}").shuffle(orders[epoch])
        chosen.append(orders[epoch][offset])
    return chosen


def check_config(cfg: RLConfig) -> None:
    """Refuse settings that cannot train, with the flag to change."""
    positive = ("steps", "problems_per_step", "micro_batch", "ppo_epochs", "max_new_tokens", "replay_batch")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.group_size < 2:
        raise ValueError(f"--group-size must be at least 2 (advantages compare samples of a problem), got {cfg.group_size}")
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature must be positive: RL learns from samples, got {cfg.temperature}")
    for name in ("clip_eps", "kl_coef", "replay_coef", "eval_problems", "eval_every", "ckpt_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative, got {getattr(cfg, name)}")


def check_ranks(cfg: RLConfig, world_size: int) -> None:
    """Refuse a step's problems (or replayed rows) that do not split evenly over the processes."""
    for name in ("problems_per_step",) + ("replay_batch",) * (cfg.replay_coef > 0):
        if getattr(cfg, name) % world_size:
            raise TrainingError(f"--{name.replace('_', '-')} {getattr(cfg, name)} does not split over {world_size} "
                                f"processes; make it a multiple of {world_size}")


# --- the algorithm --------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, normalize_std: bool = False, eps: float = 1e-4) -> torch.Tensor:
    """rewards (problems, group) -> reward minus the group's mean, optionally over its (population)
    standard deviation; exactly zero for a group whose rewards are all equal (no rounding residue)."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)
    all_equal = (rewards.max(dim=1).values == rewards.min(dim=1).values)[:, None]
    return centred.masked_fill(all_equal, 0.0)


def trained_tokens(completion: Completion, tool_result_ids: tuple[int, int] | None) -> tuple[list[int], list[int]]:
    """(completion tokens to train on, 1 where the policy chose the token). The stop token it
    sampled is appended when the completion stopped, so the model is reinforced to stop (or not to
    stop that way); tool results, which the engine forced in, are kept as context but masked."""
    tokens = list(completion.tokens) + ([completion.stop_id] if completion.finish_reason == FINISH_STOP else [])
    chosen, forced = [], False
    for token in tokens:
        if tool_result_ids and token == tool_result_ids[0]:
            forced = True
        chosen.append(0 if forced else 1)
        if tool_result_ids and token == tool_result_ids[1]:
            forced = False
    return tokens, chosen


@dataclass
class PolicyBatch:
    """Sequences to train on, right-padded: position t predicts targets[:, t] from inputs[:, :t+1]."""

    inputs: torch.Tensor  # (N, T) token ids
    targets: torch.Tensor  # (N, T) next token ids
    mask: torch.Tensor  # (N, T) float, 1 where the target is a sampled completion token
    advantages: torch.Tensor  # (N,)

    def rows(self, start: int, stop: int) -> PolicyBatch:
        """Rows start:stop, without the trailing columns where none of them is trained."""
        trained_columns = self.mask[start:stop].any(dim=0).nonzero()
        width = int(trained_columns.max()) + 1 if len(trained_columns) else 1
        return PolicyBatch(self.inputs[start:stop, :width], self.targets[start:stop, :width],
                           self.mask[start:stop, :width], self.advantages[start:stop])


def build_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                chosen: Sequence[Sequence[int]], advantages: Sequence[float]) -> PolicyBatch:
    """Concatenate each prompt with its completion; the loss mask covers the completion tokens
    the policy chose (`chosen`), never the prompt."""
    sequences = [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)]
    width = max(len(s) for s in sequences) - 1
    inputs = torch.zeros(len(sequences), width, dtype=torch.long)
    targets = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width)
    for row, (prompt, sequence, picked) in enumerate(zip(prompts, sequences, chosen, strict=True)):
        n = len(sequence) - 1
        inputs[row, :n] = torch.tensor(sequence[:-1])
        targets[row, :n] = torch.tensor(sequence[1:])
        mask[row, len(prompt) - 1 : n] = torch.tensor(picked, dtype=torch.float)
    return PolicyBatch(inputs, targets, mask, torch.tensor(advantages, dtype=torch.float))


def token_log_probs(model: Transformer, inputs: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(targets[:, t] | inputs[:, :t+1]) for every position, (N, T) float32, under the
    distribution the tokens were sampled from (softmax of logits / temperature)."""
    logits = model(inputs)
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                n_tokens: int, clip_eps: float = 0.0, ref_logp: torch.Tensor | None = None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Policy-gradient loss summed over the masked tokens and divided by `n_tokens`, the trained
    tokens of the whole step (so micro-batches add up to the same gradient).

    Per token: -ratio * advantage with ratio = p / p_old (exactly 1 on-policy, where its gradient is
    the REINFORCE gradient); with clip_eps, PPO's pessimistic -min(ratio * A, clip(ratio) * A); with
    kl_coef, plus kl_coef times the k3 estimate of KL(policy || reference)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -ratio * adv
    stats = {}
    if clip_eps > 0:
        per_token = torch.maximum(per_token, -ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        stats["clipped"] = float((((ratio - 1).abs() > clip_eps).float() * mask).sum())
    if kl_coef > 0 and ref_logp is not None:
        log_ratio = ref_logp - logp
        kl = torch.exp(log_ratio) - log_ratio - 1
        per_token = per_token + kl_coef * kl
        stats["kl"] = float((kl.detach() * mask).sum())
    return (per_token * mask).sum() / n_tokens, stats


@dataclass
class Rollouts:
    """One step's samples: completions[i][j] is sample j of problem i."""

    completions: list[list[Completion]]
    rewards: torch.Tensor  # (problems, group)
    texts: list[list[str]] = field(default_factory=list)  # the completions decoded


def problem_seeds(seed: int, step: int, positions: Sequence[int]) -> list[int]:
    """The sampling seed of each problem of a step, by its position in the step: the same whichever
    rank samples it, so 1 and N processes draw the same replies."""
    return [(seed * 1_000_003 + step) * 100_003 + position for position in positions]


def sample_groups(model: Transformer, tok: Tokenizer, prompts: Sequence[Sequence[int]], problems: Sequence[dict],
                  cfg: RLConfig, seeds: Sequence[int], reward_fn: RewardFn = reward, tools: Tools | None = None,
                  group_reward: GroupRewardFn | None = None) -> Rollouts:
    """Sample `group_size` replies per prompt in one batched call, each prompt from its own random
    stream (`seeds`), and reward each (with `reward_fn` one by one, or `group_reward` all at once);
    `tools` runs the tool calls of replies to problems that offer them (default: the calculator). A
    call where none are offered gets no result: RL that ran it taught the model to call the
    calculator unasked (BENCHMARKS.md, "A tool result's number is the token the model copies")."""
    model.eval()
    sampling = Sampling(cfg.temperature, stop_ids=REPLY_STOP_IDS)  # as every reply ends
    completions = generate(model, prompts, cfg.max_new_tokens, sampling, num_samples=cfg.group_size, tokenizer=tok,
                           tools=tools, seeds=seeds, run_tools=[tools_offered(problem_messages(p)) for p in problems])
    model.train()
    texts = [[tok.decode(c.tokens) for c in group] for group in completions]
    if group_reward is not None:
        rewards = group_reward(texts, problems).float().cpu()
    else:
        rewards = torch.tensor([[reward_fn(text, problem) for text in group]
                                for group, problem in zip(texts, problems, strict=True)], dtype=torch.float)
    return Rollouts(completions, rewards, texts)


def policy_batch(tok: Tokenizer, prompts: Sequence[Sequence[int]], rollouts: Rollouts, normalize_std: bool) -> PolicyBatch | None:
    """The training sequences of the groups with any non-zero advantage, shortest first; None when
    there are none. Sorted by length, the rows of a micro-batch are alike and little of it is padding
    (BENCHMARKS.md: the cpu preset's update is a third faster)."""
    advantages = group_advantages(rollouts.rewards, normalize_std)
    tool_ids = (TOOL_RESULT_ID, TOOL_RESULT_END_ID)
    rows = []
    for prompt, group, group_adv in zip(prompts, rollouts.completions, advantages):
        if not group_adv.any():
            continue
        for completion, adv in zip(group, group_adv.tolist()):
            tokens, chosen = trained_tokens(completion, tool_ids)
            rows.append((prompt, tokens, chosen, adv))
    rows.sort(key=lambda row: len(row[0]) + len(row[1]))
    return build_batch(*zip(*rows)) if rows else None


def sum_over_ranks(rt: Runtime, values: Sequence[float]) -> list[float]:
    """Each value summed over the ranks (itself in one process)."""
    if not rt.distributed:
        return list(values)
    totals = torch.tensor(values, dtype=torch.float64, device=rt.device)
    dist.all_reduce(totals)
    return totals.tolist()


def all_reduce_gradients(model: Transformer, rt: Runtime) -> None:
    """Sum every gradient over the ranks. Not DDP: the ranks' batches have different numbers of
    micro-batches (or none), and each loss is already divided by the whole step's trained tokens."""
    if not rt.distributed:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)


def update(model: Transformer, optimizers: list, batch: PolicyBatch | None, cfg: RLConfig, rt: Runtime,
           reference: Transformer | None, replay: tuple[torch.Tensor, torch.Tensor] | None = None,
           n_tokens: int | None = None) -> dict:
    """`ppo_epochs` optimizer steps on the batch, each accumulating micro-batches of `micro_batch` rows,
    plus `replay_coef` times the SFT loss on the `replay` rows (inputs, targets) at each of them.

    Over several ranks each passes its own batch and replay rows, `n_tokens` is the trained tokens of
    all the ranks' batches, and the update (and the returned totals) equal one process's on all of them."""
    n_tokens = max(1, int(n_tokens if n_tokens is not None else batch.mask.sum() if batch is not None else 0))
    if replay is not None:
        replay_targets = int((replay[1] != IGNORE_INDEX).sum())
        replay_targets = max(1, int(sum_over_ranks(rt, [replay_targets])[0]))
    rows = len(batch.advantages) if batch is not None else 0
    chunks = [batch.rows(i, i + cfg.micro_batch) for i in range(0, rows, cfg.micro_batch)]
    chunks = [PolicyBatch(*(t.to(rt.device) for t in (c.inputs, c.targets, c.mask, c.advantages))) for c in chunks]
    ref_logps = [None] * len(chunks)
    if reference is not None:
        with torch.no_grad(), autocast(rt, cfg.dtype):
            ref_logps = [token_log_probs(reference, c.inputs, c.targets, cfg.temperature) for c in chunks]
    old_logps: list[torch.Tensor] = []
    # The same keys on every rank (they are summed over the ranks), whatever this rank's batch holds.
    names = ["loss"] + ["clipped"] * (cfg.clip_eps > 0) + ["kl"] * (cfg.kl_coef > 0 and reference is not None)
    totals = dict.fromkeys(names + ["replay_loss"] * (replay is not None), 0.0)
    grad_norm = None
    for epoch in range(cfg.ppo_epochs):
        for index, (chunk, ref_logp) in enumerate(zip(chunks, ref_logps)):
            with autocast(rt, cfg.dtype):
                logp = token_log_probs(model, chunk.inputs, chunk.targets, cfg.temperature)
            if epoch == 0:  # the samples' own log-probs: the model has not moved yet
                old_logps.append(logp.detach())
            loss, stats = policy_loss(logp, old_logps[index], chunk.advantages, chunk.mask, n_tokens,
                                      cfg.clip_eps, ref_logp, cfg.kl_coef)
            loss.backward()
            if epoch == 0:
                totals["loss"] += loss.item()
                for name, value in stats.items():
                    totals[name] += value / n_tokens
        if replay is not None:  # the mean over every rank's replayed tokens
            with autocast(rt, cfg.dtype):
                replay_loss = model(replay[0].to(rt.device), replay[1].to(rt.device), reduction="none").sum() / replay_targets
            (cfg.replay_coef * replay_loss).backward()
            if epoch == 0:
                totals["replay_loss"] = replay_loss.item()
        all_reduce_gradients(model, rt)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    totals = dict(zip(totals, sum_over_ranks(rt, list(totals.values()))))
    if grad_norm is not None:
        totals["grad_norm"] = float(grad_norm)
    return totals


# --- the stage ------------------------------------------------------------------------------------
def problem_messages(problem: dict) -> list[dict]:
    """The conversation that asks a problem: its system message, if it has one, then the prompt."""
    system = [{"role": "system", "content": problem["system"]}] if problem.get("system") else []
    return [*system, {"role": "user", "content": problem["prompt"]}]


def prompt_ids(tok: Tokenizer, problems: Sequence[dict]) -> list[list[int]]:
    return [render_for_reply(problem_messages(p), tok) for p in problems]


def read_problem_mixture(specs: Sequence[str], seed: int) -> list[dict]:
    """The problems of FILE[:WEIGHT] specs: concatenated without weights; with weights, a mixture as
    large as all of them together, each file's share set by its weight (as SFT's `load_mixture`)."""
    files = [(read_problems(path), weight) for path, weight in map(parse_data_spec, specs)]
    if all(weight is None for _, weight in files):
        return [problem for problems, _ in files for problem in problems]
    return mix([(problems, 1.0 if weight is None else weight) for problems, weight in files],
               n=sum(len(problems) for problems, _ in files), seed=seed)


def training_problems(tok: Tokenizer, specs: Sequence[str], context: int, seed: int) -> tuple[list[dict], list[list[int]], int]:
    """(problems, their prompt ids, how many were left out because the prompt fills the context)."""
    problems = read_problem_mixture(specs, seed)
    prompts = prompt_ids(tok, problems)
    fits = [i for i, p in enumerate(prompts) if len(p) < context]
    if not fits:
        raise ValueError(f"{', '.join(specs)}: every prompt is longer than the model's context of {context} tokens")
    return [problems[i] for i in fits], [prompts[i] for i in fits], len(problems) - len(fits)


def gather_rollouts(rt: Runtime, rollouts: Rollouts) -> tuple[torch.Tensor, list[int], list[list[str]]]:
    """(rewards, reply lengths, texts) of the whole step, every rank's in problem order, on every rank."""
    mine = (rollouts.rewards.tolist(), [len(c.tokens) for group in rollouts.completions for c in group], rollouts.texts)
    parts = [mine]
    if rt.distributed:
        parts = [None] * rt.world_size
        dist.all_gather_object(parts, mine)
    return (torch.tensor([row for rewards, _, _ in parts for row in rewards]),
            [n for _, lengths, _ in parts for n in lengths], [t for _, _, texts in parts for t in texts])


def step_record(rewards: torch.Tensor, lengths: Sequence[int], trained: dict, sample_s: float, step_s: float,
                checked: bool = True) -> dict:
    """The metrics of one step: reward, pass rate (only for `checked` rewards, where above 0 means a right
    answer; a reward model's scores have no such line), reply length, the update's loss, time."""
    return {
        "reward": round(rewards.mean().item(), 4),
        **({"pass_rate": round((rewards.max(dim=1).values > 0).float().mean().item(), 4)} if checked else {}),
        "response_len": round(sum(lengths) / len(lengths), 2),
        "trained_groups": int(group_advantages(rewards).any(dim=1).sum()),
        **{k: round(v, 6) for k, v in trained.items()},
        "sample_s": round(sample_s, 2),
        "seconds": round(step_s, 2),
    }


def heldout_metrics(model: Transformer, tok: Tokenizer, problems: list[dict], cfg: RLConfig, rt: Runtime | None = None) -> dict:
    """pass@1 / pass@k on held-out problems, as `picochat eval` measures them (split over the ranks)."""
    metrics = problem_metrics(model, tok, problems, cfg.eval_k, rt=rt)
    return {"heldout_pass@1": round(metrics["pass@1"], 4), "heldout_pass@k": round(metrics["pass@k"], 4), "k": metrics["k"]}


def replay_loader(replay: list[str], tok: Tokenizer, seq_len: int, batch: int, seed: int, rt: Runtime) -> ConversationLoader:
    """Rows of the replayed conversations and documents (FILE[:WEIGHT] specs) for the SFT loss added to a
    step (InstructGPT's PPO-ptx): `batch` rows a step in all, split over the processes."""
    return ConversationLoader(load_mixture(replay, seed), tok, seq_len=seq_len, batch_size=batch // rt.world_size,
                              rank=rt.rank, world_size=rt.world_size, seed=seed)


def run_rl(run_dir: Path, preset: str = "cpu", cfg: RLConfig | None = None, init: Path | None = None,
           problems: Sequence[str] | None = None, heldout_path: Path | None = None, resume: bool = False,
           device: str = "auto", reward_fn: RewardFn = reward, join_group: bool = True,
           replay: list[str] | None = None, stage: str = "rl", group_reward: GroupRewardFn | None = None,
           step_metrics: StepMetricsFn | None = None) -> dict:
    """Train `<init or run/sft>` with RL on the problems and write `<run>/<stage>/`; returns the summary.
    With cfg.replay_coef > 0, `replay` (FILE[:WEIGHT] specs, default the world's SFT mixture) is replayed.
    `group_reward` replaces `reward_fn` (RLHF's reward model); `step_metrics` adds to each step's record.

    join_group=False runs in one process even under torchrun (see `setup_runtime`)."""
    run = Run(run_dir)
    cfg = cfg or get_preset(preset).rl
    check_config(cfg)
    init = Path(init) if init else run.stage("sft")
    specs = [str(spec) for spec in problems] if problems else run.world_rl_problems
    heldout_path = Path(heldout_path) if heldout_path else run.eval_problems
    rt = setup_runtime(device, join_group)
    try:
        check_ranks(cfg, rt.world_size)
        per_rank = cfg.problems_per_step // rt.world_size
        tok = Tokenizer.load(run.tokenizer)
        model, _ = load_model(init, rt.device)
        problems, prompts, too_long = training_problems(tok, specs, model.config.max_seq_len, cfg.seed)
        tools = Tools(tok, run.open_index())  # the calculator, and search over the run's index if it has one
        heldout = read_problems(heldout_path)[: cfg.eval_problems] if cfg.eval_problems else []
        reference = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef > 0 else None
        model.train()
        optimizers = build_optimizers(model, "adamw", cfg.lr, weight_decay=cfg.weight_decay)
        stateful = {}
        if cfg.replay_coef > 0:
            replay = replay or [str(path) for path in run.world_sft_data]
            stateful["replay_loader"] = replay_loader(replay, tok, model.config.max_seq_len, cfg.replay_batch, cfg.seed, rt)
        if rt.is_main:
            print(f"{stage}: {len(problems):,} problems from {', '.join(specs)} ({too_long} longer than the context left out), "
                  f"{cfg.steps} steps of {cfg.problems_per_step} problems x {cfg.group_size} samples"
                  + (f" ({per_rank} problems on each of {rt.world_size} processes)" if rt.distributed else "") + f", from {init}"
                  + (f"; replaying {cfg.replay_batch} rows a step of {', '.join(replay)}" if stateful else ""))

        def step_fn(step: int) -> dict:
            t0 = time.perf_counter()
            chosen = problems_for_step(len(problems), step, cfg.problems_per_step, cfg.seed)
            positions = range(rt.rank * per_rank, (rt.rank + 1) * per_rank)  # this rank's share of the step
            step_prompts = [prompts[chosen[i]] for i in positions]
            rollouts = sample_groups(model, tok, step_prompts, [problems[chosen[i]] for i in positions], cfg,
                                     seeds=problem_seeds(cfg.seed, step, positions), reward_fn=reward_fn, tools=tools,
                                     group_reward=group_reward)
            sample_s = time.perf_counter() - t0
            batch = policy_batch(tok, step_prompts, rollouts, cfg.normalize_std)
            replay_rows = next(stateful["replay_loader"]) if stateful else None
            n_tokens = sum_over_ranks(rt, [float(batch.mask.sum()) if batch is not None else 0.0])[0]
            if n_tokens == 0 and replay_rows is None:
                trained = {"loss": 0.0}
            else:
                trained = update(model, optimizers, batch, cfg, rt, reference, replay_rows, n_tokens=int(n_tokens))
            rewards, lengths, texts = gather_rollouts(rt, rollouts)
            record = step_record(rewards, lengths, trained, sample_s, time.perf_counter() - t0, checked=group_reward is None)
            if step_metrics is not None:
                record.update(step_metrics(texts, [problems[i] for i in chosen]))
            if heldout and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps):
                record.update(heldout_metrics(model, tok, heldout, cfg, rt))
            return record

        info = {"stage": stage, "preset": preset, "tokenizer": tok.fingerprint, "init": str(init), "problems": specs}
        return run_steps(run.stage(stage), model, optimizers, rt, cfg.steps, step_fn, resume=resume,
                         ckpt_every=cfg.ckpt_every, desc=stage, info=info, stateful=stateful,
                         meta={"rl_config": asdict(cfg)}, summary={"rl_config": asdict(cfg)},
                         postfix=("reward", "pass_rate", "response_len", "loss", "seconds"))
    finally:
        teardown_runtime(rt)


def register_cli(parser: argparse.ArgumentParser) -> None:
    add_common_args(parser)
    parser.add_argument("--init", default=None, help="model folder to start from (default: <run>/sft)")
    parser.add_argument("--problems", nargs="+", default=None, metavar="FILE[:WEIGHT]",
                        help="training problems, JSONL of {prompt, answer} (an integer answer to a worked problem, or "
                             "a short text answer) or GSM8K {question, answer}; FILE:WEIGHT mixes files by weight "
                             "(default: the world's word problems tasks-rl.jsonl:3 and fact questions tasks-rl-facts.jsonl:1)")
    parser.add_argument("--heldout", default=None,
                        help="held-out problems for pass@1 / pass@k, same formats (default: <run>/world/eval/tasks.jsonl, "
                             "the set `picochat eval` uses)")
    parser.add_argument("--replay", nargs="+", default=None, metavar="FILE[:WEIGHT]",
                        help="with --replay-coef > 0: conversation or document files replayed with the SFT loss "
                             "(default: the world's SFT mixture, as `picochat sft` trains on)")
    add_dataclass_args(parser, RLConfig)
    parser.set_defaults(func=_cmd)


def _cmd(args) -> None:
    cfg = apply_overrides(get_preset(args.preset).rl, args)
    summary = run_rl(Path(args.run), args.preset, cfg, args.init, args.problems, args.heldout, args.resume, args.device,
                     replay=args.replay)
    shown = {k: summary[k] for k in ("reward", "heldout_pass@1", "heldout_pass@k", "seconds") if k in summary}
    print(f"rl: done {shown} -> {Path(args.run) / 'rl'}")
