"""Serving: continuous batching in the engine, the text a client sees, and the OpenAI-compatible
API exercised with the official `openai` client against a real uvicorn server on 127.0.0.1."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import uvicorn

from picochat.chat import REPLY_STOP_IDS, render_for_reply, result_text
from picochat.checkpoint import save_model
from picochat.cli import main
from picochat.engine import FINISH_CANCELLED, FINISH_LENGTH, FINISH_STOP, ContinuousBatch, GenerationError, Sampling, generate
from picochat.model import ModelConfig, Transformer
from picochat.serve.app import create_app, load_models
from picochat.serve.completions import conversation
from picochat.serve.schemas import ChatMessage
from picochat.serve.text import StopStrings
from picochat.tokenizer import TOOL_CALL_END_ID, TOOL_CALL_ID, TOOL_RESULT_END_ID, TOOL_RESULT_ID, TextStream, iter_text
from picochat.tools import TOOLS_SYSTEM_PROMPT, Tools, with_tools

CONTEXT = 128
HELLO = [{"role": "user", "content": "Hello, who are you?"}]


def tiny_model(vocab_size: int, seed: int, context: int = CONTEXT) -> Transformer:
    model = Transformer(ModelConfig(vocab_size=vocab_size, n_layer=2, d_model=64, n_head=2, n_kv_head=1, max_seq_len=context))
    model.init_weights(seed=seed)
    with torch.no_grad():  # sharper next-token distributions than a fresh init: greedy has no near-ties
        model.lm_head.weight.mul_(30)
    return model.eval()


@pytest.fixture(scope="session")
def serve_run(tmp_path_factory, small_tokenizer):
    """A run folder with a tokenizer and small (untrained) base and sft models."""
    run = tmp_path_factory.mktemp("serve") / "demo"
    small_tokenizer.save(run / "tokenizer")
    save_model(run / "base", tiny_model(small_tokenizer.vocab_size, seed=1))
    save_model(run / "sft", tiny_model(small_tokenizer.vocab_size, seed=2))
    return run


@contextmanager
def serving(app):
    """Run `app` with uvicorn in a thread on a free 127.0.0.1 port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def loaded(serve_run):
    return load_models(serve_run, None, "cpu")


