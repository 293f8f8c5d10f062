"""File helpers shared by every stage: atomic writes, and JSONL reading with located errors.

Writes go to a temporary file in the destination folder, are flushed and fsynced, then renamed over
the destination (`os.replace` is atomic on POSIX): readers see the old file or the new one, and a
crash or a kill mid-write never leaves a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def atomic_write_lines(path: str | Path, chunks: Iterable[bytes]) -> int:
    """Stream `chunks` into `path` atomically; returns the bytes written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    size = 0
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; these are ordinary data files
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return size


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path in `path`'s folder for a writer that needs a file name (SQLite); when the
    block ends without an error the file is fsynced and renamed over `path`, otherwise removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write_lines(path, [data])


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_lines(path, [text.encode("utf-8")])


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> None:
    atomic_write_lines(path, [(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n").encode("utf-8")])


def atomic_write_jsonl(path: str | Path, rows: Iterable[Any]) -> int:
    """Write one JSON value a line (UTF-8, not ASCII-escaped) atomically; returns the bytes written."""
    return atomic_write_lines(path, ((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8") for row in rows))


def iter_jsonl(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, Any]]:
    """(where, row) for each non-blank line of a JSONL file, `where` being "file:line" for error
    messages; a line that is not JSON raises `error` naming the file and line."""
    path = Path(path)
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None


def read_jsonl(path: str | Path, error: type[Exception] = ValueError) -> list[Any]:
    """Every row of a JSONL file (errors as `iter_jsonl`)."""
    return [row for _, row in iter_jsonl(path, error)]


def read_json(path: str | Path, error: type[Exception] = ValueError) -> Any:
    """A JSON file's value; a file that is not JSON raises `error` naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise error(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
