"""`picochat chat` in the terminal: a long scripted conversation on a model with the cpu preset's
context goes on to the end, the oldest messages dropped (and announced) as the context fills."""

import io
import re

import pytest
from test_serve import runs_on_into_a_document, tiny_model

from picochat.chat import token_view
from picochat.chat_cli import ChatSession
from picochat.checkpoint import save_model
from picochat.cli import main
from picochat.config import get_preset
from picochat.engine import Sampling
from picochat.run import Run

TURNS = 40


@pytest.fixture(scope="module")
def cpu_context_run(tmp_path_factory, small_tokenizer):
    """A run folder with a tokenizer and an untrained sft model of the cpu preset's context (256)."""
    run = tmp_path_factory.mktemp("chat") / "demo"
    small_tokenizer.save(run / "tokenizer")
    context = get_preset("cpu").model["max_seq_len"]
    save_model(run / "sft", tiny_model(small_tokenizer.vocab_size, seed=2, context=context))
    return run


def chat(run, lines: list[str], monkeypatch, capsys, *flags: str) -> str:
    """What `picochat chat --run run` prints when a user types `lines`, then ends the input."""
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(line + "\n" for line in lines)))
    with pytest.raises(SystemExit) as exit_:
        main(["chat", "--run", str(run), *flags])
    out, err = capsys.readouterr()
    assert exit_.value.code == 0 and err == ""
    return out


def test_a_40_turn_chat_drops_the_oldest_messages_and_never_fails(cpu_context_run, monkeypatch, capsys):
    """With the default settings (replies up to 256 tokens, half the context kept for each)."""
    lines = [f"Tell me more about Oskel, part {turn}." for turn in range(TURNS)]
    out = chat(cpu_context_run, lines, monkeypatch, capsys, "--seed", "0")
    assert not re.search(r"^\[.*\]$", out, re.MULTILINE)  # no error line
    assert out.count("picochat> ") == TURNS
    notices = re.findall(r"\((\d+) older messages? dropped to fit the model's 256-token context\)\n", out)
    assert len(notices) >= TURNS // 4 and all(int(n) % 2 == 0 for n in notices)  # whole exchanges, many times


def test_the_session_keeps_the_system_prompt_and_the_newest_exchanges_within_the_context(cpu_context_run):
    model, tok, _ = Run(cpu_context_run).load()
    session = ChatSession(model, tok, Sampling(0.7, seed=1), system="Be brief.", max_tokens=40)
    drops = []
    for turn in range(12):
        dropped, pieces = session.reply(f"Question number {turn}?")
        "".join(pieces)
        drops.append(dropped)
        ids, _ = token_view(session.messages, tok)
        assert len(ids) <= 256 and session.messages[0] == {"role": "system", "content": "Be brief."}
    assert any(drops)
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == [f"Question number {turn}?" for turn in range(12 - len(users), 12)] and len(users) < 12


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(cpu_context_run, monkeypatch, capsys):
    out = chat(cpu_context_run, ["word " * 300, "Hello?"], monkeypatch, capsys, "--max-tokens", "8")
    assert "[the newest message needs" in out and "8 are kept for the reply: more than the model's context of 256 tokens]" in out
    assert out.count("picochat> ") == 1


def test_endoftext_ends_a_reply(cpu_context_run):
    model, tok, _ = Run(cpu_context_run).load()
    scripted, expected = runs_on_into_a_document(model, tok)
    session = ChatSession(scripted, tok, Sampling(0))
    dropped, pieces = session.reply("Where is Oskel?")
    assert ("".join(pieces), dropped) == (expected, 0)
    assert session.messages[-1] == {"role": "assistant", "content": expected}
