"""Hugging Face export and import: transformers loads an export and computes what picochat computes
(logits, greedy tokens, chat-template ids, tokenization); Qwen3 folders import into runs; bad folders
give clear errors."""

import json
import shutil

import pytest
import torch
from conftest import SAMPLE_TEXT, shared_data, trained_tiny_model
from safetensors.torch import load_file, save_file

from picochat.chat import CHAT_TEMPLATE, render, render_for_reply
from picochat.checkpoint import load_model, save_model
from picochat.cli import main as cli_main
from picochat.engine import Sampling, generate
from picochat.hf import ExportError, HFImportError, export_hf, import_hf
from picochat.model import ModelConfig, Transformer
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

transformers = pytest.importorskip("transformers")

CONVERSATIONS = {
    "multi-turn with system": [
        {"role": "system", "content": "You are brief. Answer in one line."},
        {"role": "user", "content": "What is the capital of Varnia?"},
        {"role": "assistant", "content": "Oskel, on the river Tam."},
        {"role": "user", "content": "How many people live there?"},
        {"role": "assistant", "content": "12,345 people."},
    ],
    "tool call": [
        {"role": "user", "content": "Each apple cost $2; what do 3 apples cost?"},
        {"role": "assistant", "content": "Let me compute.", "tool_call": "3*2"},
        {"role": "tool", "content": "6"},
        {"role": "assistant", "content": "They cost $6."},
    ],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def exported(request, tmp_path_factory, small_tokenizer):
    """(run folder, export folder, picochat model) of a tiny trained run, exported."""
    root = tmp_path_factory.mktemp("tied" if request.param else "untied")
    run, out = root / "run", root / "export"
    small_tokenizer.save(run / "tokenizer")
    model = trained_tiny_model(small_tokenizer, tie=request.param)
    save_model(run / "sft", model, {"stage": "sft", "tokenizer": small_tokenizer.fingerprint})
    export_hf(run, out, stage="sft")
    return run, out, model


@pytest.fixture(scope="module")
def hf_model(exported):
    return transformers.AutoModelForCausalLM.from_pretrained(exported[1], dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, small_tokenizer):
    """AutoTokenizer on an export (of an untrained model: only the tokenizer files matter here)."""
    run = tmp_path_factory.mktemp("tokenizer-run")
    small_tokenizer.save(run / "tokenizer")
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size, n_layer=1, d_model=16, n_head=2, n_kv_head=1)
    save_model(run / "base", Transformer(config))
    return transformers.AutoTokenizer.from_pretrained(export_hf(run, run / "export"))


# --- export --------------------------------------------------------------------------------------


def test_export_writes_a_qwen3_folder(exported):
    run, out, model = exported
    assert sorted(p.name for p in out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["model_type"] == "qwen3"
    assert (config["torch_dtype"], config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == ("float32", 0, 3, 8)
    assert config["tie_word_embeddings"] == model.config.tie_embeddings and config["head_dim"] == 16
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["pad_token"]) == ("<|endoftext|>", "<|im_end|>", "<|pad|>")
    assert tok_config["chat_template"] == CHAT_TEMPLATE == (out / "chat_template.jinja").read_text()
    assert [tok_config["added_tokens_decoder"][str(i)]["content"] for i in range(9)] == SPECIAL_TOKENS
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [3, 0]
    weights = load_file(out / "model.safetensors")
    assert ("lm_head.weight" in weights) != model.config.tie_embeddings  # Qwen3 ties from the config
    assert torch.equal(weights["model.layers.1.mlp.down_proj.weight"], model.model.layers[1].mlp.down_proj.weight)
    assert (out / "tokenizer.json").read_text() == (run / "tokenizer" / "tokenizer.json").read_text()


def test_transformers_logits_equal_picochat(exported, hf_model):
    _, _, model = exported
    assert type(hf_model).__name__ == "Qwen3ForCausalLM"
    ids = torch.randint(0, model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, model(ids), atol=1e-4, rtol=0)


def test_auto_tokenizer_encodes_and_decodes_like_picochat(hf_tokenizer, small_tokenizer):
    texts = [SAMPLE_TEXT[:300], "  leading spaces\n\n\ttabs and 1234567 digits", "Ünïcödé 日本語 🎉", "don't WE'LL"]
    for text in texts:
        ids = small_tokenizer.encode(text)
        assert hf_tokenizer.encode(text) == ids
        assert hf_tokenizer.decode(ids) == text == small_tokenizer.decode(ids)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (0, 3, 8)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_gives_picochat_ids(name, hf_tokenizer, small_tokenizer):
    messages = CONVERSATIONS[name]

    def hf_ids(conversation, add_generation_prompt):
        encoding = hf_tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt,
                                                    tokenize=True, return_dict=True)
        return list(encoding["input_ids"])

    assert hf_ids(messages, False) == render(messages, small_tokenizer)[0]
    prompt = messages[:-1] if name == "tool call" else messages[:-2] + [{"role": "user", "content": "And Tam?"}]
    assert hf_ids(prompt, True) == render_for_reply(prompt, small_tokenizer)


