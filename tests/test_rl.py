"""RL on verifiable problems: advantages, token-level loss and its masks, skipped groups, PPO
clipping, problem order, and a short run that writes the stage and resumes."""

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from conftest import one_torch_thread
from picochat.checkpoint import latest_checkpoint, save_model
from picochat.config import RLConfig
from picochat.engine import FINISH_LENGTH, FINISH_STOP, Completion
from picochat.model import ModelConfig, Transformer
from picochat.tokenizer import Tokenizer
from picochat.train.loop import TrainingError
from picochat.chat import render_for_reply
from picochat.train.rl import (Rollouts, build_batch, check_ranks, group_advantages, policy_batch, policy_loss, problems_for_step, run_rl,
                               sample_groups, token_log_probs, trained_tokens)


def tiny_model(vocab_size: int, seed: int = 0) -> Transformer:
    model = Transformer(ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=32, n_head=2, n_kv_head=1, max_seq_len=256))
    model.init_weights(seed)
    return model


# --- advantages -----------------------------------------------------------------------------------
def test_advantages_are_reward_minus_group_mean():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0], [-0.25, -0.25, -0.25, 0.75]])
    assert torch.equal(group_advantages(rewards), expected)
    equal_but_inexact = torch.full((1, 7), 0.3)  # its float mean is not exactly 0.3
    assert not group_advantages(equal_but_inexact, normalize_std=True).any()


def test_advantages_divided_by_the_group_std():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    normalized = group_advantages(rewards, normalize_std=True)
    root3 = 3**0.5  # (0, 0, 0, 1) has mean 1/4 and std sqrt(3)/4: advantages -1/sqrt(3) and sqrt(3)
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [-1 / root3, -1 / root3, -1 / root3, root3]])
    torch.testing.assert_close(normalized, expected, atol=1e-3, rtol=1e-3)


# --- sequences and masks --------------------------------------------------------------------------
def test_trained_tokens_keep_the_stop_token_and_mask_tool_results():
    tokens, chosen = trained_tokens(Completion([20, 21], FINISH_STOP, stop_id=3), tool_result_ids=(6, 7))
    assert (tokens, chosen) == ([20, 21, 3], [1, 1, 1])
    tokens, chosen = trained_tokens(Completion([20, 21], FINISH_STOP, stop_id=0), tool_result_ids=(6, 7))
    assert tokens == [20, 21, 0]  # stopped on <|endoftext|>: that is the choice reinforced or discouraged
    tokens, chosen = trained_tokens(Completion([20, 21], FINISH_LENGTH), tool_result_ids=(6, 7))
    assert (tokens, chosen) == ([20, 21], [1, 1])  # cut off: no stop token to learn
    tool_use = Completion([4, 30, 5, 6, 31, 7, 32], FINISH_STOP, stop_id=3)
    tokens, chosen = trained_tokens(tool_use, tool_result_ids=(6, 7))
    assert tokens == [4, 30, 5, 6, 31, 7, 32, 3]
    assert chosen == [1, 1, 1, 0, 0, 0, 1, 1]  # the engine's tool result is context, not the policy's choice


def test_build_batch_aligns_targets_and_masks_only_completion_tokens():
    batch = build_batch([[1, 2, 3], [1, 2]], [[10, 11], [12, 13, 14]], [[1, 1], [1, 0, 1]], [0.5, -0.5])
    assert batch.inputs.tolist() == [[1, 2, 3, 10], [1, 2, 12, 13]]
    assert batch.targets.tolist() == [[2, 3, 10, 11], [2, 12, 13, 14]]
    assert batch.mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 1]]
    assert batch.advantages.tolist() == [0.5, -0.5]


