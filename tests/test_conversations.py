"""Conversation datasets: readers (real files and malformed ones), mixtures, and the SFT batch loader."""

import gzip
import json
import re

import pytest
import torch

from picochat.chat import ConversationError, parse, render
from picochat.data.conversations import (
    from_alpaca,
    mix,
    read_conversations,
    trim_to_last_reply,
)
from picochat.data.loader import ConversationLoader

from conftest import shared_data

PAD, EOT = 8, 0


def numbered_conversations(n, words=3):
    """Conversations whose user turn says 'question k' and whose reply length varies with k."""
    return [
        {"messages": [{"role": "user", "content": f"question {k}"},
                      {"role": "assistant", "content": " ".join(["apple"] * (1 + (k * words) % 7))}]}
        for k in range(n)
    ]


def question_numbers(tok, inputs):
    return [int(k) for k in re.findall(r"question (\d+)", tok.decode(inputs.tolist()))]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- readers -------------------------------------------------------------------------------------------
def test_reads_real_openai_messages(small_tokenizer):
    path = shared_data("chat", "tulu-eval-prompts.messages.jsonl")
    conversations = list(read_conversations(path))
    assert len(conversations) == 332
    first = json.loads(path.read_text().splitlines()[0])["messages"]
    assert conversations[0]["messages"] == first
    for c in conversations[:50]:
        ids, mask = render(c["messages"], small_tokenizer)
        assert parse(ids, small_tokenizer) == c["messages"]


def test_reads_real_alpaca():
    path = shared_data("chat", "alpaca_tiny.json")
    raw = json.loads(path.read_text())
    conversations = list(read_conversations(path))
    assert len(conversations) == len(raw) == 100
    with_input = next(k for k, r in enumerate(raw) if r["input"].strip())
    without_input = next(k for k, r in enumerate(raw) if not r["input"].strip())
    assert conversations[with_input]["messages"] == [
        {"role": "user", "content": raw[with_input]["instruction"] + "\n\n" + raw[with_input]["input"]},
        {"role": "assistant", "content": raw[with_input]["output"]},
    ]
    assert conversations[without_input]["messages"][0]["content"] == raw[without_input]["instruction"]


SHAREGPT = [
    {"id": "a", "conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                                  {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Bye"},
                                  {"from": "gpt", "value": "Goodbye."}]},
    {"id": "b", "conversations": [{"from": "user", "value": "2+2?"}, {"from": "assistant", "value": "4"}]},
]
SHAREGPT_MESSAGES = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
]


@pytest.mark.parametrize("layout", ["array", "jsonl", "jsonl.gz"])
def test_reads_sharegpt_in_each_layout(tmp_path, layout):
    if layout == "array":
        path = tmp_path / "chats.json"
        path.write_text(json.dumps(SHAREGPT, indent=2))
    elif layout == "jsonl":
        path = write_jsonl(tmp_path / "chats.jsonl", SHAREGPT)
    else:
        path = tmp_path / "chats.jsonl.gz"
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(json.dumps(r) for r in SHAREGPT) + "\n\n")
    assert [c["messages"] for c in read_conversations(path)] == SHAREGPT_MESSAGES
    assert [c["messages"] for c in read_conversations(path, format="sharegpt")] == SHAREGPT_MESSAGES


def test_openai_messages_keep_tool_calls_and_drop_other_fields(tmp_path):
    row = {"messages": [{"role": "user", "content": "12*7?", "name": "ann"},
                        {"role": "assistant", "content": "", "tool_call": "12*7"},
                        {"role": "tool", "content": "84"}, {"role": "assistant", "content": "84."}]}
    (conversation,) = read_conversations(write_jsonl(tmp_path / "tools.jsonl", [row]))
    assert conversation["messages"][0] == {"role": "user", "content": "12*7?"}
    assert conversation["messages"][1:] == row["messages"][1:]


