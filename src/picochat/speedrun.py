"""`picochat speedrun`: every stage end to end, then a report card.

    picochat speedrun --preset cpu --run runs/demo
    torchrun --standalone --nproc_per_node=8 -m picochat -- speedrun --preset gpu-135m --run runs/gpu \
        --docs data/fineweb --chat chats.jsonl

world -> index -> tokenizer -> shards -> pretrain -> eval -> SFT -> eval -> RL -> eval -> report (the
index is the search tool's, over the world's documents); `--with-preferences` adds, before the report,
pairs ranked by the world's labeler -> reward model -> DPO -> eval -> RLHF -> eval, each judged against SFT. A stage whose output is complete is
skipped; an interrupted training stage resumes from its last checkpoint, so rerunning the same
command after a crash picks up where it stopped. The run folder remembers its
inputs (`speedrun.json`: preset, `--docs`, `--val-docs`, `--chat`); a rerun with other inputs is
refused before any work rather than resumed into a mix of two runs.

`--docs` pretrains on your documents (FineWeb-edu parquet, JSONL, text) with the world's mixed in:
the tokenizer is trained on yours, the token shards hold yours and then the world's (pretraining
reads sequences in a random order, so they are spread over the whole run), and your first
`--val-docs` documents are held out for validation. The world's documents stay in because the SFT
conversations, the word problems and every evaluation come from the world: a base model that never
read its facts would be taught by SFT to answer questions about entities it knows nothing of, the
very way the lecture says hallucination is made. `--chat FILE[:WEIGHT]` adds conversation files to
the SFT mixture beside the world's.

Under torchrun every process runs this loop. Pretraining, SFT and RL train on all of them (data
parallel) and the evaluations after them decode split over all of them; the other stages (the
world, tokenizer, shards, the preference stages, the report) run on rank 0 alone while the other
ranks poll the stage's output every few seconds. If a stage fails on rank 0, it writes `speedrun-failed.json` in the run
folder, and the waiting ranks stop with its message instead of waiting forever; when it finishes,
it writes `speedrun-finished.json`, and every rank leaves the process group together.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from picochat.config import get_preset
from picochat.data.conversations import parse_data_spec, read_conversations
from picochat.data.index import INFO_FILE, build_index
from picochat.data.shards import prepare
from picochat.data.sources import iter_documents, list_source_files
from picochat.evaluate import evaluate_stage
from picochat.io import atomic_write_json
from picochat.report import write_report
from picochat.run import Run
from picochat.tokenizer import Tokenizer, limit_chars
from picochat.train.loop import setup_runtime, teardown_runtime
from picochat.train.pretrain import run_pretrain
from picochat.train.dpo import DPOConfig, run_dpo
from picochat.train.rl import check_ranks, run_rl
from picochat.train.rlhf import rlhf_config, run_rlhf
from picochat.train.rm import RMConfig, run_rm
from picochat.train.sft import run_sft
from picochat.world import generate, search_documents
from picochat.world.preferences import judge_stage, sample_pairs
from picochat.world.tool_chats import WORLD_PASSAGE_CHARS

ALL_RANKS = ("base", "eval base", "sft", "eval sft", "rl", "eval rl")  # every torchrun process works in these
FAILED = "speedrun-failed.json"  # rank 0's note that a stage failed, for the waiting ranks
FINISHED = "speedrun-finished.json"  # rank 0's note that every stage is done, for the waiting ranks
INPUTS = "speedrun.json"  # the inputs the run was started with
POLL_SECONDS = 5.0
DEFAULT_VAL_DOCS = 5000
TOKENIZER_CHARS = 2_000_000_000  # the tokenizer trains on at most this much of --docs (as `picochat tokenizer train`)


class SpeedrunError(RuntimeError):
    """Bad speedrun input, or a stage that failed on rank 0 while this rank waited for it."""


def _world(run: Run, preset) -> None:
    generate(run.world, preset.world_mb, preset.world_scale, seed=0, shard_mb=max(1.0, preset.world_mb / 4))


def _index(run: Run) -> None:
    """The search tool's index over the world's documents and its news articles (not --docs: the
    world's facts are what the chat model is asked about), as the world's tool conversations searched it."""
    build_index(search_documents(run.world), run.index, max_passage_chars=WORLD_PASSAGE_CHARS)


def _tokenizer(run: Run, preset, docs: Path | None) -> None:
    texts = limit_chars(iter_documents(docs), TOKENIZER_CHARS) if docs else iter_documents(run.world_docs)
    Tokenizer.train(texts, preset.vocab_size).save(run.tokenizer)


def _shards(run: Run, docs: Path | None, val_docs: int) -> None:
    if docs:
        prepare([docs, run.world_docs], run.tokenizer, run.shards, val_docs=val_docs)
    else:
        prepare(run.world_docs, run.tokenizer, run.shards, val_inputs=run.world_val_docs)


def _pretrain(run: Run, preset_name: str, device: str, seed: int) -> None:
    cfg = dataclasses.replace(get_preset(preset_name).pretrain, seed=seed)
    run_pretrain(run.root, preset_name, cfg, resume=True, device=device)


def _sft(run: Run, preset_name: str, device: str, chat: list[str], seed: int) -> None:
    cfg = dataclasses.replace(get_preset(preset_name).sft, seed=seed)
    run_sft(run.root, preset_name, cfg, data=[str(path) for path in run.world_sft_data] + chat, resume=True, device=device)


def _rl(run: Run, preset_name: str, device: str, seed: int) -> None:
    # No held-out pass@1 inside RL: "eval rl" measures it on the same problems next (with and without tools).
    cfg = dataclasses.replace(get_preset(preset_name).rl, seed=seed, eval_problems=0)
    run_rl(run.root, preset_name, cfg, resume=True, device=device)


def _evaluate(stage: str, preset, device: str, every_rank: bool = True) -> Callable:
    """The stage's evaluation: split over the ranks, or (every_rank=False) on rank 0 alone."""
    def run_eval(run: Run):
        resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        evaluate_stage(run.root, stage, k=preset.rl.eval_k, n_problems=preset.rl.eval_problems, device=resolved,
                       join_group=every_rank)

    return run_eval


def _benchmarks(run: Run, docs: Path, val_docs: int, device: str) -> None:
    from picochat.evals.card import measure

    measure(run.root, docs, val_docs, ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)


def _report(run: Run) -> None:
    write_report(run.root)


def preference_stages(preset_name: str, device: str, seed: int) -> list[tuple[str, Callable, Callable[[Run], bool]]]:
    """The preference stages (`--with-preferences`): the labeler ranks the SFT model's replies, a
    reward model learns the rankings, DPO and RLHF tune the SFT model, each judged against it."""
    preset = get_preset(preset_name)
    resolved = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    done = lambda stage, name: (lambda run: (run.stage(stage) / name).exists())  # noqa: E731
    rlhf_cfg = dataclasses.replace(rlhf_config(preset_name), seed=seed)
    return [
        ("prefs", lambda run: sample_pairs(run.root, seed=seed), lambda run: (run.prefs / "pairs-heldout.jsonl").exists()),
        ("rm", lambda run: run_rm(run.root, RMConfig(seed=seed), resume=True, device=resolved), done("rm", "done.json")),
        ("dpo", lambda run: run_dpo(run.root, DPOConfig(seed=seed), resume=True, device=resolved), done("dpo", "done.json")),
        ("eval dpo", _evaluate("dpo", preset, device, every_rank=False), done("dpo", "eval.json")),
        ("judge dpo", lambda run: judge_stage(run.root, "dpo"), done("dpo", "winrate.json")),
        ("rlhf", lambda run: run_rlhf(run.root, preset_name, rlhf_cfg, resume=True, device=resolved, join_group=False), done("rlhf", "done.json")),
        ("eval rlhf", _evaluate("rlhf", preset, device, every_rank=False), done("rlhf", "eval.json")),
        ("judge rlhf", lambda run: judge_stage(run.root, "rlhf"), done("rlhf", "winrate.json")),
    ]


def stages(preset_name: str, device: str, docs: Path | None = None, chat: list[str] | None = None,
           val_docs: int = DEFAULT_VAL_DOCS, seed: int = 0,
           with_preferences: bool = False) -> list[tuple[str, Callable, Callable[[Path], bool]]]:
    """(name, action(run), is_done(run)) in pipeline order. `seed` seeds every training stage (initial
    weights, data order, RL's sampling); the world, its data and the evaluations stay the same.
    `with_preferences` adds the preference stages after RL."""
    preset = get_preset(preset_name)
    stage_file = lambda stage, name: (lambda run: (run.stage(stage) / name).exists())  # noqa: E731
    plan = [
        ("world", lambda run: _world(run, preset), lambda run: run.eval_problems.exists()),
        ("index", _index, lambda run: (run.index / INFO_FILE).exists()),
        ("tokenizer", lambda run: _tokenizer(run, preset, docs), lambda run: (run.tokenizer / "tokenizer.json").exists()),
        ("shards", lambda run: _shards(run, docs, val_docs), lambda run: (run.shards / "manifest.json").exists()),
        ("base", lambda run: _pretrain(run, preset_name, device, seed), stage_file("base", "done.json")),
        ("eval base", _evaluate("base", preset, device), stage_file("base", "eval.json")),
        ("sft", lambda run: _sft(run, preset_name, device, chat or [], seed), stage_file("sft", "done.json")),
        ("eval sft", _evaluate("sft", preset, device), stage_file("sft", "eval.json")),
        ("rl", lambda run: _rl(run, preset_name, device, seed), stage_file("rl", "done.json")),
        ("eval rl", _evaluate("rl", preset, device), stage_file("rl", "eval.json")),
        *(preference_stages(preset_name, device, seed) if with_preferences else []),
        ("report", _report, lambda run: False),
    ]
    if docs:  # held-out bits per byte of your documents, and the CORE-like suite (evals.card)
        plan.insert(-1, ("benchmarks", lambda run: _benchmarks(run, docs, val_docs, device), stage_file("rl", "eval-bpb.json")))
    on_path = lambda f: (lambda path: f(Run(path)))  # noqa: E731  (the plan is driven with the run's Path)
    return [(name, on_path(action), on_path(is_done)) for name, action, is_done in plan]


def check_inputs(docs: Path | None, chat: list[str] | None, val_docs: int, read_chat: bool = True) -> None:
    """Fail before any work on inputs that would fail a stage hours later: every --docs file is found
    with a known format; every --chat file exists, has a valid weight and (read_chat) valid conversations."""
    if docs is not None:
        list_source_files(docs)
        if val_docs < 1:
            raise SpeedrunError(f"--val-docs must be at least 1 (documents held out for validation), got {val_docs}")
    for spec in chat or []:
        path, _ = parse_data_spec(spec)
        if not path.is_file():
            raise FileNotFoundError(f"--chat {spec}: {path} is not a conversation file")
        if read_chat:
            for _ in read_conversations(path):
                pass


def run_inputs(preset_name: str, docs: Path | None, chat: list[str] | None, val_docs: int, seed: int = 0) -> dict:
    """What decides a run's stages, with paths made absolute so a rerun from another folder compares equal."""

    def chat_spec(spec: str) -> str:
        path, weight = parse_data_spec(spec)
        return str(path.resolve()) + ("" if weight is None else f":{weight:g}")

    return {"preset": preset_name, "docs": str(Path(docs).resolve()) if docs else None,
            "val_docs": val_docs if docs else None, "chat": [chat_spec(spec) for spec in chat or []], "seed": seed}


def check_same_inputs(run: Path, inputs: dict) -> None:
    """Record the run's inputs on its first start; refuse a rerun whose inputs differ."""
    path = Run(run).inputs
    if not path.exists():
        atomic_write_json(path, inputs)
        return
    before = json.loads(path.read_text())
    before.setdefault("seed", 0)  # runs started before --seed existed
    changed = [f"{key}: was {before.get(key)!r}, now {value!r}" for key, value in inputs.items() if before.get(key) != value]
    if changed:
        raise SpeedrunError(f"{run} was started with other inputs ({'; '.join(changed)}); rerun with the same "
                            f"ones to resume it, or pick another --run")


def torchrun_env() -> tuple[int, int, str]:
    """(rank, world size, run id) of this process: torchrun's environment, or a single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")), os.environ.get("TORCHELASTIC_RUN_ID", "")


def write_failure(run: Path, stage: str, error: BaseException, run_id: str) -> None:
    # Atomic: the waiting ranks poll for this file and must never read half of it.
    atomic_write_json(run / FAILED, {"stage": stage, "error": f"{type(error).__name__}: {error}", "run_id": run_id})


def wait_for(run: Path, is_done: Callable[[Path], bool], run_id: str, poll_s: float | None = None) -> None:
    """Block until rank 0 completes the stage (`is_done`); raise if rank 0 recorded a failure in this run."""
    while not is_done(run):
        failed = run / FAILED
        if failed.exists():
            note = json.loads(failed.read_text())
            if note.get("run_id") == run_id:
                raise SpeedrunError(f"rank 0 failed at stage {note['stage']!r} ({note['error']}); see rank 0's output")
        time.sleep(POLL_SECONDS if poll_s is None else poll_s)


def speedrun(run: Path, preset_name: str = "cpu", device: str = "auto", docs: Path | None = None,
             chat: list[str] | None = None, val_docs: int = DEFAULT_VAL_DOCS, seed: int = 0,
             with_preferences: bool = False) -> None:
    run = Path(run)
    rank, world_size, run_id = torchrun_env()
    plan = stages(preset_name, device, docs, chat, val_docs, seed, with_preferences)
    inputs = run_inputs(preset_name, docs, chat, val_docs, seed)
    check_ranks(get_preset(preset_name).rl, world_size)  # before hours of pretraining, not at RL
    if world_size == 1:
        _lead(run, plan, world_size, run_id, docs, chat, val_docs, inputs)
        return

    # One process group for the whole run: under torchrun, joining a new group after leaving
    # pretraining's could hang at SFT's start (seen with gloo), so the stages share this one.
    group = setup_runtime(device)
    try:
        if rank == 0:
            _lead(run, plan, world_size, run_id, docs, chat, val_docs, inputs)
            atomic_write_json(run / FINISHED, {"run_id": run_id})
        else:
            check_inputs(docs, chat, val_docs, read_chat=False)  # rank 0 reads the conversations
            _follow(run, plan, run_id)
        # Every rank leaves the group at once: a gloo process that left while rank 0 still held the
        # group (rank 0 alone runs the last stages) was seen to abort ("terminate called ...").
        dist.barrier()
    finally:
        teardown_runtime(group)


def _lead(run: Path, plan: list, world_size: int, run_id: str, docs: Path | None, chat: list[str] | None,
          val_docs: int, inputs: dict) -> None:
    """Rank 0 (or the only process): run every stage not yet complete, in order."""
    run.mkdir(parents=True, exist_ok=True)
    (run / FAILED).unlink(missing_ok=True)
    (run / FINISHED).unlink(missing_ok=True)
    stage = "checking inputs"
    try:
        check_inputs(docs, chat, val_docs)
        check_same_inputs(run, inputs)
        timings_path = Run(run).timings
        timings = json.loads(timings_path.read_text()) if timings_path.exists() else {}
        t_all = time.time()
        for i, (stage, action, is_done) in enumerate(plan, 1):
            header = f"[{i}/{len(plan)}] {stage}"
            if is_done(run):
                print(f"{header}: already complete, skipped", flush=True)
                continue
            print(f"{header} ... (total elapsed {time.time() - t_all:.0f}s)", flush=True)
            t0 = time.time()
            action(run)
            timings[stage] = round(timings.get(stage, 0) + time.time() - t0, 2)
            atomic_write_json(timings_path, timings)
            print(f"{header}: done in {time.time() - t0:.0f}s", flush=True)
    except BaseException as e:
        if world_size > 1:
            write_failure(run, stage, e, run_id)
        raise
    print(f"\nspeedrun finished in {time.time() - t_all:.0f}s. Report card: {run / 'report.md'}")
    print(f"Chat with your model:  picochat chat --run {run}")
    print(f"Or serve it:           picochat serve --run {run}   (then open http://127.0.0.1:8000)")


def _follow(run: Path, plan: list, run_id: str) -> None:
    """A rank other than 0: work in the stages of every rank, wait for rank 0 in the others, then
    wait until rank 0 has finished the stages it runs alone."""
    last_shared = max(i for i, (name, _, _) in enumerate(plan) if name in ALL_RANKS)
    for name, action, is_done in plan[: last_shared + 1]:
        if name in ALL_RANKS:
            if not is_done(run):
                action(run)
        else:
            wait_for(run, is_done, run_id)
    wait_for(run, lambda path: finished(path, run_id), run_id)


def finished(run: Path, run_id: str) -> bool:
    """Whether rank 0 of this torchrun launch finished every stage (a note from an earlier launch does not count)."""
    note = run / FINISHED
    return note.exists() and json.loads(note.read_text()).get("run_id") == run_id


def register_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--preset", default="cpu", help="cpu, gpu-135m or gpu-564m (default cpu); `picochat plan` shows their cost")
    parser.add_argument("--device", default="auto", help="cpu, cuda, or auto (default)")
    parser.add_argument("--docs", type=Path, default=None, metavar="PATH",
                        help="pretraining documents beside the synthetic world's: a folder of FineWeb-edu parquet shards "
                             "(as `picochat download` writes), or JSONL ({\"text\": ...}) / text files. The tokenizer is "
                             "trained on them; pretraining reads them and the world's documents, whose facts the SFT "
                             "conversations, word problems and evaluations ask about")
    parser.add_argument("--val-docs", type=int, default=DEFAULT_VAL_DOCS, metavar="N",
                        help=f"with --docs: the first N documents are the validation split (default {DEFAULT_VAL_DOCS})")
    parser.add_argument("--chat", nargs="+", default=None, metavar="FILE[:WEIGHT]",
                        help="conversation files (OpenAI messages JSONL; ShareGPT, Alpaca) added to the SFT mixture beside "
                             "the world's conversations, word problems and replayed documents; FILE:WEIGHT for a weighted "
                             "mixture (the world's files weigh 1)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of every training stage: initial weights, data order, RL's problems and samples "
                             "(default 0; the world and the evaluation sets do not change with it)")
    parser.add_argument("--with-preferences", action="store_true",
                        help="after RL, the preference stages (the lecture's RLHF): pairs ranked by the world's labeler, "
                             "a reward model, DPO and RLHF, each judged against the SFT model (about 25 more minutes on "
                             "2 CPU cores, so not in the default demo); rerun with it to add them to a finished run")
    parser.set_defaults(func=lambda args: speedrun(Path(args.run), args.preset, args.device, args.docs, args.chat,
                                                   args.val_docs, args.seed, args.with_preferences))