def test_loss_gives_no_gradient_to_prompt_positions():
    torch.manual_seed(0)
    model = tiny_model(64)
    prompts, completions = [[1, 5, 6, 7, 2], [1, 8, 2]], [[20, 21, 22], [23, 3]]
    batch = build_batch(prompts, completions, [[1, 1, 1], [1, 1]], [1.0, -1.0])
    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    model.lm_head.register_forward_hook(keep_logits)
    logp = token_log_probs(model, batch.inputs, batch.targets)
    loss, _ = policy_loss(logp, logp.detach(), batch.advantages, batch.mask, int(batch.mask.sum()))
    loss.backward()
    per_position = captured["logits"].grad.abs().sum(dim=-1)
    assert torch.all(per_position[0, :4] == 0) and torch.all(per_position[0, 4:7] > 0)
    assert torch.all(per_position[1, :2] == 0) and torch.all(per_position[1, 2:4] > 0)
    assert torch.all(per_position[1, 4:] == 0)  # padding


def test_loss_is_normalised_per_token_over_the_whole_step():
    advantages, mask = torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logp = torch.zeros(2, 3, requires_grad=True)
    loss, _ = policy_loss(logp, logp.detach(), advantages, mask, n_tokens=4)
    assert loss.item() == pytest.approx(-(3 * 1.0 + 1 * -1.0) / 4)  # a per-sequence mean would give 0
    loss.backward()
    assert logp.grad.tolist() == [[-0.25, -0.25, -0.25], [0.25, 0.0, 0.0]]


def test_micro_batches_add_up_to_the_full_batch_gradient():
    torch.manual_seed(0)
    model = tiny_model(64)
    batch = build_batch([[1, 5, 2], [1, 6, 7, 2], [1, 2]], [[20, 3], [21, 22, 23], [24]], [[1, 1], [1, 1, 1], [1]],
                        [0.7, -0.2, -0.5])
    n_tokens = int(batch.mask.sum())

    def gradients(chunks):
        model.zero_grad()
        for chunk in chunks:
            logp = token_log_probs(model, chunk.inputs, chunk.targets)
            policy_loss(logp, logp.detach(), chunk.advantages, chunk.mask, n_tokens)[0].backward()
        return [p.grad.clone() for p in model.parameters()]

    whole, split = gradients([batch.rows(0, 3)]), gradients([batch.rows(0, 1), batch.rows(1, 3)])
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_training_forward_scores_the_tokens_the_engine_sampled(small_tokenizer):
    """Right-padded training sequences see what the engine saw (its prompts are left-padded in a KV
    cache): at a near-zero temperature every sampled token is the training forward's argmax."""
    tok = small_tokenizer
    model = tiny_model(tok.vocab_size)
    problems = [{"prompt": "Ann has 3 apples.", "answer": 3}, {"prompt": "A much longer question about pears?", "answer": 1}]
    prompts = [render_for_reply([{"role": "user", "content": p["prompt"]}], tok) for p in problems]
    rollouts = sample_groups(model, tok, prompts, problems, replace(RLConfig(), temperature=1e-6, group_size=2, max_new_tokens=12),
                             seeds=[0, 1], reward_fn=lambda text, problem: 0.0)
    rows = [trained_tokens(group[0], None) for group in rollouts.completions]
    batch = build_batch(prompts, [r[0] for r in rows], [r[1] for r in rows], [1.0, 1.0])
    with torch.no_grad():
        predicted = model(batch.inputs).argmax(dim=-1)
    assert torch.equal(predicted[batch.mask.bool()], batch.targets[batch.mask.bool()])


def test_groups_with_equal_rewards_are_left_out(small_tokenizer):
    tok = small_tokenizer
    prompts = [[1, 40, 2], [1, 41, 2]]
    groups = [[Completion([50, 51], FINISH_STOP, tok.im_end_id), Completion([52], FINISH_STOP, tok.im_end_id)],
              [Completion([53], FINISH_STOP, tok.im_end_id), Completion([54, 55], FINISH_LENGTH)]]
    mixed = policy_batch(tok, prompts, Rollouts(groups, torch.tensor([[1.0, 1.0], [1.0, 0.0]])), normalize_std=True)
    assert mixed.inputs[:, :2].tolist() == [[1, 41], [1, 41]]  # only the second problem's samples
    assert mixed.advantages.tolist() == pytest.approx([1.0, -1.0], abs=1e-3)
    assert policy_batch(tok, prompts, Rollouts(groups, torch.tensor([[0.0, 0.0], [1.0, 1.0]])), False) is None


