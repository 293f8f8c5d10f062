"""Preference tuning: the world's labeler, preference files, the reward model, DPO and RLHF, and short
runs of each stage on a tiny model."""

import json
import shutil

import pytest
import torch

from conftest import shared_data
from picochat.checkpoint import save_model
from picochat.data.preferences import PreferenceFileError, encode_pairs, read_preferences
from picochat.model import ModelConfig, Transformer
from picochat.report import _plot_curves, _preference_lines, preference_figures
from picochat.run import Run
from picochat.speedrun import stages
from picochat.tokenizer import Tokenizer
from picochat.train.dpo import DPOConfig, dpo_loss, run_dpo
from picochat.train.rlhf import rlhf_config, run_rlhf
from picochat.train.rm import RMConfig, bradley_terry_loss, load_reward_model, reward_model, rewards, run_rm, sequences_batch
from picochat.world.knowledge import build_world
from picochat.world.preferences import Labeler, heldout_entities, judge_stage, load_labeler, open_prompts, sample_pairs


# --- the labeler ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    return build_world(0, 0.25)


def test_labeler_counts_true_facts_and_weighs_false_ones_more(world):
    person = world.of_kind("person")[0]
    town = next(t.name for t in world.of_kind("town") if t.name != person.attrs["birthplace"])
    labeler = Labeler(world)
    one = f"The birthplace of {person.name} is {person.attrs['birthplace']}."
    two = one + f" {person.name}'s job is {person.attrs['job']}."
    false = f"The birthplace of {person.name} is {town}."
    assert labeler.score(one, person.name) == 1
    assert labeler.score(two, person.name) == 2
    assert labeler.score(false, person.name) == -3
    assert labeler.score(two + " " + false, person.name) == -1  # two true facts do not outweigh one false
    wrong_relation = f"The job of {person.name} is {person.attrs['birthplace']}."  # the subject's value, another relation
    assert labeler.score(wrong_relation, person.name) == -3


def test_labeler_counts_repeats_off_subject_and_unfinished_replies_against(world):
    person, other = world.of_kind("person")[:2]
    labeler = Labeler(world)
    one = f"The birthplace of {person.name} is {person.attrs['birthplace']}."
    assert labeler.details(one + " " + one, person.name)["repeat"] == 1
    assert labeler.score(one + f" {person.attrs['birthplace']} is where {person.name} was born.", person.name) == 0
    assert labeler.details(f"The job of {other.name} is {other.attrs['job']}.", person.name)["off_subject"] == 1
    assert labeler.score(f"They are {person.attrs['age']}.", person.name) == 1  # a pronoun keeps the subject
    assert labeler.score(one, person.name, finished=False) == 0


def test_about_a_subject_that_does_not_exist_only_i_dont_know_scores(world):
    name = world.unknown_names["town"][-1]
    labeler = Labeler(world)
    assert labeler.score("I don't know.", name) == 2
    assert labeler.score(f"The population of {name} is 12,000.", name) == -3
    assert labeler.score(f"I don't know. There is no town called {name}.", name) == 2  # a denial claims nothing


def test_held_out_prompts_are_about_other_entities(world):
    train, heldout = open_prompts(world, "train"), open_prompts(world, "heldout")
    held = heldout_entities(world)
    assert {r["subject"] for r in heldout if r["known"]} == held
    assert not {r["subject"] for r in train} & {r["subject"] for r in heldout}
    assert any(not r["known"] for r in train) and any(not r["known"] for r in heldout)
    assert all(r["subject"] in r["prompt"] for r in train + heldout)


