"""The training loop: schedule, a killed run resumes to the same weights, 2-process DDP equals 1 process,
SFT on conversations, and base-model sampling."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
import time
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from picochat.checkpoint import latest_checkpoint, save_training_state
from picochat.config import TrainConfig
from picochat.model import ModelConfig, Transformer
from picochat.train import loop
from picochat.train.loop import MetricsLog, Runtime, TrainingError, autocast, lr_multiplier
from picochat.train.muon import native_bfloat16

from conftest import TINY_MODEL_FLAGS

TINY_TRAIN = ["--seq-len", "64", "--batch-size", "4", "--total-batch-tokens", "256", "--eval-batches", "2", "--lr", "1e-2"]


def picochat(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "picochat", *args], capture_output=True, text=True, env=env, **kw)


def fresh_copy(tiny_run, tmp_path, name):
    run = tmp_path / name
    run.mkdir()
    for part in ("tokenizer", "shards", "world"):
        shutil.copytree(tiny_run / part, run / part)
    return run


def weights(stage_dir):
    return load_file(str(stage_dir / "model.safetensors"))


def one_thread_env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def test_lr_schedule_warms_up_holds_and_decays():
    cfg = replace(TrainConfig(), max_steps=100, warmup_steps=10, decay_frac=0.5, final_lr_frac=0.1)
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(30, cfg) == 1.0
    assert lr_multiplier(75, cfg) == pytest.approx(0.55)
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)


def test_auto_dtype_autocasts_to_bfloat16_only_where_the_device_has_it(monkeypatch):
    rt, x = Runtime(torch.device("cpu"), 0, 1, 0), torch.randn(4, 4)
    for native in (True, False):
        monkeypatch.setattr(loop, "native_bfloat16", lambda device, native=native: native)
        with autocast(rt, "auto"):
            assert (x @ x).dtype == (torch.bfloat16 if native else torch.float32)
    with autocast(rt, "float32"):
        assert (x @ x).dtype == torch.float32
    with pytest.raises(ValueError, match="float32, bfloat16 or auto"):
        autocast(rt, "float16")


def test_a_bad_dtype_or_optimizer_is_refused_when_the_flags_are_read(tmp_path):
    for args in (["pretrain", "--dtype", "float16"], ["rl", "--dtype", "fp8"], ["dpo", "--dtype", "half"],
                 ["pretrain", "--optimizer", "sgd"]):
        result = picochat(*args, "--run", str(tmp_path / "run"))
        assert result.returncode == 2 and "invalid choice" in result.stderr, (args, result.stderr)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_killed_pretraining_resumes_to_the_same_weights(tiny_run, tmp_path):
    args = ["pretrain", *TINY_MODEL_FLAGS, *TINY_TRAIN, "--max-steps", "24", "--ckpt-every", "4", "--eval-every", "0", "--device", "cpu"]
    straight = fresh_copy(tiny_run, tmp_path, "straight")
    done = picochat(*args, "--run", str(straight), env=one_thread_env())
    assert done.returncode == 0, done.stderr

    killed = fresh_copy(tiny_run, tmp_path, "killed")
    proc = subprocess.Popen([sys.executable, "-m", "picochat", *args, "--run", str(killed)], env=one_thread_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = killed / "base" / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while not latest.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the run died before its first checkpoint"
    assert not (killed / "base" / "done.json").exists(), "the run finished before it was killed: nothing was tested"

    again = picochat(*args, "--run", str(killed), env=one_thread_env())
    assert again.returncode == 2 and "--resume" in again.stderr  # refuses to overwrite silently
    resumed = picochat(*args, "--run", str(killed), "--resume", env=one_thread_env())
    assert resumed.returncode == 0, resumed.stderr
    a, b = weights(straight / "base"), weights(killed / "base")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lines = (killed / "base" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 24  # the metrics log has each step exactly once


def metrics(stage_dir):
    return [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def torchrun(*args):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "picochat", "--",
                           *args], capture_output=True, text=True, env=one_thread_env())


# Where Muon's Newton-Schulz runs in bfloat16 (a CPU with AVX512-BF16 or AMX), sharded and whole matrix
# products round differently: a bfloat16 step (0.4%) of a Muon update, about 1.6e-4 after six steps here.
# A wrong gradient or a lost shard moves weights by about the learning rate (1e-2) instead.
WEIGHT_ATOL = 5e-4 if native_bfloat16(torch.device("cpu")) else 1e-5


@pytest.mark.slow
def test_two_processes_train_the_same_tokens_to_the_same_loss_curve_as_one(tiny_run, tmp_path):
    """The same global batch (512 tokens): one process accumulates 2 micro-batches of 4, two processes
    take one each, replicated (DDP) or sharded (FSDP2), over gloo; and a sharded run resumes the one
    process's checkpoint. Same tokens, same losses, same weights, within float tolerance."""
    common = ["pretrain", *TINY_MODEL_FLAGS, "--seq-len", "64", "--batch-size", "4", "--total-batch-tokens", "512",
              "--eval-batches", "2", "--max-steps", "6", "--ckpt-every", "3", "--eval-every", "0", "--device", "cpu"]
    single = fresh_copy(tiny_run, tmp_path, "single")
    out = picochat(*common, "--run", str(single), env=one_thread_env())
    assert out.returncode == 0, out.stderr
    assert "(1 x 4 x 64 x 2 accumulated)" in out.stdout
    one = metrics(single / "base")
    assert [r["tokens"] for r in one] == [512 * step for step in range(1, 7)]
    assert one[-1]["loss"] < one[0]["loss"]  # the curve compared is a learning one

    resumed = fresh_copy(tiny_run, tmp_path, "resumed")  # the single run's step-3 checkpoint, resumed sharded
    shutil.copytree(single / "base" / "checkpoints" / "step-000003", resumed / "base" / "checkpoints" / "step-000003")
    (resumed / "base" / "checkpoints" / "LATEST").write_text("step-000003")
    shutil.copy(single / "base" / "metrics.jsonl", resumed / "base" / "metrics.jsonl")
    for name, extra in (("ddp", []), ("fsdp", ["--fsdp"]), ("resumed", ["--fsdp", "--resume"])):
        run = tmp_path / name if name == "resumed" else fresh_copy(tiny_run, tmp_path, name)
        out = torchrun(*common, *extra, "--run", str(run))
        assert out.returncode == 0, (name, out.stderr[-3000:])
        assert "(2 x 4 x 64 x 1 accumulated)" in out.stdout
        two = metrics(run / "base")
        assert [r["tokens"] for r in two] == [r["tokens"] for r in one], name
        torch.testing.assert_close([r["loss"] for r in two], [r["loss"] for r in one], rtol=1e-4, atol=1e-4, msg=name)
        a, b = weights(single / "base"), weights(run / "base")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=WEIGHT_ATOL, msg=f"{name}: {key}")


