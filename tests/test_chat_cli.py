"""`picochat chat` in the terminal: a long scripted conversation on a model with the cpu preset's
context goes on to the end, the oldest messages dropped (and announced) as the context fills; tool
calls show on lines of their own, and `--no-tools` offers and runs none."""

import io
import json
import re

import pytest
from test_serve import CALC_ANSWER, RecitingTransformer, calculating, runs_on_into_a_document, tiny_model, tool_script

import picochat.chat_cli
from picochat.chat import token_view
from picochat.chat_cli import ChatSession, step_lines
from picochat.checkpoint import save_model
from picochat.cli import main
from picochat.config import get_preset
from picochat.data.index import build_index
from picochat.engine import Sampling
from picochat.reply import ToolStep
from picochat.run import Run
from picochat.tools import TOOLS_SYSTEM_PROMPT, Tools, with_tools

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
    assert "[the newest message with the system message needs" in out and "8 are kept for the reply: more than the model's context of 256 tokens]" in out
    assert out.count("picochat> ") == 1


def test_endoftext_ends_a_reply(cpu_context_run):
    model, tok, _ = Run(cpu_context_run).load()
    scripted, expected = runs_on_into_a_document(model, tok)
    session = ChatSession(scripted, tok, Sampling(0))
    dropped, pieces = session.reply("Where is Oskel?")
    assert ("".join(pieces), dropped) == (expected, 0)
    assert session.messages[-1] == {"role": "assistant", "content": expected}


# --- tools -----------------------------------------------------------------------------------------
def scripted_chat(run, model, lines, monkeypatch, capsys, *flags: str) -> tuple[str, list[dict]]:
    """What `picochat chat` prints with `model` in place of the run's, and how it called the engine."""
    _, tok, stage_dir = Run(run).load()
    monkeypatch.setattr(Run, "load", lambda self, stage=None, device="cpu": (model, tok, stage_dir))
    calls = []
    real_stream = picochat.chat_cli.stream

    def spying_stream(model, prompt, *args, **kwargs):
        calls.append({"prompt": tok.decode(prompt), **kwargs})
        return real_stream(model, prompt, *args, **kwargs)

    monkeypatch.setattr(picochat.chat_cli, "stream", spying_stream)
    return chat(run, lines, monkeypatch, capsys, *flags), calls


def test_a_tool_call_shows_on_a_line_of_its_own_and_the_reply_without_markup(cpu_context_run, monkeypatch, capsys):
    model, tok, _ = Run(cpu_context_run).load()
    out, calls = scripted_chat(cpu_context_run, calculating(model, tok), ["What is 4 * 2?", "/tokens"], monkeypatch, capsys)
    assert "tools: calc only (this run has no search index)" in out.splitlines()[0]
    assert f"picochat> \n  ⚙ calc: 4 * 2 → 8\n{CALC_ANSWER}\n" in out
    assert "<|tool_call|>" not in out.split("picochat> ")[1].split("you> ")[0]  # the reply
    assert "[<|tool_call|>]" in out and "[<|/tool_call|>][<|tool_result|>][ ][8][<|/tool_result|>]" in out  # /tokens (" 8" is two tokens here)
    [call] = calls
    assert call["prompt"].startswith(f"<|endoftext|><|im_start|>system<|im_sep|>{TOOLS_SYSTEM_PROMPT}<|im_end|>")
    assert call["tools"] is not None and call["tools"].index is None and "tokenizer" not in call


def test_no_tools_offers_none_and_runs_no_call(cpu_context_run, monkeypatch, capsys):
    model, tok, _ = Run(cpu_context_run).load()
    scripted = calculating(model, tok, tools_run=False)
    out, calls = scripted_chat(cpu_context_run, scripted, ["What is 4 * 2?"], monkeypatch, capsys, "--no-tools")
    assert "tools off" in out.splitlines()[0]
    assert f"picochat> \n  ⚙ calc: 4 * 2 → no result\n{CALC_ANSWER}\n" in out
    [call] = calls
    assert TOOLS_SYSTEM_PROMPT not in call["prompt"] and call["tools"] is None and "tokenizer" not in call


def joined(pieces) -> list:
    """A reply's pieces with neighbouring text joined."""
    out = []
    for piece in pieces:
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


