"""The speedrun under torchrun: rank 0 runs the single-process stages while the other ranks wait (and
stop on its failure), every rank trains in pretraining, SFT and RL and evaluates; `--docs` and `--chat` inputs."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from picochat import speedrun as sr
from picochat.data.sources import SourceError
from picochat.run import Run
from picochat.train.loop import TrainingError

TINY_PRESET_SCRIPT = """
import sys
from picochat.cli import main
from picochat.config import PRESETS, Preset, RLConfig, TrainConfig

PRESETS["tiny"] = Preset(
    model=dict(n_layer=2, d_model=64, n_head=2, n_kv_head=1, max_seq_len=256, tie_embeddings=True),
    vocab_size=512, world_mb=0.2, world_scale=0.1,
    pretrain=TrainConfig(batch_size=4, seq_len=64, total_batch_tokens=256, max_steps=6, eval_every=0, eval_batches=2, ckpt_every=0),
    sft=TrainConfig(batch_size=4, seq_len=128, total_batch_tokens=512, max_steps=4, eval_every=0, ckpt_every=0),
    rl=RLConfig(steps=2, problems_per_step=2, group_size=2, max_new_tokens=8, ckpt_every=0, eval_problems=4, eval_k=2),
)
main(sys.argv[1:])
"""


def write_docs(folder: Path, n: int = 400) -> Path:
    """JSONL documents whose only long word, 'Quetzalcoatlus', a tokenizer trained on them makes one token."""
    folder.mkdir()
    words = "the river flows past old stone bridges while merchants count copper coins".split()
    with open(folder / "part-0.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(50)) + " Quetzalcoatlus."}) + "\n")
    return folder


def write_chats(path: Path, n: int = 50) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}."}]}) + "\n")
    return path


def fake_plan(calls: list, fail: str | None = None):
    """Stages named like the real ones; each action records its name and writes its done file."""
    def action(name):
        def run(run_dir):
            calls.append(name)
            if name == fail:
                raise ValueError(f"{name} broke")
            (run_dir / f"{name}.done").touch()
        return run
    names = ["world", "tokenizer", "shards", "base", "eval base", "sft", "eval sft", "rl", "eval rl", "report"]
    return [(name, action(name), (lambda n: lambda run_dir: (run_dir / f"{n}.done").exists())(name)) for name in names]


def as_rank(monkeypatch, rank: int, world_size: int = 2, run_id: str = "run-a"):
    """torchrun's environment for one rank; the process group the speedrun holds is recorded, not joined."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", run_id)
    groups = []
    monkeypatch.setattr(sr, "setup_runtime", lambda device: groups.append("joined") or "group")
    monkeypatch.setattr(sr, "teardown_runtime", lambda group: groups.append(f"left {group}"))
    monkeypatch.setattr(sr.dist, "barrier", lambda: groups.append("barrier"))
    return groups


def test_wait_for_returns_once_rank_0_finishes_the_stage(tmp_path):
    done = tmp_path / "done"
    threading.Timer(0.2, done.touch).start()
    t0 = time.time()
    sr.wait_for(tmp_path, lambda run: (run / "done").exists(), "run-a", poll_s=0.02)
    assert done.exists() and time.time() - t0 < 5


def test_wait_for_stops_on_this_runs_failure_and_ignores_a_stale_one(tmp_path):
    is_done = lambda run: (run / "done").exists()  # noqa: E731
    sr.write_failure(tmp_path, "tokenizer", ValueError("old failure"), "run-old")
    threading.Timer(0.2, (tmp_path / "done").touch).start()
    sr.wait_for(tmp_path, is_done, "run-a", poll_s=0.02)  # a marker from another run: keeps waiting

    (tmp_path / "done").unlink()
    sr.write_failure(tmp_path, "tokenizer", ValueError("no such file"), "run-a")
    with pytest.raises(sr.SpeedrunError, match=r"rank 0 failed at stage 'tokenizer' \(ValueError: no such file\)"):
        sr.wait_for(tmp_path, is_done, "run-a", poll_s=0.02)


