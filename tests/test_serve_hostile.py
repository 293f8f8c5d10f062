"""The server under hostile and careless clients (issue 21): requests that used to kill every
request in flight, freeze the event loop, crash with a 500 or keep decoding for nobody."""

import asyncio
import http.client
import json
import re
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

import picochat.serve.app
from picochat.cli import main
from picochat.engine import sample_next
from picochat.serve.app import create_app
from picochat.serve.completions import _split_tool_markup
from picochat.serve.schemas import MAX_STOP_CHARS, MAX_STOP_STRINGS
from picochat.serve.text import StopStrings
from picochat.tokenizer import Tokenizer
from test_serve import (HELLO, GatedTransformer, gated, greedy_reply, health, loaded, serve_run,  # noqa: F401 (fixtures)
                        server, serving, wait_for)


def stream_events(url: str, body: dict) -> list:
    """The events of one streamed chat completion, "[DONE]" included, parsed."""
    events = []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"model": "demo-sft", "stream": True, **body}, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict) and e.get("choices"))


def errors(events: list) -> list:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


# --- 1. one request's sampling must not kill the others -------------------------------------------
def test_temperatures_and_top_ps_below_float32_sample_greedily():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 5
    greedy = logits.argmax(dim=-1)
    assert torch.equal(sample_next(logits, temperature=1e-40), greedy)
    assert torch.equal(sample_next(logits, temperature=1.0, top_p=1e-46), greedy)


def test_a_request_with_a_denormal_temperature_or_top_p_does_not_fail_the_batch(gated, loaded):
    tokenizer, model = gated
    questions = [[{"role": "user", "content": f"Question {i}: where is Oskel?"}] for i in range(8)]
    expected = [greedy_reply(loaded, q, 12)[0] for q in questions]
    settings = [{"temperature": 1e-40}, {"temperature": 1.0, "top_p": 1e-46}] + [{"temperature": 0}] * 6
    with serving(create_app(tokenizer, {"demo-sft": model}, max_batch=8)) as url:
        with ThreadPoolExecutor(len(questions)) as pool:
            futures = [pool.submit(stream_events, url, {"messages": q, "max_tokens": 12, **s}) for q, s in zip(questions, settings)]
            wait_for(lambda: health(url)["admitted_sequences"] == len(questions))
            model.permits.release(10_000)
            results = [f.result(timeout=60) for f in futures]
    for events, reply in zip(results, expected):
        assert errors(events) == [] and events[-1] == "[DONE]"
        assert streamed_text(events) == reply  # both are greedy: they sample nothing


class PoisonedTransformer(GatedTransformer):
    """A gated Transformer whose logits are NaN for every sequence that holds the `poison` token:
    sampling such a sequence fails, as it would for a model that overflowed on it."""

    def __init__(self, source, poison: int):
        super().__init__(source)
        self.poison = poison
        self.forwards = 0

    def forward(self, tokens, *args, **kwargs):
        logits = super().forward(tokens, *args, **kwargs)
        self.forwards += 1
        return logits.masked_fill((tokens == self.poison).any(dim=1)[:, None, None], float("nan"))

    def run_until(self, condition) -> None:
        """Allow one forward pass at a time until `condition()` holds."""
        while not condition():
            done = self.forwards
            self.permits.release(1)
            wait_for(lambda: self.forwards > done)