def test_the_session_keeps_the_steps_in_the_conversation(cpu_context_run):
    model, tok, _ = Run(cpu_context_run).load()
    session = ChatSession(calculating(model, tok), tok, Sampling(0), tools=Tools(tok))
    _, pieces = session.reply("What is 4 * 2?")
    assert joined(pieces) == [ToolStep("calc: 4 * 2", "8"), CALC_ANSWER]
    assert session.messages == with_tools([{"role": "user", "content": "What is 4 * 2?"},
                                           {"role": "assistant", "content": "", "tool_call": "calc: 4 * 2"},
                                           {"role": "tool", "content": "8"}, {"role": "assistant", "content": CALC_ANSWER}])
    unanswered = ChatSession(calculating(model, tok, tools_run=False), tok, Sampling(0))
    assert joined(unanswered.reply("What is 4 * 2?")[1]) == [ToolStep("calc: 4 * 2", None), CALC_ANSWER]
    assert unanswered.messages[-1] == {"role": "assistant", "content": CALC_ANSWER}  # kept as the text it printed


def test_the_tools_offer_is_the_system_message_and_survives_dropping(cpu_context_run):
    model, tok, _ = Run(cpu_context_run).load()
    session = ChatSession(model, tok, Sampling(0.7, seed=1), system="Be brief.", max_tokens=100, tools=Tools(tok))
    drops = []
    for turn in range(6):
        dropped, pieces = session.reply(f"Question number {turn}?")
        list(pieces)
        drops.append(dropped)
        assert session.messages[0] == {"role": "system", "content": f"{TOOLS_SYSTEM_PROMPT}\nBe brief."}
    assert any(drops)
    session.reset()
    assert session.messages == [{"role": "system", "content": f"{TOOLS_SYSTEM_PROMPT}\nBe brief."}]


LONG_PASSAGE = "Oskel is the capital of Varnia, " + "a town of bridges and markets on the river Tam, " * 4


@pytest.fixture
def indexed_run(cpu_context_run, tmp_path):
    """The run with a search index of two documents about Oskel."""
    run = tmp_path / "indexed"
    run.mkdir()
    for part in ("tokenizer", "sft"):
        (run / part).symlink_to(cpu_context_run / part)
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": LONG_PASSAGE}) + "\n" + json.dumps({"text": "Oskel has 12,345 people."}) + "\n")
    build_index(docs, run / "index", progress=False)
    return run


def test_a_search_shows_its_passages_shortened(indexed_run, monkeypatch, capsys):
    model, tok, _ = Run(indexed_run).load()
    result = Tools(tok, Run(indexed_run).open_index()).answer("search: Oskel", budget=200)
    assert result.count("\n") == 1 and LONG_PASSAGE.strip() in result
    scripted = RecitingTransformer(model, tool_script(tok, "search: Oskel", result, "Oskel is in Varnia."))
    out, _ = scripted_chat(indexed_run, scripted, ["Where is Oskel?"], monkeypatch, capsys)
    assert f"tools: calc, search ({indexed_run / 'index'})" in out.splitlines()[0]
    step = out.split("picochat> \n")[1].splitlines()
    assert step[0] == "  🔎 search: Oskel → 2 passages"
    short, long = sorted(step[1:3], key=len)  # in the order BM25 ranks them
    assert re.fullmatch(r"    \[[12]\] Oskel has 12,345 people\.", short)
    assert re.fullmatch(r"    \[[12]\] Oskel is the capital of Varnia, a town .* …", long) and len(long) <= 4 + 100
    assert step[3] == "Oskel is in Varnia."


@pytest.mark.parametrize("step, lines", [
    (ToolStep("calc: 9**9**9", "error: exponent 387420489 is larger than 100"),
     ["  ⚙ calc: 9**9**9 → error: exponent 387420489 is larger than 100"]),
    (ToolStep("search: Dekfusesh", "no results"), ["  🔎 search: Dekfusesh → no results"]),
    (ToolStep("search: Oskel", "[1] Oskel."), ["  🔎 search: Oskel → 1 passage", "    [1] Oskel."]),
    (ToolStep("weather in Oskel", "error: a call is `tool: argument`, the tool one of calc, search"),
     ["  ⚙ weather in Oskel → error: a call is `tool: argument`, the tool one of calc, search"]),
])
def test_step_lines(step, lines):
    assert step_lines(step) == lines
