"""Download FineWeb-edu parquet shards from the Hugging Face Hub: parallel, resumable, verified, atomic.

Only the standard library speaks HTTP here (urllib and a thread pool); huggingface_hub is not needed.

Layouts (`--dataset`); a shard is fetched from `<base-url>/<file>`:
- `fineweb-edu-100b-shuffle` (default): `karpathy/fineweb-edu-100b-shuffle`, files
  `shard_00000.parquet` ... `shard_01822.parquet`: FineWeb-edu's 100B-token sample shuffled and
  repacked into 1,823 shards of about 100 MB (250M characters each), so the first N shards are a
  uniform sample. This is the layout nanochat trains on.
- `fineweb-edu-10bt`: the official `HuggingFaceFW/fineweb-edu` repository, `sample/10BT/000_00000.parquet`
  ... `013_00000.parquet`: 14 files of about 2.2 GB (the last one smaller), in crawl order.
Both have the `text` column that `picochat.data.sources` reads. `--base-url` points at a mirror of
the same layout (e.g. https://hf-mirror.com/datasets/...).

Each shard goes through:
1. GET with `Range: bytes=N-` when `<file>.part` already holds N bytes (a 206 answer is appended;
   a 200 answer means the server ignored the range, and the part is rewritten from the start).
   Redirects are followed; the Hub answers `resolve/` URLs with a redirect to its CDN whose
   headers carry `X-Linked-Etag` (the sha256 of the LFS file) and `X-Linked-Size`.
2. Verification: the size (`X-Linked-Size`, else Content-Range / Content-Length), the sha256 when
   the server gave one, then the parquet magic bytes and `pyarrow.parquet.ParquetFile` metadata
   with a string `text` column. A part that fails is deleted, never resumed. (A mirror that sends
   no sha256 gets the size and parquet checks only: a part resumed after the file changed upstream
   would pass them, so delete stale parts after a dataset update.)
3. `os.replace` to the final name, so a final name always means a complete, verified shard, and
   existing final files are skipped.
Network errors, HTTP 408/429/5xx, cut-off bodies and failed verifications are retried with
exponential backoff; other HTTP errors (404, 403 ...) fail at once. Errors are `DownloadError`.

CLI: `picochat download --out data/fineweb --shards 8 [--start 0] [--workers 4] [--dataset NAME]
[--base-url URL]`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import itertools
import os
import re
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from picochat.data.sources import SourceError, open_parquet_text


@dataclass(frozen=True)
class HubDataset:
    """Where a dataset's parquet shards live: `base_url/file_pattern.format(index=i)`, 0 <= i < num_shards."""

    base_url: str
    file_pattern: str
    num_shards: int
    description: str


DATASETS = {
    "fineweb-edu-100b-shuffle": HubDataset(
        base_url="https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        file_pattern="shard_{index:05d}.parquet",
        num_shards=1823,
        description="FineWeb-edu 100BT, pre-shuffled, 1,823 shards of ~100 MB",
    ),
    "fineweb-edu-10bt": HubDataset(
        base_url="https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main",
        file_pattern="sample/10BT/{index:03d}_00000.parquet",
        num_shards=14,
        description="FineWeb-edu sample-10BT (official repository), 14 files of ~2.2 GB, crawl order",
    ),
}
DEFAULT_DATASET = "fineweb-edu-100b-shuffle"

PARQUET_MAGIC = b"PAR1"
CHUNK_BYTES = 2**20
MAX_UNSIZED_BYTES = 8 * 2**30  # a file the server gives no size for is cut off here (shards are at most ~2.2 GB)
USER_AGENT = "picochat-download/0.1 (python urllib)"
RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
MAX_BACKOFF_S = 60.0

# (bytes on disk for this shard, its full size if known) -> None; called from worker threads.
Report = Callable[[int, "int | None"], None]


class DownloadError(RuntimeError):
    """A shard could not be downloaded and verified; the message says which and why."""


class _Retry(Exception):
    """A failure worth another attempt (network trouble, a cut-off body, a corrupt download)."""

    def __init__(self, message: str, *, unreachable: bool = False, discard_part: bool = False):
        super().__init__(message)
        self.unreachable, self.discard_part = unreachable, discard_part


class _RecordingRedirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects like urllib does, keeping each redirect's headers (the Hub puts the sha256 there)."""

    def __init__(self):
        self.hop_headers: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.hop_headers.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