def test_a_sampling_failure_fails_its_own_request_alone(loaded):
    tokenizer, models, _ = loaded
    questions = [[{"role": "user", "content": f"Question {i}: where is Oskel?"}] for i in range(7)]
    expected = [greedy_reply(loaded, q, 12)[0] for q in questions]
    innocent = {t for q in questions for t in tokenizer.encode(q[0]["content"])}
    poison_text = "zebra quiz jinx"
    poison = next(t for t in tokenizer.encode(poison_text) if t not in innocent)
    model = PoisonedTransformer(models["demo-sft"], poison)
    sampled = {"temperature": 1.0, "top_k": 1, "max_tokens": 12}  # one sampling group for all; top_k=1 is greedy
    with serving(create_app(tokenizer, {"demo-sft": model}, max_batch=8)) as url:
        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(stream_events, url, {"messages": q, **sampled}) for q in questions]
            wait_for(lambda: health(url)["admitted_sequences"] == 7)
            model.run_until(lambda: health(url)["tokens"] >= 14)  # a few tokens each, then the poisoned one joins
            poisoned = pool.submit(stream_events, url, {"messages": [{"role": "user", "content": poison_text}], **sampled})
            wait_for(lambda: health(url)["admitted_sequences"] == 8)
            model.permits.release(10_000)
            results = [f.result(timeout=60) for f in futures]
            failed = poisoned.result(timeout=60)
        [error] = errors(failed)
        assert error["type"] == "server_error" and "decoding this request failed" in error["message"]
        assert failed[-1] == "[DONE]"
        for events, reply in zip(results, expected):
            assert errors(events) == [] and events[-1] == "[DONE]"
            assert streamed_text(events) == reply
        assert health(url)["admitted_sequences"] == 0
        response = httpx.post(f"{url}/v1/chat/completions", json={"model": "demo-sft", "messages": [{"role": "user", "content": poison_text}]})
        assert response.status_code == 500 and "decoding this request failed" in response.json()["error"]["message"]