def test_real_conversations_render_the_same_through_the_chat_template(hf_tokenizer, small_tokenizer):
    path = shared_data("chat", "tulu-eval-prompts.messages.jsonl")
    conversations = [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]
    for messages in conversations:
        ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert list(ids) == render(messages, small_tokenizer)[0]
        prompt = hf_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(prompt["input_ids"]) == render_for_reply(messages[:-1], small_tokenizer)
        assert hf_tokenizer.decode(ids[1:]) == small_tokenizer.decode(ids[1:])


def test_greedy_generation_matches_engine(exported, hf_model, hf_tokenizer, small_tokenizer):
    _, _, model = exported
    tok = small_tokenizer
    prompts = [render_for_reply([{"role": "user", "content": "What is 3+4?"}], tok),
               [tok.eot_id] + tok.encode("The capital of Varnia is"),
               render_for_reply([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 1+2?"}], tok)]
    # Besides the exported EOS ids, stop at a token the first reply is known to reach, so stopping is
    # compared whatever this tiny model learned (rows that run to the limit are compared too).
    [[free_run], *_] = generate(model, prompts[:1], 24, Sampling(temperature=0))
    reached = next((t for i, t in enumerate(free_run.tokens) if i >= 1 and t not in free_run.tokens[:i]),
                   free_run.tokens[0])  # a reply of one repeated token: stop at once
    stop_ids = [tok.im_end_id, tok.eot_id, reached]
    ours = generate(model, prompts, 24, Sampling(0, stop_ids=stop_ids))
    batch = hf_tokenizer.pad({"input_ids": prompts}, return_tensors="pt")  # left padding, as exported
    with torch.no_grad():
        theirs = hf_model.generate(**batch, do_sample=False, max_new_tokens=24, eos_token_id=stop_ids)
    assert ours[0][0].finish_reason == "stop"
    for [completion], row in zip(ours, theirs[:, batch["input_ids"].shape[1]:].tolist()):
        if completion.finish_reason == "stop":  # transformers keeps the EOS it stopped at, then pads
            stop_at = len(completion.tokens)
            assert row[stop_at] in stop_ids and set(row[stop_at + 1:]) <= {tok.pad_id}
            row = row[:stop_at]
        assert row == completion.tokens


def test_export_refuses_to_overwrite_unless_forced(exported, tmp_path):
    run, _, model = exported
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ExportError, match="already exists"):
        export_hf(run, out)
    assert (out / "old.txt").exists()
    export_hf(run, out, dtype="bfloat16", force=True)
    assert not (out / "old.txt").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_file(out / "model.safetensors")["model.norm.weight"].dtype == torch.bfloat16


def test_export_refuses_a_tokenizer_the_model_was_not_trained_with(exported, tmp_path):
    run, _, _ = exported
    other = tmp_path / "run"
    shutil.copytree(run / "sft", other / "sft")
    Tokenizer.train([SAMPLE_TEXT[:2000]], vocab_size=300).save(other / "tokenizer")
    with pytest.raises(ExportError, match="trained with tokenizer"):
        export_hf(other, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_tokenizer_larger_than_the_embedding(tmp_path, small_tokenizer):
    small_tokenizer.save(tmp_path / "run" / "tokenizer")
    config = ModelConfig(vocab_size=small_tokenizer.vocab_size - 1, n_layer=1, d_model=16, n_head=2, n_kv_head=1)
    save_model(tmp_path / "run" / "base", Transformer(config))
    with pytest.raises(ExportError, match=f"{small_tokenizer.vocab_size} tokens, more than the {config.vocab_size} embeddings"):
        export_hf(tmp_path / "run", tmp_path / "out")


# --- import --------------------------------------------------------------------------------------


def make_hf_qwen3(folder, tok: Tokenizer, **overrides):
    """A random transformers Qwen3ForCausalLM saved with save_pretrained, with a picochat tokenizer."""
    fields = dict(vocab_size=tok.vocab_size + 8, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=80,
                  tie_word_embeddings=True, rope_theta=1000.0)
    torch.manual_seed(3)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**fields, **overrides})).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    hf.save_pretrained(folder)
    tok.save(folder / "tokenizer.json")
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_import_of_a_transformers_qwen3(tie, tmp_path, small_tokenizer):
    hf = make_hf_qwen3(tmp_path / "hf", small_tokenizer, tie_word_embeddings=tie)
    stage_dir = import_hf(tmp_path / "hf", tmp_path / "run")
    assert stage_dir == tmp_path / "run" / "sft"
    model, meta = load_model(stage_dir)
    assert meta["tokenizer"] == small_tokenizer.fingerprint == Tokenizer.load(tmp_path / "run" / "tokenizer").fingerprint
    assert (model.config.d_model, model.config.head_dim, model.config.rope_theta, model.config.tie_embeddings) == (48, 8, 1000.0, tie)
    ids = torch.randint(0, model.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)
    [[completion]] = generate(model, [[0, 1, 300, 2]], 5, Sampling(temperature=0), tokenizer=small_tokenizer)
    assert len(completion.tokens) == 5  # the engine runs on the imported run