def test_training_rows_come_shortest_first_each_with_its_own_advantage(small_tokenizer):
    tok = small_tokenizer
    prompts = [[1, 40, 2], [1, 41, 42, 43, 2]]
    groups = [[Completion([50, 51, 52, 53], FINISH_LENGTH), Completion([54], FINISH_STOP, tok.im_end_id)],
              [Completion([55, 56], FINISH_LENGTH), Completion([57], FINISH_LENGTH)]]
    batch = policy_batch(tok, prompts, Rollouts(groups, torch.tensor([[1.0, 0.0], [0.0, 1.0]])), normalize_std=False)
    lengths = (batch.mask.cumsum(dim=1).argmax(dim=1) + 2).tolist()  # tokens in each row: last trained target + 1
    assert lengths == [5, 6, 7, 7]
    first_sampled = [int(batch.targets[row, int(batch.mask[row].nonzero()[0])]) for row in range(4)]
    assert first_sampled == [54, 57, 50, 55]
    assert batch.advantages.tolist() == [-0.5, 0.5, 0.5, -0.5]


def test_ppo_clipping_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 2)
    logp = torch.log(torch.tensor([[1.5, 1.1]])).requires_grad_(True)  # ratios 1.5 (outside 1 +- 0.2) and 1.1
    loss, stats = policy_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2), n_tokens=2, clip_eps=0.2)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0
    assert stats["clipped"] == 1
    logp.grad = None
    loss, _ = policy_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 2), n_tokens=2, clip_eps=0.2)
    loss.backward()
    assert logp.grad[0, 0] > 0  # a worse-than-average sample is still pushed down, however far it moved


def test_kl_penalty_is_zero_at_the_reference_and_positive_away_from_it():
    logp = torch.tensor([[-1.0, -2.0]])
    at_ref, stats = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), 2, ref_logp=logp, kl_coef=0.1)
    assert at_ref.item() == 0 and stats["kl"] == 0
    away, stats = policy_loss(logp, logp, torch.tensor([0.0]), torch.ones(1, 2), 2, ref_logp=logp - 0.5, kl_coef=0.1)
    assert away.item() > 0 and stats["kl"] > 0


# --- problems -------------------------------------------------------------------------------------
def test_problem_order_covers_each_problem_once_per_epoch_and_is_reproducible():
    first_epoch = [i for step in range(5) for i in problems_for_step(10, step, 2, seed=3)]
    assert sorted(first_epoch) == list(range(10))
    assert problems_for_step(10, 7, 2, seed=3) == problems_for_step(10, 7, 2, seed=3)
    assert problems_for_step(10, 0, 10, seed=3) != problems_for_step(10, 0, 10, seed=4)


# --- the stage end to end -------------------------------------------------------------------------
TINY_RL = RLConfig(steps=4, problems_per_step=2, group_size=4, max_new_tokens=8, lr=3e-3, micro_batch=5, ckpt_every=2,
                   eval_problems=3, eval_k=2)


def odd_length_reward(text: str, problem: dict) -> float:
    """A reward a random tiny model earns about half the time, so every step has something to learn."""
    return float(len(text) % 2 == 1)


@pytest.fixture(scope="module")
def rl_run(tiny_run, tmp_path_factory):
    """The tiny run's world and tokenizer with a random tiny model as its SFT stage."""
    import shutil

    run = tmp_path_factory.mktemp("rl") / "run"
    for part in ("tokenizer", "world"):
        shutil.copytree(tiny_run / part, run / part)
    tok = Tokenizer.load(run / "tokenizer")
    save_model(run / "sft", tiny_model(tok.vocab_size), {"stage": "sft"})
    return run


def dies_in_step_three(cfg: RLConfig):
    """odd_length_reward that raises KeyboardInterrupt (a kill) once step three starts rewarding."""
    calls = []

    def reward(text, problem):
        calls.append(1)
        if len(calls) > 2 * cfg.problems_per_step * cfg.group_size:
            raise KeyboardInterrupt
        return odd_length_reward(text, problem)

    return reward


def copy_run(rl_run, tmp_path, name):
    import shutil

    shutil.copytree(rl_run, tmp_path / name)
    return tmp_path / name


