"""Real-benchmark evaluation (`picochat.evals`): task files are checked, the CORE-like suite, the chat
suite and bits per byte run on a picochat stage and on a Hugging Face folder, and what they compute
equals what transformers computes on the exported model (log-likelihoods, and accuracy from an
independent scorer written here: lm-evaluation-harness is not installed and cannot download)."""

import dataclasses
import json

import pytest
import torch
from conftest import SAMPLE_TEXT, shared_data, trained_tiny_model

from picochat.checkpoint import save_model, write_safetensors
from picochat.cli import main as cli_main
from picochat.evals.bpb import bits_per_byte
from picochat.evals.chat_suite import arc_question, chat_suite, chosen_letter
from picochat.evals.core import core_suite, core_task
from picochat.evals.models import load_evaluated
from picochat.evals.scoring import score_rows
from picochat.evals.tasks import DEFAULT_TASKS, Task, TaskError, read_task, split_shots, task_table
from picochat.hf import HFImportError, export_hf, hf_config, hf_tensors
from picochat.model import Transformer

transformers = pytest.importorskip("transformers")
CONTEXT = 1024


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_tokenizer):
    """(run folder, export folder): a tiny trained model, its context widened to hold few-shot prompts."""
    root = tmp_path_factory.mktemp("evals")
    tiny = trained_tiny_model(small_tokenizer, tie=True)
    model = Transformer(dataclasses.replace(tiny.config, max_seq_len=CONTEXT))
    model.load_state_dict(tiny.state_dict())
    small_tokenizer.save(root / "run" / "tokenizer")
    save_model(root / "run" / "base", model.eval(), {"stage": "base", "tokenizer": small_tokenizer.fingerprint})
    export_hf(root / "run", root / "hf", stage="base")
    return root / "run", root / "hf"


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported[1], dtype=torch.float32).eval()


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def small_tasks(folder):
    """A task folder of each kind, with a tasks.json, in the gauntlet layout."""
    folder.mkdir(exist_ok=True)
    sentences = [SAMPLE_TEXT[start : start + 50] for start in (0, 95, 190)]
    write_jsonl(folder / "mc.jsonl", [{"query": f"Question: which is it? {i}", "choices": ["Oskel", "Tam", "apples"],
                                       "gold": i % 3} for i in range(8)])
    write_jsonl(folder / "schema.jsonl", [{"context_options": ["Mira bought apples so Mira", "Mira bought apples so Oskel"],
                                           "continuation": "was happy.", "gold": i % 2} for i in range(4)])
    write_jsonl(folder / "lm.jsonl", [{"context": s[:40], "continuation": s[40:50]} for s in sentences])
    (folder / "tasks.json").write_text(json.dumps([
        {"name": "mc", "file": "mc.jsonl", "kind": "multiple_choice", "shots": 2, "chance": 1 / 3, "delimiter": "\nAnswer: "},
        {"name": "schema", "file": "schema.jsonl", "kind": "schema", "shots": 0, "chance": 0.5},
        {"name": "lm", "file": "lm.jsonl", "kind": "language_modeling", "shots": 1, "chance": 0.0}]))
    return folder


# --- task files -----------------------------------------------------------------------------------


@pytest.mark.parametrize("line, message", [
    ('{"query": "Q", "choices": ["a", "b"], "gold": 2}', "gold"),
    ('{"query": "Q", "choices": ["a", " "], "gold": 0}', "item 1 is empty"),
    ('{"query": "Q", "choices": "ab", "gold": 0}', "choices"),
    ('{"choices": ["a", "b"], "gold": 0}', "query"),
    ('{"query": "Q", "choices": ["a", "b"], "gold": true}', "gold"),
    ('{"query": "Q", "choices": ["a", "b"]', "not valid JSON"),
])
def test_a_bad_row_is_refused_naming_file_and_line(tmp_path, line, message):
    good = '{"query": "Q", "choices": ["a", "b"], "gold": 1}'
    path = write_jsonl(tmp_path / "t.jsonl", [good, line])
    with pytest.raises(TaskError, match=rf"t\.jsonl:2: .*{message}"):
        read_task(tmp_path, Task("t", "t.jsonl", "multiple_choice", 0, 0.5))
    assert path.exists()


