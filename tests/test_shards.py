"""Token shards (prepare: contents, manifest, atomic resume) and the batch loader (layout, DDP, resume)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import shared_data
from picochat.cli import main as cli_main
from picochat.data import shards
from picochat.data.loader import ShardLoader, iter_val_batches
from picochat.data.shards import ShardError, prepare
from picochat.tokenizer import Tokenizer

WORDS = "the river Tam flows past Oskel where 12,345 people live; Mira bought 3 apples 🍎 Ünïcödé 日本語".split()


def make_docs(n: int, seed: int = 0) -> list[str]:
    """Varied documents, some holding special-token strings, which must stay plain text."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 120))]
        if i % 7 == 3:
            words.insert(rng.randint(0, len(words)), "<|im_end|>")
        if i % 11 == 5:
            words.append("<|endoftext|>")
        docs.append(f"Doc {i}.\n" + " ".join(words))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, documents, tokenizer, tokenizer path) shared by the tests of this module."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_docs(400)
    write_jsonl(root / "docs.jsonl", docs)
    tok = Tokenizer.train(docs, vocab_size=512)
    return root, docs, tok, tok.save(root / "tokenizer")


@pytest.fixture
def small_batches(monkeypatch):
    """Cut tokenizing batches small, so that a small corpus spans many batches (resume cursors)."""
    monkeypatch.setattr(shards, "BATCH_CHARS", 3000)


def read_split(out: Path, split: str) -> np.ndarray:
    manifest = json.loads((out / "manifest.json").read_text())
    dtype = np.dtype(manifest["dtype"])
    return np.concatenate([np.fromfile(out / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]])


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


# --- prepare ----------------------------------------------------------------------------------
def test_tiktoken_encoder_gives_the_tokenizers_ids(corpus):
    _, docs, tok, _ = corpus
    fast, exact = shards.make_encoder(tok, "tiktoken"), shards.make_encoder(tok, "tokenizers")
    for a, b, doc in zip(fast(docs), exact(docs), docs):
        assert a.tolist() == b.tolist() == tok.encode(doc)


def test_tiktoken_encoder_on_real_text(tmp_path):
    from picochat.data.sources import iter_documents

    docs = [d[:20000] for d in list(iter_documents(shared_data("text", "moby-dick.jsonl.gz")))[:40]]
    tok = Tokenizer.train(docs[:20], vocab_size=1024)
    fast = shards.make_encoder(tok, "tiktoken")(docs)
    assert [ids.tolist() for ids in fast] == tok.encode_batch(docs)


def test_shards_decode_back_to_the_documents(corpus, small_batches, tmp_path):
    root, docs, tok, tok_path = corpus
    m = prepare(root / "docs.jsonl", tok_path, tmp_path, val_docs=25, workers=1, shard_tokens=1000, progress=False)
    for split, split_docs in (("val", docs[:25]), ("train", docs[25:])):
        ids = read_split(tmp_path, split)
        assert tok.decode(ids.tolist()) == "".join("<|endoftext|>" + d for d in split_docs)
        # special-token strings inside documents are text: the only special id is each document's eot
        assert np.count_nonzero(ids < 9) == np.count_nonzero(ids == tok.eot_id) == len(split_docs)
        assert np.flatnonzero(ids == tok.eot_id)[0] == 0
        expected = [tok.eot_id] + [i for d in split_docs[:3] for i in tok.encode(d) + [tok.eot_id]]
        assert ids[: len(expected) - 1].tolist() == expected[:-1]
    assert m["dtype"] == "uint16" and all(p.suffix != ".tmp" for p in tmp_path.iterdir())
    assert not (tmp_path / "progress.json").exists()