def test_round_trip_export_import_gives_identical_weights(exported, tmp_path):
    run, out, model = exported
    import_hf(out, tmp_path / "run", stage="base")
    back, meta = load_model(tmp_path / "run" / "base")
    assert back.config == model.config and meta["stage"] == "base"
    original = model.state_dict()
    assert all(torch.equal(tensor, original[name]) for name, tensor in back.state_dict().items())
    assert (tmp_path / "run" / "tokenizer" / "tokenizer.json").read_text() == (run / "tokenizer" / "tokenizer.json").read_text()


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture
def hf_folder(tmp_path, small_tokenizer):
    make_hf_qwen3(tmp_path / "hf", small_tokenizer)
    return tmp_path / "hf"


@pytest.mark.parametrize("break_it, message", [
    (lambda d: (d / "config.json").unlink(), r"config.json: missing"),
    (lambda d: (d / "config.json").write_text('{\n"vocab_size": 5,\n}'), r"config.json: line 3: not valid JSON"),
    (lambda d: edit_json(d / "config.json", architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
    (lambda d: edit_json(d / "config.json", architectures=["LlamaForCausalLM"], model_type="llama"), "applies RMSNorm to queries and keys"),
    (lambda d: edit_json(d / "config.json", rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}), "rope type 'yarn'"),
    (lambda d: edit_json(d / "config.json", intermediate_size=64), r"'model.layers.0.mlp.down_proj.weight' has shape \[48, 96\], config.json implies \[48, 64\]"),
    (lambda d: save_file({k: v for k, v in load_file(d / "model.safetensors").items() if "layers.1.mlp" not in k},
                         str(d / "model.safetensors"), metadata={"format": "pt"}), r"lack 3 tensor\(s\): model.layers.1.mlp.down_proj"),
    (lambda d: save_file({**load_file(d / "model.safetensors"), "model.layers.0.self_attn.q_proj.bias": torch.zeros(32)},
                         str(d / "model.safetensors"), metadata={"format": "pt"}), "unexpected tensor 'model.layers.0.self_attn.q_proj.bias'"),
    (lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"), "pickled .bin weights are not read"),
    (lambda d: (d / "tokenizer.json").unlink(), "tokenizer.json: missing"),
    (lambda d: (d / "model.safetensors").unlink() or (d / "model.safetensors.index.json")
     .write_text(json.dumps({"weight_map": {"model.embed_tokens.weight": "../../elsewhere.safetensors"}})),
     r"must name files in .*elsewhere.safetensors"),
])
def test_import_refuses_malformed_folders(break_it, message, hf_folder, tmp_path):
    break_it(hf_folder)
    with pytest.raises(HFImportError, match=message):
        import_hf(hf_folder, tmp_path / "run")
    assert not (tmp_path / "run" / "sft" / "model.json").exists()


def test_import_refuses_a_tokenizer_without_picochats_special_tokens(hf_folder, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    foreign = HFTokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel()
    foreign.train_from_iterator([SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"]))
    foreign.save(str(hf_folder / "tokenizer.json"))
    with pytest.raises(HFImportError, match=r"special tokens at ids 0..8.*<\|im_start\|> at None"):
        import_hf(hf_folder, tmp_path / "run")


def test_import_keeps_an_existing_run_unless_forced(hf_folder, tmp_path, small_tokenizer):
    import_hf(hf_folder, tmp_path / "run")
    with pytest.raises(HFImportError, match="already holds a model"):
        import_hf(hf_folder, tmp_path / "run")
    Tokenizer.train([SAMPLE_TEXT[:2000]], vocab_size=300).save(tmp_path / "run" / "tokenizer")
    with pytest.raises(HFImportError, match="different tokenizer"):
        import_hf(hf_folder, tmp_path / "run", stage="rl")
    import_hf(hf_folder, tmp_path / "run", force=True)
    assert Tokenizer.load(tmp_path / "run" / "tokenizer").fingerprint == small_tokenizer.fingerprint


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_export_then_import(exported, tmp_path, capsys):
    run, _, model = exported
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["export", "--run", str(run), "--stage", "sft", "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 0 and "Qwen3ForCausalLM" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--hf", str(tmp_path / "out"), "--run", str(tmp_path / "run")])
    assert exit_info.value.code == 0
    assert load_model(tmp_path / "run" / "sft")[0].config == model.config
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["import", "--hf", str(tmp_path / "nowhere"), "--run", str(tmp_path / "run2")])
    assert exit_info.value.code == 2 and "nowhere: not a folder" in capsys.readouterr().err