# --- 2. stop strings: capped, and checked in time linear in their length ------------------------------
class QuadraticStopStrings:
    """The first StopStrings (issue 21.2's quadratic check), kept as the oracle of what push returns."""

    def __init__(self, stops):
        self._stops, self._held, self.stopped = list(stops), "", False

    def push(self, text):
        if self.stopped:
            return ""
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._held = True, ""
            return text[:min(hits)]
        keep = max((n for s in self._stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]


@given(stops=st.lists(st.text("ab\n", min_size=1, max_size=6), min_size=1, max_size=4),
       pieces=st.lists(st.text("ab\nc", max_size=5), max_size=12))
@settings(max_examples=300, deadline=None)
def test_stop_strings_hold_back_and_cut_exactly_as_before(stops, pieces):
    watcher, oracle = StopStrings(stops), QuadraticStopStrings(stops)
    for piece in pieces:
        assert watcher.push(piece) == oracle.push(piece)
        assert watcher.stopped == oracle.stopped
    assert watcher.flush() == ("" if oracle.stopped else oracle._held)


@pytest.mark.parametrize("stop, needle", [
    (["x"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS}"),
    ("y" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters"),
    (["ok", "z" * 250_000], f"at most {MAX_STOP_CHARS} characters"),
])
def test_too_many_or_too_long_stop_strings_get_a_400(server, stop, needle):
    response = httpx.post(f"{server}/v1/chat/completions", json={"model": "demo-sft", "messages": HELLO, "stop": stop})
    assert response.status_code == 400, response.text
    assert needle in response.json()["error"]["message"] and response.json()["error"]["param"] == "stop"
    longest = httpx.post(f"{server}/v1/chat/completions",
                         json={"model": "demo-sft", "messages": HELLO, "max_tokens": 3, "temperature": 0,
                               "stop": ["w" * MAX_STOP_CHARS] * MAX_STOP_STRINGS})
    assert longest.status_code == 200 and longest.json()["usage"]["completion_tokens"] == 3


# --- 3. work that grows with a request: bounded, linear, off the event loop ----------------------------
MARKUP = ["<|tool_call|>", "<|/tool_call|>", "<|tool_result|>", "<|/tool_result|>"]
BACKTRACKING_MARKUP = re.compile(r"(.*?)<\|tool_call\|>(.*?)<\|/tool_call\|><\|tool_result\|>(.*?)<\|/tool_result\|>", re.S)


@given(st.lists(st.sampled_from(MARKUP + ["<|/tool_call|><|tool_result|>", "a", "2*3", "\n"]), max_size=14).map("".join))
@settings(max_examples=300, deadline=None)
def test_inline_tool_markup_is_split_as_the_regular_expression_did(content):
    expected, end = [], 0
    for match in BACKTRACKING_MARKUP.finditer(content):
        expected += [{"role": "assistant", "content": match[1], "tool_call": match[2]}, {"role": "tool", "content": match[3]}]
        end = match.end()
    assert _split_tool_markup(content) == expected + [{"role": "assistant", "content": content[end:]}]


def test_a_reply_full_of_unclosed_tool_calls_is_read_back_at_once():
    content = "<|tool_call|>x" * 20_000  # 280 kB; the regular expression took 2.4 s on 2.8 kB of this
    assert _split_tool_markup(content) == [{"role": "assistant", "content": content}]


class SpyTokenizer(Tokenizer):
    """A tokenizer that records, for every encoding call, whether it ran on an event loop and how
    many characters it was given."""

    def __init__(self, source: Tokenizer):
        super().__init__(source._special)
        self.calls = []

    def _record(self, texts):
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append((on_loop, sum(len(t) for t in texts)))

    def encode(self, text, allow_special=False):
        self._record([text])
        return super().encode(text, allow_special)

    def encode_batch(self, texts, allow_special=False):
        self._record(texts)
        return super().encode_batch(texts, allow_special)


@pytest.fixture(scope="module")
def spied(loaded):
    tokenizer, models, _ = loaded
    spy = SpyTokenizer(tokenizer)
    with serving(create_app(spy, models)) as url:
        yield spy, url


def test_prompts_are_tokenized_off_the_event_loop(spied):
    spy, url = spied
    spy.calls.clear()
    chat = httpx.post(f"{url}/v1/chat/completions", json={"model": "demo-sft", "messages": HELLO, "max_tokens": 2}, timeout=60)
    text = httpx.post(f"{url}/v1/completions", json={"model": "demo-base", "prompt": "The capital of", "max_tokens": 2}, timeout=60)
    view = httpx.post(f"{url}/v1/tokenize", json={"messages": HELLO}, timeout=60)
    document = httpx.post(f"{url}/v1/tokenize", json={"prompt": "The capital of"}, timeout=60)
    assert [r.status_code for r in (chat, text, view, document)] == [200] * 4
    assert len(spy.calls) >= 4 and not any(on_loop for on_loop, _ in spy.calls)


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": "demo-sft", "messages": [{"role": "user", "content": "word " * 400_000}]}),
    ("/v1/chat/completions", {"model": "demo-sft", "messages": [{"role": "user", "content": "hi"}] * 50_000}),
    ("/v1/completions", {"model": "demo-base", "prompt": "word " * 400_000}),
    ("/v1/tokenize", {"messages": [{"role": "user", "content": "word " * 400_000}]}),
    ("/v1/tokenize", {"prompt": "word " * 400_000}),
])
def test_text_far_too_long_for_the_context_is_refused_without_tokenizing_it(spied, path, body):
    spy, url = spied
    spy.calls.clear()
    response = httpx.post(f"{url}{path}", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "at least" in error["message"], error
    assert sum(chars for _, chars in spy.calls) < 10_000


def test_a_body_over_the_limit_gets_413_and_the_server_goes_on(loaded):
    tokenizer, models, _ = loaded
    body = json.dumps({"model": "demo-sft", "messages": [{"role": "user", "content": "word " * 10_000}]}).encode()
    with serving(create_app(tokenizer, models, max_body_bytes=20_000)) as url, httpx.Client(base_url=url, timeout=60) as client:
        declared = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        chunked = client.post("/v1/chat/completions", content=iter([body[:15_000], body[15_000:]]),
                              headers={"content-type": "application/json"})
        for response in (declared, chunked):
            assert response.status_code == 413, response.text
            error = response.json()["error"]
            assert error["code"] == "request_too_large" and "20,000 bytes" in error["message"] and "--max-body-mb" in error["message"]
        reply = client.post("/v1/chat/completions", json={"model": "demo-sft", "messages": HELLO, "max_tokens": 2, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2


def test_the_serve_command_sets_the_body_limit(serve_run, monkeypatch):
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: apps.append(app))
    with pytest.raises(SystemExit, match="0"):
        main(["serve", "--run", str(serve_run), "--max-body-mb", "0.01"])  # 10,485 bytes
    client = TestClient(apps[0])  # no lifespan: the requests below never reach a model
    assert client.post("/v1/tokenize", json={"prompt": "word " * 3_000}).status_code == 413
    assert client.post("/v1/tokenize", json={"prompt": "word " * 1_000}).status_code == 400  # read, then too long


# --- 4. text that is not Unicode, and the server's own errors ---------------------------------------
def keep_alive_request(connection: http.client.HTTPConnection, method: str, path: str, body: str | None = None):
    """(status, parsed body) of a request on a kept-alive connection (http.client never reconnects
    by itself: a connection the server closed fails the next request)."""
    connection.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
    response = connection.getresponse()
    return response.status, json.loads(response.read())


SURROGATE = "\ud800"  # valid JSON ("\\ud800"), but no Unicode character


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"model": "demo-sft", "messages": [{"role": "user", "content": f"hi {SURROGATE}"}]}, "messages.0.content"),
    ("/v1/chat/completions", {"model": "demo-sft", "messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "demo-sft", "messages": HELLO, "stop": ["a", SURROGATE]}, "stop"),
    ("/v1/chat/completions", {"model": f"demo-sft{SURROGATE}", "messages": HELLO}, "model"),
    ("/v1/completions", {"model": "demo-base", "prompt": SURROGATE}, "prompt"),
    ("/v1/completions", {"model": "demo-base", "prompt": [SURROGATE]}, "prompt"),
    ("/v1/tokenize", {"prompt": SURROGATE}, "prompt"),
    ("/v1/tokenize", {"messages": [{"role": SURROGATE, "content": "hi"}]}, "messages.0.role"),
])
def test_lone_surrogates_get_a_400_and_the_connection_stays_open(server, path, body, param):
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    status, answer = keep_alive_request(connection, "POST", path, json.dumps(body))
    assert status == 400, answer
    assert "lone surrogate" in answer["error"]["message"] and answer["error"]["param"] == param
    status, answer = keep_alive_request(connection, "POST", "/v1/tokenize", json.dumps({"messages": HELLO}))
    assert status == 200 and answer["count"] > 0
    connection.close()


def test_an_internal_error_is_a_500_that_keeps_the_connection_open(server, monkeypatch):
    def broken(*args):
        raise RuntimeError(f"a bug {SURROGATE}")

    monkeypatch.setattr(picochat.serve.app, "token_view", broken)
    connection = http.client.HTTPConnection(server.removeprefix("http://"), timeout=60)
    status, answer = keep_alive_request(connection, "POST", "/v1/tokenize", json.dumps({"messages": HELLO}))
    assert status == 500 and answer["error"]["type"] == "server_error"
    assert answer["error"]["message"] == "internal error: RuntimeError: a bug \\ud800"
    status, answer = keep_alive_request(connection, "GET", "/health")
    assert status == 200 and answer["status"] == "ok"
    connection.close()


# --- 5. a client that leaves a request that does not stream ------------------------------------------
def test_a_client_that_leaves_a_request_that_does_not_stream_frees_its_row(gated):
    tokenizer, model = gated
    with serving(create_app(tokenizer, {"demo-sft": model}, max_batch=1, max_queue=0)) as url:
        body = json.dumps({"model": "demo-sft", "messages": HELLO, "max_tokens": 100, "temperature": 0}).encode()
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as client:
            client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            model.permits.release(3)  # the prefill and two decoding steps: two tokens out
            wait_for(lambda: health(url)["tokens"] == 2)
        wait_for(lambda: health(url)["admitted_sequences"] == 0)
        model.permits.release(10_000)
        wait_for(lambda: health(url)["active_sequences"] == 0)
        assert health(url)["tokens"] < 10
        reply = httpx.post(f"{url}/v1/chat/completions", json={"model": "demo-sft", "messages": HELLO, "max_tokens": 4, "temperature": 0},
                           timeout=60)
        assert reply.json()["usage"]["completion_tokens"] == 4