def test_manifest_records_sources_tokenizer_and_counts(corpus, tmp_path):
    root, docs, tok, tok_path = corpus
    m = prepare(root / "docs.jsonl", tok_path, tmp_path, val_docs=25, workers=1, shard_tokens=1000, progress=False)
    assert m == json.loads((tmp_path / "manifest.json").read_text())
    assert m["sources"] == [{"path": str((root / "docs.jsonl").resolve()), "bytes": (root / "docs.jsonl").stat().st_size,
                             "mtime_ns": (root / "docs.jsonl").stat().st_mtime_ns}]
    assert m["tokenizer_fingerprint"] == tok.fingerprint and m["tokenizer"]["vocab_size"] == tok.vocab_size
    for split, split_docs in (("val", docs[:25]), ("train", docs[25:])):
        s = m["splits"][split]
        ids = read_split(tmp_path, split)
        sizes = [sh["tokens"] for sh in s["shards"]]
        assert all(n == 1000 for n in sizes[:-1]) and 0 < sizes[-1] <= 1000
        assert [sh["file"] for sh in s["shards"]] == [f"{split}-{i:05d}.bin" for i in range(len(sizes))]
        for sh in s["shards"]:
            assert sh["documents"] == np.count_nonzero(np.fromfile(tmp_path / sh["file"], np.uint16) == tok.eot_id)
        assert s["tokens"] == len(ids) == sum(sizes)
        assert s["documents"] == len(split_docs)
        assert s["text_bytes"] == sum(len(d.encode("utf-8")) for d in split_docs)
        assert s["text_tokens"] == sum(len(tok.encode(d)) for d in split_docs)
    assert shards.bytes_per_token(tmp_path) == m["splits"]["val"]["text_bytes"] / m["splits"]["val"]["text_tokens"]


def test_worker_pool_and_both_encoders_write_identical_shards(corpus, small_batches, tmp_path):
    root, _, _, tok_path = corpus
    prepare(root / "docs.jsonl", tok_path, tmp_path / "a", val_docs=10, workers=1, shard_tokens=700,
            encoder="tokenizers", progress=False)
    prepare(root / "docs.jsonl", tok_path, tmp_path / "b", val_docs=10, workers=2, shard_tokens=700, progress=False)
    a, b = shard_bytes(tmp_path / "a"), shard_bytes(tmp_path / "b")
    assert [k for k in a if k.endswith(".bin")] == [k for k in b if k.endswith(".bin")]
    assert all(a[k] == b[k] for k in a if k.endswith(".bin"))


def test_separate_validation_input(corpus, tmp_path):
    root, docs, tok, tok_path = corpus
    val_file = write_jsonl(tmp_path / "held_out.jsonl", make_docs(5, seed=1))
    m = prepare(root / "docs.jsonl", tok_path, tmp_path / "out", val_inputs=[val_file], workers=1, progress=False)
    assert m["splits"]["val"]["documents"] == 5 and m["splits"]["train"]["documents"] == len(docs)
    assert tok.decode(read_split(tmp_path / "out", "val").tolist()) == "".join("<|endoftext|>" + d for d in make_docs(5, seed=1))
    assert m["val_sources"][0]["path"] == str(val_file.resolve())


def test_token_dtype_follows_vocab_size(corpus, tmp_path, monkeypatch):
    assert shards.token_dtype(65536) == np.uint16 and shards.token_dtype(65537) == np.uint32
    root, _, _, tok_path = corpus
    prepare(root / "docs.jsonl", tok_path, tmp_path / "u16", workers=1, shard_tokens=900, progress=False)
    monkeypatch.setattr(shards, "token_dtype", lambda vocab_size: np.dtype(np.uint32))
    m = prepare(root / "docs.jsonl", tok_path, tmp_path / "u32", workers=1, shard_tokens=900, progress=False)
    assert m["dtype"] == "uint32"
    assert (tmp_path / "u32" / "train-00000.bin").stat().st_size == 4 * 900
    assert np.array_equal(read_split(tmp_path / "u32", "train"), read_split(tmp_path / "u16", "train"))
    a, b = ShardLoader(tmp_path / "u16", batch_size=2, seq_len=32), ShardLoader(tmp_path / "u32", batch_size=2, seq_len=32)
    assert all(torch.equal(x, y) for x, y in zip(next(a), next(b)))