# --- shard lists ----------------------------------------------------------------------------------
def shard_files(dataset: str, count: int, start: int = 0, base_url: str | None = None) -> list[tuple[str, str]]:
    """(url, local file name) of shards start .. start+count-1 of a named dataset."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    layout = DATASETS[dataset]
    if count < 1 or start < 0 or start + count > layout.num_shards:
        raise ValueError(
            f"shards {start}..{start + count - 1} are out of range: {dataset} has shards 0..{layout.num_shards - 1}"
        )
    base = (base_url or layout.base_url).rstrip("/")
    files = [layout.file_pattern.format(index=i) for i in range(start, start + count)]
    return [(f"{base}/{urllib.parse.quote(name)}", Path(name).name) for name in files]


# --- one file -------------------------------------------------------------------------------------
def download_file(
    url: str,
    dest: Path,
    *,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    report: Report | None = None,
    stop: threading.Event | None = None,
) -> Path:
    """Download `url` to `dest` through `dest.part` (resumed if present), verify it, then rename it.

    `report(bytes_on_disk, total_or_None)` follows progress; setting `stop` ends the download early
    with a DownloadError, keeping the part for a later resume.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    report = report or (lambda on_disk, total: None)
    stop = stop or threading.Event()
    for attempt in itertools.count(1):
        try:
            expected_size, expected_sha256 = _fetch(url, part, timeout_s, report, stop)
            _verify(part, expected_size, expected_sha256)
        except _Retry as e:
            if e.discard_part:
                part.unlink(missing_ok=True)
                report(0, None)
            if attempt == attempts:
                tries = f"{attempts} attempt" + ("s" if attempts > 1 else "")
                if e.unreachable:
                    host = urllib.parse.urlsplit(url).netloc
                    raise DownloadError(
                        f"cannot reach {host} ({e}) after {tries}: check the network connection, "
                        "or point --base-url at a reachable mirror"
                    ) from None
                raise DownloadError(f"{url}: failed after {tries}: {e}") from None
            if stop.wait(min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)):
                raise DownloadError(f"{url}: stopped") from None
            continue
        os.replace(part, dest)
        _fsync_dir(dest.parent)
        return dest


def _fetch(url: str, part: Path, timeout_s: float, report: Report, stop: threading.Event) -> tuple[int | None, str | None]:
    """Bring `part` up to the whole file; return (expected size, expected sha256) as the server told."""
    offset = part.stat().st_size if part.exists() else 0
    redirects = _RecordingRedirects()
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        response = urllib.request.build_opener(redirects).open(urllib.request.Request(url, headers=headers), timeout=timeout_s)
    except urllib.error.HTTPError as e:
        all_headers = [*redirects.hop_headers, e.headers]
        if e.code == 416 and offset:  # nothing after `offset`: the part may already be whole
            size = _linked_size(all_headers) or _content_range_total(e.headers.get("Content-Range"))
            if size == offset:
                return size, _linked_sha256(all_headers)
            raise _Retry(f"server refused to resume at byte {offset:,} (HTTP 416)", discard_part=True) from None
        if e.code in RETRYABLE_HTTP:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        hint = ": check --dataset, --base-url and --shards" if e.code == 404 else ""
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}{hint}") from None
    except urllib.error.URLError as e:
        raise _Retry(str(e.reason), unreachable=True) from None
    except (http.client.HTTPException, ConnectionError, TimeoutError) as e:
        raise _Retry(f"no answer ({e!r})") from None

    with response:
        all_headers = [*redirects.hop_headers, response.headers]
        expected_sha256 = _linked_sha256(all_headers)
        if response.status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise _Retry(f"asked for bytes from {offset:,}, server sent from {start}", discard_part=True)
            total = _content_range_total(response.headers.get("Content-Range"))
        else:  # 200: the whole file, whether or not we asked for a range
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        expected_size = _linked_size(all_headers) or total
        if expected_size is not None and total is not None and expected_size != total:
            raise _Retry(f"size mismatch: the Hub says {expected_size:,} bytes, the server sends {total:,}", discard_part=True)
        received = _copy_body(response, part, offset, expected_size, report, stop)
    if total is not None and offset + received < total:
        raise _Retry(f"connection closed after {offset + received:,} of {total:,} bytes")
    return expected_size, expected_sha256


def _copy_body(response, part: Path, offset: int, expected_size: int | None, report: Report, stop: threading.Event) -> int:
    received = 0
    report(offset, expected_size)
    try:
        with open(part, "ab" if offset else "wb") as out:
            while chunk := response.read(CHUNK_BYTES):
                if stop.is_set():
                    raise DownloadError(f"{part.name}: stopped; the next run resumes from byte {offset + received:,}")
                out.write(chunk)
                received += len(chunk)
                report(offset + received, expected_size)
                limit = expected_size if expected_size is not None else MAX_UNSIZED_BYTES
                if offset + received > limit:
                    raise _Retry(f"the server sent more than the {limit:,} bytes expected", discard_part=True)
            out.flush()
            os.fsync(out.fileno())
    except (http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError) as e:
        raise _Retry(f"connection lost after {offset + received:,} bytes ({e!r})") from None
    return received


