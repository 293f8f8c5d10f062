"""`picochat plan` and the GPU check script, on CPU."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from picochat.config import PRESETS
from picochat.plan import make_plan

REPO = Path(__file__).resolve().parents[1]


def picochat(*args):
    return subprocess.run([sys.executable, "-m", "picochat", *args], capture_output=True, text=True)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_plan_prints_every_figure_for_every_preset(name):
    out = picochat("plan", "--preset", name, "--gpus", "1", "8")
    assert out.returncode == 0, out.stdout + out.stderr
    one, eight = out.stdout.split("\n\n")
    for figure in ("parameters", "without embeddings", "tokens", "steps", "accumulated", "FLOPs", "memory/GPU",
                   "optimizer", "activations", "logits", "hours at 40% MFU"):
        assert figure in one and figure in eight, figure
    assert one.splitlines()[2] == eight.splitlines()[2]  # the same tokens and steps on 1 and 8 GPUs


def test_plan_warns_when_data_repeats_or_memory_does_not_fit(tiny_run):
    out = picochat("plan", "--preset", "cpu", "--gpus", "1", "--shards", str(tiny_run / "shards"), "--max-epochs", "2")
    assert out.returncode == 1 and "epochs" in out.stdout and "WARNING: the data would be read" in out.stdout
    out = picochat("plan", "--preset", "gpu-564m", "--gpus", "8", "--batch-size", "64")
    assert out.returncode == 1 and "does not fit a H100's 80 GB" in out.stdout


def test_memory_estimate_shrinks_with_fsdp_and_activation_checkpointing():
    cfg = PRESETS["gpu-564m"].pretrain
    plain = make_plan("gpu-564m", cfg, 8).memory
    sharded = make_plan("gpu-564m", dataclasses.replace(cfg, fsdp=True), 8).memory
    recomputed = make_plan("gpu-564m", dataclasses.replace(cfg, activation_checkpointing=True), 8).memory
    assert sharded["weights"] == plain["weights"] / 8 and sharded["optimizer"] == plain["optimizer"] / 8
    assert recomputed["activations"] < plain["activations"] / 4
    assert make_plan("gpu-564m", cfg, 8).hours == pytest.approx(make_plan("gpu-564m", cfg, 1).hours / 8)


def test_gpu_check_runs_on_cpu_with_a_tiny_shape():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--device", "cpu", "--steps", "6",
                          "--presets", "gpu-135m"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    row = [line for line in out.stdout.splitlines() if line.startswith("| gpu-135m")]
    assert len(row) == 1 and row[0].endswith("| yes |")
