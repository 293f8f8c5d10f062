"""The search index: documents cut into passages, ranked by BM25 with SQLite FTS5.

    picochat index build --input DOCS... --out DIR        # documents as pretraining reads them
    picochat index search --index DIR "capital of Dekfusesh"

Layout of DIR:
    index.sqlite   one FTS5 table `passages(text, document)`: every passage of every document
                   (`picochat.data.passages`), `document` being the document's number in input order.
                   Tokenized by FTS5's `porter unicode61 remove_diacritics 2` (case, accents and
                   English word endings folded), ranked by FTS5's built-in bm25().
    index.json     what was indexed (sources, counts, settings); written last, so its presence
                   marks a finished build.
Both are written atomically (a temporary file in DIR, then a rename), so a reader never sees half an
index. SQLite comes with Python: no server, no dependency, and a query reads only the pages it needs,
so memory does not grow with the index (BENCHMARKS.md, "Search index").

Queries never become SQL or FTS5 syntax: the query is a bound parameter, and its text is reduced to
its words, each a quoted FTS5 string, joined by OR (`match_expression`). Quotes, `AND`, `NEAR(`,
`*`, `-`, `:` are plain words or nothing; a passage ranks higher the more of the rarer words it holds.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from picochat.data.passages import MAX_PASSAGE_CHARS, split_passages
from picochat.data.sources import PathLike, iter_documents, list_source_files
from picochat.io import atomic_path, atomic_write_json, read_json

INDEX_FILE = "index.sqlite"
INFO_FILE = "index.json"
FORMAT = "picochat-search-index"
FORMAT_VERSION = 1
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
DEFAULT_RESULTS = 3
MAX_QUERY_WORDS = 32

_SCHEMA = f"CREATE VIRTUAL TABLE passages USING fts5(text, document UNINDEXED, tokenize = '{FTS_TOKENIZER}')"
_WORD = re.compile(r"[^\W_]+")  # letters and digits: what FTS5's unicode61 tokenizer keeps
_SQLITE_MAGIC = b"SQLite format 3\x00"


class SearchIndexError(ValueError):
    """A missing, corrupt or unreadable search index (the message names the file)."""


@dataclass(frozen=True)
class Passage:
    text: str
    document: int  # the document's number in the order the build read them
    score: float  # BM25: higher is more relevant


def build_index(inputs: PathLike | Iterable[PathLike], out: PathLike, max_passage_chars: int = MAX_PASSAGE_CHARS,
                progress: bool = True) -> dict:
    """Index every document of `inputs` (files, folders, globs; read by `iter_documents`) into
    `out`; returns what index.json records."""
    files = list_source_files(inputs)  # a typo fails before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)  # no index.json: the build is unfinished
    counts = {"documents": 0, "passages": 0, "characters": 0}
    started = time.perf_counter()

    def rows(bar: tqdm):
        for number, document in enumerate(iter_documents(files)):
            passages = split_passages(document, max_passage_chars)
            counts["documents"] += 1
            counts["passages"] += len(passages)
            counts["characters"] += len(document)
            bar.update(len(document))
            for passage in passages:
                yield passage, number

    with atomic_path(out / INDEX_FILE) as tmp:
        db = sqlite3.connect(tmp)
        try:
            db.execute("PRAGMA journal_mode = OFF")  # a temporary file: no journal needed
            db.execute("PRAGMA synchronous = OFF")  # atomic_path fsyncs the finished file
            _create_fts5_table(db)
            with tqdm(desc="indexing", unit="char", unit_scale=True, disable=not progress) as bar:
                db.executemany("INSERT INTO passages (text, document) VALUES (?, ?)", rows(bar))
            db.execute("INSERT INTO passages (passages) VALUES ('optimize')")  # one b-tree: faster queries
            db.commit()
        finally:
            db.close()
    info = {"format": FORMAT, "version": FORMAT_VERSION, "sources": [str(f) for f in files], **counts,
            "max_passage_chars": max_passage_chars, "fts5_tokenizer": FTS_TOKENIZER,
            "build_seconds": round(time.perf_counter() - started, 2)}
    atomic_write_json(out / INFO_FILE, info)
    return info


def _create_fts5_table(db: sqlite3.Connection) -> None:
    try:
        db.execute(_SCHEMA)
    except sqlite3.OperationalError as e:
        if "fts5" in str(e):
            raise RuntimeError(f"this Python's SQLite {sqlite3.sqlite_version} was built without FTS5, which "
                               "the search index needs") from None
        raise


def match_expression(query: str) -> str | None:
    """The FTS5 query for `query`: its distinct words (at most MAX_QUERY_WORDS), each a quoted string,
    joined by OR; None when it has no word. Nothing in `query` can act as FTS5 syntax."""
    words = list(dict.fromkeys(word.lower() for word in _WORD.findall(query)))[:MAX_QUERY_WORDS]
    return " OR ".join(f'"{word}"' for word in words) or None


class SearchIndex:
    """A built index, opened read-only; `search` returns the best passages for a query.

    One connection, usable from any one thread at a time (the server's decoding thread opens none
    of its own)."""

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.path = self.directory / INDEX_FILE
        if not self.path.is_file():
            raise SearchIndexError(f"{self.path}: no search index there; build one with "
                                   f"`picochat index build --input DOCS --out {self.directory}`")
        _check_header(self.path)
        self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        try:
            row = self._db.execute("SELECT sql FROM sqlite_master WHERE name = 'passages'").fetchone()
            if row is None or "fts5" not in row[0].lower():
                raise SearchIndexError(f"{self.path}: not a picochat search index (it has no FTS5 table 'passages')")
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise SearchIndexError(f"{self.path}: not a readable SQLite database ({e})") from None
        except SearchIndexError:
            self._db.close()
            raise

    def search(self, query: str, k: int = DEFAULT_RESULTS) -> list[Passage]:
        """The k passages that match `query` best, best first (none when it has no word)."""
        match = match_expression(query)
        if match is None:
            return []
        try:
            rows = self._db.execute("SELECT text, document, bm25(passages) FROM passages WHERE passages MATCH ? "
                                    "ORDER BY rank LIMIT ?", (match, k)).fetchall()
        except sqlite3.DatabaseError as e:
            raise SearchIndexError(f"{self.path}: the search failed ({e})") from None
        return [Passage(text, document, -score) for text, document, score in rows]  # FTS5's bm25 is negated

    def info(self) -> dict:
        """index.json: what was indexed."""
        return read_json(self.directory / INFO_FILE, SearchIndexError)

    def close(self) -> None:
        self._db.close()


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite, or is shorter than its header says (a cut copy), before
    SQLite reads it."""
    with path.open("rb") as f:
        header = f.read(100)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        raise SearchIndexError(f"{path}: not an SQLite database (a corrupt or foreign file); rebuild the index")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    size_is_valid = header[24:28] == header[92:96]  # SQLite's rule for trusting the page count
    size = path.stat().st_size
    if size_is_valid and size < pages * page_size:
        raise SearchIndexError(f"{path}: truncated ({size} bytes, its header says {pages * page_size}); rebuild the index")


