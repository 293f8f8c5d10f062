"""The search index: documents cut into passages, ranked by BM25 with SQLite FTS5.

    picochat index build --input DOCS... --out DIR        # documents as pretraining reads them
    picochat index search --index DIR "capital of Dekfusesh"

Layout of DIR:
    index.sqlite   the FTS5 table `passages(text, document)`: every passage of every document
                   (`picochat.data.passages`), `document` being the document's number in input order,
                   tokenized by FTS5's `porter unicode61 remove_diacritics 2` (case, accents and
                   English word endings folded) and ranked by FTS5's built-in bm25(); and the table
                   `common_terms(term, documents)`: the terms found in more than COMMON_PASSAGES
                   passages, with their passage counts.
    index.json     what was indexed (sources, counts, settings); written last, so its presence
                   marks a finished build.
Both are written atomically (a temporary file in DIR, then a rename), so a reader never sees half an
index. SQLite comes with Python: no server, no dependency, and a query reads only the pages it needs,
so memory does not grow with the index (BENCHMARKS.md, "Search index").

Queries never become SQL or FTS5 syntax: the query is a bound parameter, and its text is reduced to
its words, each a quoted FTS5 string, joined by OR (`match_expression`). Quotes, `AND`, `NEAR(`,
`*`, `-`, `:` are plain words or nothing; a passage ranks higher the more of the rarer words it holds.

Common words are left out of the query: FTS5 scores every passage that holds any word of the
query, about a microsecond each, so "the" would make a search over a gigabyte of text take seconds.
A word is common when it is in more than COMMON_PASSAGES passages, measured on the indexed text
after FTS5's own stemming (`SearchIndex.informative_words`), not taken from a list: a small index
keeps every word (and full BM25); in a large one, the words left out are those that say least about
a passage (BM25's inverse document frequency is lowest for them). When every word of a query is
common, the rarest is searched alone, unless it is in more than VAGUE_PASSAGES passages: such a
query ("the of a") finds nothing rather than take a second. BENCHMARKS.md ("Search index")
measures what this costs in answers found and saves in time.
"""

from __future__ import annotations

import argparse
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from picochat.data.passages import MAX_PASSAGE_CHARS, split_passages
from picochat.data.sources import PathLike, iter_documents, list_source_files
from picochat.io import atomic_path, atomic_write_json

INDEX_FILE = "index.sqlite"
INFO_FILE = "index.json"
FORMAT = "picochat-search-index"
FORMAT_VERSION = 1
FTS_TOKENIZER = "porter unicode61 remove_diacritics 2"
DEFAULT_RESULTS = 3
MAX_QUERY_WORDS = 32
COMMON_PASSAGES = 10_000  # a term in more passages than this is left out of queries (BENCHMARKS.md)
VAGUE_PASSAGES = 100_000  # a query whose every term is in more passages than this finds nothing