def test_schema_and_lm_rows_are_checked(tmp_path):
    write_jsonl(tmp_path / "s.jsonl", [{"context_options": ["a", "b"], "continuation": "", "gold": 0}])
    with pytest.raises(TaskError, match=r"s\.jsonl:1: .*continuation"):
        read_task(tmp_path, Task("s", "s.jsonl", "schema", 0, 0.5))
    write_jsonl(tmp_path / "l.jsonl", [{"context": "a"}])
    with pytest.raises(TaskError, match=r"l\.jsonl:1: .*continuation"):
        read_task(tmp_path, Task("l", "l.jsonl", "language_modeling", 0, 0.0))


def test_task_table_is_checked_and_defaults_to_the_files_present(tmp_path):
    (tmp_path / "copa.jsonl").write_text('{"query": "Q", "choices": ["a", "b"], "gold": 1}\n')
    assert [t.name for t in task_table(tmp_path)] == ["copa"]
    (tmp_path / "tasks.json").write_text(json.dumps([{"name": "x", "file": "x.jsonl", "kind": "cloze", "shots": 0, "chance": 0}]))
    with pytest.raises(TaskError, match=r"tasks\.json: task 1: .*kind"):
        task_table(tmp_path)


def test_shots_are_seeded_and_left_out_of_the_scored_examples():
    rows = list(range(50))
    shots, scored = split_shots(rows, 10)
    assert shots == split_shots(rows, 10)[0] and len(set(shots)) == 10
    assert sorted(shots + scored) == rows and not set(shots) & set(scored)


# --- scoring against transformers -------------------------------------------------------------------


