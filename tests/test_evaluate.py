"""The conversation and few-shot metrics of picochat.evaluate, on handmade replies (the model's
decoding is replaced); a stage evaluated by 2 processes gives what one gives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from picochat import evaluate
from picochat.checkpoint import save_model
from picochat.model import ModelConfig, Transformer
from picochat.tokenizer import Tokenizer


def user(text: str) -> dict:
    return {"role": "user", "content": text}


@pytest.fixture
def replies(monkeypatch):
    """Make the model 'reply' with the given texts, in order."""
    def use(texts: list[str]):
        monkeypatch.setattr(evaluate, "chat_replies", lambda model, tok, conversations, *a, **kw: [[t] for t in texts])
    return use


def test_system_prompt_metrics_apply_each_row_s_rule(replies):
    rows = [{"messages": [], "check": "name", "name": "Zara"}, {"messages": [], "check": "name", "name": "Felix"},
            {"messages": [], "check": "sure", "name": None}, {"messages": [], "check": "one_word", "name": None}]
    replies(["I am Zara.", "I am picochat.", "Sure! It is Oskel.", "Oskel."])
    metrics = evaluate.system_prompt_metrics(None, None, rows)
    assert metrics == {"system_followed": 0.75, "system_followed_name": 0.5, "system_followed_one_word": 1.0,
                       "system_followed_sure": 1.0}


def test_followup_and_refusal_metrics(replies):
    replies(["The currency of Varnia is the thaket.", "I don't know, the thaket?", "The currency is the kron."])
    rows = [{"messages": [], "answer": "thaket"}] * 3
    assert evaluate.followup_metrics(None, None, rows) == {"followup_qa": pytest.approx(1 / 3)}
    replies(["Letter by letter, kite is k-i-t-e.", "I'm sorry, I can't help with that.", "Sorry, I won't help with that.",
             "Hello, Tamrin!"])
    rows = [{"messages": [], "kind": kind} for kind in ("harmless", "harmless", "harmful", "harmful")]
    assert evaluate.refusal_metrics(None, None, rows) == {"harmless_refused": 0.5, "harmful_refused": 0.5}


def test_few_shot_and_zero_shot_completion(monkeypatch):
    class Tok:
        eot_id = 0

        def encode(self, text):
            return [ord(c) for c in text]

    continuations = {"- A: x\n- B:": " Oskel\n", "- B:": " Brelby"}
    monkeypatch.setattr(evaluate, "complete", lambda model, tok, prompts, *a, **kw:
                        [[continuations["".join(map(chr, p[1:]))]] for p in prompts])
    rows = [{"prompt": "- A: x\n- B:", "query": "- B:", "answer": "Oskel"}]
    assert evaluate.few_shot_metrics(None, Tok(), rows) == {"few_shot_completion": 1.0, "zero_shot_completion": 0.0}


# --- split over ranks ------------------------------------------------------------------------------
EVAL_ROWS = 24  # of each eval set: enough for several chunks of EVAL_BATCH_SPLIT prompts
EVAL_BATCH_SPLIT = 4  # small chunks, so each of 2 ranks decodes several
SPLIT_SCRIPT = """
import json, sys
from pathlib import Path
from picochat import evaluate
from picochat.engine import Sampling
from picochat.train.loop import setup_runtime, teardown_runtime

evaluate.EVAL_BATCH = %d
run = Path(sys.argv[1])
rt = setup_runtime("cpu")  # joined once here: evaluate_stage uses the group and leaves it to its holder
evaluate.evaluate_stage(run, "sft", k=2, n_problems=8)
model, tok, _ = evaluate.Run(run).load("sft")
prompts = [[tok.eot_id] + tok.encode(f"Fact {i}:") for i in range(10)]
texts = evaluate.complete(model, tok, prompts, 6, Sampling(1.0, seed=3), num_samples=2, rt=rt)
if rt.is_main:
    Path(sys.argv[2]).write_text(json.dumps(texts))
teardown_runtime(rt)
""" % EVAL_BATCH_SPLIT


@pytest.fixture(scope="module")
def small_eval_run(tiny_run, tmp_path_factory):
    """The tiny run's tokenizer and world, each eval set cut to EVAL_ROWS rows, a random tiny chat model."""
    run = tmp_path_factory.mktemp("eval_split") / "run"
    for part in ("tokenizer", "world"):
        shutil.copytree(tiny_run / part, run / part)
    for path in (run / "world" / "eval").glob("*.jsonl"):
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:EVAL_ROWS]))
    tok = Tokenizer.load(run / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, n_kv_head=1, max_seq_len=256))
    model.init_weights(0)
    save_model(run / "sft", model, {"stage": "sft"})
    return run


def test_two_processes_evaluate_a_stage_to_the_figures_of_one(small_eval_run, tmp_path, monkeypatch):
    """Under torchrun each of 2 gloo processes decodes every other chunk of each eval set; rank 0
    writes eval.json, and both the figures and sampled texts are those of one process."""
    monkeypatch.setattr(evaluate, "EVAL_BATCH", EVAL_BATCH_SPLIT)
    one = evaluate.evaluate_stage(small_eval_run, "sft", k=2, n_problems=8)
    model, tok, _ = evaluate.Run(small_eval_run).load("sft")
    prompts = [[tok.eot_id] + tok.encode(f"Fact {i}:") for i in range(10)]
    texts = evaluate.complete(model, tok, prompts, 6, evaluate.Sampling(1.0, seed=3), num_samples=2)
    assert len({t for pair in texts for t in pair}) > 10  # sampled texts that differ: a real comparison

    (small_eval_run / "sft" / "eval.json").unlink()
    script, texts_path = tmp_path / "eval_ranks.py", tmp_path / "texts.json"
    script.write_text(SPLIT_SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
                          str(small_eval_run), str(texts_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads((small_eval_run / "sft" / "eval.json").read_text()) == one
    assert json.loads(texts_path.read_text()) == texts


def test_prompts_that_do_not_fit_the_context_are_left_out_of_a_completion_eval(small_eval_run):
    tok = Tokenizer.load(small_eval_run / "tokenizer")
    short, long = {"prompt": "The age of Zorb is", "answer": "Zorb"}, {"prompt": "Zorb " * 300, "answer": "Zorb"}
    assert evaluate.fitting([short, long, short], tok, 256) == [short, short]
    assert evaluate.fitting([short], tok, len(tok.encode(short["prompt"])) + 1) == []
