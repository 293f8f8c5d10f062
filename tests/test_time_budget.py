"""A wall-clock budget for pretraining: the steps that fit the seconds, the learning-rate schedule laid
out over them, a final checkpoint as at the end of any run, and a resumed run continuing the schedule.

The schedule is checked with an injected clock (each step takes exactly 0.25 s of it), so nothing here
depends on how loaded the machine is; the command-line run uses the real clock and checks only what
holds at any speed. Also the recipe's knobs: untied embeddings with a learning rate of their own."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from picochat.checkpoint import latest_checkpoint, load_model
from picochat.config import TrainConfig
from picochat.data.loader import ShardLoader
from picochat.model import ModelConfig, Transformer
from picochat.tokenizer import Tokenizer
from picochat.train.budget import BudgetError, batch_budget
from picochat.train.loop import TrainingError, build_optimizers, lr_multiplier, setup_runtime, train

from test_train import TINY_MODEL_FLAGS, TINY_TRAIN, fresh_copy, metrics, one_thread_env, picochat

CFG = TrainConfig(batch_size=4, seq_len=64, total_batch_tokens=256, time_budget=5.0, warmup_steps=2, decay_frac=0.5,
                  final_lr_frac=0.1, lr=1e-2, eval_every=0, ckpt_every=7)


def quarter_second_steps():
    """A clock read twice a step (start, end) whose every step lasts 0.25 s."""
    calls = iter(range(10**6))
    return lambda: 0.25 * ((next(calls) + 1) // 2)


class KilledAfter:
    """The loader, raising once it has given `batches` batches: a run killed mid-way."""

    def __init__(self, loader, batches):
        self.loader, self.left = loader, batches
        self.batch_size, self.grad_accum = loader.batch_size, loader.grad_accum

    def __next__(self):
        if self.left == 0:
            raise RuntimeError("killed")
        self.left -= 1
        return next(self.loader)

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, state):
        self.loader.load_state_dict(state)


def budgeted_run(tiny_run, stage_dir, kill_after=None, resume=False, cfg=CFG):
    tok = Tokenizer.load(tiny_run / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=64, n_head=2, n_kv_head=1, max_seq_len=64))
    model.init_weights(cfg.seed)
    budget = batch_budget(cfg, 1, model.num_params())
    loader = ShardLoader(tiny_run / "shards", batch_size=budget.micro_batch, seq_len=cfg.seq_len, grad_accum=budget.grad_accum)
    if kill_after is not None:
        loader = KilledAfter(loader, kill_after)
    return train(model, loader, cfg, stage_dir, setup_runtime("cpu"), resume=resume, budget=budget,
                 clock=quarter_second_steps(), desc="budget")


def test_the_schedule_is_laid_out_over_the_seconds_and_a_resumed_run_continues_it(tiny_run, tmp_path, one_thread):
    straight = tmp_path / "straight"
    summary = budgeted_run(tiny_run, straight)
    records = metrics(straight)
    assert len(records) == 20 and records[-1]["train_s"] == 5.0  # 20 steps of 0.25 s fill the 5 s exactly
    assert summary["train_s"] == 5.0 and summary["time_budget"] == 5.0 and summary["tokens"] == 20 * 256
    mults = [r["lr_mult"] for r in records]
    assert mults[:2] == [0.5, 1.0]  # warmup, in steps
    for step in range(2, 19):  # decay over the last half of the seconds: step k starts at 0.25 k s
        assert mults[step] == pytest.approx(lr_multiplier(step, CFG, progress=0.25 * step / 5.0), abs=1e-5)
    assert mults[10] == 1.0 and mults[15] == pytest.approx(0.55) and mults[18] > mults[-1]
    assert mults[-1] == pytest.approx(CFG.final_lr_frac)  # the last step runs at the final learning rate
    model, _ = load_model(straight)  # the stage's model, loadable
    assert model.config.n_layer == 2
    final = latest_checkpoint(straight)
    assert final.name == "step-000020" and json.loads((final / "meta.json").read_text())["clock"]["finished"] is True

    resumed = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="killed"):
        budgeted_run(tiny_run, resumed, kill_after=10)  # dies at step 11, after the checkpoint of step 7
    assert latest_checkpoint(resumed).name == "step-000007" and not (resumed / "done.json").exists()
    budgeted_run(tiny_run, resumed, resume=True)  # a fresh clock: the checkpoint's seconds carry the schedule on
    again = metrics(resumed)
    assert [r["lr_mult"] for r in again] == mults and [r["train_s"] for r in again] == [r["train_s"] for r in records]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert budgeted_run(tiny_run, resumed, resume=True)["step"] == 20  # a finished budget is not trained again

    stepped = tmp_path / "stepped"  # a checkpoint of a run with a step horizon has no clock to continue
    budgeted_run(tiny_run, stepped, cfg=replace(CFG, time_budget=0, max_steps=3))
    with pytest.raises(TrainingError, match="no clock state"):
        budgeted_run(tiny_run, stepped, resume=True)


def test_a_negative_budget_is_refused():
    with pytest.raises(BudgetError, match="time_budget must be >= 0"):
        batch_budget(TrainConfig(time_budget=-1), 1, 1000)


def test_pretrain_with_a_short_time_budget_ends_on_time_with_a_finished_schedule(tiny_run, tmp_path):
    run = fresh_copy(tiny_run, tmp_path, "budget")
    out = picochat("pretrain", "--run", str(run), *TINY_MODEL_FLAGS, *TINY_TRAIN, "--time-budget", "3", "--eval-every", "0",
                   "--ckpt-every", "0", "--no-tie-embeddings", "--device", "cpu", env=one_thread_env())
    assert out.returncode == 0, out.stderr
    assert "a time budget of 3 s" in out.stdout
    records = metrics(run / "base")
    seconds = [r["train_s"] for r in records]
    longest = max(b - a for a, b in zip([0.0, *seconds], seconds))
    # Ends within two steps of the budget, whatever the machine's speed: the last step is foreseen from
    # the one before it, which on a loaded machine may be much shorter or longer than it.
    assert 3 - 1.5 * longest <= seconds[-1] <= 3 + 2 * longest and len(records) > 2
    assert records[-1]["lr_mult"] == pytest.approx(0.05)  # the cpu preset's final_lr_frac: the schedule finished
    assert "val_bpb" in records[-1] and (run / "base" / "done.json").exists()
    model = load_model(run / "base")[0]
    assert model.config.d_model == 64 and not model.config.tie_embeddings  # --no-tie-embeddings: two matrices
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_untied_input_embeddings_take_their_own_learning_rate():
    shape = dict(vocab_size=64, n_layer=1, d_model=16, n_head=2, n_kv_head=1, max_seq_len=8)
    untied = Transformer(ModelConfig(**shape, tie_embeddings=False))
    muon, adamw = build_optimizers(untied, "muon", lr=3e-3, embedding_lr=0.1)
    rates = {id(p): g["lr"] for g in adamw.param_groups for p in g["params"]}
    assert rates[id(untied.model.embed_tokens.weight)] == 0.1 and rates[id(untied.lm_head.weight)] == 3e-3
    assert sum(len(g["params"]) for g in muon.param_groups) == 7  # q, k, v, o, gate, up, down
    tied = Transformer(ModelConfig(**shape, tie_embeddings=True))  # one matrix: the head's rate, the knob ignored
    (adamw,) = build_optimizers(tied, "adamw", lr=3e-3, embedding_lr=0.1)
    assert {g["lr"] for g in adamw.param_groups} == {3e-3}
