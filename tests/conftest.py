"""Shared test fixtures: the real-data folder beside the repository, a small trained tokenizer, a tiny
trained model for the export tests."""

import contextlib
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

SAMPLE_TEXT = (
    "The capital of Varnia is Oskel. Oskel lies on the river Tam, and 12,345 people live there.\n"
    "Dear Mira, I bought 3 apples and 2 oranges; each apple cost $2. Ünïcödé, 日本語, emoji 🎉.\n"
    "def f(x):\n    return x ** 2  # code too\n"
) * 20


def arithmetic_chats() -> list[list[dict]]:
    return [[{"role": "user", "content": f"What is {a}+{b}?"}, {"role": "assistant", "content": f"{a}+{b} = {a + b}"}]
            for a in range(4) for b in range(4)]


def trained_tiny_model(tok, tie: bool):
    """A 2-layer Transformer trained for a few steps on documents and chats, so its greedy output
    varies and its norms move away from 1 (a misapplied norm would show)."""
    import torch

    from picochat.chat import render
    from picochat.model import IGNORE_INDEX, ModelConfig, Transformer

    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                         head_dim=16, max_seq_len=96, tie_embeddings=tie)
    model = Transformer(config)
    model.init_weights(seed=1)
    seq_len = 32
    doc = [tok.eot_id] + tok.encode(SAMPLE_TEXT)
    rows = [render(chat, tok)[0] for chat in arithmetic_chats()]
    rows += [doc[i:i + seq_len + 1] for i in range(0, 12 * seq_len, seq_len)]
    data = torch.tensor([(row + [tok.pad_id] * seq_len)[:seq_len + 1] for row in rows])
    targets = data[:, 1:].masked_fill(data[:, 1:] == tok.pad_id, IGNORE_INDEX)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2)
    for _ in range(20):
        loss = model(data[:, :-1], targets=targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, skipping the test when that folder is not beside the clone."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: real-data tests need ../shared/data beside the repository")
    return path


@contextlib.contextmanager
def one_torch_thread():
    """Run on one torch thread. The test models are tiny: a second thread only adds synchronisation,
    which on a busy 2-core machine made modules 5-10x slower; and one thread fixes the order of sums."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`) or a test."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def small_tokenizer():
    from picochat.tokenizer import Tokenizer

    return Tokenizer.train([SAMPLE_TEXT], vocab_size=512)


TINY_MODEL_FLAGS = ["--n-layer", "2", "--d-model", "64", "--n-head", "2", "--n-kv-head", "1"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A run folder with a small world, its tokenizer and token shards (no model yet)."""
    from picochat.data.shards import prepare
    from picochat.data.sources import iter_documents
    from picochat.tokenizer import Tokenizer
    from picochat.world import generate

    run = tmp_path_factory.mktemp("tiny_run")
    world = run / "world"
    generate(world, size_mb=0.3, seed=0, n_chats=300, n_sft_tasks=100, n_rl_tasks=50, n_eval_tasks=20, shard_mb=0.1, val_kb=30)
    Tokenizer.train(iter_documents(world / "docs"), vocab_size=512).save(run / "tokenizer")
    prepare(world / "docs", run / "tokenizer", run / "shards", val_inputs=world / "docs-val.jsonl", workers=1, progress=False)
    return run
