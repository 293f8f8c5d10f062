"""The report card's side-by-side conversations: which ones every stage answers, and how they are shown."""

from __future__ import annotations

from picochat.report import _side_by_side_lines, _side_by_side_rows
from picochat.run import Run


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def test_side_by_side_shows_identity_with_and_without_a_renaming_system_prompt(tiny_run):
    rows = _side_by_side_rows(Run(tiny_run))
    conversations = [row["messages"] for row in rows]
    assert [user("Who are you?")] in conversations
    renamed = [c for c in conversations if c[0]["role"] == "system" and c[-1]["content"] == "Who are you?"]
    assert renamed and "name" in renamed[0][0]["content"]
    assert any(len(c) == 3 and c[-1]["content"] == "And its currency?" for c in conversations)  # a follow-up
    assert any(c[-1]["content"].startswith("- ") and c[-1]["content"].endswith(":") for c in conversations)  # few-shot
    assert [user("How many r are in strawberry?")] in conversations
    assert sum(row["tools"] for row in rows) == 2


def test_side_by_side_lines_show_the_system_message_the_earlier_turns_and_each_stage():
    row = {"messages": [{"role": "system", "content": "Your name is Zara."}, user("Hi"),
                        {"role": "assistant", "content": "Hello!"}, user("Who are you?")],
           "tools": False, "base": "Who are you?\nI am", "sft": "I am Zara."}
    assert _side_by_side_lines([row]) == ["*system:* Your name is Zara.", "", "*user:* Hi", "", "*assistant:* Hello!", "",
                                          "**Prompt:** Who are you?", "", "- *base*: Who are you? ⏎ I am",
                                          "- *sft*: I am Zara.", ""]