def test_rank_0_runs_every_stage_and_records_a_failure_for_the_others(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan(calls, fail="eval sft"))
    groups = as_rank(monkeypatch, 0)
    sr.write_failure(tmp_path, "world", ValueError("stale"), "run-a")  # from an earlier attempt: cleared at start
    with pytest.raises(ValueError, match="eval sft broke"):
        sr.speedrun(tmp_path)
    assert groups == ["joined", "left group"]  # one group for the whole run, left even on failure
    assert calls == ["world", "tokenizer", "shards", "base", "eval base", "sft", "eval sft"]
    note = json.loads((tmp_path / sr.FAILED).read_text())
    assert note == {"stage": "eval sft", "error": "ValueError: eval sft broke", "run_id": "run-a"}


def test_a_single_process_writes_no_failure_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan([], fail="world"))
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="world broke"):
        sr.speedrun(tmp_path)
    assert not (tmp_path / sr.FAILED).exists()


def test_rank_0_notes_that_it_finished_and_leaves_the_group_with_the_others(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan(calls))
    groups = as_rank(monkeypatch, 0)
    sr.speedrun(tmp_path)
    assert calls[-1] == "report" and sr.finished(tmp_path, "run-a") and not sr.finished(tmp_path, "run-b")
    assert groups == ["joined", "barrier", "left group"]


def test_other_ranks_train_and_evaluate_then_wait_for_rank_0_to_finish(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan(calls))
    monkeypatch.setattr(sr, "POLL_SECONDS", 0.02)
    groups = as_rank(monkeypatch, 1)
    for name in ("world", "tokenizer", "shards", "eval sft"):  # rank 0's work, and a stage already done
        (tmp_path / f"{name}.done").touch()
    sr.atomic_write_json(tmp_path / sr.FINISHED, {"run_id": "run-old"})  # an earlier launch's note: not this one's
    finish = threading.Timer(0.3, lambda: sr.atomic_write_json(tmp_path / sr.FINISHED, {"run_id": "run-a"}))
    finish.start()
    sr.speedrun(tmp_path)  # does not run rank 0's report; returns once rank 0's note names this launch
    assert calls == ["base", "eval base", "sft", "rl", "eval rl"] and groups == ["joined", "barrier", "left group"]
    assert not finish.is_alive()


def test_a_speedrun_whose_rl_step_does_not_split_over_the_ranks_is_refused_before_any_work(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan(calls))
    as_rank(monkeypatch, 0, world_size=3)  # the cpu preset samples 32 problems a step
    with pytest.raises(TrainingError, match="--problems-per-step 32 does not split over 3 processes"):
        sr.speedrun(tmp_path)
    assert calls == []


def test_bad_inputs_fail_before_any_work(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(SourceError, match="no such file or folder"):
        sr.speedrun(run, docs=tmp_path / "missing-fineweb")
    with pytest.raises(FileNotFoundError, match="missing.jsonl is not a conversation file"):
        sr.speedrun(run, chat=[str(tmp_path / "missing.jsonl:2")])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "oops"}\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        sr.speedrun(run, chat=[str(bad)])
    good = tmp_path / "good.jsonl"
    good.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    with pytest.raises(ValueError, match="weight"):
        sr.speedrun(run, chat=[f"{good}:-1"])
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a document"}\n')
    with pytest.raises(sr.SpeedrunError, match="--val-docs must be at least 1"):
        sr.speedrun(run, docs=docs, val_docs=0)
    assert not (run / "world").exists()


def test_docs_make_the_tokenizer_and_the_shards(tmp_path):
    from picochat.data.shards import read_manifest
    from picochat.data.sources import iter_documents
    from picochat.tokenizer import Tokenizer

    docs = write_docs(tmp_path / "docs")
    run = tmp_path / "run"
    run.mkdir()
    plan = dict((name, action) for name, action, _ in sr.stages("cpu", "cpu", docs=docs, val_docs=40))
    plan["world"](run)
    for shard in (run / "world" / "docs").glob("*.jsonl"):
        shard.unlink()
    (run / "world" / "docs" / "train-00000.jsonl").write_text('{"text": "Quetzal is a town."}\n')  # a world of one document
    plan["index"](run)
    plan["tokenizer"](run)
    plan["shards"](run)
    index = Run(run).open_index()
    assert index.search("Quetzal town")[0].text == "Quetzal is a town."  # the world's documents, news and practice
    others = "\n".join(iter_documents([Run(run).world_news_docs, Run(run).world / "docs-practice.jsonl"]))
    assert all(p.text in others for p in index.search("Quetzal town")[1:])
    assert index.search("Quetzalcoatlus") == []  # not --docs
    index.close()
    tok = Tokenizer.load(run / "tokenizer")
    assert len(tok.encode(" Quetzalcoatlus")) == 1  # learnt from --docs
    manifest = read_manifest(run / "shards")
    assert [Path(s["path"]).name for s in manifest["sources"]] == ["part-0.jsonl", "train-00000.jsonl"]  # --docs, then the world's
    assert manifest["splits"]["val"]["documents"] == 40 and manifest["splits"]["train"]["documents"] == 361