def test_prompts_without_reply_are_read_as_they_are(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Tell me a story."}]}]
    assert list(read_conversations(write_jsonl(tmp_path / "prompts.jsonl", rows))) == rows


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.mark.parametrize(
    "lines, error",
    [
        ([json.dumps(GOOD), "", "{not json"], r"bad\.jsonl:3: not valid JSON"),
        ([json.dumps(GOOD), json.dumps({"messages": [{"role": "robot", "content": "x"}]})], r"bad\.jsonl:2: message 0: unknown role 'robot'"),
        ([json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]})], r"bad\.jsonl:1: message 1: a user message cannot come after"),
        ([json.dumps({"messages": [{"role": "user", "content": ["parts"]}]})], r"bad\.jsonl:1: message 0: content must be a string"),
        ([json.dumps(GOOD), json.dumps({"messages": "hi"})], r"bad\.jsonl:2: expected an object with a 'messages' list"),
        ([json.dumps({"prompt": "x", "completion": "y"})], r"bad\.jsonl:1: unknown conversation format \(keys \['completion', 'prompt'\]\)"),
        ([json.dumps({"conversations": [{"from": "narrator", "value": "x"}]})], r"bad\.jsonl:1: turn 0: unknown speaker 'narrator'"),
        ([json.dumps({"conversations": [{"from": "human"}]})], r"bad\.jsonl:1: turn 0: expected an object with 'from' and 'value'"),
        ([json.dumps({"instruction": "x", "output": 3})], r"bad\.jsonl:1: expected string fields 'instruction' and 'output'"),
        ([json.dumps({"instruction": "x", "output": ""})], r"bad\.jsonl:1: message 1: empty assistant message"),
        ([json.dumps({"text": "a document"}), json.dumps({"text": ""})], r"bad\.jsonl:2: expected an object with a non-empty string 'text'"),
        ([json.dumps({"text": "a document"}), json.dumps({"text": 7})], r"bad\.jsonl:2: expected an object with a non-empty string 'text'"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, error):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConversationError, match=error):
        list(read_conversations(path))


def test_malformed_json_array_names_the_index(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    with pytest.raises(ConversationError, match=r"bad\.json\[1\]: expected string fields"):
        list(read_conversations(path))
    path.write_text('[{"instruction": "a",\n "output": }]')
    with pytest.raises(ConversationError, match=r"bad\.json:2: not valid JSON"):
        list(read_conversations(path))


def test_other_bad_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(GOOD).encode()[:-2] + b"\xe9\"}\n")
    with pytest.raises(ConversationError, match=r"latin1\.jsonl: not UTF-8"):
        list(read_conversations(path))
    with pytest.raises(FileNotFoundError, match="no such conversation file"):
        list(read_conversations(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="unknown conversation format 'csv'"):
        list(read_conversations(path, format="csv"))
    ok = write_jsonl(tmp_path / "ok.jsonl", [GOOD])
    with pytest.raises(ConversationError, match=r"ok\.jsonl:1: expected an object with a 'conversations' list"):
        list(read_conversations(ok, format="sharegpt"))
    whole = gzip.compress((json.dumps(GOOD) + "\n").encode())
    for name, data in (("cut.jsonl.gz", whole[:-10]), ("plain.jsonl.gz", b"not gzip at all")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConversationError, match=re.escape(name) + ": not a complete gzip file"):
            list(read_conversations(tmp_path / name))


def test_alpaca_null_input_is_no_input():
    assert from_alpaca({"instruction": "Sum 2 and 3.", "input": None, "output": "5"})[0]["content"] == "Sum 2 and 3."


# --- training preparation and mixtures ---------------------------------------------------------------------
def test_trim_to_last_reply():
    user, reply = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
    call, result = {"role": "assistant", "content": "", "tool_call": "1+1"}, {"role": "tool", "content": "2"}
    assert trim_to_last_reply([user, reply, user]) == [user, reply]
    assert trim_to_last_reply([user, reply, user, call, result]) == [user, reply]
    assert trim_to_last_reply([user, reply]) == [user, reply]
    assert trim_to_last_reply([user]) is None
    assert trim_to_last_reply([user, call, result]) is None


def test_mix_is_deterministic_and_weighted():
    a, b, c = [f"a{i}" for i in range(10)], [f"b{i}" for i in range(100)], [f"c{i}" for i in range(3)]
    drawn = mix([(a, 1.0), (b, 2.0), (c, 1.0)], n=40, seed=7)
    assert drawn == mix([(a, 1.0), (b, 2.0), (c, 1.0)], n=40, seed=7)
    assert drawn != mix([(a, 1.0), (b, 2.0), (c, 1.0)], n=40, seed=8)
    counts = {p: sum(x.startswith(p) for x in drawn) for p in "abc"}
    assert counts == {"a": 10, "b": 20, "c": 10}
    assert sorted(x for x in drawn if x[0] == "a") == sorted(a)  # a used up exactly once before repeating
    assert len(set(x for x in drawn if x[0] == "b")) == 20  # no repeats while b has fresh items
    assert sorted(drawn.count(x) for x in c) == [3, 3, 4]
    assert len(mix([(a, 1), (b, 1)], n=3, seed=0)) == 3  # largest remainders make the total exact


def test_mix_rejects_bad_arguments():
    with pytest.raises(ValueError, match="weight must be positive"):
        mix([([1], 0.0)], n=1)
    with pytest.raises(ValueError, match="dataset 1 is empty"):
        mix([([1], 1.0), ([], 1.0)], n=1)
    with pytest.raises(ValueError, match="at least one"):
        mix([], n=1)


# --- the SFT loader --------------------------------------------------------------------------------------
def test_batches_shift_targets_and_mask_all_but_the_replies(small_tokenizer):
    tok = small_tokenizer
    conversations = numbered_conversations(30)
    loader = ConversationLoader(conversations, tok, batch_size=4, seq_len=64, seed=0)
    x, y = next(loader)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, 64)
    for row_x, row_y in zip(x, y):
        row = torch.cat([row_x, row_y[-1:]])
        trained = row_y != -100
        assert torch.equal(row_y[trained], row[1:][trained])  # targets are the next tokens
        # What is trained is exactly each packed conversation's reply and its <|im_end|>.
        numbers = question_numbers(tok, row_x)
        expected = "".join(conversations[k]["messages"][1]["content"] + "<|im_end|>" for k in numbers)
        assert tok.decode(row_y[trained].tolist()) == expected
        assert (row_x == EOT).sum() == len(numbers)  # each conversation starts with <|endoftext|>
        assert torch.all(row_y[row_x == PAD] == -100)