def test_rerun_of_a_finished_job_returns_at_once(corpus, tmp_path, monkeypatch):
    root, _, _, tok_path = corpus
    first = prepare(root / "docs.jsonl", tok_path, tmp_path, workers=1, shard_tokens=1000, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    monkeypatch.setattr(shards, "_write_split", lambda *a, **k: pytest.fail("a finished job was tokenized again"))
    assert prepare(root / "docs.jsonl", tok_path, tmp_path, workers=1, shard_tokens=1000, progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


def test_rerun_with_other_inputs_or_tokenizer_is_refused(corpus, tmp_path):
    root, docs, _, tok_path = corpus
    source = write_jsonl(tmp_path / "docs.jsonl", docs[:50])
    prepare(source, tok_path, tmp_path / "out", workers=1, progress=False)
    with pytest.raises(ShardError, match="manifest.json.*different settings"):
        prepare(source, tok_path, tmp_path / "out", workers=1, shard_tokens=123, progress=False)
    other_tok = Tokenizer.train(docs[:50], vocab_size=300).save(tmp_path / "other")
    with pytest.raises(ShardError, match="different tokenizer"):
        prepare(source, other_tok, tmp_path / "out", workers=1, progress=False)
    write_jsonl(source, docs[:51])
    with pytest.raises(ShardError, match="different input files"):
        prepare(source, tok_path, tmp_path / "out", workers=1, progress=False)


class Crash(Exception):
    pass


@pytest.mark.parametrize("crash_on, at_call", [("rename", 1), ("rename", 4), ("write", 9)])
def test_crash_then_resume_writes_the_same_shards(corpus, small_batches, tmp_path, monkeypatch, crash_on, at_call):
    """A crash right after a shard's rename (before progress.json records it) or inside a shard."""
    root, _, _, tok_path = corpus
    args = dict(val_docs=30, workers=1, shard_tokens=800, progress=False)
    reference = prepare(root / "docs.jsonl", tok_path, tmp_path / "ref", **args)
    assert len(reference["splits"]["train"]["shards"]) > 6

    calls = {"rename": 0, "write": 0}
    real_replace, real_write = os.replace, shards._ShardWriter.write

    def crashing_replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".bin"):
            calls["rename"] += 1
            if crash_on == "rename" and calls["rename"] == at_call:
                raise Crash()

    def crashing_write(self, tokens):
        calls["write"] += 1
        if crash_on == "write" and calls["write"] == at_call:
            assert self.tokens > 0, "the crash should strike a half-written shard"
            raise Crash()
        real_write(self, tokens)

    monkeypatch.setattr(shards.os, "replace", crashing_replace)
    monkeypatch.setattr(shards._ShardWriter, "write", crashing_write)
    with pytest.raises(Crash):
        prepare(root / "docs.jsonl", tok_path, tmp_path / "run", **args)
    monkeypatch.undo()
    monkeypatch.setattr(shards, "BATCH_CHARS", 3000)

    crashed = shard_bytes(tmp_path / "run")
    assert "manifest.json" not in crashed
    ref = shard_bytes(tmp_path / "ref")
    assert all(ref[name] == data for name, data in crashed.items() if name.endswith(".bin"))

    encoded = []
    real_encode_docs = shards._encode_docs
    monkeypatch.setattr(shards, "_encode_docs", lambda *a: encoded.append(1) or real_encode_docs(*a))
    resumed = prepare(root / "docs.jsonl", tok_path, tmp_path / "run", **args)
    assert resumed["splits"] == reference["splits"]
    assert shard_bytes(tmp_path / "run") == ref
    if (crash_on, at_call) == ("rename", 4):  # the first shards were not tokenized again
        assert 0 < len(encoded) < sum(1 for _ in shards._doc_batches(make_docs(400)))


@pytest.mark.slow
def test_sigkill_mid_prepare_then_resume(corpus, small_batches, tmp_path):
    root, _, _, tok_path = corpus
    child = f"""
import time, sys
from picochat.data import shards
shards.BATCH_CHARS = 3000
finish = shards._ShardWriter.finish
def slow_finish(self):
    time.sleep(0.05)
    return finish(self)
shards._ShardWriter.finish = slow_finish
shards.prepare({str(root / 'docs.jsonl')!r}, {str(tok_path)!r}, {str(tmp_path / 'run')!r}, val_docs=30,
               workers=2, shard_tokens=500, progress=False)
"""
    proc = subprocess.Popen([sys.executable, "-c", child])
    progress = tmp_path / "run" / "progress.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(json.loads(progress.read_text())["splits"].get("train", {"shards": []})["shards"]) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "prepare finished before it could be killed"
    assert not (tmp_path / "run" / "manifest.json").exists()

    args = dict(val_docs=30, workers=1, shard_tokens=500, progress=False)
    resumed = prepare(root / "docs.jsonl", tok_path, tmp_path / "run", **args)
    reference = prepare(root / "docs.jsonl", tok_path, tmp_path / "ref", **args)
    assert resumed["splits"] == reference["splits"]
    assert shard_bytes(tmp_path / "run") == shard_bytes(tmp_path / "ref")


def test_prepare_real_text(tmp_path):
    source = shared_data("text", "moby-dick.jsonl.gz")
    from picochat.data.sources import iter_documents

    tok = Tokenizer.train(iter_documents(source), vocab_size=1024)
    m = prepare(source, tok.save(tmp_path / "tok"), tmp_path / "out", val_docs=8, workers=2, shard_tokens=2**17, progress=False)
    assert m["splits"]["val"]["documents"] == 8 and m["splits"]["train"]["documents"] == 130
    ratio, _, _ = tok.bytes_per_token(list(iter_documents(source))[:8])
    assert shards.bytes_per_token(tmp_path / "out") == pytest.approx(ratio)


def test_cli_prepare_and_info(corpus, tmp_path, capsys):
    root, docs, _, tok_path = corpus
    with pytest.raises(SystemExit) as exit_:
        cli_main(["data", "prepare", "--input", str(root / "docs.jsonl"), "--tokenizer", str(tok_path.parent),
                  "--out", str(tmp_path), "--val-docs", "5", "--workers", "1", "--shard-tokens", "5000"])
    assert exit_.value.code == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli_main(["data", "info", str(tmp_path)])
    out = capsys.readouterr().out
    assert "val:" in out and f"{len(docs) - 5:,} documents" in out and "uint16" in out


# --- the loader -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    """Shards with small files, so that many sequences cross shard boundaries."""
    root, _, tok, tok_path = corpus
    out = tmp_path_factory.mktemp("shards")
    prepare(root / "docs.jsonl", tok_path, out, val_docs=40, workers=1, shard_tokens=300, progress=False)
    return out, tok


def test_batches_are_shifted_windows_of_the_stream(prepared):
    out, _ = prepared
    stream = read_split(out, "train").astype(np.int64)
    loader = ShardLoader(out, batch_size=4, seq_len=48)
    assert loader.n_sequences == (len(stream) - 1) // 48
    start_of_window = {stream[s : s + 49].tobytes(): s for s in range(0, loader.n_sequences * 48, 48)}
    starts = []
    for _ in range(loader.steps_in_epoch(0)):
        x, y = next(loader)
        assert x.shape == y.shape == (4, 48) and x.dtype == y.dtype == torch.int64
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts += [start_of_window[row.tobytes()] for row in torch.cat([x, y[:, -1:]], dim=1).numpy()]
    # one epoch visits distinct sequences: all but the remainder after the last full batch
    assert len(set(starts)) == len(starts) == loader.steps_in_epoch(0) * 4 > loader.n_sequences - 4
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["step"] == 0


def test_loader_is_deterministic_per_seed_and_epoch(prepared):
    out, _ = prepared
    a, b, c = (ShardLoader(out, batch_size=3, seq_len=32, seed=s) for s in (0, 0, 1))
    first_epoch_a = [next(a)[0] for _ in range(a.steps_in_epoch(0))]
    first_epoch_b = [next(b)[0] for _ in range(b.steps_in_epoch(0))]
    assert all(torch.equal(p, q) for p, q in zip(first_epoch_a, first_epoch_b))
    assert not torch.equal(first_epoch_a[0], next(c)[0])
    second_epoch_a = [next(a)[0] for _ in range(a.steps_in_epoch(0))]
    assert not all(torch.equal(p, q) for p, q in zip(first_epoch_a, second_epoch_a))
    assert a.epoch == 2


def test_resume_from_state_dict_gives_the_same_next_batches(prepared):
    out, _ = prepared
    loader = ShardLoader(out, batch_size=4, seq_len=40, seed=3)
    for _ in range(loader.steps_in_epoch(0) - 2):
        next(loader)
    state = loader.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    expected = [next(loader) for _ in range(5)]  # crosses into the next epoch
    resumed = ShardLoader(out, batch_size=4, seq_len=40, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(5))):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_ranks_read_disjoint_parts_of_the_single_rank_batch(prepared):
    out, _ = prepared
    single = ShardLoader(out, batch_size=6, seq_len=24, seed=5)
    ranks = [ShardLoader(out, batch_size=2, seq_len=24, seed=5, rank=r, world_size=3) for r in range(3)]
    assert single.steps_in_epoch(0) == ranks[0].steps_in_epoch(0)
    for _ in range(single.steps_in_epoch(0) + 2):
        x, y = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        rows = {tuple(row) for p in parts for row in p[0].tolist()}
        assert len(rows) == 6  # no sequence is read by two ranks