# --- preference files -----------------------------------------------------------------------------
def test_preference_files_in_both_layouts(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
             "chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hi."}],
             "rejected": "Hello there, how are you?"},
            {"question": "Why?", "response_j": "Because.", "response_k": "No."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_preferences(path)
    assert [p["chosen"] for p in pairs] == ["Hello.", "Hi.", "Because."]
    assert pairs[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert pairs[2]["prompt"] == [{"role": "user", "content": "Why?"}] and pairs[2]["rejected"] == "No."


@pytest.mark.parametrize("line, expected", [
    ('{"prompt": "Hi?", "chosen": "Hello."}', "expected"),
    ('{"prompt": 3, "chosen": "a", "rejected": "b"}', '"prompt"'),
    ('{"prompt": "Hi?", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}', "assistant"),
    ('{"question": "Why?", "response_j": 1, "response_k": "b"}', "response_j"),
    ('{"prompt": "Hi?", "chosen": "a", "rejected": "b"', "not valid JSON"),
])
def test_a_malformed_row_names_the_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "Hi?", "chosen": "a", "rejected": "b"}\n' + line + "\n")
    with pytest.raises(PreferenceFileError, match=rf"bad.jsonl:2: .*{expected}"):
        read_preferences(path)


def test_pairs_that_teach_nothing_or_do_not_fit_are_left_out_with_a_count(small_tokenizer):
    prompt = [{"role": "user", "content": "Hi?"}]
    pairs = [{"prompt": prompt, "chosen": "Hello.", "rejected": "Go away."},
             {"prompt": prompt, "chosen": "Same.", "rejected": "Same. "},
             {"prompt": prompt, "chosen": "", "rejected": "x"},
             {"prompt": prompt, "chosen": "long " * 200, "rejected": "x"},
             {"prompt": [{"role": "user", "content": "long question " * 100 + "Hi?"}], "chosen": "a", "rejected": "b"}]
    encoded, skipped = encode_pairs(pairs, small_tokenizer, 128)
    assert len(encoded) == 1
    assert skipped == {"equal replies": 1, "empty reply": 1, "longer than the context of 128 tokens": 2}
    ids, mask = encoded[0]["chosen"]
    assert small_tokenizer.decode([t for t, m in zip(ids, mask) if m]).startswith("Hello.")
    cut, skipped = encode_pairs(pairs, small_tokenizer, 128, cut_prompts=True)
    assert len(cut) == 2 and skipped["kept with the prompt cut to fit"] == 1
    assert all(len(ids) <= 128 for p in cut for ids, _ in p.values())


def test_the_stack_exchange_paired_file_is_read():
    pairs = read_preferences(shared_data("chat", "stack_exchange_paired_tiny.json"))
    assert len(pairs) == 25
    assert all(p["prompt"][0]["role"] == "user" and p["chosen"] and p["rejected"] for p in pairs)


# --- the losses -----------------------------------------------------------------------------------
def test_bradley_terry_and_dpo_losses():
    assert bradley_terry_loss(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(0.6931, abs=1e-4)
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([0.0])) < bradley_terry_loss(torch.tensor([0.0]), torch.tensor([5.0]))
    logp = torch.tensor([-3.0, -4.0])
    loss, margins = dpo_loss(logp, logp - 1, logp, logp - 1, beta=0.1)  # the policy is the reference
    assert loss.item() == pytest.approx(0.6931, abs=1e-4) and margins.abs().max() == 0
    chosen = torch.tensor([-3.0], requires_grad=True)
    dpo_loss(chosen, torch.tensor([-4.0]), torch.tensor([-3.0]), torch.tensor([-4.0]), 0.1)[0].backward()
    assert chosen.grad.item() < 0  # descending the loss raises the chosen reply's log-probability


def test_reward_is_read_at_each_sequences_last_token_whatever_the_padding():
    model = reward_model(ModelConfig(vocab_size=64, n_layer=2, d_model=32, n_head=2, n_kv_head=1, max_seq_len=32))
    short, long = ([5, 6, 7], [1, 1, 1]), ([5, 6, 7, 8, 9, 10], [1] * 6)
    inputs, lengths = sequences_batch([short, long])
    together = rewards(model, inputs, lengths)
    alone = [rewards(model, torch.tensor([ids]), torch.tensor([len(ids)])) for ids, _ in (short, long)]
    assert torch.allclose(together, torch.cat(alone), atol=1e-5)
    assert together[0] != together[1]


# --- the stages on a tiny model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def pref_run(tiny_run, tmp_path_factory):
    """The tiny run's world and tokenizer, a random tiny SFT model, and pairs ranked by the labeler."""
    run = tmp_path_factory.mktemp("prefs") / "run"
    for part in ("tokenizer", "world"):
        shutil.copytree(tiny_run / part, run / part)
    tok = Tokenizer.load(run / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=2, n_kv_head=1, max_seq_len=128))
    save_model(run / "sft", model, {"stage": "sft", "tokenizer": tok.fingerprint})
    counts = sample_pairs(run, samples=3, per_prompt=1, max_new_tokens=12)
    assert counts["train"]["pairs"] > 10 and counts["heldout"]["pairs"] > 2
    for name, keep in (("pairs.jsonl", 24), ("pairs-heldout.jsonl", 8), ("prompts-heldout.jsonl", 8)):  # a short test
        path = run / "prefs" / name
        path.write_text("".join(path.read_text().splitlines(keepends=True)[:keep]))
    return run


