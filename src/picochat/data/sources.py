"""Document sources: stream documents (strings) out of text, JSONL and parquet files.

`iter_documents(paths)` is what tokenizer training and shard preparation read. `paths` is a file,
a folder, a glob pattern, or a list of these. Folders are walked recursively in sorted order,
skipping hidden files and folders (names starting with "."); a file reached twice is read once.

Formats, chosen by extension (case-insensitive), each optionally gzip-compressed (`.gz` appended):
- plain text `.txt`, `.md`, `.rst`: one file is one document. It is decoded as UTF-8 in a stream
  of 1 MiB reads. A file longer than `TEXT_PIECE_CHARS` (64 Mi characters) is cut at line ends into
  pieces of at most that size, each yielded as a document, so memory stays bounded on huge files;
  put real document boundaries in JSONL or parquet instead of giant text files.
- JSONL `.jsonl`: one JSON object per line with a string `text` field (other fields ignored,
  blank lines skipped), read line by line.
- parquet `.parquet`: a string `text` column (the FineWeb-edu shard layout), read in batches of
  `PARQUET_BATCH_ROWS` rows, so memory holds one row group at most. A gzipped parquet file is
  first decompressed to a temporary file (parquet needs random access).
Any other extension is an error rather than a guess. Empty texts are skipped: a document is
never the empty string.

Malformed input raises `SourceError` (a `ValueError`) naming the file, the line or row, and what
was expected: bad JSON, rows that are not objects, a missing or non-string `text`, bytes that are
not UTF-8 (with the byte offset), empty files, parquet files without a string `text` column,
corrupt gzip data, unknown extensions, paths that do not exist.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Union

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PathLike = Union[str, os.PathLike]

TEXT_SUFFIXES = (".txt", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = "plain text (.txt .md .rst), JSONL (.jsonl) or parquet (.parquet), optionally gzip-compressed (.gz)"

TEXT_PIECE_CHARS = 64 * 2**20
PARQUET_BATCH_ROWS = 1024
READ_BYTES = 2**20

_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


class SourceError(ValueError):
    """Malformed or missing input, located as precisely as possible (file, then line or row)."""

    def __init__(self, path: PathLike, message: str, *, line: int | None = None, row: int | None = None):
        self.path, self.line, self.row = str(path), line, row
        where = self.path + (f":{line}" if line is not None else "") + (f": row {row}" if row is not None else "")
        super().__init__(f"{where}: {message}")


# --- finding files --------------------------------------------------------------------------------
def list_source_files(paths: PathLike | Iterable[PathLike]) -> list[Path]:
    """The document files that `paths` (files, folders, globs, or a list of them) name, in order.

    Checks existence and extensions up front, so a typo fails before any reading starts.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise SourceError("<no paths>", f"expected at least one file, folder or glob of {SUPPORTED}")
    files, seen = [], set()
    for entry in entries:
        for file in _expand(entry):
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files