def test_accumulating_layouts_read_the_same_rows_each_step_and_resume_across_them(prepared):
    """1 rank x 4 micro-batches, 2 ranks x 2, 4 ranks x 1: the same 8 rows per optimizer step, across epochs."""
    out, _ = prepared
    layouts = {(1, 4): None, (2, 2): None, (4, 1): None}
    for world_size, accum in layouts:
        layouts[(world_size, accum)] = [ShardLoader(out, batch_size=2, seq_len=24, seed=5, rank=r, world_size=world_size,
                                                    grad_accum=accum) for r in range(world_size)]
    steps = layouts[(1, 4)][0].steps_in_epoch(0)
    assert {loaders[0].steps_in_epoch(0) for loaders in layouts.values()} == {steps}
    assert len({str(loaders[0].state_dict()) for loaders in layouts.values()}) == 1
    for _ in range(steps + 2):
        seen = [sorted(tuple(row) for _ in range(accum) for loader in loaders for row in next(loader)[0].tolist())
                for (world_size, accum), loaders in layouts.items()]
        assert seen[0] == seen[1] == seen[2] and len(set(seen[0])) == 8
    state = layouts[(1, 4)][0].state_dict()
    resumed = ShardLoader(out, batch_size=2, seq_len=24, seed=5, world_size=2, grad_accum=2)
    resumed.load_state_dict(state)  # a run resumes on another number of processes
    assert (resumed.epoch, resumed.step) == (1, 2)