def test_documents_are_read_and_trained_on_every_token_beside_conversations(tmp_path, small_tokenizer):
    tok = small_tokenizer
    texts = [f"Document {k} says that the river is {k} miles long." for k in range(12)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "style": "news"} for t in texts])
    documents = list(read_conversations(path))
    assert documents == [{"text": t} for t in texts]
    conversations = numbered_conversations(12)
    loader = ConversationLoader(conversations + documents, tok, batch_size=2, seq_len=256, pack=False)
    assert loader.stats["documents"] == 12 and loader.stats["used"] == 24
    seen_documents = 0
    for _ in range(loader.steps_in_epoch(0)):
        x, y = next(loader)
        for row_x, row_y in zip(x, y):
            trained = tok.decode(row_y[row_y != -100].tolist())
            if trained in texts:  # a document: every token after its <|endoftext|>
                seen_documents += 1
                assert row_x[0] == EOT and tok.decode(row_x[row_x != PAD].tolist()) == "<|endoftext|>" + trained
            else:  # a conversation: the reply only
                assert trained.endswith("<|im_end|>") and "user" not in trained
    assert seen_documents == 12


def test_packing_fills_rows_and_padding_holds_one_each(small_tokenizer):
    conversations = numbered_conversations(40)
    packed = ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=128, pack=True)
    padded = ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=128, pack=False)
    assert padded.stats["rows_first_epoch"] == 40
    assert packed.stats["rows_first_epoch"] < 20
    x, _ = next(padded)
    assert [(row == EOT).sum().item() for row in x] == [1, 1]
    assert (x == PAD).any()


def test_one_epoch_visits_every_conversation_once_then_reshuffles(small_tokenizer):
    tok = small_tokenizer
    conversations = numbered_conversations(24)
    loader = ConversationLoader(conversations, tok, batch_size=1, seq_len=32, pack=False, seed=3)
    assert loader.steps_in_epoch(0) == 24
    epoch0 = [question_numbers(tok, next(loader)[0][0])[0] for _ in range(24)]
    epoch1 = [question_numbers(tok, next(loader)[0][0])[0] for _ in range(24)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24))
    assert epoch0 != epoch1


def test_loader_is_deterministic_given_the_seed(small_tokenizer):
    conversations = numbered_conversations(50)
    batches = [[next(loader) for _ in range(6)] for loader in (
        ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=96, seed=5) for _ in range(2))]
    other = [next(ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=96, seed=6)) for _ in range(1)]
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert not torch.equal(batches[0][0][0], other[0][0])


def test_resume_from_state_dict_gives_the_same_next_batches(small_tokenizer):
    conversations = numbered_conversations(30)
    make = lambda: ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=96, seed=1)  # noqa: E731
    reference = make()
    steps = reference.steps_in_epoch(0)
    for _ in range(steps - 1):  # stop just before an epoch boundary
        next(reference)
    state = reference.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [next(reference) for _ in range(3)]  # crosses into epoch 1
    resumed = make()
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for (x0, y0), (x1, y1) in zip(expected, (next(resumed) for _ in range(3))):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert resumed.state_dict() == reference.state_dict() and resumed.epoch == 1


