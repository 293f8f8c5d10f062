"""Soak: good traffic alone, then with hostile and careless clients (issue 21), against `picochat serve`.

Good traffic: 16 concurrent clients, each sending streaming chat requests one after another (the
questions of the run's SFT conversations). A prober reads /health every 50 ms: its latency shows
event-loop stalls. Hostile clients run in another process (so that building and sending their large
bodies does not slow the good clients' event loop), each looping over issue 21's requests:

    tiny_temperature   a stream at temperature 1e-40 (its sampling failure killed every request in the batch)
    tiny_top_p         a stream at top_p 1e-46 (the same)
    long_stops         4 stop strings of 250,000 characters (froze the event loop for seconds a token)
    body_10mb          a 10 MB chat request (tokenized on the event loop: all clients stalled)
    body_25mb          a 25 MB chat request
    tokenize_4mb       a 4,000,000-byte /v1/tokenize (stalled 8.4 s, answered 33.7 MB)
    surrogate          a lone surrogate in a message (a 500 that dropped the connection)
    abandoned          a 200-token text completion that does not stream, abandoned after 0.3 s (decoded to the end)

Rounds alternate the two phases (alone, with hostile clients) so that a machine whose load drifts
affects both alike; the summary gives the median over rounds of each phase's p50 and p95 request
latency and their ratio. Every request loop is bounded in count; the hostile process stops with
its phase. Traffic goes to 127.0.0.1 only.

    python benchmarks/bench_serve_soak.py --run runs/demo --stage sft --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import build_cpu_preset_run, free_port, rss_mb, start_server  # noqa: E402

GOOD_CLIENTS = 16
GOOD_TIMEOUT = 120  # seconds: a good request still unanswered then is an error
PROBE_EVERY = 0.05  # seconds between /health probes
PROBE_TIMEOUT = 10  # seconds: a probe unanswered then counts as this long
HOSTILE_TIMEOUT = 60  # seconds: a hostile request still unanswered then counts as "timeout"
FALLBACK_QUESTIONS = ["Where does Mira live?", "What is 33-20?", "What colour does Tovondin love?", "Who are you?"]


def questions(run: Path, limit: int = 200) -> list[str]:
    """The first user messages of the run's SFT conversations (the kind of question the model knows)."""
    path = run / "world" / "sft.jsonl"
    if not path.exists():
        return FALLBACK_QUESTIONS
    found = []
    with path.open() as lines:
        for line in lines:
            found.append(json.loads(line)["messages"][0]["content"])
            if len(found) == limit:
                break
    return found


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# --- good traffic ---------------------------------------------------------------------------------
async def good_request(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> tuple[float, float]:
    """One streamed chat completion: (seconds to its first text, seconds to [DONE]); raises on any error."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.7, "stream": True}
    start = time.perf_counter()
    first, done = None, False
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"error event: {event['error']['message']}")
                if first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                    first = time.perf_counter() - start
    if not done:
        raise RuntimeError("the stream ended without [DONE]")
    total = time.perf_counter() - start
    return (total if first is None else first), total


async def good_traffic(url: str, model: str, asked: list[str], requests_per_client: int, max_tokens: int) -> dict:
    """GOOD_CLIENTS clients sending requests_per_client requests each, and the /health prober."""
    latencies, ttfts, errors, probes = [], [], [], []
    finished = asyncio.Event()

    async def client_loop(index: int, client: httpx.AsyncClient) -> None:
        for n in range(requests_per_client):
            try:
                ttft, total = await good_request(client, model, asked[(index * requests_per_client + n) % len(asked)], max_tokens)
            except Exception as error:  # counted: the figure this benchmark is for
                errors.append(f"{type(error).__name__}: {error}"[:200])
                continue
            ttfts.append(ttft)
            latencies.append(total)

    async def prober(client: httpx.AsyncClient) -> None:
        while not finished.is_set():
            start = time.perf_counter()
            try:
                await client.get("/health", timeout=PROBE_TIMEOUT)
            except httpx.TimeoutException:
                pass
            probes.append(time.perf_counter() - start)
            await asyncio.sleep(PROBE_EVERY)

    limits = httpx.Limits(max_connections=GOOD_CLIENTS + 1, max_keepalive_connections=GOOD_CLIENTS + 1)
    async with httpx.AsyncClient(base_url=url, timeout=GOOD_TIMEOUT, limits=limits) as client:
        probing = asyncio.create_task(prober(client))
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(GOOD_CLIENTS)))
        seconds = time.perf_counter() - start
        finished.set()
        await probing
    return {"requests": GOOD_CLIENTS * requests_per_client, "errors": errors, "seconds": seconds,
            "p50": percentile(latencies, 0.5), "p95": percentile(latencies, 0.95),
            "ttft_p50": percentile(ttfts, 0.5), "ttft_p95": percentile(ttfts, 0.95),
            "health_p95": percentile(probes, 0.95), "health_max": max(probes, default=float("nan"))}


# --- hostile traffic (its own process) ----------------------------------------------------------------
def chat_body(model: str, content: str, **fields) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": content}], **fields}).encode()


def attacks(model: str, document_model: str) -> dict[str, tuple[str, bytes, bool]]:
    """name -> (path, body, streamed); the bodies are built once."""
    return {
        "tiny_temperature": ("/v1/chat/completions", chat_body(model, "Who are you?", temperature=1e-40, max_tokens=16, stream=True), True),
        "tiny_top_p": ("/v1/chat/completions", chat_body(model, "Who are you?", top_p=1e-46, max_tokens=16, stream=True), True),
        "long_stops": ("/v1/chat/completions", chat_body(model, "Who are you?", stop=["x" * 250_000] * 4, max_tokens=16), False),
        "body_10mb": ("/v1/chat/completions", chat_body(model, "word " * 2_000_000), False),
        "body_25mb": ("/v1/chat/completions", chat_body(model, "word " * 5_000_000), False),
        "tokenize_4mb": ("/v1/tokenize", json.dumps({"messages": [{"role": "user", "content": "w" * 3_999_940}]}).encode(), False),
        "surrogate": ("/v1/chat/completions", chat_body(model, "hi \ud800"), False),
        "abandoned": ("/v1/completions", json.dumps({"model": document_model, "prompt": "The", "max_tokens": 200}).encode(), False),
    }


async def hostile_request(client: httpx.AsyncClient, name: str, path: str, body: bytes, streamed: bool) -> str:
    """The outcome of one hostile request: its status (and how a stream ended), or the exception."""
    headers = {"content-type": "application/json"}
    try:
        if name == "abandoned":
            try:
                await asyncio.wait_for(client.post(path, content=body, headers=headers), timeout=0.3)
                return "answered before leaving"
            except asyncio.TimeoutError:
                return "left"
        if not streamed:
            return str((await client.post(path, content=body, headers=headers, timeout=HOSTILE_TIMEOUT)).status_code)
        async with client.stream("POST", path, content=body, headers=headers, timeout=HOSTILE_TIMEOUT) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        ended = "[DONE]" if lines and lines[-1] == "data: [DONE]" else "cut"
        return f"{response.status_code} {'error event ' if any('error' in line for line in lines) else ''}{ended}"
    except httpx.TimeoutException:
        return "timeout"
    except httpx.HTTPError as error:
        return type(error).__name__


def hostile_main(url: str, models: list[str], loops: int, ready, stop, results) -> None:
    """`loops` concurrent hostile clients, each cycling through the attacks until `stop` is set;
    `ready` is set once the bodies are built (building them is not the server's load)."""
    bodies = attacks(models[0], models[-1])
    ready.set()

    async def run() -> Counter:
        outcomes: Counter = Counter()

        async def loop(offset: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=HOSTILE_TIMEOUT) as client:
                names = list(bodies)
                n = offset
                while not stop.is_set():
                    name = names[n % len(names)]
                    outcomes[(name, await hostile_request(client, name, *bodies[name]))] += 1
                    n += 1

        await asyncio.gather(*(loop(i * 3) for i in range(loops)))
        return outcomes

    results.put(dict(asyncio.run(run())))


# --- the benchmark ------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder to serve (default: build a cpu-preset-shaped model)")
    parser.add_argument("--stage", default=None, help="the served chat stage (default: picochat serve's choice)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of (alone, with hostile clients)")
    parser.add_argument("--requests-per-client", type=int, default=8, help="good requests of each client in a phase")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of the good requests")
    parser.add_argument("--hostile-loops", type=int, default=2, help="concurrent hostile clients")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: PyTorch's choice)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or build_cpu_preset_run(Path(tmp))
        port = free_port()
        server = start_server(run, port, args.max_batch, args.threads, *(["--stage", args.stage] if args.stage else []))
        url = f"http://127.0.0.1:{port}"
        try:
            models = [card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]]
            model = models[0]
            asked = questions(run)
            asyncio.run(good_traffic(url, model, asked, 1, 8))  # warm-up
            print(f"serving {run} as {model}, server threads {args.threads or 'default'}, max_batch {args.max_batch}; "
                  f"{GOOD_CLIENTS} good clients x {args.requests_per_client} streamed requests (max_tokens {args.max_tokens}) "
                  f"a phase; {args.hostile_loops} hostile clients")
            print("| round | phase | good requests | errors | p50 | p95 | TTFT p50 | TTFT p95 | /health p95 | /health max |")
            print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
            phases: dict[str, list[dict]] = {"alone": [], "with hostile": []}
            hostile: Counter = Counter()
            context = multiprocessing.get_context("spawn")
            attackers = None
            for round_index in range(1, args.rounds + 1):
                for phase in phases:
                    if phase == "with hostile":
                        ready, stop, results = context.Event(), context.Event(), context.Queue()
                        attackers = context.Process(target=hostile_main, args=(url, models, args.hostile_loops, ready, stop, results))
                        attackers.start()
                        if not ready.wait(timeout=120):
                            raise RuntimeError("the hostile clients did not start")
                    result = asyncio.run(good_traffic(url, model, asked, args.requests_per_client, args.max_tokens))
                    if attackers is not None:
                        stop.set()
                        hostile.update(results.get(timeout=HOSTILE_TIMEOUT * 2))
                        attackers.join()
                        attackers = None
                    phases[phase].append(result)
                    print(f"| {round_index} | {phase} | {result['requests']} | {len(result['errors'])} | {result['p50']:.2f} s | "
                          f"{result['p95']:.2f} s | {result['ttft_p50'] * 1000:.0f} ms | {result['ttft_p95'] * 1000:.0f} ms | "
                          f"{result['health_p95'] * 1000:.0f} ms | {result['health_max'] * 1000:.0f} ms |", flush=True)
                    for error in result["errors"][:3]:
                        print(f"  error: {error}")

            def median(phase: str, key: str) -> float:
                return statistics.median(r[key] for r in phases[phase])

            print(f"\nmedians over {args.rounds} rounds:")
            print("| phase | good requests | errors | p50 | p95 | /health p95 |")
            print("|---|---:|---:|---:|---:|---:|")
            for phase, results_of in phases.items():
                print(f"| {phase} | {sum(r['requests'] for r in results_of)} | {sum(len(r['errors']) for r in results_of)} | "
                      f"{median(phase, 'p50'):.2f} s | {median(phase, 'p95'):.2f} s | {median(phase, 'health_p95') * 1000:.0f} ms |")
            print(f"with / alone: p50 {median('with hostile', 'p50') / median('alone', 'p50'):.2f}x, "
                  f"p95 {median('with hostile', 'p95') / median('alone', 'p95'):.2f}x")
            print("\nhostile requests sent (outcome: count):")
            for (name, outcome), count in sorted(hostile.items()):
                print(f"  {name:17} {outcome}: {count}")
            print(f"server RSS at the end: {rss_mb(server.pid):.0f} MB")
        finally:
            if attackers is not None:
                attackers.terminate()
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:  # a frozen server does not get to its signal handler
                server.kill()


if __name__ == "__main__":
    main()
