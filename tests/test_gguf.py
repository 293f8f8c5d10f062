"""GGUF export: the file holds what llama.cpp needs (Qwen3 settings, tokenizer, tensors), every dtype
reads back as the model's weights, bad requests are refused before anything is written, and, where
llama-cpp-python is installed, stock llama.cpp tokenizes like picochat and decodes the same greedy
tokens as picochat's engine."""

import json

import numpy as np
import pytest
from conftest import SAMPLE_TEXT, trained_tiny_model

from picochat.chat import CHAT_TEMPLATE, render_for_reply
from picochat.checkpoint import CheckpointError, save_model
from picochat.cli import main as cli_main
from picochat.engine import Sampling, generate
from picochat.hf import ExportError
from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

gguf = pytest.importorskip("gguf")
from picochat.gguf_export import export_gguf  # noqa: E402  (needs the gguf package)

# Varied text: numbers of every length, punctuation runs, contractions in both cases, runs of spaces
# and newlines, tabs, Unicode letters and symbols, code.
PROBES = [
    "The capital of Varnia is Oskel; 12,345 people live there (since 1987).",
    "I'm sure they'll say it's fine. I'M SURE THEY'LL SAY IT'S FINE. You've we'd she's",
    "Prices: $3.50, 1234567890 and -42 ... wait!!! ?!? #hashtag @user 50% 3/4",
    "two  spaces,   three spaces\n\nnew paragraph\n  indented\n\n\n\ttabbed\r\nwindows line",
    "Ünïcödé café naïve — “quotes” ‘single’ 日本語のテキスト 😀🎉 Ελληνικά русский",
    "def f(x):\n    return x ** 2  # code too\n\nfor i in range(10):\n\tprint(f'{i:>3}')\n",
    "   leading spaces and trailing spaces   ",
    "<|im_end|> typed by a user is text, 3+4=7",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([SAMPLE_TEXT + "\n".join(PROBES[:2])], vocab_size=512)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A run folder with a tiny trained (untied) SFT model."""
    root = tmp_path_factory.mktemp("gguf-run")
    tokenizer.save(root / "tokenizer")
    model = trained_tiny_model(tokenizer, tie=False)
    save_model(root / "sft", model, {"stage": "sft", "tokenizer": tokenizer.fingerprint})
    return root, model


@pytest.fixture(scope="module")
def exports(run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf-out")
    return {dtype: export_gguf(run[0], folder / f"tiny-{dtype}.gguf", dtype=dtype)
            for dtype in ("float32", "float16", "bfloat16", "q8_0")}


def field(reader, key):
    return reader.fields[key].contents()


def test_the_file_declares_qwen3_and_picochats_tokenizer(run, exports, tokenizer):
    _, model = run
    reader = gguf.GGUFReader(exports["float32"])
    config = model.config
    assert field(reader, "general.architecture") == "qwen3"
    assert [field(reader, f"qwen3.{key}") for key in (
        "context_length", "embedding_length", "feed_forward_length", "block_count",
        "attention.head_count", "attention.head_count_kv", "attention.key_length")] == [
        config.max_seq_len, config.d_model, config.ffn_hidden, config.n_layer, config.n_head, config.n_kv_head, config.head_dim]
    assert field(reader, "qwen3.rope.freq_base") == pytest.approx(config.rope_theta)
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.vocab_size and tokens[:9] == SPECIAL_TOKENS
    vocab = tokenizer.as_json()["model"]["vocab"]
    assert all(tokens[i] == piece for piece, i in vocab.items())
    assert field(reader, "tokenizer.ggml.token_type")[:10] == [3] * 9 + [1]  # control, then normal
    assert field(reader, "tokenizer.ggml.merges")[:3] == [" ".join(m) for m in tokenizer.as_json()["model"]["merges"][:3]]
    assert (field(reader, "tokenizer.ggml.bos_token_id"), field(reader, "tokenizer.ggml.eos_token_id"),
            field(reader, "tokenizer.ggml.eot_token_id"), field(reader, "tokenizer.ggml.padding_token_id")) == (0, 3, 3, 8)
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 0), ("float16", 1e-3), ("bfloat16", 1e-2), ("q8_0", 2e-2)])
def test_every_dtype_reads_back_as_the_models_weights(run, exports, dtype, tolerance):
    _, model = run
    reader = gguf.GGUFReader(exports[dtype])
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" in tensors and len(tensors) == len(model.state_dict())  # untied: the head is stored
    pairs = {"blk.1.ffn_down.weight": model.model.layers[1].mlp.down_proj.weight,
             "blk.0.attn_q_norm.weight": model.model.layers[0].self_attn.q_norm.weight,
             "token_embd.weight": model.model.embed_tokens.weight}
    for name, weight in pairs.items():
        tensor = tensors[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape)
        expected = weight.detach().numpy()
        scale = np.abs(expected).max()
        assert np.abs(values - expected).max() <= tolerance * scale, name
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # vectors stay exact
    matrix_type = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}[dtype]
    assert tensors["blk.1.ffn_down.weight"].tensor_type.name == matrix_type


def test_a_tied_model_stores_no_output_head(tmp_path, tokenizer):
    tokenizer.save(tmp_path / "run" / "tokenizer")
    save_model(tmp_path / "run" / "sft", trained_tiny_model(tokenizer, tie=True), {"tokenizer": tokenizer.fingerprint})
    reader = gguf.GGUFReader(export_gguf(tmp_path / "run", tmp_path / "tied.gguf"))
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # llama.cpp then reuses the embedding


def test_a_tokenizer_with_another_split_is_refused_before_writing(tmp_path, tokenizer, run):
    spec = tokenizer.as_json()
    spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{N}{1,3}| ?\p{L}+|\s+|."
    (tmp_path / "run" / "tokenizer").mkdir(parents=True)
    (tmp_path / "run" / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec))
    other = Tokenizer.load(tmp_path / "run" / "tokenizer")
    save_model(tmp_path / "run" / "sft", run[1], {"tokenizer": other.fingerprint})
    with pytest.raises(ExportError, match=r"tokenizer.json: this tokenizer splits text with .*'gpt-2'"):
        export_gguf(tmp_path / "run", tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_bad_requests_are_refused_before_anything_is_written(run, tmp_path, capsys):
    root, _ = run
    with pytest.raises(ExportError, match="dtype must be one of"):
        export_gguf(root, tmp_path / "a.gguf", dtype="int4")
    with pytest.raises(CheckpointError, match="no model for stage .rl."):
        export_gguf(root, tmp_path / "a.gguf", stage="rl")
    (tmp_path / "taken.gguf").write_text("keep me")
    with pytest.raises(ExportError, match="already exists"):
        export_gguf(root, tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_text() == "keep me"
    with pytest.raises(SystemExit):
        cli_main(["export", "--run", str(root), "--out", str(tmp_path / "b.gguf"), "--format", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # q8_0 is for GGUF files only
        cli_main(["export", "--run", str(root), "--out", str(tmp_path / "hf"), "--dtype", "q8_0"])
    assert "got 'q8_0' (q8_0 is for --format gguf)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.gguf"]


def test_the_cli_writes_the_file_and_says_how_to_run_it(run, tmp_path, capsys):
    with pytest.raises(SystemExit, match="0"):
        cli_main(["export", "--run", str(run[0]), "--format", "gguf", "--dtype", "q8_0", "--out", str(tmp_path / "m.gguf")])
    assert "llama-server -m" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]  # no temporary file left behind
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


# --- stock llama.cpp (llama-cpp-python from PyPI) --------------------------------------------------


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed: `python benchmarks/bench_llama_cpp.py --install` builds it")


def test_llama_cpp_tokenizes_like_picochat(llama_cpp, exports, tokenizer):
    llm = llama_cpp.Llama(model_path=str(exports["float32"]), vocab_only=True, verbose=False)
    for text in PROBES + [SAMPLE_TEXT]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tokenizer.encode(text), text


def test_llama_cpp_decodes_picochats_greedy_tokens(llama_cpp, run, exports, tokenizer):
    _, model = run
    llm = llama_cpp.Llama(model_path=str(exports["float32"]), n_ctx=model.config.max_seq_len, n_threads=1,
                          n_batch=model.config.max_seq_len, seed=0, verbose=False)
    prompts = [render_for_reply([{"role": "user", "content": "What is 2+3?"}], tokenizer),
               [tokenizer.eot_id, *tokenizer.encode("The capital of Varnia is")]]
    for prompt in prompts:
        ours = generate(model, [prompt], max_new_tokens=24, sampling=Sampling(temperature=0.0))[0][0].tokens
        llm.reset()
        theirs = []
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == len(ours):
                break
        assert theirs == ours, tokenizer.decode(prompt)
