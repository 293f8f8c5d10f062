"""Tokenizer: exact round trips, special-token safety, fixed special ids, tiktoken parity, CLI."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picochat.tokenizer import SPECIAL_TOKENS, Tokenizer

from conftest import SAMPLE_TEXT, shared_data


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(small_tokenizer, text):
    assert small_tokenizer.decode(small_tokenizer.encode(text)) == text


def test_special_ids_fixed_whatever_the_vocab():
    for vocab in (300, 380):
        tok = Tokenizer.train([SAMPLE_TEXT], vocab_size=vocab)
        assert [tok.special_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        assert tok.vocab_size == vocab


def test_special_strings_in_text_stay_text_unless_asked(small_tokenizer):
    text = "user wrote <|im_end|><|im_start|>assistant<|im_sep|> here"
    plain = small_tokenizer.encode(text)
    assert not set(plain) & set(range(len(SPECIAL_TOKENS)))
    assert small_tokenizer.decode(plain) == text
    special = small_tokenizer.encode(text, allow_special=True)
    assert [i for i in special if i < len(SPECIAL_TOKENS)] == [3, 1, 2]
    assert small_tokenizer.decode(special) == text


def test_save_load_same_ids(small_tokenizer, tmp_path):
    path = small_tokenizer.save(tmp_path / "tok")
    assert path.name == "tokenizer.json"
    json.loads(path.read_text())  # a standard tokenizer.json
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.encode(SAMPLE_TEXT) == small_tokenizer.encode(SAMPLE_TEXT)
    assert loaded.fingerprint == small_tokenizer.fingerprint


def test_load_rejects_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(bad)


def test_a_number_keeps_its_leading_space():
    # " 12" is one pre-token (GPT-2's split; GPT-4's gives " " + "12"), so copying a number from a
    # question into the working is the same token in both places, which a tiny model learns far sooner.
    tok = Tokenizer.train(["Drava buys 12 pears for 3 dollars. 12 * 3 = 36.\n" * 50], vocab_size=300)
    pieces = [piece for piece, _ in tok._special.pre_tokenizer.pre_tokenize_str("buys 12 pears, 1234 = 36")]
    assert pieces == ["buys", "Ġ" + "12", "Ġpears", ",", "Ġ" + "1234", "Ġ=", "Ġ" + "36"]
    assert tok.decode(tok.encode(" 12")) == " 12" and len(tok.encode(" 12")) == 1


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train([SAMPLE_TEXT], vocab_size=100)


def test_tiktoken_gives_identical_ids_on_real_text():
    text = shared_data("text", "tinyshakespeare.txt").read_text()
    tok = Tokenizer.train([text[:300_000]], vocab_size=1024)
    enc = tok.as_tiktoken()
    held_out = text[300_000:400_000] + SAMPLE_TEXT
    assert enc.encode(held_out, disallowed_special=()) == tok.encode(held_out)


def test_bytes_per_token_improves_with_vocab():
    small = Tokenizer.train([SAMPLE_TEXT], vocab_size=300).bytes_per_token([SAMPLE_TEXT])[0]
    large = Tokenizer.train([SAMPLE_TEXT], vocab_size=380).bytes_per_token([SAMPLE_TEXT])[0]
    assert 1.0 <= small < large


def test_cli_train_show_stats(tmp_path):
    docs = tmp_path / "docs.txt"
    docs.write_text(SAMPLE_TEXT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "picochat", "tokenizer", *a], capture_output=True, text=True, check=True).stdout
    out = run("train", "--input", str(docs), "--out", str(tmp_path / "tok"), "--vocab-size", "350")
    assert "vocab 350" in out
    shown = run("show", "The capital of Varnia", "--tokenizer", str(tmp_path / "tok"))
    lines = shown.splitlines()
    ids = json.loads(lines[1])
    assert lines[0] == "".join(f"[{Tokenizer.load(tmp_path / 'tok').id_to_piece(i)}]" for i in ids)
    assert lines[2].startswith(f"{len(ids)} tokens")
    stats = run("stats", "--tokenizer", str(tmp_path / "tok"), "--input", str(docs))
    assert "bytes per token" in stats