@pytest.fixture(scope="module")
def server(loaded):
    tokenizer, models, _ = loaded
    with serving(create_app(tokenizer, models, max_batch=8)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def greedy_reply(loaded, messages, max_tokens):
    """What the sft model says, decoded with generate() directly."""
    tokenizer, models, _ = loaded
    prompt = render_for_reply(messages, tokenizer)
    [[completion]] = generate(models["demo-sft"], [prompt], max_tokens, Sampling(0, stop_ids=REPLY_STOP_IDS), tokenizer=tokenizer)
    return tokenizer.decode(completion.tokens), completion


def health(url: str) -> dict:
    return httpx.get(f"{url}/health").json()["models"]["demo-sft"]


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


# --- the engine's step-level API ------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_model():
    return tiny_model(vocab_size=101, seed=11, context=40)


def drain(batch: ContinuousBatch, schedule: dict, max_steps: int = 200) -> tuple[dict, dict, int]:
    """Step the batch, adding schedule[step] = [(key, prompt, kwargs)] before that step; returns
    tokens and finish reasons by key, and the number of steps."""
    owners, tokens, reasons = {}, {}, {}
    for step in range(max_steps):
        for key, prompt, kwargs in schedule.get(step, []):
            for sample, sequence in enumerate(batch.add(prompt, **kwargs)):
                owners[sequence] = (key, sample)
                tokens[(key, sample)] = []
        if not len(batch) and step >= max(schedule):
            return tokens, reasons, step
        for event in batch.step():
            if event.token is not None:
                tokens[owners[event.sequence]].append(event.token)
            if event.finish_reason is not None:
                reasons[owners[event.sequence]] = event.finish_reason
    raise AssertionError("the batch did not finish")


def test_sequences_joining_and_leaving_a_running_batch_get_what_generate_gives(engine_model):
    prompts = {"a": [5, 17, 33, 2, 9, 60, 1], "b": [42, 7], "c": [88], "d": [3, 14, 15, 92]}
    limits = {"a": 12, "b": 30, "c": 5, "d": 20}
    schedule = {0: [("a", prompts["a"], {})], 2: [("b", prompts["b"], {}), ("c", prompts["c"], {})], 6: [("d", prompts["d"], {})]}
    for step in schedule.values():
        for index, (key, prompt, _) in enumerate(step):
            step[index] = (key, prompt, dict(max_new_tokens=limits[key], sampling=Sampling(temperature=0)))
    tokens, reasons, steps = drain(ContinuousBatch(engine_model), schedule)
    for key, prompt in prompts.items():
        [[alone]] = generate(engine_model, [prompt], limits[key], Sampling(temperature=0))
        assert tokens[(key, 0)] == alone.tokens
        assert reasons[(key, 0)] == alone.finish_reason == FINISH_LENGTH
    assert steps < sum(limits.values())  # decoded together, not one after another


def test_a_request_alone_gets_exactly_generate_s_samples(engine_model):
    prompt = [5, 17, 33, 2]
    kwargs = dict(max_new_tokens=10, sampling=Sampling(1.0, top_k=20, top_p=0.9, seed=7), num_samples=3)
    tokens, _, _ = drain(ContinuousBatch(engine_model), {0: [("p", prompt, kwargs)]})
    expected = generate(engine_model, [prompt], **kwargs)[0]
    assert [tokens[("p", i)] for i in range(3)] == [c.tokens for c in expected]
    assert len({tuple(t) for t in tokens.values()}) > 1


def test_stop_ids_and_cancel_end_sequences_and_free_their_rows(engine_model):
    [[free_run]] = generate(engine_model, [[42, 7]], 10, Sampling(temperature=0))
    stop = free_run.tokens[3]
    batch = ContinuousBatch(engine_model)
    [stopping] = batch.add([42, 7], 10, Sampling(0, stop_ids=[stop]))
    [cancelled] = batch.add([88], 30, Sampling(temperature=0))
    seen = {stopping: [], cancelled: []}
    events = []
    for step in range(6):
        if step == 2:
            batch.cancel(cancelled)
        for event in batch.step():
            events.append(event)
            if event.token is not None:
                seen[event.sequence].append(event.token)
    assert seen[stopping] == free_run.tokens[:free_run.tokens.index(stop)]
    assert (stopping, None, FINISH_STOP) in [(e.sequence, e.token, e.finish_reason) for e in events]
    assert (cancelled, None, FINISH_CANCELLED) in [(e.sequence, e.token, e.finish_reason) for e in events]
    assert len(seen[cancelled]) == 2 and len(batch) == 0
    assert batch.step() == []


def test_the_batch_refuses_bad_requests_at_once(engine_model):
    batch = ContinuousBatch(engine_model)
    with pytest.raises(GenerationError, match="context"):
        batch.add(list(range(1, 41)), max_new_tokens=5)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        batch.add([1, 2], max_new_tokens=0)
    assert len(batch) == 0


# --- the text a client sees -----------------------------------------------------------------------
@pytest.mark.parametrize("text", ["Ünïcödé, 日本語, emoji 🎉🎉 and plain words.", "Oskel lies on the river Tam."])
def test_text_stream_sends_whole_characters_like_iter_text(small_tokenizer, text):
    ids = small_tokenizer.encode(text)
    stream = TextStream(small_tokenizer)
    pieces = [stream.push(token) for token in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert [p for p in pieces if p] == list(iter_text(small_tokenizer, ids))


def test_stop_strings_cut_at_the_first_one_and_hold_back_possible_starts():
    watcher = StopStrings(["END", "\n\n"])
    assert watcher.push("Hello E") == "Hello "  # "E" might start "END"
    assert watcher.push("x") == "Ex"
    assert watcher.push("then EN") == "then "
    assert watcher.push("D and more") == "" and watcher.stopped
    assert watcher.push("later") == ""
    other = StopStrings(["\n\n", "stop"])
    assert other.push("a\n") == "a"
    assert other.flush() == "\n"
    assert StopStrings([]).push("anything") == "anything"


# --- the API with the official openai client ------------------------------------------------------
def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["demo-sft", "demo-base"]
    assert client.models.retrieve("demo-base").id == "demo-base"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.get(f"{server}/health").json()["status"] == "ok"


def test_chat_completion_is_the_model_s_greedy_reply(client, loaded):
    expected_text, expected = greedy_reply(loaded, HELLO, 20)
    response = client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=20, temperature=0)
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_text
    assert choice.finish_reason == expected.finish_reason == "length"
    prompt_tokens = len(render_for_reply(HELLO, loaded[0]))
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (prompt_tokens, 20)
    assert response.usage.total_tokens == prompt_tokens + 20
    assert response.object == "chat.completion" and response.model == "demo-sft"


def test_streaming_sends_the_same_reply_in_chunks_then_usage(client, loaded):
    expected_text, _ = greedy_reply(loaded, HELLO, 25)
    chunks = list(client.chat.completions.create(model="demo-sft", messages=HELLO, max_completion_tokens=25, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == expected_text
    assert sum(1 for d in deltas if d) > 3  # streamed piece by piece
    assert not any("\ufffd" in d for d in deltas if "\ufffd" not in expected_text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 25
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_choices_with_a_seed_are_reproducible(client):
    kwargs = dict(model="demo-sft", messages=HELLO, max_tokens=12, temperature=1.0, top_p=0.95, n=3, seed=1234)
    first = client.chat.completions.create(**kwargs)
    again = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in first.choices}) > 1
    assert [c.finish_reason for c in first.choices] == [c.finish_reason for c in again.choices]
    assert first.usage.completion_tokens == again.usage.completion_tokens <= 36  # 12 each, less for one that stopped


def test_stop_strings_end_the_reply_where_they_appear(client, loaded):
    full, _ = greedy_reply(loaded, HELLO, 40)
    stop = full[10:13]
    expected = full[:full.index(stop)]
    response = client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason == "stop"
    streamed = list(client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_text_completions_continue_a_document_with_the_base_model(client, loaded):
    tokenizer, models, _ = loaded
    prompt = "The capital of Varnia is"
    [[expected]] = generate(models["demo-base"], [[tokenizer.eot_id] + tokenizer.encode(prompt)], 8,
                            Sampling(0, stop_ids=[tokenizer.eot_id]), tokenizer=tokenizer)
    response = client.completions.create(model="demo-base", prompt=prompt, max_tokens=8, temperature=0)
    assert response.choices[0].text == tokenizer.decode(expected.tokens)
    assert response.usage.prompt_tokens == 1 + len(tokenizer.encode(prompt))
    streamed = list(client.completions.create(model="demo-base", prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == response.choices[0].text
    assert streamed[-1].choices[0].finish_reason == response.choices[0].finish_reason


def test_assistant_replies_with_inline_calculator_calls_are_read_back_as_tool_messages(server):
    messages = HELLO + [{"role": "assistant", "content": "Let me see.<|tool_call|>2*3<|/tool_call|><|tool_result|>6<|/tool_result|>It is 6."},
                        {"role": "user", "content": "Thanks"}]
    view = httpx.post(f"{server}/v1/tokenize", json={"messages": messages}).json()
    assert [t["id"] for t in view["tokens"] if t["special"]].count(4) == 1  # one real <|tool_call|> token
    assert view["text"].endswith("<|im_start|>assistant<|im_sep|>")
    assert view["count"] == len(view["tokens"])


# --- conversations longer than the context ---------------------------------------------------------
SYSTEM = {"role": "system", "content": "You are picochat."}
CALCULATED = "Let me see.<|tool_call|>2*3<|/tool_call|><|tool_result|>6<|/tool_result|>It is 6."


def long_chat(turns: int) -> list[dict]:
    """A system message, then `turns` exchanges (the first reply with a calculator call), then a question."""
    messages = [SYSTEM]
    for turn in range(turns):
        messages += [{"role": "user", "content": f"Tell me about Oskel, part {turn}."},
                     {"role": "assistant", "content": CALCULATED if turn == 0 else f"Oskel lies on the river Tam ({turn})."}]
    return messages + [{"role": "user", "content": "And then?"}]


def conversation_of(messages: list[dict]) -> list[dict]:
    """Request messages in the chat protocol's form, as the server reads them."""
    return conversation([ChatMessage(**m) for m in messages])


def test_a_conversation_too_long_for_the_context_gets_a_400_unless_truncation_is_asked_for(server, loaded):
    messages = long_chat(turns=8)
    body = {"model": "demo-sft", "messages": messages, "max_tokens": 16, "temperature": 0}
    refused = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "context_length_exceeded"
    assert "X-Picochat-Dropped-Messages" not in refused.headers
    response = httpx.post(f"{server}/v1/chat/completions", json={**body, "truncation": "auto"})
    assert response.status_code == 200, response.text
    dropped = int(response.headers["X-Picochat-Dropped-Messages"])
    assert dropped > 0 and dropped % 2 == 0  # whole exchanges, the calculator reply dropped as one message
    kept = [SYSTEM] + messages[1 + dropped:]
    tokenizer = loaded[0]
    view = httpx.post(f"{server}/v1/tokenize", json={"messages": kept}).json()
    assert view["count"] + 16 <= CONTEXT  # room for max_tokens was kept ...
    longer = [SYSTEM] + messages[dropped - 1:]
    assert len(render_for_reply(conversation_of(longer), tokenizer)) + 16 > CONTEXT  # ... and no more was dropped
    expected, _ = greedy_reply(loaded, conversation_of(kept), 16)
    assert response.json()["choices"][0]["message"]["content"] == expected
    assert response.json()["usage"]["prompt_tokens"] == view["count"]
    streamed = httpx.post(f"{server}/v1/chat/completions", json={**body, "truncation": "auto", "stream": True})
    assert streamed.headers["X-Picochat-Dropped-Messages"] == str(dropped) and streamed.text.endswith("data: [DONE]\n\n")


def test_truncation_keeps_a_conversation_that_fits_whole_and_refuses_a_message_too_long_alone(server):
    fits = httpx.post(f"{server}/v1/chat/completions",
                      json={"model": "demo-sft", "messages": HELLO, "max_tokens": 4, "truncation": "auto"})
    assert fits.status_code == 200 and fits.headers["X-Picochat-Dropped-Messages"] == "0"
    too_long = long_chat(turns=2)[:-1] + [{"role": "user", "content": "word " * 300}]
    refused = httpx.post(f"{server}/v1/chat/completions", json={"model": "demo-sft", "messages": too_long, "truncation": "auto"})
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert "the newest message with the system message needs" in error["message"]
    plain = httpx.post(f"{server}/v1/chat/completions", json={"model": "demo-sft", "messages": HELLO, "truncation": "never"})
    assert plain.status_code == 400 and plain.json()["error"]["param"] == "truncation"


@pytest.mark.parametrize("body, param, needle", [
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages", "unknown role 'wizard'"),
    ({"messages": []}, "messages", "at least 1 item"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "messages", "cannot come first"),
    ({"messages": HELLO, "max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
    ({"messages": HELLO, "max_tokens": 1_000_000}, "max_tokens", f"between 1 and {CONTEXT - 1}"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages", "context"),
    ({"messages": HELLO, "temperature": "hot"}, "temperature", "valid number"),
    ({"messages": HELLO, "n": 9}, "n", "at most 8"),
    ({"messages": HELLO, "stop": [""]}, "stop", "must not be empty"),
    ({"messages": [{"role": "user"}]}, "messages", "empty user message"),
])
def test_bad_requests_get_a_clear_400_and_the_server_goes_on(client, server, body, param, needle):
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": "demo-sft", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert needle in error["message"] and error["param"] == param and error["type"] == "invalid_request_error"
    assert client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=2).choices[0].finish_reason == "length"


def test_malformed_json_unknown_models_and_routes(client, server):
    response = httpx.post(f"{server}/v1/chat/completions", content=b'{"model": "demo-sft", "messages": [', headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="demo-sft, demo-base"):
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="demo-base", prompt="word " * 300)
    missing = httpx.get(f"{server}/v1/embeddings")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_the_api_key_is_required_when_set(loaded):
    tokenizer, models, _ = loaded
    with serving(create_app(tokenizer, models, api_key="s3cret")) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(f"{url}/v1/models").status_code == 401
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=3, temperature=0).usage.completion_tokens == 3
        assert httpx.get(f"{url}/").status_code == 200  # the page itself is public; it asks for the key


# --- concurrency ----------------------------------------------------------------------------------
class GatedTransformer(Transformer):
    """A Transformer whose every forward pass waits for a permit, so tests decide when steps run."""

    def __init__(self, source: Transformer):
        super().__init__(source.config)
        self.load_state_dict(source.state_dict())
        self.eval()
        self.permits = threading.Semaphore(0)

    def forward(self, *args, **kwargs):
        assert self.permits.acquire(timeout=60), "the test never allowed this step"
        return super().forward(*args, **kwargs)


class ScriptedTransformer(Transformer):
    """A Transformer that, decoding greedily, says `script`: after `after` (the prompt's last token)
    and after each token of the script, the script's next token is made by far the likeliest."""

    def __init__(self, source: Transformer, after: int, script: list[int]):
        super().__init__(source.config)
        self.load_state_dict(source.state_dict())
        self.eval()
        chain = [after] + script
        assert len(set(chain)) == len(chain), "each token of the script must be different"
        self.successor = dict(zip(chain, chain[1:]))

    def forward(self, input_ids, *args, **kwargs):
        logits = super().forward(input_ids, *args, **kwargs)
        for row, last in enumerate(input_ids[:, -1].tolist()):
            if last in self.successor:
                logits[row, -1, self.successor[last]] = logits[row, -1].max() + 100
        return logits


def runs_on_into_a_document(model: Transformer, tokenizer) -> tuple[ScriptedTransformer, str]:
    """`model` scripted to reply "Oskel lies on the Tam." then <|endoftext|> and a new document; and that reply."""
    reply = "Oskel lies on the Tam."
    script = tokenizer.encode(reply) + [tokenizer.eot_id] + tokenizer.encode("The capital of Varnia") + [tokenizer.im_end_id]
    return ScriptedTransformer(model, tokenizer.im_sep_id, script), reply


class RecitingTransformer(Transformer):
    """A Transformer that says `script`, token by token, whatever it reads, one request at a time:
    a prefill starts the script over and each decoding step moves one token on (a step that feeds a
    tool result too: the script holds the result the engine feeds, where it feeds it)."""

    def __init__(self, source: Transformer, script: list[int]):
        super().__init__(source.config)
        self.load_state_dict(source.state_dict())
        self.eval()
        self.script, self._next = script, 0

    def forward(self, input_ids, *args, **kwargs):
        logits = super().forward(input_ids, *args, **kwargs)
        self._next = 0 if input_ids.shape[1] > 1 else self._next + 1
        logits[:, -1, self.script[min(self._next, len(self.script) - 1)]] = logits[:, -1].max() + 100
        return logits


CALC_CALL, CALC_RESULT, CALC_ANSWER = "calc: 4 * 2", "8", "So it is 8."


def tool_script(tokenizer, call: str, result: str | None, answer: str) -> list[int]:
    """A reply that calls a tool, `<|tool_call|>call<|/tool_call|>`, reads `result` (None: no tool ran),
    then says `answer`."""
    fed = [] if result is None else [TOOL_RESULT_ID, *tokenizer.encode(result_text(result)), TOOL_RESULT_END_ID]
    return [TOOL_CALL_ID, *tokenizer.encode(call), TOOL_CALL_END_ID, *fed, *tokenizer.encode(answer), tokenizer.im_end_id]


def calculating(model: Transformer, tokenizer, tools_run: bool = True) -> RecitingTransformer:
    """`model` scripted to call `calc: 4 * 2` and answer "So it is 8." after the result the engine
    feeds back, or right after the call when `tools_run` is False."""
    return RecitingTransformer(model, tool_script(tokenizer, CALC_CALL, CALC_RESULT if tools_run else None, CALC_ANSWER))


def test_endoftext_ends_a_chat_reply(loaded):
    tokenizer, models, _ = loaded
    model, reply = runs_on_into_a_document(models["demo-sft"], tokenizer)
    with serving(create_app(tokenizer, {"demo-sft": model})) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        response = client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0)
        [choice] = response.choices
        assert (choice.message.content, choice.finish_reason) == (reply, "stop")
        assert response.usage.completion_tokens == len(tokenizer.encode(reply))
        streamed = client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == reply


@pytest.fixture
def gated(loaded):
    tokenizer, models, _ = loaded
    return tokenizer, GatedTransformer(models["demo-sft"])


def test_concurrent_streaming_clients_are_decoded_together_and_correctly(gated, loaded):
    tokenizer, model = gated
    questions = [[{"role": "user", "content": f"Question number {i}: where is Oskel?"}] for i in range(6)]
    expected = [greedy_reply(loaded, q, 20) for q in questions]

    def ask(url, messages):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        stream = client.chat.completions.create(model="demo-sft", messages=messages, max_tokens=20, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with serving(create_app(tokenizer, {"demo-sft": model}, max_batch=8)) as url:
        with ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(ask, url, q) for q in questions]
            wait_for(lambda: health(url)["admitted_sequences"] == len(questions))
            model.permits.release(10_000)
            replies = [f.result(timeout=60) for f in futures]
        stats = health(url)
    assert replies == [text for text, _ in expected]
    assert stats["tokens"] == sum(len(completion.tokens) for _, completion in expected)
    assert stats["steps"] <= 21 + 1  # the first request's prefill, then everyone together


def test_a_full_server_answers_503_and_recovers(gated):
    tokenizer, model = gated
    with serving(create_app(tokenizer, {"demo-sft": model}, max_batch=1, max_queue=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(client.chat.completions.create, model="demo-sft", messages=HELLO, max_tokens=5, temperature=0)
            wait_for(lambda: health(url)["admitted_sequences"] == 1)
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=5)
            assert refused.value.status_code == 503
            assert refused.value.body["code"] == "overloaded"
            model.permits.release(10_000)
            assert first.result(timeout=60).usage.completion_tokens == 5
        assert client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=5, temperature=0).usage.completion_tokens == 5


def test_a_client_that_disconnects_mid_stream_frees_its_slot(gated):
    tokenizer, model = gated
    with serving(create_app(tokenizer, {"demo-sft": model}, max_batch=1, max_queue=0)) as url:
        body = {"model": "demo-sft", "messages": HELLO, "max_tokens": 100, "temperature": 0, "stream": True}
        model.permits.release(3)  # the prefill and two decoding steps: two tokens out
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: dropping the iterator would close the connection now
            first_event = json.loads(next(lines).removeprefix("data: "))
            assert first_event["choices"][0]["delta"]["role"] == "assistant"
            wait_for(lambda: health(url)["tokens"] == 2)
        wait_for(lambda: health(url)["admitted_sequences"] == 0)
        model.permits.release(10_000)
        wait_for(lambda: health(url)["active_sequences"] == 0)
        assert health(url)["tokens"] < 10
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=4, temperature=0).usage.completion_tokens == 4


# --- the server's own tools -------------------------------------------------------------------------
CALC_STEP = {"call": CALC_CALL, "result": CALC_RESULT, "offset": 0}


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def streamed_deltas(client: openai.OpenAI, **request) -> list:
    return [chunk.choices[0].delta for chunk in client.chat.completions.create(stream=True, **request) if chunk.choices]


def test_the_server_runs_a_tool_call_and_returns_the_step_beside_the_text(loaded):
    tokenizer, models, _ = loaded
    model = calculating(models["demo-sft"], tokenizer)
    with serving(create_app(tokenizer, {"demo-sft": model}, tools=Tools(tokenizer))) as url:
        client = openai_client(url)
        request = dict(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0)
        response = client.chat.completions.create(**request)
        message = response.choices[0].message
        assert (message.content, message.tool_steps) == (CALC_ANSWER, [CALC_STEP])
        assert response.usage.prompt_tokens == len(render_for_reply(with_tools(HELLO), tokenizer))  # the tools are offered
        assert response.usage.completion_tokens == len(model.script) - 1  # the fed result counts; <|im_end|> does not

        deltas = streamed_deltas(client, **request)
        pieces = [("step", d.tool_steps) if getattr(d, "tool_steps", None) else ("text", d.content)
                  for d in deltas if d.content or getattr(d, "tool_steps", None)]
        assert pieces[0] == ("step", [CALC_STEP])  # the step, then the text after it
        assert "".join(text for kind, text in pieces[1:] if kind == "text") == CALC_ANSWER and len(pieces) > 1

        history = HELLO + [message.model_dump(exclude_none=True), {"role": "user", "content": "Thanks"}]
        view = httpx.post(f"{url}/v1/tokenize", json={"messages": history}).json()
        protocol = HELLO + [{"role": "assistant", "content": "", "tool_call": CALC_CALL},
                            {"role": "tool", "content": CALC_RESULT},
                            {"role": "assistant", "content": CALC_ANSWER}, {"role": "user", "content": "Thanks"}]
        assert [t["id"] for t in view["tokens"]] == render_for_reply(with_tools(protocol), tokenizer)  # the step went back in
        again = client.chat.completions.create(**dict(request, messages=history))
        assert again.usage.prompt_tokens == view["count"]


def test_a_step_sits_at_its_offset_in_the_text_and_goes_back_there(loaded):
    tokenizer, models, _ = loaded
    script = [*tokenizer.encode("Let me see."), *tool_script(tokenizer, CALC_CALL, CALC_RESULT, CALC_ANSWER)]
    model = RecitingTransformer(models["demo-sft"], script)
    with serving(create_app(tokenizer, {"demo-sft": model}, tools=Tools(tokenizer))) as url:
        body = {"model": "demo-sft", "messages": HELLO, "max_tokens": 60, "temperature": 0}
        message = httpx.post(f"{url}/v1/chat/completions", json=body).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Let me see." + CALC_ANSWER,
                           "tool_steps": [dict(CALC_STEP, offset=len("Let me see."))]}
        view = httpx.post(f"{url}/v1/tokenize", json={"messages": HELLO + [message]}).json()
        assert view["text"].endswith("<|im_sep|>Let me see.<|tool_call|>calc: 4 * 2<|/tool_call|><|tool_result|> 8"
                                     "<|/tool_result|>So it is 8.<|im_end|>")


def test_tool_choice_none_offers_no_tools_and_runs_no_call(loaded):
    tokenizer, models, _ = loaded
    model = calculating(models["demo-sft"], tokenizer, tools_run=False)
    with serving(create_app(tokenizer, {"demo-sft": model}, tools=Tools(tokenizer))) as url:
        client = openai_client(url)
        request = dict(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0, tool_choice="none")
        response = client.chat.completions.create(**request)
        unanswered = {"call": CALC_CALL, "result": None, "offset": 0}
        assert response.choices[0].message.content == CALC_ANSWER
        assert response.choices[0].message.tool_steps == [unanswered]  # not run
        assert response.usage.prompt_tokens == len(render_for_reply(HELLO, tokenizer))  # not offered
        assert [d.tool_steps for d in streamed_deltas(client, **request) if getattr(d, "tool_steps", None)] == [[unanswered]]
        offered = httpx.post(f"{url}/v1/tokenize", json={"messages": HELLO}).json()["text"]
        plain = httpx.post(f"{url}/v1/tokenize", json={"messages": HELLO, "tool_choice": "none"}).json()["text"]
        assert TOOLS_SYSTEM_PROMPT in offered and TOOLS_SYSTEM_PROMPT not in plain
        refused = httpx.post(f"{url}/v1/chat/completions", json=dict(request, tool_choice="required"))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"


def test_a_server_without_tools_runs_no_call_and_a_reply_without_calls_has_no_steps(loaded):
    tokenizer, models, _ = loaded
    with serving(create_app(tokenizer, {"demo-sft": calculating(models["demo-sft"], tokenizer, tools_run=False)})) as url:
        client = openai_client(url)
        assert client.models.list().data[0].tools == []
        response = client.chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0)
        assert response.choices[0].message.tool_steps == [{"call": CALC_CALL, "result": None, "offset": 0}]
        assert response.usage.prompt_tokens == len(render_for_reply(HELLO, tokenizer))
        without_steps = HELLO + [{"role": "assistant", "content": "Hi.", "tool_steps": [{"call": CALC_CALL, "offset": 0}]}]
        view = httpx.post(f"{url}/v1/tokenize", json={"messages": without_steps}).json()
        assert view["text"].endswith("<|im_sep|>Hi.<|im_end|>")  # a step without a result is left out
    model, reply = runs_on_into_a_document(models["demo-sft"], tokenizer)
    with serving(create_app(tokenizer, {"demo-sft": model}, tools=Tools(tokenizer))) as url:
        response = openai_client(url).chat.completions.create(model="demo-sft", messages=HELLO, max_tokens=40, temperature=0)
        message = response.choices[0].message
        assert message.content == reply and "tool_steps" not in message.model_dump()


@pytest.mark.parametrize("steps, needle", [
    ([{"call": CALC_CALL, "result": "8", "offset": 99}], "at most the content's length (3 characters)"),
    ([{"call": CALC_CALL, "result": "8", "offset": 2}, {"call": CALC_CALL, "result": "8", "offset": 1}], "must not decrease"),
])
def test_steps_sent_back_at_impossible_offsets_get_a_400(server, steps, needle):
    messages = HELLO + [{"role": "assistant", "content": "Hi.", "tool_steps": steps}, {"role": "user", "content": "And?"}]
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": "demo-sft", "messages": messages})
    assert response.status_code == 400 and needle in response.json()["error"]["message"]
    user_steps = [{"role": "user", "content": "Hi.", "tool_steps": [{"call": CALC_CALL, "result": "8", "offset": 0}]}]
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": "demo-sft", "messages": user_steps})
    assert response.status_code == 400 and "only assistant messages may carry tool_steps" in response.json()["error"]["message"]


def started_app(run, monkeypatch, *flags: str):
    """The app `picochat serve --run run *flags` would serve."""
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: apps.append(app))
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--run", str(run), *flags])
    assert exit_.value.code == 0
    return apps[0]


def test_picochat_serve_runs_the_calculator_unless_told_no_tools(serve_run, monkeypatch, capsys):
    with serving(started_app(serve_run, monkeypatch)) as url:
        assert [card.tools for card in openai_client(url).models.list().data] == [["calc"], ["calc"]]
    assert "tools: calc;" in capsys.readouterr().out
    with serving(started_app(serve_run, monkeypatch, "--no-tools")) as url:
        assert [card.tools for card in openai_client(url).models.list().data] == [[], []]
        assert TOOLS_SYSTEM_PROMPT not in httpx.post(f"{url}/v1/tokenize", json={"messages": HELLO}).json()["text"]
    assert "tools off;" in capsys.readouterr().out
