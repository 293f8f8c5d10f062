"""The token budget: a global batch in tokens and a horizon that do not depend on the number of processes."""

import argparse
import dataclasses

import pytest
import torch

from picochat.config import PRESETS, TrainConfig, add_dataclass_args, apply_overrides, get_preset
from picochat.model import ModelConfig, Transformer
from picochat.train.budget import BudgetError, batch_budget


def preset_params(name: str) -> int:
    p = PRESETS[name]
    with torch.device("meta"):
        return Transformer(ModelConfig(vocab_size=p.vocab_size, **p.model)).num_params()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_one_two_and_eight_processes_plan_the_same_tokens_and_steps(name):
    for stage in ("pretrain", "sft"):
        cfg = getattr(PRESETS[name], stage)
        budgets = [batch_budget(cfg, world_size, preset_params(name)) for world_size in (1, 2, 8)]
        assert len({(b.steps, b.tokens_per_step, b.tokens) for b in budgets}) == 1, (name, stage, budgets)
        assert budgets[0].tokens_per_step == cfg.total_batch_tokens
        for b in budgets:
            assert b.micro_batch <= cfg.batch_size
            assert b.micro_batch * b.grad_accum * b.world_size * b.seq_len == cfg.total_batch_tokens


def test_the_cpu_preset_keeps_its_one_process_layout():
    for cfg, steps in ((PRESETS["cpu"].pretrain, 900), (PRESETS["cpu"].sft, 380)):
        b = batch_budget(cfg, 1, preset_params("cpu"))
        assert (b.micro_batch, b.grad_accum, b.steps, b.tokens_per_step) == (8, 1, steps, 8 * 256)


def test_a_horizon_in_tokens_per_parameter_gives_the_steps():
    cfg = TrainConfig(seq_len=100, batch_size=4, total_batch_tokens=800, max_steps=0, tokens_per_param=20)
    assert batch_budget(cfg, 1, 1000).steps == 25  # 20 x 1000 tokens / 800 per step
    assert batch_budget(dataclasses.replace(cfg, tokens_per_param=0, max_tokens=801), 2, 1000).steps == 2  # rounded up
    assert batch_budget(cfg, 2, 1000).grad_accum == 1 and batch_budget(cfg, 1, 1000).grad_accum == 2


def test_a_global_batch_that_does_not_split_is_refused_with_a_fix():
    cfg = TrainConfig(seq_len=100, batch_size=5, total_batch_tokens=1000, max_steps=10)
    with pytest.raises(BudgetError, match="not a multiple of seq_len 100 x 3 processes"):
        batch_budget(cfg, 3, 1)
    with pytest.raises(BudgetError, match="use --batch-size 2"):
        batch_budget(dataclasses.replace(cfg, batch_size=3), 1, 1)  # 10 rows do not split into 3s
    with pytest.raises(BudgetError, match="exactly one of max_steps, max_tokens, tokens_per_param"):
        batch_budget(dataclasses.replace(cfg, max_tokens=5000), 1, 1)


def test_a_horizon_on_the_command_line_replaces_the_presets():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    preset = get_preset("gpu-small").pretrain  # the old name, an alias
    assert preset.tokens_per_param and not preset.max_steps
    cfg = apply_overrides(preset, parser.parse_args(["--max-steps", "7"]))
    assert (cfg.max_steps, cfg.max_tokens, cfg.tokens_per_param) == (7, 0, 0.0)
    cfg = apply_overrides(PRESETS["cpu"].pretrain, parser.parse_args(["--max-tokens", "4096"]))
    assert (cfg.max_steps, cfg.max_tokens) == (0, 4096) and batch_budget(cfg, 1, 1).steps == 2