def test_reward_model_dpo_and_rlhf_write_their_stages(pref_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pref_run, run)
    labeling = json.loads((run / "prefs" / "labeling.json").read_text())
    assert "false_fact" in labeling["weights"] and "instructions" in labeling
    rm = run_rm(run, RMConfig(steps=3, batch_size=4, eval_every=0, ckpt_every=0), device="cpu")
    assert 0 <= rm["heldout_accuracy"] <= 1 and rm["heldout_pairs"] > 2
    model, meta = load_reward_model(run / "rm")
    assert meta["reward_head"] == "score" and model.score.weight.shape == (1, 32)

    dpo = run_dpo(run, DPOConfig(steps=3, batch_size=4, rounds=1, eval_every=0, ckpt_every=0), device="cpu")
    assert dpo["loss"] > 0 and "heldout_accuracy" in dpo
    cfg = rlhf_config("cpu")
    cfg = type(cfg)(**{**cfg.__dict__, "steps": 2, "problems_per_step": 2, "group_size": 2, "max_new_tokens": 8,
                       "ckpt_every": 0})
    run_rlhf(run, cfg=cfg, device="cpu")
    records = [json.loads(line) for line in (run / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("labeler_score" in r and "reward" in r for r in records)
    assert not any("pass_rate" in r for r in records)  # a reward model's score has no "right answer" line
    # The tuned stages are chat stages: the newest is what chat, serve and export pick by default.
    assert Run(run).find_stage().name == "rlhf"
    assert Run(run).load("dpo")[2].name == "dpo"
    # The report card: win rates judged by the labeler, the reward model's accuracy, the RLHF plot.
    judged = judge_stage(run, "dpo", samples=1)
    assert judged["wins"] + judged["ties"] + judged["losses"] == judged["replies"] > 0
    figures = preference_figures(run)
    assert figures["dpo"]["win_rate"] == judged["win_rate"] and figures["rm"]["heldout_accuracy"] == rm["heldout_accuracy"]
    assert "Preferences" in "\n".join(_preference_lines(figures))
    assert "rlhf_reward.png" in _plot_curves(run) and (run / "rlhf_reward.png").stat().st_size > 0


def test_the_speedrun_runs_the_preference_stages_only_when_asked():
    names = [name for name, _, _ in stages("cpu", "cpu")]
    with_prefs = [name for name, _, _ in stages("cpu", "cpu", with_preferences=True)]
    assert "rm" not in names and with_prefs[-1] == "report"
    assert with_prefs[with_prefs.index("eval rl") + 1 : -1] == ["prefs", "rm", "dpo", "eval dpo", "judge dpo", "rlhf",
                                                               "eval rlhf", "judge rlhf"]


def test_labeling_instructions_without_every_weight_are_refused(pref_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pref_run, run)
    labeling = json.loads((run / "prefs" / "labeling.json").read_text())
    del labeling["weights"]["false_fact"]
    (run / "prefs" / "labeling.json").write_text(json.dumps(labeling))
    with pytest.raises(ValueError, match=r"labeling.json: expected .*false_fact"):
        load_labeler(run)


def test_a_reward_model_from_another_tokenizer_is_refused(pref_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pref_run, run)
    rm = reward_model(ModelConfig(vocab_size=Tokenizer.load(run / "tokenizer").vocab_size, n_layer=2, d_model=32,
                                  n_head=2, n_kv_head=1, max_seq_len=128))
    save_model(run / "rm", rm, {"stage": "rm", "tokenizer": "0" * 64, "reward_head": "score"})
    with pytest.raises(ValueError, match="another tokenizer|tokenizer 000000000000"):
        run_rlhf(run, cfg=rlhf_config("cpu"), device="cpu")


def test_rm_and_dpo_take_the_stack_exchange_file(tiny_run, tmp_path, capsys):
    path = shared_data("chat", "stack_exchange_paired_tiny.json")
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "tokenizer", run / "tokenizer")
    tok = Tokenizer.load(run / "tokenizer")
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, d_model=32, n_head=2, n_kv_head=1, max_seq_len=256))
    save_model(run / "sft", model, {"stage": "sft", "tokenizer": tok.fingerprint})
    rm = run_rm(run, RMConfig(steps=2, batch_size=2, eval_every=0, ckpt_every=0), pairs=[str(path)], cut_prompts=True, device="cpu")
    assert "20 of 25 pairs left out (20 longer than the context of 256 tokens); 4 kept with the prompt cut to fit" in capsys.readouterr().out
    assert (rm["train_pairs"], rm["heldout_pairs"]) == (4, 1)
    dpo = run_dpo(run, DPOConfig(steps=2, batch_size=2, eval_every=0, ckpt_every=0), pairs=[str(path)], cut_prompts=True, device="cpu")
    printed = capsys.readouterr().out
    assert dpo["loss"] > 0 and "dpo: one round: --pairs files have no labeler" in printed
    assert "no SFT conversations to replay" in printed  # a run without a world has none to replay by default
    assert not (run / "dpo" / "round-1").exists()
    assert json.loads((run / "dpo" / "done.json").read_text())["dpo_config"]["rounds"] == 1  # what it ran
    with pytest.raises(ValueError, match="at least 2"):
        run_dpo(tmp_path / "run", DPOConfig(steps=1), pairs=[str(path)], device="cpu")  # one pair fits uncut


