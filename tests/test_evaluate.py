"""The conversation and few-shot metrics of picochat.evaluate, on handmade replies (the model's
decoding is replaced)."""

from __future__ import annotations

import pytest

from picochat import evaluate


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