def test_rl_run_writes_the_stage_and_a_killed_run_resumes_to_the_same_weights(rl_run, tmp_path):
    straight = copy_run(rl_run, tmp_path, "straight")
    summary = run_rl(straight, cfg=TINY_RL, device="cpu", reward_fn=odd_length_reward)
    stage = straight / "rl"
    assert (stage / "done.json").exists() and (stage / "model.json").exists()
    records = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["reward"] <= 1 and 0 <= r["pass_rate"] <= 1 and r["response_len"] > 0 for r in records)
    assert sum(r["trained_groups"] for r in records) > 0
    assert 0 <= summary["heldout_pass@1"] <= summary["heldout_pass@k"] <= 1
    start, final = load_file(str(rl_run / "sft" / "model.safetensors")), load_file(str(stage / "model.safetensors"))
    assert any(not torch.equal(start[name], final[name]) for name in start)  # it learned something

    killed = copy_run(rl_run, tmp_path, "killed")
    with pytest.raises(KeyboardInterrupt):
        run_rl(killed, cfg=TINY_RL, device="cpu", reward_fn=dies_in_step_three(TINY_RL))
    assert latest_checkpoint(killed / "rl").name == "step-000002" and not (killed / "rl" / "done.json").exists()
    with pytest.raises(TrainingError, match="--resume"):
        run_rl(killed, cfg=TINY_RL, device="cpu", reward_fn=odd_length_reward)
    run_rl(killed, cfg=TINY_RL, device="cpu", reward_fn=odd_length_reward, resume=True)
    resumed = load_file(str(killed / "rl" / "model.safetensors"))
    for name in final:
        assert torch.equal(final[name], resumed[name]), name
    lines = (killed / "rl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]


def test_replay_adds_the_sft_loss_and_a_killed_run_resumes_to_the_same_weights(rl_run, tmp_path):
    cfg = replace(TINY_RL, replay_coef=0.5, replay_batch=2)
    straight = copy_run(rl_run, tmp_path, "straight")
    run_rl(straight, cfg=cfg, device="cpu", reward_fn=odd_length_reward)
    records = [json.loads(line) for line in (straight / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replay_loss"] > 0 for r in records)  # the world's conversations, scored every step
    without = copy_run(rl_run, tmp_path, "without")
    run_rl(without, cfg=TINY_RL, device="cpu", reward_fn=odd_length_reward)
    final = load_file(str(straight / "rl" / "model.safetensors"))
    plain = load_file(str(without / "rl" / "model.safetensors"))
    assert any(not torch.equal(final[name], plain[name]) for name in final)

    killed = copy_run(rl_run, tmp_path, "killed")
    with pytest.raises(KeyboardInterrupt):
        run_rl(killed, cfg=cfg, device="cpu", reward_fn=dies_in_step_three(cfg))
    run_rl(killed, cfg=cfg, device="cpu", reward_fn=odd_length_reward, resume=True)
    resumed = load_file(str(killed / "rl" / "model.safetensors"))
    for name in final:  # the replayed rows continue where the checkpoint left them
        assert torch.equal(final[name], resumed[name]), name


def test_rl_with_kl_and_ppo_clipping_runs(rl_run, tmp_path):
    run = copy_run(rl_run, tmp_path, "ppo")
    cfg = replace(TINY_RL, steps=2, kl_coef=0.05, clip_eps=0.2, ppo_epochs=2, normalize_std=True)
    run_rl(run, cfg=cfg, device="cpu", reward_fn=odd_length_reward)
    records = [json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["trained_groups"]]
    assert trained and all("kl" in r and "clipped" in r for r in trained)


def test_cli_runs_the_stage(rl_run, tmp_path):
    run = copy_run(rl_run, tmp_path, "cli")
    args = [sys.executable, "-m", "picochat", "rl", "--run", str(run), "--steps", "1", "--problems-per-step", "2",
            "--group-size", "2", "--max-new-tokens", "4", "--eval-problems", "2", "--eval-k", "1", "--device", "cpu"]
    out = subprocess.run(args, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rl: done" in out.stdout and (run / "rl" / "done.json").exists()


def test_settings_that_cannot_train_are_refused(rl_run):
    with pytest.raises(ValueError, match="--group-size must be at least 2"):
        run_rl(rl_run, cfg=replace(TINY_RL, group_size=1), device="cpu")
    with pytest.raises(ValueError, match="--temperature must be positive"):
        run_rl(rl_run, cfg=replace(TINY_RL, temperature=0.0), device="cpu")
    with pytest.raises(ValueError, match="--replay-coef must not be negative"):
        run_rl(rl_run, cfg=replace(TINY_RL, replay_coef=-1.0), device="cpu")
    with pytest.raises(ValueError, match="--replay-batch must be at least 1"):
        run_rl(rl_run, cfg=replace(TINY_RL, replay_batch=0), device="cpu")


# --- every rank --------------------------------------------------------------------------------------
RANKS_SCRIPT = """
import sys
from dataclasses import replace
from pathlib import Path
from picochat.config import RLConfig
from picochat.train.rl import run_rl

def odd_length_reward(text, problem):
    return float(len(text) % 2 == 1)

cfg = eval(sys.argv[2])
run_rl(Path(sys.argv[1]), cfg=cfg, device="cpu", reward_fn=odd_length_reward)
"""


def torchrun_rl(script, run, cfg: RLConfig, nproc: int = 2):
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           str(script), str(run), repr(cfg)], capture_output=True, text=True, env=env)


def test_two_processes_sample_their_share_and_update_as_one(rl_run, tmp_path):
    """Each of 2 gloo processes samples half of each step's problems (seeded per problem, so the same
    replies as one process), and their summed gradients make one process's update: same rewards,
    losses, held-out pass@k and weights after two steps, with PPO clipping, KL and replay on."""
    cfg = replace(TINY_RL, steps=2, problems_per_step=4, micro_batch=3, kl_coef=0.05, clip_eps=0.2, ppo_epochs=2,
                  replay_coef=0.5, replay_batch=2, eval_problems=4)
    single = copy_run(rl_run, tmp_path, "single")
    with one_torch_thread():  # as each torchrun process: the same order of sums, so PPO clips the same tokens
        run_rl(single, cfg=cfg, device="cpu", reward_fn=odd_length_reward)
    script = tmp_path / "rl_ranks.py"
    script.write_text(RANKS_SCRIPT)
    two = copy_run(rl_run, tmp_path, "two")
    out = torchrun_rl(script, two, cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(2 problems on each of 2 processes)" in out.stdout

    one_records, two_records = [[json.loads(line) for line in (run / "rl" / "metrics.jsonl").read_text().splitlines()]
                                for run in (single, two)]
    assert sum(r["trained_groups"] for r in one_records) > 0  # there was an update to compare
    for a, b in zip(one_records, two_records, strict=True):
        for name in ("reward", "pass_rate", "response_len", "trained_groups", "heldout_pass@1", "heldout_pass@k"):
            assert a.get(name) == b.get(name), (a["step"], name)
        for name in ("loss", "kl", "clipped", "replay_loss", "grad_norm"):
            assert b[name] == pytest.approx(a[name], rel=1e-3, abs=1e-5), (a["step"], name)
    start = load_file(str(rl_run / "sft" / "model.safetensors"))
    one, other = load_file(str(single / "rl" / "model.safetensors")), load_file(str(two / "rl" / "model.safetensors"))
    assert any(not torch.equal(start[name], one[name]) for name in start)
    for name in one:
        torch.testing.assert_close(other[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_step_that_does_not_split_over_the_ranks_is_refused():
    check_ranks(replace(TINY_RL, problems_per_step=4), 2)
    with pytest.raises(TrainingError, match="--problems-per-step 3 does not split over 2 processes; make it a multiple of 2"):
        check_ranks(replace(TINY_RL, problems_per_step=3), 2)
    check_ranks(replace(TINY_RL, problems_per_step=4, replay_batch=3), 2)  # nothing replayed: no rows to split
    with pytest.raises(TrainingError, match="--replay-batch 3 does not split"):
        check_ranks(replace(TINY_RL, problems_per_step=4, replay_coef=0.5, replay_batch=3), 2)