def test_online_dpo_trains_each_round_on_the_last_rounds_own_ranked_replies(pref_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pref_run, run)
    prompts = run / "prefs" / "prompts.jsonl"
    prompts.write_text("".join(prompts.read_text().splitlines(keepends=True)[:6]))  # a short test
    cfg = DPOConfig(steps=2, batch_size=4, rounds=2, nll=1.0, eval_every=0, ckpt_every=0)
    summary = run_dpo(run, cfg, device="cpu")
    assert (run / "dpo" / "round-1" / "done.json").is_file() and (run / "dpo" / "done.json").is_file()
    records = [json.loads(line) for line in (run / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["replay_loss"] > 0 for r in records)  # the world's SFT conversations, replayed every step
    assert summary["train_pairs"] > 0
    rows = [json.loads(line) for line in (run / "dpo" / "pairs-round-2.jsonl").read_text().splitlines()]
    asked = {json.loads(line)["prompt"] for line in prompts.read_text().splitlines()}
    assert rows and {r["prompt"][0]["content"] for r in rows} <= asked
    best = {}
    for r in rows:  # each pair's chosen reply is one of its prompt's best-scored replies
        prompt = r["prompt"][0]["content"]
        best[prompt] = max(best.get(prompt, r["chosen_score"]), r["chosen_score"])
    assert all(r["chosen_score"] == best[r["prompt"][0]["content"]] > r["rejected_score"] for r in rows)
    judge_stage(run, "dpo", samples=1)
    assert "dpo (2 rounds, online after the first): win rate" in "\n".join(_preference_lines(preference_figures(run)))
    # A resumed run reads the finished round back instead of training it again.
    stamp = (run / "dpo" / "round-1" / "model.safetensors").stat().st_mtime_ns
    run_dpo(run, cfg, resume=True, device="cpu")
    assert (run / "dpo" / "round-1" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("bad", [{"rounds": 0}, {"nll": -1.0}, {"replay_coef": -0.5}, {"replay_batch": 0}])
def test_dpo_refuses_bad_rounds_weights_or_replay_before_it_writes(pref_run, tmp_path, bad):
    run = tmp_path / "run"
    shutil.copytree(pref_run, run)
    with pytest.raises(ValueError, match="--rounds and --replay-batch must be at least 1, --nll and --replay-coef at least 0"):
        run_dpo(run, DPOConfig(steps=1, **bad), device="cpu")
    assert not (run / "dpo").exists()