_SCHEMA = f"CREATE VIRTUAL TABLE passages USING fts5(text, document UNINDEXED, tokenize = '{FTS_TOKENIZER}')"
# In each connection: the query's words go through the index's tokenizer to find their terms.
_QUERY_TABLES = (f"CREATE VIRTUAL TABLE temp.query_words USING fts5(word, tokenize = '{FTS_TOKENIZER}')",
                 "CREATE VIRTUAL TABLE temp.query_terms USING fts5vocab(temp, query_words, instance)")
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
            _record_common_terms(db)
            db.commit()
        finally:
            db.close()
    info = {"format": FORMAT, "version": FORMAT_VERSION, "sources": [str(f) for f in files], **counts,
            "max_passage_chars": max_passage_chars, "fts5_tokenizer": FTS_TOKENIZER, "common_passages": COMMON_PASSAGES,
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


def _record_common_terms(db: sqlite3.Connection) -> None:
    db.execute("CREATE VIRTUAL TABLE temp.vocabulary USING fts5vocab(main, passages, row)")
    db.execute("CREATE TABLE common_terms (term TEXT PRIMARY KEY, documents INTEGER NOT NULL) WITHOUT ROWID")
    db.execute("INSERT INTO common_terms SELECT term, doc FROM temp.vocabulary WHERE doc > ?", (COMMON_PASSAGES,))


def query_words(query: str) -> list[str]:
    """The distinct words of a query (letters and digits, lowercased), at most MAX_QUERY_WORDS."""
    return list(dict.fromkeys(word.lower() for word in _WORD.findall(query)))[:MAX_QUERY_WORDS]


def match_expression(words: list[str]) -> str:
    """The FTS5 query that matches passages holding any of `words` (from `query_words`: only letters
    and digits), each a quoted string, so that none can act as FTS5 syntax."""
    return " OR ".join(f'"{word}"' for word in words)


class SearchIndex:
    """A built index, opened read-only; `search` returns the best passages for a query.

    One connection, shared by the threads that search (the server's decoding threads): searches
    take turns."""

    def __init__(self, directory: PathLike):
        self.directory = Path(directory)
        self.path = self.directory / INDEX_FILE
        if not self.path.is_file():
            raise SearchIndexError(f"{self.path}: no search index there; build one with "
                                   f"`picochat index build --input DOCS --out {self.directory}`")
        _check_header(self.path)
        self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False,
                                   isolation_level=None)
        self._lock = threading.RLock()
        try:
            tables = dict(self._db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
            if "fts5" not in tables.get("passages", "").lower() or "common_terms" not in tables:
                raise SearchIndexError(f"{self.path}: not a picochat search index (it lacks the FTS5 table 'passages' "
                                       "or the table 'common_terms')")
            for statement in _QUERY_TABLES:
                self._db.execute(statement)
        except sqlite3.DatabaseError as e:
            self._db.close()
            raise SearchIndexError(f"{self.path}: not a readable SQLite database ({e})") from None
        except SearchIndexError:
            self._db.close()
            raise

    def search(self, query: str, k: int = DEFAULT_RESULTS) -> list[Passage]:
        """The k passages that match `query` best, best first (none when it has no word)."""
        with self._lock:
            return self._search(query, k)

    def _search(self, query: str, k: int) -> list[Passage]:
        try:
            words = self.informative_words(query_words(query))
            if not words:
                return []
            rows = self._db.execute("SELECT text, document, bm25(passages) FROM passages WHERE passages MATCH ? "
                                    "ORDER BY rank LIMIT ?", (match_expression(words), k)).fetchall()
        except sqlite3.DatabaseError as e:
            raise SearchIndexError(f"{self.path}: the search failed ({e})") from None
        return [Passage(text, document, -score) for text, document, score in rows]  # FTS5's bm25 is negated

    def informative_words(self, words: list[str]) -> list[str]:
        """`words` less the common ones (all of whose terms are in common_terms), or, when every word is
        common, the rarest one alone if it is in at most VAGUE_PASSAGES passages. A word the tokenizer
        finds no term in is left out."""
        with self._lock:
            self._db.executemany("INSERT INTO temp.query_words (rowid, word) VALUES (?, ?)", enumerate(words))
            terms = self._db.execute("SELECT q.doc, coalesce(c.documents, 0) FROM temp.query_terms AS q "
                                     "LEFT JOIN common_terms AS c ON c.term = q.term").fetchall()
            self._db.execute("DELETE FROM temp.query_words")
        passages = {}  # word index -> passages that hold its rarest term (0: no term of it is common)
        for index, documents in terms:
            passages[index] = min(passages.get(index, documents), documents)
        kept = [words[i] for i in sorted(passages) if passages[i] == 0]
        rarest = min(passages, key=passages.get, default=None)
        if kept or rarest is None or passages[rarest] > VAGUE_PASSAGES:
            return kept
        return [words[rarest]]

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