# --- the command line -----------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="index_command", metavar="<action>", required=True)
    p = sub.add_parser(
        "build", help="index documents for the search tool",
        description="Cut documents into passages (at most --max-passage-chars characters, at paragraph, line "
                    "and sentence breaks) and index them with SQLite FTS5 for BM25 search: writes "
                    f"DIR/{INDEX_FILE} and DIR/{INFO_FILE}. A chat model calls it as `search: words`.")
    p.add_argument("--input", nargs="+", required=True,
                   help="files, folders or globs of documents (.txt/.md/.rst, .jsonl, .parquet, optionally .gz), "
                        "read as pretraining reads them")
    p.add_argument("--out", required=True, help="the index folder (e.g. runs/demo/index)")
    p.add_argument("--max-passage-chars", type=int, default=MAX_PASSAGE_CHARS,
                   help=f"longest passage in characters (default {MAX_PASSAGE_CHARS})")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("search", help="query an index from the terminal",
                       description="Print the passages that best match a query, best first, as the search tool finds them.")
    p.add_argument("--index", required=True, help="the index folder")
    p.add_argument("-k", type=int, default=DEFAULT_RESULTS, help=f"how many passages (default {DEFAULT_RESULTS})")
    p.add_argument("query", help="words to look for (any text: it is never read as query syntax)")
    p.set_defaults(func=_cmd_search)


def _cmd_build(args) -> None:
    info = build_index(args.input, args.out, args.max_passage_chars)
    print(f"{args.out}: {info['documents']:,} documents, {info['passages']:,} passages, "
          f"{info['characters']:,} characters in {info['build_seconds']:.1f} s")


def _cmd_search(args) -> int:
    index = SearchIndex(args.index)
    passages = index.search(args.query, args.k)
    for rank, passage in enumerate(passages, 1):
        print(f"[{rank}] document {passage.document}, score {passage.score:.2f}\n{passage.text}\n")
    if not passages:
        print("no results")
    index.close()
    return 0
