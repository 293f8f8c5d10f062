"""A reply's tokens read as a person sees them: text without the tool markup, and tool steps."""

import pytest

from picochat.reply import ReplyReader, ToolStep
from picochat.tokenizer import TOOL_CALL_END_ID as CALL_END
from picochat.tokenizer import TOOL_CALL_ID as CALL
from picochat.tokenizer import TOOL_RESULT_END_ID as RESULT_END
from picochat.tokenizer import TOOL_RESULT_ID as RESULT


def read(tok, ids: list[int]) -> list:
    """What a ReplyReader gives for `ids`, neighbouring text joined."""
    reader = ReplyReader(tok)
    out = []
    for piece in [p for token in ids for p in reader.push(token)] + reader.finish():
        if isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


def test_text_and_steps_come_out_in_order_without_markup(small_tokenizer):
    tok = small_tokenizer
    ids = [*tok.encode("4 kites cost "), CALL, *tok.encode("calc: 4 * 2"), CALL_END, RESULT, *tok.encode("8"), RESULT_END,
           *tok.encode("8 dollars.")]
    assert read(tok, ids) == ["4 kites cost ", ToolStep("calc: 4 * 2", "8"), "8 dollars."]


@pytest.mark.parametrize("tail, step", [
    ([CALL, "calc: 4"], ToolStep("calc: 4", None)),  # the reply ended inside the call
    ([CALL, "calc: 4 * 2", CALL_END], ToolStep("calc: 4 * 2", None)),  # ... before the result
    ([CALL, "calc: 4 * 2", CALL_END, RESULT, "8"], ToolStep("calc: 4 * 2", None)),  # ... inside the result
])
def test_a_step_the_reply_ended_inside_has_no_result(small_tokenizer, tail, step):
    ids = [i for part in ["Hm. ", *tail] for i in (small_tokenizer.encode(part) if isinstance(part, str) else [part])]
    assert read(small_tokenizer, ids) == ["Hm. ", step]


def test_a_call_no_tool_answered_is_a_step_without_result_and_the_text_goes_on(small_tokenizer):
    tok = small_tokenizer
    ids = [CALL, *tok.encode("calc: 1 + 1"), CALL_END, *tok.encode("It is 2.")]
    assert read(tok, ids) == [ToolStep("calc: 1 + 1", None), "It is 2."]


def test_stray_markup_outside_a_step_is_text(small_tokenizer):
    tok = small_tokenizer
    assert read(tok, [RESULT_END, *tok.encode("x"), CALL_END]) == ["<|/tool_result|>x<|/tool_call|>"]


def test_a_character_split_across_tokens_before_a_call_is_released(small_tokenizer):
    tok = small_tokenizer
    emoji = tok.encode("🎉")
    assert len(emoji) > 1
    assert read(tok, [*emoji, CALL, *tok.encode("calc: 1"), CALL_END, RESULT, *tok.encode("1"), RESULT_END]) == [
        "🎉", ToolStep("calc: 1", "1")]
    assert read(tok, [*emoji[:1], CALL])[0] == "\ufffd"  # half a character, then a call: the half is shown as such


def test_a_step_knows_its_tool_and_counts_a_search_s_passages():
    step = ToolStep("search: Oskel", "[1] Oskel is a town.\n[2] Oskel has 12,345 people [3] not a passage.")
    assert (step.tool, step.passages()) == ("search", 2)
    assert (ToolStep("no colon", "error: ...").tool, ToolStep("calc: 1", None).passages()) == ("", 0)