def test_resume_refuses_a_different_setup(small_tokenizer):
    conversations = numbered_conversations(30)
    state = ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=96, seed=1).state_dict()
    other = ConversationLoader(conversations[:-1], small_tokenizer, batch_size=2, seq_len=96, seed=2)
    with pytest.raises(ValueError, match="seed was 1, is 2, conversations was 30, is 29"):
        other.load_state_dict(state)
    same = ConversationLoader(conversations, small_tokenizer, batch_size=2, seq_len=96, seed=1)
    with pytest.raises(ValueError, match="outside that epoch"):
        same.load_state_dict(state | {"step": 10_000})


def test_ddp_ranks_read_disjoint_parts_of_one_global_batch(small_tokenizer):
    tok = small_tokenizer
    conversations = numbered_conversations(60)
    single = ConversationLoader(conversations, tok, batch_size=4, seq_len=96, seed=2)
    ranks = [ConversationLoader(conversations, tok, batch_size=2, seq_len=96, seed=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    for _ in range(single.steps_in_epoch(0) + 2):
        x, y = next(single)
        (x0, y0), (x1, y1) = next(ranks[0]), next(ranks[1])
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
        assert not set(question_numbers(tok, x0.flatten())) & set(question_numbers(tok, x1.flatten()))


def test_too_long_conversations_are_truncated_or_dropped(small_tokenizer):
    long_reply = {"messages": [{"role": "user", "content": "question 999"}, {"role": "assistant", "content": "apple " * 200}]}
    long_prompt = {"messages": [{"role": "user", "content": "question 998 " + "pear " * 200}, {"role": "assistant", "content": "ok"}]}
    no_reply = {"messages": [{"role": "user", "content": "question 997"}]}
    trailing_user = {"messages": numbered_conversations(1)[0]["messages"] + [{"role": "user", "content": "more?"}]}
    conversations = numbered_conversations(10) + [long_reply, long_prompt, no_reply, trailing_user]
    truncating = ConversationLoader(conversations, small_tokenizer, batch_size=1, seq_len=64)
    assert {k: truncating.stats[k] for k in ("conversations", "used", "truncated", "dropped_too_long",
                                             "skipped_no_reply", "trimmed_to_last_reply")} == {
        "conversations": 14, "used": 12, "truncated": 1, "dropped_too_long": 1, "skipped_no_reply": 1, "trimmed_to_last_reply": 1}
    dropping = ConversationLoader(conversations, small_tokenizer, batch_size=1, seq_len=64, too_long="drop")
    assert (dropping.stats["used"], dropping.stats["dropped_too_long"], dropping.stats["truncated"]) == (11, 2, 0)
    rows = [next(truncating) for _ in range(truncating.steps_in_epoch(0))]
    cut = [(x[0], y[0]) for x, y in rows if 999 in question_numbers(small_tokenizer, x[0])]
    assert len(cut) == 1
    x, y = cut[0]
    assert (x != PAD).all() and (y[-20:] != -100).all()  # the cut reply runs to the end of its row


def test_loader_rejects_bad_input(small_tokenizer):
    with pytest.raises(ConversationError, match="conversation 1: message 0: unknown role 'bot'"):
        ConversationLoader([GOOD, {"messages": [{"role": "bot", "content": "x"}]}], small_tokenizer, batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match="no conversation to train on"):
        ConversationLoader([{"messages": [{"role": "user", "content": "x"}]}], small_tokenizer, batch_size=1, seq_len=16)
    with pytest.raises(ValueError, match="too few for one batch of 8 rows"):
        ConversationLoader([GOOD] * 3, small_tokenizer, batch_size=4, seq_len=32, world_size=2, pack=False)
    with pytest.raises(ValueError, match="too_long must be"):
        ConversationLoader([GOOD], small_tokenizer, batch_size=1, seq_len=16, too_long="wrap")


def test_loader_on_a_real_mixture(small_tokenizer):
    tulu = list(read_conversations(shared_data("chat", "tulu-eval-prompts.messages.jsonl")))
    alpaca = list(read_conversations(shared_data("chat", "alpaca_tiny.json")))
    loader = ConversationLoader(mix([(tulu, 3.0), (alpaca, 1.0)], n=200, seed=0), small_tokenizer, batch_size=4, seq_len=512)
    stats = loader.stats
    assert stats["used"] + stats["dropped_too_long"] == 200 and stats["truncated"] > 0
    x, y = next(loader)
    assert x.shape == (4, 512)
    assert (x != PAD).float().mean() > 0.8  # packing leaves little padding
    assert ((y >= 0) & (y < small_tokenizer.vocab_size)).sum() > 0