def test_pretrain_sft_sample_chat_end_to_end(tiny_run, tmp_path):
    run = fresh_copy(tiny_run, tmp_path, "e2e")
    out = picochat("pretrain", "--run", str(run), *TINY_MODEL_FLAGS, *TINY_TRAIN, "--max-steps", "30", "--eval-every", "15", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    records = metrics(run / "base")
    assert records[-1]["loss"] < records[0]["loss"] - 0.5  # it learns
    assert 0 < records[-1]["val_bpb"] < records[14]["val_bpb"]

    out = picochat("sft", "--run", str(run), "--seq-len", "128", "--batch-size", "4", "--total-batch-tokens", "512",
                   "--max-steps", "10", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert (run / "sft" / "done.json").exists()
    sft_data = json.loads((run / "sft" / "model.json").read_text())["data"]
    assert [Path(p).name for p in sft_data] == ["sft.jsonl", "tasks-sft.jsonl", "sft-tools.jsonl", "train-00000.jsonl"]  # documents replayed

    out = picochat("sample", "--run", str(run), "--prompt", "The capital of", "--max-tokens", "8", "--seed", "1")
    assert out.returncode == 0 and out.stdout.startswith("The capital of"), out.stderr
    out = picochat("sample", "--run", str(run), "--few-shot", "2")
    assert out.returncode == 0, out.stderr
    shown = out.stdout.split("\n\n")
    assert len([s for s in shown if s.strip()]) == 2 and all(s.startswith("- ") and "the last line alone gives: - " in s
                                                              for s in shown if s.strip())
    out = picochat("chat", "--run", str(run), "--prompt", "Who are you?", "--max-tokens", "8", "--seed", "1")
    assert out.returncode == 0, out.stderr


def test_pretrain_refuses_a_tokenizer_that_does_not_match_the_shards(tiny_run, tmp_path):
    from picochat.tokenizer import Tokenizer

    run = fresh_copy(tiny_run, tmp_path, "mismatch")
    Tokenizer.train(["some other text entirely"] * 10, vocab_size=300).save(run / "tokenizer")
    out = picochat("pretrain", "--run", str(run), *TINY_MODEL_FLAGS, "--max-steps", "1")
    assert out.returncode == 2 and "another tokenizer" in out.stderr


def test_every_override_flag_explains_itself_and_applies():
    import argparse
    import dataclasses

    from picochat.config import RLConfig, add_dataclass_args, apply_overrides

    for cls in (TrainConfig, RLConfig):
        parser = argparse.ArgumentParser()
        add_dataclass_args(parser, cls)
        actions = {a.dest: a for a in parser._actions}
        for f in dataclasses.fields(cls):
            assert actions[f.name].help, f"{cls.__name__}.{f.name} has no help text"
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainConfig)
    cfg = apply_overrides(TrainConfig(), parser.parse_args(["--muon-lr", "0.01", "--compile", "--optimizer", "muon"]))
    assert (cfg.muon_lr, cfg.compile, cfg.optimizer, cfg.lr) == (0.01, True, "muon", TrainConfig().lr)


def test_a_torn_last_metrics_line_is_dropped_on_resume_and_a_broken_one_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-append
    MetricsLog(path, resume_step=2).log(step=3, loss=1.2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    path.write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(TrainingError, match=r"metrics.jsonl:2: not valid JSON"):
        MetricsLog(path, resume_step=2)
    assert path.read_text() == '{"step": 1}\n{"ste\n{"step": 2}\n'  # nothing lost


def test_temporary_checkpoint_folders_left_by_a_kill_are_removed_at_the_next_save(tmp_path):
    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, d_model=16, n_head=2, n_kv_head=1, max_seq_len=8))
    left = tmp_path / "checkpoints" / ".step-000004.abc123"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"half")
    save_training_state(tmp_path, 8, model, [], {})
    assert not left.exists() and latest_checkpoint(tmp_path).name == "step-000008"
