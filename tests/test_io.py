"""picochat.io: atomic writes leave the old file or the new one; JSONL errors name file and line."""

import pytest

from picochat.io import atomic_write_json, atomic_write_jsonl, atomic_write_text, iter_jsonl, read_jsonl


def test_iter_jsonl_skips_blank_lines_and_locates_rows(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n  \n[2]\n', encoding="utf-8")
    assert list(iter_jsonl(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:4", [2])]


def test_iter_jsonl_names_the_bad_line_with_the_callers_error(tmp_path):
    class MyError(ValueError):
        pass

    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": \n', encoding="utf-8")
    with pytest.raises(MyError, match=r"rows\.jsonl:2: not valid JSON"):
        list(iter_jsonl(path, MyError))
    with pytest.raises(ValueError, match=r"rows\.jsonl:2: not valid JSON"):
        read_jsonl(path)


def test_atomic_write_replaces_whole_files_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "out.json"
    atomic_write_text(path, "old")
    atomic_write_json(path, {"new": [1, 2]})
    assert path.read_text() == '{\n  "new": [\n    1,\n    2\n  ]\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_jsonl_writes_one_unescaped_row_a_line_and_returns_its_size(tmp_path):
    path = tmp_path / "rows.jsonl"
    size = atomic_write_jsonl(path, iter([{"name": "Ünï", "n": 1}, [2]]))
    assert path.read_bytes() == '{"name": "Ünï", "n": 1}\n[2]\n'.encode("utf-8")
    assert size == path.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