def hf_logprobs(hf_model, ids: list[int], continuation: int) -> torch.Tensor:
    """Log-probabilities of the last `continuation` tokens of `ids`, one plain forward pass of transformers."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    targets = torch.tensor(ids[-continuation:])
    return logprobs[len(ids) - continuation - 1 : len(ids) - 1].gather(1, targets[:, None])[:, 0]


def test_row_log_likelihoods_equal_transformers(exported, hf_model, small_tokenizer):
    ev = load_evaluated(run=exported[0], stage="base")
    tok = small_tokenizer
    prefix = [tok.eot_id] + tok.encode(SAMPLE_TEXT[:300])
    texts = [SAMPLE_TEXT[start : start + 60] for start in (0, 95, 190, 250)]
    rows = [(tok.encode(t[:n]), tok.encode(t[n : n + m])) for t in texts for n, m in ((10, 5), (30, 20), (3, 1))]
    scores = score_rows(ev.model, prefix, rows)
    for (context, continuation), score in zip(rows, scores):
        expected = hf_logprobs(hf_model, prefix + context + continuation, len(continuation))
        assert score.logprob == pytest.approx(float(expected.sum()), abs=1e-4)
        assert score.tokens == len(continuation)
    # Without a shared prefix (only <|endoftext|>): every row on its own, the same values.
    alone = score_rows(ev.model, [tok.eot_id], rows[:3])
    for (context, continuation), score in zip(rows, alone):
        expected = hf_logprobs(hf_model, [tok.eot_id] + context + continuation, len(continuation))
        assert score.logprob == pytest.approx(float(expected.sum()), abs=1e-4)


def independent_accuracy(hf_model, hf_tok, task, rows, shot_rows, used, scored) -> float:
    """A transformers-based scorer of a multiple-choice or schema task: the documented prompt (the
    start token, the shots each followed by a newline, the question and the delimiter without its
    trailing space), each option's continuation tokenized on its own, one forward pass per option,
    the option with the highest mean log-likelihood per token."""
    head = task.delimiter.rstrip()
    tail = task.delimiter[len(head):]

    def options(row):
        if task.kind == "schema":
            return [(option + head, tail + row["continuation"]) for option in row["context_options"]]
        return [(row["query"] + head, tail + choice) for choice in row["choices"]]

    shots = "".join("".join(options(rows[i])[rows[i]["gold"]]) + "\n" for i in shot_rows[:used])
    correct = 0
    for row in (rows[i] for i in scored):
        means = []
        for context, continuation in options(row):
            context_ids = [hf_tok.bos_token_id] + hf_tok(shots + context, add_special_tokens=False)["input_ids"]
            continuation_ids = hf_tok(continuation, add_special_tokens=False)["input_ids"]
            means.append(float(hf_logprobs(hf_model, context_ids + continuation_ids, len(continuation_ids)).mean()))
        correct += max(range(len(means)), key=means.__getitem__) == row["gold"]
    return correct / len(scored)


@pytest.mark.parametrize("name", ["arc_easy", "winogrande"])
def test_task_accuracy_equals_an_independent_transformers_scorer(exported, hf_model, name):
    folder = shared_data("eval")
    task = next(t for t in DEFAULT_TASKS if t.name == name)
    ev = load_evaluated(hf=exported[1])  # the Hugging Face folder, read in place
    result = core_task(ev, folder, task, limit=24, progress=False)
    assert result["examples"] == 24 and result["skipped"] == 0
    assert task.shots == 0 or 1 <= result["shots"] <= task.shots
    rows = read_task(folder, task)
    shot_rows, scored = split_shots(rows, task.shots)
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported[1])
    expected = independent_accuracy(hf_model, hf_tok, task, rows, shot_rows, result["shots"], scored[:24])
    assert result["accuracy"] == expected


# --- the suites on a small task folder --------------------------------------------------------------


def test_core_suite_scores_every_kind_and_skips_what_does_not_fit(exported, tmp_path):
    folder = small_tasks(tmp_path / "tasks")
    write_jsonl(folder / "lm.jsonl", [{"context": "The capital", "continuation": " of Varnia is Oskel."},
                                      {"context": "x" * 3000, "continuation": " y"}])
    ev = load_evaluated(run=exported[0], stage="base")
    result = core_suite(ev, folder, progress=False)
    mc, schema, lm = (result["tasks"][name] for name in ("mc", "schema", "lm"))
    assert (mc["examples"], mc["skipped"], mc["shots"]) == (6, 0, 2)
    assert (schema["examples"], schema["shots"]) == (4, 0)
    assert (lm["examples"], lm["skipped"]) == (0, 1) or (lm["examples"], lm["skipped"]) == (1, 0)
    for r in (mc, schema):
        assert r["centered"] == pytest.approx((r["accuracy"] - r["chance"]) / (1 - r["chance"]))
    assert result["core"] == pytest.approx(sum(r["centered"] for r in result["tasks"].values() if r["examples"]) /
                                           sum(1 for r in result["tasks"].values() if r["examples"]))


def test_lambada_counts_an_exact_greedy_match(exported, tmp_path, small_tokenizer):
    """The model's own greedy continuation is right; the same with one word changed is wrong."""
    ev = load_evaluated(run=exported[0], stage="base")
    context = "The capital of Varnia is"
    ids = [small_tokenizer.eot_id] + small_tokenizer.encode(context)
    for _ in range(4):
        ids.append(int(ev.model(torch.tensor([ids]))[0, -1].argmax()))
    greedy = small_tokenizer.decode(ids[len(ids) - 4:])
    write_jsonl(tmp_path / "lambada_openai.jsonl", [{"context": context, "continuation": greedy.lstrip(" ")},
                                             {"context": context, "continuation": "zebra"}])
    task = DEFAULT_TASKS[-1]
    assert greedy.startswith(" ") and task.kind == "language_modeling"
    result = core_task(ev, tmp_path, task, progress=False)
    assert result["accuracy"] == 0.5 and result["examples"] == 2