def _verify(part: Path, expected_size: int | None, expected_sha256: str | None) -> None:
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        raise _Retry(f"got {size:,} bytes, expected {expected_size:,}", discard_part=size > expected_size)
    if expected_sha256:
        hasher = hashlib.sha256()
        _hash_file_into(hasher, part)
        if hasher.hexdigest() != expected_sha256:
            raise _Retry(f"sha256 {hasher.hexdigest()} does not match the expected {expected_sha256}", discard_part=True)
    with open(part, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        tail = f.read(4)
    if size < 12 or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise _Retry("not a parquet file (no PAR1 magic at both ends)", discard_part=True)
    try:
        open_parquet_text(part)
    except SourceError as e:
        raise _Retry(f"parquet check failed: {e}", discard_part=True) from None


def _hash_file_into(hasher, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)


def _linked_sha256(all_headers: list) -> str | None:
    """The sha256 the Hub gives for LFS files (X-Linked-Etag, or an ETag that is one)."""
    for name in ("X-Linked-Etag", "ETag"):
        for headers in all_headers:
            value = (headers.get(name) or "").strip().removeprefix("W/").strip('"').lower()
            if re.fullmatch(r"[0-9a-f]{64}", value):
                return value
    return None


def _linked_size(all_headers: list) -> int | None:
    for headers in all_headers:
        value = (headers.get("X-Linked-Size") or "").strip()
        if value.isdigit():
            return int(value)
    return None


def _content_range_start(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", (value or "").strip())
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    match = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (value or "").strip())
    return int(match.group(1)) if match else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- many files -----------------------------------------------------------------------------------
def download_shards(
    shards: list[tuple[str, str]],
    out_dir: str | os.PathLike,
    *,
    workers: int = 4,
    attempts: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    show_progress: bool = True,
) -> tuple[list[Path], list[Path]]:
    """Download (url, file name) pairs into `out_dir` in parallel; return (downloaded, skipped as complete).

    The first failure stops the other downloads (their `.part` files stay, for the next run to
    resume) and raises its DownloadError.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    skipped = [out / name for _, name in shards if (out / name).exists()]
    todo = [(url, out / name) for url, name in shards if not (out / name).exists()]
    if not todo:
        return [], skipped

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {len(todo)} shards", disable=not show_progress)
    lock = threading.Lock()
    on_disk: dict[Path, int] = {}
    sizes: dict[Path, int] = {}

    def reporter(dest: Path) -> Report:
        def report(bytes_on_disk: int, total: int | None) -> None:
            with lock:
                if total is not None and dest not in sizes:
                    sizes[dest] = total
                    bar.total += total
                bar.update(bytes_on_disk - on_disk.get(dest, 0))
                on_disk[dest] = bytes_on_disk

        return report

    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="download")
    try:
        futures = [
            pool.submit(
                download_file, url, dest, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s, report=reporter(dest), stop=stop
            )
            for url, dest in todo
        ]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # the first failure in submission order, for a stable message
            if future in done and future.exception() is not None:
                raise future.exception()
    finally:  # on failure or Ctrl-C: stop the others at their next chunk (their parts stay for a resume)
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return [dest for _, dest in todo], skipped


# --- CLI ------------------------------------------------------------------------------------------
def register_cli(parser: argparse.ArgumentParser) -> None:
    datasets = "; ".join(f"{name}: {d.description}" for name, d in DATASETS.items())
    parser.add_argument("--out", required=True, help="folder for the parquet shards (created if missing)")
    parser.add_argument("--shards", type=int, default=8, help="how many shards to download (default 8)")
    parser.add_argument("--start", type=int, default=0, help="index of the first shard (default 0)")
    parser.add_argument("--workers", type=int, default=4, help="parallel downloads (default 4)")
    parser.add_argument(
        "--dataset", choices=sorted(DATASETS), default=DEFAULT_DATASET, help=f"which layout (default {DEFAULT_DATASET}). {datasets}"
    )
    parser.add_argument("--base-url", help="download from this URL instead of the dataset's Hugging Face URL (a mirror of the same layout)")
    parser.add_argument("--attempts", type=int, default=5, help="tries per shard before giving up, with exponential backoff (default 5)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a connection is retried (default 60)")
    parser.set_defaults(func=run_download)


def run_download(args: argparse.Namespace) -> int:
    try:
        shards = shard_files(args.dataset, args.shards, args.start, args.base_url)
        downloaded, skipped = download_shards(
            shards, args.out, workers=args.workers, attempts=args.attempts, timeout_s=args.timeout
        )
    except (ValueError, DownloadError) as e:
        print(f"picochat download: error: {e}", file=sys.stderr)
        return 1
    total_bytes = sum(p.stat().st_size for p in downloaded + skipped)
    print(
        f"download: {len(downloaded)} shards downloaded, {len(skipped)} already complete; "
        f"{len(shards)} shards, {total_bytes / 1e9:.2f} GB in {args.out}"
    )
    return 0
