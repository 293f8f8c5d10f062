"""Serving under load: `picochat serve` in a subprocess, driven by concurrent streaming clients.

For 1, 4 and 16 concurrent clients (each sending streaming chat requests one after another):
aggregate decode throughput (completion tokens of all clients per second of wall time) and the
p50 / p99 time to first token. Then --soak-requests requests at concurrency 16: how many failed,
and the server's resident memory (VmRSS) before and after.

Without --run it benchmarks an untrained model of the `cpu` preset's shape (4 layers, d_model 256,
context 256) with a 4096-token tokenizer trained on a small synthetic world, built in a temporary
folder; untrained, its replies run to max_tokens, so every request decodes the same number of tokens.

    python benchmarks/bench_serve.py
    python benchmarks/bench_serve.py --run runs/demo --max-tokens 64 --requests-per-client 4
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx


def build_cpu_preset_run(folder: Path) -> Path:
    """A run with a tokenizer and an untrained sft model of the cpu preset's shape."""
    from picochat.checkpoint import save_model
    from picochat.config import get_preset
    from picochat.data.sources import iter_documents
    from picochat.world.documents import write_world
    from picochat.model import ModelConfig, Transformer
    from picochat.tokenizer import Tokenizer

    preset = get_preset("cpu")
    run = folder / "bench"
    write_world(run / "world", size_mb=1, seed=0, shard_mb=1, val_kb=10)
    tokenizer = Tokenizer.train(iter_documents(run / "world" / "docs"), vocab_size=preset.vocab_size)
    tokenizer.save(run / "tokenizer")
    save_model(run / "sft", Transformer(ModelConfig(vocab_size=tokenizer.vocab_size, **preset.model)))
    return run


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(run: Path, port: int, max_batch: int, threads: int | None, *extra: str) -> subprocess.Popen:
    """`picochat serve` on 127.0.0.1:port (with `extra` arguments), once it answers /health."""
    command = [sys.executable, "-m", "picochat", "serve", "--run", str(run), "--port", str(port), "--max-batch", str(max_batch),
               *extra]
    if threads:
        command += ["--threads", str(threads)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    server.kill()
    raise RuntimeError("the server did not start within 120 s")


async def one_request(client: httpx.AsyncClient, model: str, question: str, max_tokens: int) -> tuple[float, int]:
    """Stream one chat completion; returns (seconds to the first piece of text, completion tokens)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 1.0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first_text, tokens = None, None
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if first_text is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first_text = time.perf_counter() - start
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if tokens is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return (first_text if first_text is not None else time.perf_counter() - start), tokens


async def load(url: str, model: str, clients: int, total_requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients sending `total_requests` requests, each client one after another."""
    ttfts, tokens, errors = [], [0], []
    sent = [0]

    async def client_loop(client_index: int, client: httpx.AsyncClient) -> None:
        while sent[0] < total_requests:
            sent[0] += 1
            question = f"Client {client_index} asks question {sent[0]}: where does Mira live?"
            try:
                ttft, n = await one_request(client, model, question, max_tokens)
            except Exception as error:  # counted, not fatal: the soak test reports them
                errors.append(f"{type(error).__name__}: {error}")
                continue
            ttfts.append(ttft)
            tokens[0] += n

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        seconds = time.perf_counter() - start
    ttfts.sort()
    return {
        "clients": clients, "requests": total_requests, "errors": errors, "tokens": tokens[0],
        "seconds": seconds, "tokens_per_s": tokens[0] / seconds,
        "ttft_p50": statistics.median(ttfts) if ttfts else float("nan"),
        "ttft_p99": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))] if ttfts else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="run folder to serve (default: build a cpu-preset-shaped model)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="concurrent clients per measurement")
    parser.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends in a measurement")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    parser.add_argument("--soak-requests", type=int, default=500, help="requests of the error/memory test at concurrency 16 (0: skip)")
    parser.add_argument("--soak-max-tokens", type=int, default=16, help="max_tokens of the soak test's requests")
    parser.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    parser.add_argument("--threads", type=int, default=None, help="the server's --threads (default: PyTorch's choice)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or build_cpu_preset_run(Path(tmp))
        port = free_port()
        server = start_server(run, port, args.max_batch, args.threads)
        url = f"http://127.0.0.1:{port}"
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            asyncio.run(load(url, model, 2, 1, 8))  # warm-up
            print(f"serving {run} as {model} on {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}), "
                  f"server threads {args.threads or 'default'}; max_tokens {args.max_tokens}, {args.requests_per_client} requests per client")
            print("| clients | requests | tokens | seconds | tokens/s | vs 1 client | TTFT p50 | TTFT p99 | errors |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            single = None
            for clients in args.concurrency:
                result = asyncio.run(load(url, model, clients, clients * args.requests_per_client, args.max_tokens))
                single = single or result["tokens_per_s"]
                print(f"| {clients} | {result['requests']} | {result['tokens']} | {result['seconds']:.1f} | "
                      f"{result['tokens_per_s']:.0f} | {result['tokens_per_s'] / single:.1f}x | "
                      f"{result['ttft_p50'] * 1000:.0f} ms | {result['ttft_p99'] * 1000:.0f} ms | {len(result['errors'])} |")
            if args.soak_requests:
                before = rss_mb(server.pid)
                result = asyncio.run(load(url, model, 16, args.soak_requests, args.soak_max_tokens))
                after = rss_mb(server.pid)
                print(f"\nsoak: {result['requests']} requests at concurrency 16 (max_tokens {args.soak_max_tokens}) in "
                      f"{result['seconds']:.1f} s: {len(result['errors'])} errors; server RSS {before:.0f} MB before, {after:.0f} MB after")
                for error in result["errors"][:5]:
                    print(f"  error: {error}")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