def _expand(entry: PathLike) -> list[Path]:
    path = Path(entry)
    if path.is_dir():
        found = sorted(
            p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise SourceError(path, f"folder holds no files: expected {SUPPORTED}")
        for file in found:
            document_format(file)
        return found
    if path.is_file():
        document_format(path)
        return [path]
    if glob.has_magic(str(entry)):
        matches = sorted(glob.glob(str(entry), recursive=True))
        if not matches:
            raise SourceError(entry, "no files match this pattern")
        return [file for match in matches for file in _expand(match)]
    raise SourceError(path, "no such file or folder")


def document_format(path: PathLike) -> tuple[str, bool]:
    """("text" | "jsonl" | "parquet", gzip-compressed?) from the file name, or a SourceError."""
    name = Path(path).name.lower()
    compressed = name.endswith(".gz")
    suffix = Path(name.removesuffix(".gz")).suffix
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if suffix in suffixes:
            return kind, compressed
    if name.endswith(".part"):
        raise SourceError(path, "an unfinished download: run `picochat download` again to complete it, or delete it")
    raise SourceError(path, f"unknown extension {suffix or '(none)'!r}: expected {SUPPORTED}")


# --- reading documents ----------------------------------------------------------------------------
def iter_documents(paths: PathLike | Iterable[PathLike], *, text_piece_chars: int = TEXT_PIECE_CHARS) -> Iterator[str]:
    """Every document in `paths`, in order, streamed (see the module docstring for formats)."""
    if text_piece_chars < 1:
        raise ValueError(f"text_piece_chars must be at least 1, got {text_piece_chars}")
    for path in list_source_files(paths):
        kind, compressed = document_format(path)
        if path.stat().st_size == 0:
            raise SourceError(path, f"empty file: expected {kind} content")
        if kind == "text":
            yield from _iter_text(path, compressed, text_piece_chars)
        elif kind == "jsonl":
            yield from _iter_jsonl(path, compressed)
        else:
            yield from _iter_parquet(path, compressed)


def _open_binary(path: Path, compressed: bool) -> BinaryIO:
    return gzip.open(path, "rb") if compressed else open(path, "rb")


def _gzip_checked(path: Path, pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Pass `pieces` through, turning gzip corruption into a SourceError that names the file."""
    offset = 0
    try:
        for piece in pieces:
            offset += len(piece)
            yield piece
    except _GZIP_ERRORS as e:
        raise SourceError(path, f"corrupt gzip data after {offset:,} uncompressed bytes ({e})") from None


def _iter_text(path: Path, compressed: bool, piece_chars: int) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0  # uncompressed bytes fed to the decoder so far
    newlines = 0  # newlines decoded so far, to give line numbers in errors
    pending: list[str] = []
    pending_chars = 0
    first = True
    with _open_binary(path, compressed) as f:
        chunks = _gzip_checked(path, iter(lambda: f.read(READ_BYTES), b""))
        for chunk in _with_final(chunks):
            held = decoder.getstate()[0]  # an incomplete character left from the previous chunk
            try:
                text = decoder.decode(chunk, final=chunk == b"")
            except UnicodeDecodeError as e:
                bad_at = offset - len(held) + e.start
                line = newlines + (held + chunk)[: e.start].count(b"\n") + 1
                raise SourceError(path, f"not UTF-8 at byte offset {bad_at:,} ({e.reason}): expected UTF-8 text", line=line) from None
            offset += len(chunk)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            newlines += text.count("\n")
            pending.append(text)
            pending_chars += len(text)
            while pending_chars > piece_chars:
                joined = "".join(pending)
                cut = joined.rfind("\n", 0, piece_chars) + 1 or piece_chars
                yield joined[:cut]
                pending, pending_chars = [joined[cut:]], len(joined) - cut
    rest = "".join(pending)
    if not rest:  # pieces are cut only while more text follows, so this means no text at all
        raise SourceError(path, "empty file: expected text")
    yield rest


def _with_final(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """The chunks, then b"" once, so an incremental decoder gets its final call."""
    yield from chunks
    yield b""


def _iter_jsonl(path: Path, compressed: bool) -> Iterator[str]:
    rows = 0
    offset = 0
    with _open_binary(path, compressed) as f:
        for line_number, raw in enumerate(_gzip_checked(path, f), start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SourceError(
                    path, f"not UTF-8 at byte offset {offset + e.start:,} ({e.reason}): expected UTF-8 text", line=line_number
                ) from None
            offset += len(raw)
            if line_number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            rows += 1
            text = _text_of_row(path, line, line_number)
            if text:
                yield text
    if rows == 0:
        raise SourceError(path, 'empty file: expected JSON objects with a "text" field, one per line')


def _text_of_row(path: Path, line: str, line_number: int) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise SourceError(path, f"invalid JSON at column {e.colno}: {e.msg}", line=line_number) from None
    if not isinstance(row, dict):
        raise SourceError(path, f'expected a JSON object with a "text" field, got {_json_kind(row)}', line=line_number)
    if "text" not in row:
        fields = ", ".join(sorted(row)) or "none"
        raise SourceError(path, f'missing the "text" field (fields present: {fields})', line=line_number)
    text = row["text"]
    if not isinstance(text, str):
        raise SourceError(path, f'"text" must be a string, got {_json_kind(text)}', line=line_number)
    return text


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "a boolean"), (str, "a string"), ((int, float), "a number"), (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _iter_parquet(path: Path, compressed: bool) -> Iterator[str]:
    if not compressed:
        yield from _iter_parquet_rows(path, path)
        return
    with tempfile.TemporaryDirectory(prefix="picochat-parquet-") as tmp:
        plain = Path(tmp) / "data.parquet"
        with gzip.open(path, "rb") as src, open(plain, "wb") as dst:
            try:
                shutil.copyfileobj(src, dst, READ_BYTES)
            except _GZIP_ERRORS as e:
                raise SourceError(path, f"corrupt gzip data ({e})") from None
        yield from _iter_parquet_rows(plain, path)


def open_parquet_text(path: PathLike, name: PathLike | None = None) -> pq.ParquetFile:
    """Open a parquet file and check it has a string `text` column; SourceError (naming `name`) if not."""
    name = path if name is None else name
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(name, f"not a readable parquet file ({e})") from None
    schema = parquet.schema_arrow
    if "text" not in schema.names:
        raise SourceError(name, f"no 'text' column (columns: {', '.join(schema.names) or 'none'}): expected a string 'text' column")
    column_type = schema.field("text").type
    if not _is_string_type(column_type):
        raise SourceError(name, f"column 'text' has type {column_type}: expected strings")
    return parquet


def _is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or str(t) == "string_view"


def _iter_parquet_rows(path: Path, name: Path) -> Iterator[str]:
    parquet = open_parquet_text(path, name)
    if parquet.metadata.num_rows == 0:
        raise SourceError(name, "empty file: no rows")
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=["text"]):
            column = batch.column(0)
            if column.null_count:
                first_null = pc.index(pc.is_null(column), True).as_py()
                raise SourceError(name, "'text' is null: expected a string", row=row + first_null)
            for text in column.to_pylist():
                if text:
                    yield text
            row += len(column)
    except (pa.ArrowException, OSError) as e:
        raise SourceError(name, f"unreadable parquet data ({e})", row=row) from None