@pytest.mark.slow
def test_torchrun_speedrun_with_docs_and_chat(tmp_path):
    script = tmp_path / "tiny_speedrun.py"
    script.write_text(TINY_PRESET_SCRIPT)
    docs, chats, run = write_docs(tmp_path / "docs"), write_chats(tmp_path / "chats.jsonl"), tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), "--",
                          "speedrun", "--preset", "tiny", "--run", str(run), "--device", "cpu", "--docs", str(docs),
                          "--val-docs", "40", "--chat", f"{chats}:2"],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
                         cwd=tmp_path)  # no ../shared/data/eval here: the CORE-like suite is tested in test_evals
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for stage in ("base", "sft", "rl"):
        assert (run / stage / "done.json").exists() and (run / stage / "eval.json").exists(), stage
        assert json.loads((run / stage / "eval-bpb.json").read_text())["documents"] == 40, stage  # --val-docs, held out
    assert (run / "report.md").exists() and (run / sr.FINISHED).exists() and not (run / sr.FAILED).exists()
    evaluation = json.loads((run / "sft" / "eval.json").read_text())
    assert {"pass@1_tools", "known_fact_qa_tools", "unknown_idk_tools", "news_qa", "news_qa_tools"} <= set(evaluation)
    assert {"system_followed", "known_fact_qa_system", "followup_qa", "harmless_refused", "harmful_refused",
            "few_shot_completion", "zero_shot_completion"} <= set(evaluation)
    assert "few_shot_completion" in json.loads((run / "base" / "eval.json").read_text())
    report = (run / "report.md").read_text()
    assert "## Tools: the same evaluations without and with them" in report and "*(tools offered)*" in report
    assert "| system_followed |" in report and "*system:* " in report
    assert "## Real benchmarks" in report and "the CORE-like suite is left out" in out.stdout
    assert out.stdout.count("[5/12] base ...") == 1  # one rank tells the story
    sft_data = json.loads((run / "sft" / "model.json").read_text())["data"]
    assert str(chats) in sft_data[-1]
    assert Path(sft_data[3]).name == "train-00000.jsonl"  # the world's documents replayed: pretraining read them too


def test_a_rerun_with_other_inputs_is_refused_before_any_work(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan(calls, fail="base"))
    chats, run = write_chats(tmp_path / "chats.jsonl"), tmp_path / "run"
    with pytest.raises(ValueError, match="base broke"):  # a first attempt that stopped mid-way
        sr.speedrun(run, chat=[f"{chats}:2"])
    assert json.loads((run / sr.INPUTS).read_text()) == {"preset": "cpu", "docs": None, "val_docs": None,
                                                          "chat": [f"{chats.resolve()}:2"], "seed": 0}
    calls.clear()
    for other in ([], [f"{chats}:3"], [str(chats)]):
        with pytest.raises(sr.SpeedrunError, match=r"started with other inputs \(chat: was .*, or pick another --run"):
            sr.speedrun(run, chat=other)
    with pytest.raises(sr.SpeedrunError, match="preset: was 'cpu', now 'gpu-small'"):
        sr.speedrun(run, "gpu-small", chat=[f"{chats}:2"])
    with pytest.raises(sr.SpeedrunError, match="seed: was 0, now 1"):
        sr.speedrun(run, chat=[f"{chats}:2"], seed=1)
    assert calls == []
    monkeypatch.chdir(tmp_path)  # the same inputs, written from another folder: resumed
    monkeypatch.setattr(sr, "stages", lambda *a: fake_plan(calls))
    sr.speedrun(Path("run"), chat=["chats.jsonl:2.0"])
    assert calls == ["base", "eval base", "sft", "eval sft", "rl", "eval rl", "report"]