def test_bits_per_byte_equals_transformers(exported, hf_model, small_tokenizer, tmp_path):
    text = SAMPLE_TEXT[:1500]  # longer than one window: two windows overlapping by a token
    path = tmp_path / "held-out.txt"
    path.write_text(text)
    ev = load_evaluated(run=exported[0], stage="base")
    ev.model = Transformer(dataclasses.replace(ev.model.config, max_seq_len=256))
    ev.model.load_state_dict(load_evaluated(run=exported[0], stage="base").model.state_dict())
    result = bits_per_byte(ev, [path], progress=False)
    ids = [small_tokenizer.eot_id] + small_tokenizer.encode(text)
    assert len(ids) > 257 and result["tokens"] == len(ids) - 1
    windows = [ids[s : s + 257] for s in range(0, len(ids) - 1, 256)]
    nats = -sum(float(hf_logprobs(hf_model, w, len(w) - 1).sum()) for w in windows)
    assert result["bpb"] == pytest.approx(nats / torch.log(torch.tensor(2.0)).item() / len(text.encode()), rel=1e-5)
    assert result["bytes"] == len(text.encode()) and result["documents"] == 1


# --- any model ----------------------------------------------------------------------------------------


def test_an_unsupported_model_type_is_refused_naming_it(exported, tmp_path):
    folder = tmp_path / "mistral"
    folder.mkdir()
    config = json.loads((exported[1] / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral"}))
    with pytest.raises(HFImportError, match="MistralForCausalLM"):
        load_evaluated(hf=folder)
    config_llama = {**config, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    (folder / "config.json").write_text(json.dumps(config_llama))
    with pytest.raises(HFImportError, match="Llama"):
        load_evaluated(hf=folder)


def test_a_model_with_its_own_tokenizer_gets_the_core_suite_not_the_chat_suite(tmp_path):
    """A Qwen3 folder whose tokenizer is not picochat's (no special tokens at 0..8) is scored with its
    own tokenizer and its bos_token_id; the chat suite, which needs picochat's protocol, refuses it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf_tok = Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok.train_from_iterator([SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder = tmp_path / "foreign"
    folder.mkdir()
    hf_tok.save(str(folder / "tokenizer.json"))
    from picochat.model import ModelConfig

    model = Transformer(ModelConfig(vocab_size=hf_tok.get_vocab_size(), n_layer=1, d_model=32, n_head=2, n_kv_head=1,
                                    max_seq_len=256))
    write_safetensors(folder / "model.safetensors", {k: v.detach().contiguous() for k, v in hf_tensors(model).items()})
    (folder / "config.json").write_text(json.dumps({**hf_config(model.config), "bos_token_id": 0}))
    ev = load_evaluated(hf=folder)
    assert ev.tokenizer is None and ev.bos == [0] and ev.encode("hello") == hf_tok.encode("hello").ids
    result = core_suite(ev, small_tasks(tmp_path / "tasks"), progress=False)
    assert result["tasks"]["mc"]["examples"] == 6
    with pytest.raises(ValueError, match="chat protocol"):
        chat_suite(ev, None, None)


# --- the chat suite -----------------------------------------------------------------------------------


def test_arc_as_a_chat_question_and_its_letter():
    row = {"query": "Question: Which is a planet?", "choices": ["Moon", "Mars", "Sun", "Comet"], "gold": 1}
    assert arc_question(row) == ("Which is a planet?\n\nA. Moon\nB. Mars\nC. Sun\nD. Comet\n\n"
                                 "Answer with the letter of the right choice.")
    assert chosen_letter("B", 4) == 1 and chosen_letter("The answer is (C).", 4) == 2
    assert chosen_letter("A. Moon", 4) == 0 and chosen_letter("I think D", 4) == 3
    assert chosen_letter("Mars is one", 4) is None and chosen_letter("E", 4) is None


def test_chat_suite_asks_arc_and_gsm8k(exported, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    question = {"query": "Question: Which is a planet?", "choices": ["Moon", "Mars", "Sun", "Comet"], "gold": 1}
    write_jsonl(tasks / "arc_easy.jsonl", [question] * 3 + [{**question, "query": "Question: " + "why " * 900}])
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 apples and buys 4. How many?",
                                                    "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}] * 2)
    ev = load_evaluated(run=exported[0], stage="base")
    result = chat_suite(ev, tasks, gsm8k)
    arc = result["tasks"]["arc_easy"]
    assert (arc["examples"], arc["skipped"], arc["chance"]) == (3, 1, 0.25)
    assert "arc_challenge" not in result["tasks"]
    assert result["tasks"]["gsm8k"]["examples"] == 2 and result["tasks"]["gsm8k_tools"]["examples"] == 2
    centred = [result["tasks"][n]["centered"] for n in ("arc_easy", "gsm8k")]
    assert result["chat_core"] == pytest.approx(sum(centred) / 2)


# --- the command line --------------------------------------------------------------------------------


def test_eval_command_writes_each_suite_beside_the_stage(exported, tmp_path, capsys):
    run = exported[0]
    folder = small_tasks(tmp_path / "tasks")
    text = write_jsonl(tmp_path / "held-out.jsonl", [{"text": SAMPLE_TEXT[:400]}])
    with pytest.raises(SystemExit) as done:
        cli_main(["eval", "--run", str(run), "--stage", "base", "--suite", "core", "--tasks-dir", str(folder),
                  "--limit", "3", "--bpb", str(text)])
    assert done.value.code == 0
    core = json.loads((run / "base" / "eval-core.json").read_text())
    assert core["limit"] == 3 and core["tasks"]["mc"]["examples"] == 3
    assert json.loads((run / "base" / "eval-bpb.json").read_text())["bytes"] == len(SAMPLE_TEXT[:400].encode())
    assert "CORE-like" in capsys.readouterr().out
    question = {"query": "Question: Which is a planet?", "choices": ["Moon", "Mars", "Sun", "Comet"], "gold": 1}
    write_jsonl(folder / "arc_easy.jsonl", [question] * 2)  # not in tasks.json: the chat suite's ARC file
    gsm8k = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "Tom has 3 apples and buys 4. How many?",
                                                    "answer": "3 + 4 = 7\n#### 7"}])
    out = tmp_path / "hf.json"
    with pytest.raises(SystemExit) as done:
        cli_main(["eval", "--hf", str(exported[1]), "--suite", "core", "chat", "--tasks-dir", str(folder),
                  "--gsm8k", str(gsm8k), "--out", str(out)])
    assert done.value.code == 0
    results = json.loads(out.read_text())
    assert results["core"]["tasks"]["mc"]["examples"] == 6 and results["core"]["model"] == str(exported[1])
    assert results["chat"]["tasks"]["arc_easy"]["examples"] == 2 and results["chat"]["tasks"]["gsm8k"]["examples"] == 1
    with pytest.raises(SystemExit) as refused:
        cli_main(["eval", "--hf", str(exported[1])])
    assert refused.value.code == 2 and "--suite" in capsys.readouterr().err


# --- the report card ---------------------------------------------------------------------------------


def test_speedrun_measure_and_the_report_section(exported, tmp_path):
    """The speedrun's benchmark stage writes held-out bpb and the base model's suite; the report's
    section shows each task's accuracy with chance beside it."""
    from picochat.evals.card import benchmark_lines, measure

    docs = write_jsonl(tmp_path / "docs.jsonl", [{"text": SAMPLE_TEXT[i : i + 200]} for i in range(0, 1000, 200)])
    measure(exported[0], docs, val_docs=2, tasks_dir=small_tasks(tmp_path / "tasks"))
    bpb = json.loads((exported[0] / "base" / "eval-bpb.json").read_text())
    assert bpb["documents"] == 2 and bpb["bytes"] == len(SAMPLE_TEXT[:400].encode())
    lines, figures = benchmark_lines(exported[0])
    text = "\n".join(lines)
    assert "## Real benchmarks" in text and f"| base | {bpb['bpb']:.3f} | 2 |" in text
    mc = figures["core"]["base"]["tasks"]["mc"]
    assert f"| mc | 0.33 | {mc['accuracy']:.3f} ({mc['examples']}) |" in text
    assert "| **core** (mean centred) | 0 |" in text
