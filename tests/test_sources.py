"""Tests for picochat.data.sources: formats, folders and globs, real files, errors, bounded memory."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import shared_data
from picochat.data import sources
from picochat.data.sources import SourceError, iter_documents, list_source_files, open_parquet_text

DOCS = ["First document.\nIt has two lines.", "Second: Ünïcödé, 日本語, emoji 🎉", "Third {\"not\": json} text"]


def write_jsonl(path: Path, rows: list, compress: bool = False) -> Path:
    data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_parquet(path: Path, table: pa.Table, row_group_size: int | None = None) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


# --- real data ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, count",
    [
        ("moby-dick.jsonl.gz", 138),
        ("python-docs.jsonl.gz", 497),
        ("linux-docs.jsonl.gz", 3178),
        ("tinyshakespeare.txt", 1),
        ("kjv.txt", 1),
        ("wordnet-glosses.txt.gz", 1),
    ],
)
def test_real_files_document_counts(name, count):
    docs = list(iter_documents(shared_data("text", name)))
    assert len(docs) == count
    assert all(isinstance(d, str) and d for d in docs)


def test_real_jsonl_content_and_plain_text_is_the_whole_file():
    first = next(iter_documents(shared_data("text", "moby-dick.jsonl.gz")))
    assert first.startswith("CHAPTER 1. Loomings.\n\nCall me Ishmael.")
    path = shared_data("text", "tinyshakespeare.txt")
    (doc,) = iter_documents(path)
    assert doc == path.read_text(encoding="utf-8")


def test_real_folder_and_glob():
    folder = shared_data("text")
    names = [p.name for p in list_source_files(folder)]
    assert names == sorted(names) and "moby-dick.jsonl.gz" in names
    assert sum(1 for _ in iter_documents(folder)) == 138 + 497 + 3178 + 3
    assert sum(1 for _ in iter_documents(str(folder / "*.jsonl.gz"))) == 138 + 497 + 3178


# --- formats --------------------------------------------------------------------------------------
def test_every_format_gives_the_same_documents(tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [{"text": d, "source": "x"} for d in DOCS])
    jsonl_gz = write_jsonl(tmp_path / "a.jsonl.gz", [{"text": d} for d in DOCS], compress=True)
    parquet = write_parquet(tmp_path / "a.parquet", pa.table({"id": [1, 2, 3], "text": DOCS}), row_group_size=2)
    parquet_gz = tmp_path / "a.parquet.gz"
    parquet_gz.write_bytes(gzip.compress(parquet.read_bytes()))
    for path in (jsonl, jsonl_gz, parquet, parquet_gz):
        assert list(iter_documents(path)) == DOCS, path
    for suffix in (".txt", ".md", ".rst", ".TXT"):
        (tmp_path / f"t{suffix}").write_text(DOCS[1], encoding="utf-8")
        assert list(iter_documents(tmp_path / f"t{suffix}")) == [DOCS[1]]
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(DOCS[0].encode()))
    assert list(iter_documents(tmp_path / "t.txt.gz")) == [DOCS[0]]


def test_large_string_column_and_empty_texts_skipped(tmp_path):
    table = pa.table({"text": pa.array(["a", "", "b"], type=pa.large_string())})
    assert list(iter_documents(write_parquet(tmp_path / "l.parquet", table))) == ["a", "b"]
    jsonl = write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "x"}])
    assert list(iter_documents(jsonl)) == ["x"]


def test_jsonl_blank_lines_bom_and_crlf(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "one"}\r\n\r\n   \n{"text": "two", "n": 1}\r\n')
    assert list(iter_documents(path)) == ["one", "two"]


def test_text_bom_is_dropped_and_characters_split_across_reads_decode(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 5)  # every multi-byte character crosses a read boundary
    text = "ÀÉÎ 日本語 🎉🎉 end\n" * 7
    path = tmp_path / "u.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    assert list(iter_documents(path)) == [text]


def test_big_text_file_is_cut_at_line_ends(tmp_path):
    lines = [f"line {i} " + "x" * (i % 50) + "\n" for i in range(3000)]
    text = "".join(lines)
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    pieces = list(iter_documents(path, text_piece_chars=1000))
    assert "".join(pieces) == text
    assert len(pieces) > len(text) // 1000
    assert all(len(p) <= 1000 and p.endswith("\n") for p in pieces)


def test_text_without_newlines_is_cut_hard(tmp_path):
    path = tmp_path / "one-line.txt"
    path.write_text("y" * 2500, encoding="utf-8")
    assert [len(p) for p in iter_documents(path, text_piece_chars=1000)] == [1000, 1000, 500]


# --- finding files --------------------------------------------------------------------------------
def test_folders_walk_sorted_skip_hidden_and_read_each_file_once(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("bz")
    (tmp_path / "b" / "a.txt").write_text("ba")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / ".hidden.txt").write_text("hidden")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "junk.bin").write_bytes(b"\0")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "c1"}, {"text": "c2"}])
    assert [p.relative_to(tmp_path).as_posix() for p in list_source_files(tmp_path)] == ["a.txt", "b/a.txt", "b/z.txt", "c.jsonl"]
    assert list(iter_documents(tmp_path)) == ["a", "ba", "bz", "c1", "c2"]
    # a list mixing a file, a glob and a folder: the overlap is read once, in first-seen order
    assert list(iter_documents([tmp_path / "c.jsonl", str(tmp_path / "b" / "*.txt"), tmp_path])) == ["c1", "c2", "ba", "bz", "a"]
    assert list(iter_documents(str(tmp_path / "**" / "a.txt"))) == ["a", "ba"]


# --- errors ---------------------------------------------------------------------------------------
def _error(path, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        list(iter_documents(path, **kwargs))
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value)
    return info.value


@pytest.mark.parametrize(
    "lines, line, message",
    [
        (['{"text": "ok"}', '{"text": "broken"'], 2, "invalid JSON"),
        (['{"text": "ok"}', "", '["text", "a list"]'], 3, 'expected a JSON object with a "text" field, got an array'),
        (['"just a string"'], 1, "got a string"),
        (['{"content": "x", "id": 1}'], 1, 'missing the "text" field (fields present: content, id)'),
        (['{"text": 42}'], 1, '"text" must be a string, got a number'),
        (['{"text": null}'], 1, '"text" must be a string, got null'),
        (['{"text": ["a"]}'], 1, '"text" must be a string, got an array'),
    ],
)
def test_bad_jsonl_rows_name_the_line(tmp_path, lines, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    err = _error(path)
    assert err.line == line and f"bad.jsonl:{line}:" in str(err)
    assert message in str(err)


def test_bad_jsonl_row_in_gzip_names_the_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [{"text": "a"}, {"text": "b"}, {"txt": "c"}], compress=True)
    assert _error(path).line == 3


def test_non_utf8_jsonl_gives_line_and_byte_offset(tmp_path):
    path = tmp_path / "latin1.jsonl"
    first = b'{"text": "fine"}\n'
    path.write_bytes(first + b'{"text": "caf\xe9"}\n')
    err = _error(path)
    assert err.line == 2
    assert f"byte offset {len(first) + 13}" in str(err) and "expected UTF-8" in str(err)


def test_non_utf8_text_gives_line_and_byte_offset_across_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 4)
    path = tmp_path / "latin1.txt"
    data = "line one\nlíne two\n".encode("utf-8") + b"bad \xff here\n"
    path.write_bytes(data)
    bad_at = data.index(b"\xff")
    err = _error(path)
    assert err.line == 3 and f"byte offset {bad_at}" in str(err)


def test_text_truncated_in_a_character_is_reported(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ok\n日本".encode("utf-8")[:-1])
    err = _error(path)
    assert err.line == 2 and "not UTF-8 at byte offset 6" in str(err)


@pytest.mark.parametrize(
    "name, content",
    [
        ("empty.txt", b""),
        ("empty.jsonl", b""),
        ("blank.jsonl", b"\n  \n\n"),
        ("empty.txt.gz", gzip.compress(b"")),
        ("empty.jsonl.gz", gzip.compress(b"")),
        ("bom-only.txt", b"\xef\xbb\xbf"),
        ("empty.parquet", b""),
    ],
)
def test_empty_files_are_errors(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    assert "empty file" in str(_error(path))


def test_parquet_without_rows_is_an_error(tmp_path):
    path = write_parquet(tmp_path / "norows.parquet", pa.table({"text": pa.array([], type=pa.string())}))
    assert "empty file: no rows" in str(_error(path))


def test_parquet_without_text_column(tmp_path):
    path = write_parquet(tmp_path / "cols.parquet", pa.table({"content": ["a"], "id": [1]}))
    assert "no 'text' column (columns: content, id)" in str(_error(path))


def test_parquet_with_non_string_text_column(tmp_path):
    path = write_parquet(tmp_path / "ints.parquet", pa.table({"text": [1, 2]}))
    assert "column 'text' has type int64: expected strings" in str(_error(path))
    with pytest.raises(SourceError):
        open_parquet_text(path)


def test_parquet_null_text_names_the_row(tmp_path):
    path = write_parquet(tmp_path / "nulls.parquet", pa.table({"text": ["a", "b", "c", None, "e"]}), row_group_size=2)
    err = _error(path)
    assert err.row == 3 and "row 3: 'text' is null" in str(err)


def test_corrupt_parquet_is_an_error(tmp_path):
    good = write_parquet(tmp_path / "good.parquet", pa.table({"text": DOCS}))
    bad = tmp_path / "truncated.parquet"
    bad.write_bytes(good.read_bytes()[:-20])
    assert "not a readable parquet file" in str(_error(bad))
    (tmp_path / "junk.parquet").write_bytes(b"this is not parquet at all")
    assert "not a readable parquet file" in str(_error(tmp_path / "junk.parquet"))


@pytest.mark.parametrize("name", ["t.txt.gz", "t.jsonl.gz", "t.parquet.gz"])
def test_corrupt_gzip(tmp_path, name):
    payload = ('{"text": "' + "x" * 5000 + '"}\n').encode() * 50
    truncated = tmp_path / name
    truncated.write_bytes(gzip.compress(payload)[:200])
    assert "corrupt gzip data" in str(_error(truncated))
    not_gzip = tmp_path / ("plain-" + name)
    not_gzip.write_bytes(payload)
    assert "corrupt gzip data" in str(_error(not_gzip))


def test_bad_paths(tmp_path):
    (tmp_path / "data.csv").write_text("a,b\n")
    assert "unknown extension '.csv'" in str(_error(tmp_path / "data.csv"))
    (tmp_path / "shard_00000.parquet.part").write_bytes(b"PAR1")
    assert "unfinished download" in str(_error(tmp_path / "shard_00000.parquet.part"))
    assert "no such file or folder" in str(_error(tmp_path / "missing.txt"))
    assert "no files match" in str(_error(str(tmp_path / "nothing-*.jsonl")))
    (tmp_path / "empty-folder").mkdir()
    assert "folder holds no files" in str(_error(tmp_path / "empty-folder"))
    # a folder with an unreadable kind of file fails before anything is read
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "a.txt").write_text("a")
    (tmp_path / "mixed" / "notes.docx").write_bytes(b"PK")
    with pytest.raises(SourceError, match="notes.docx: unknown extension"):
        list_source_files(tmp_path / "mixed")
    with pytest.raises(SourceError, match="expected at least one"):
        list_source_files([])


# --- memory stays flat ----------------------------------------------------------------------------
def _peak_python_bytes(documents) -> tuple[int, int]:
    """(documents consumed, peak bytes Python allocated while consuming them one at a time)."""
    tracemalloc.start()
    try:
        count = sum(1 for _ in documents)
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_jsonl_and_text_stream_in_bounded_memory(tmp_path, monkeypatch):
    row = json.dumps({"text": "word " * 200}) + "\n"
    path = tmp_path / "big.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write(row * 16_000)  # 16 MB uncompressed
    count, peak = _peak_python_bytes(iter_documents(path))
    assert count == 16_000 and peak < 2_000_000

    # memory follows the piece and read sizes, not the file size
    monkeypatch.setattr(sources, "READ_BYTES", 2**16)
    text = tmp_path / "big.txt"
    text.write_text(("a line of plain text\n" * 50) * 16_000, encoding="utf-8")  # 16 MB
    count, peak = _peak_python_bytes(iter_documents(text, text_piece_chars=2**18))
    assert count >= 64 and peak < 2_000_000


def test_parquet_streams_one_batch_at_a_time(tmp_path):
    texts = pa.array(["token " * 300] * 8_000)  # about 14 MB of text in 16 row groups
    path = write_parquet(tmp_path / "big.parquet", pa.table({"text": texts}), row_group_size=500)
    del texts
    baseline = pa.total_allocated_bytes()
    arrow_peak = 0
    count = 0
    tracemalloc.start()
    try:
        for _ in iter_documents(path):
            count += 1
            arrow_peak = max(arrow_peak, pa.total_allocated_bytes() - baseline)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == 8_000
    assert arrow_peak < 4_000_000 and python_peak < 4_000_000