def test_val_batches_are_sequential_and_deterministic(prepared):
    out, _ = prepared
    stream = read_split(out, "val").astype(np.int64)
    batches = list(iter_val_batches(out, batch_size=2, seq_len=16))
    assert len(batches) == ((len(stream) - 1) // 16) // 2
    for g, (x, y) in enumerate(batches):
        for row in range(2):
            s = (2 * g + row) * 16
            assert np.array_equal(x[row].numpy(), stream[s : s + 16]) and np.array_equal(y[row].numpy(), stream[s + 1 : s + 17])
    assert len(list(iter_val_batches(out, 2, 16, max_batches=3))) == 3
    rank1 = list(iter_val_batches(out, batch_size=1, seq_len=16, rank=1, world_size=2))
    assert all(torch.equal(r[0][0], b[0][1]) for r, b in zip(rank1, batches))


def test_loader_errors_are_clear(prepared, tmp_path):
    out, tok = prepared
    with pytest.raises(ShardError, match="no manifest.*picochat data prepare"):
        ShardLoader(tmp_path, batch_size=1, seq_len=8)
    with pytest.raises(ShardError, match="tokenizer mismatch"):
        ShardLoader(out, batch_size=1, seq_len=8, expect_fingerprint="0" * 64)
    assert ShardLoader(out, batch_size=1, seq_len=8, expect_fingerprint=tok.fingerprint).n_sequences > 0
    with pytest.raises(ShardError, match="too few for one batch"):
        ShardLoader(out, split="val", batch_size=64, seq_len=512)
    with pytest.raises(ShardError, match="too few for one batch"):
        list(iter_val_batches(out, batch_size=64, seq_len=512))
    with pytest.raises(ShardError, match="no 'test' split"):
        ShardLoader(out, split="test", batch_size=1, seq_len=8)
    loader = ShardLoader(out, batch_size=2, seq_len=8)
    with pytest.raises(ShardError, match="seq_len was 8, is 16"):
        ShardLoader(out, batch_size=2, seq_len=16).load_state_dict(loader.state_dict())


def test_truncated_shard_is_reported(corpus, tmp_path):
    root, _, _, tok_path = corpus
    prepare(root / "docs.jsonl", tok_path, tmp_path, workers=1, shard_tokens=1000, progress=False)
    shard = tmp_path / "train-00001.bin"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ShardError, match=r"train-00001.bin: expected 2000 bytes \(1000 uint16 tokens\), found 100"):
        ShardLoader(tmp_path, batch_size=1, seq_len=8)
