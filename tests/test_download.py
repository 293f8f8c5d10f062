"""Tests for picochat.data.download against a local HTTP server on 127.0.0.1 that supports Range requests."""

from __future__ import annotations

import hashlib
import io
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from picochat.cli import main as cli_main
from picochat.data.download import DATASETS, DownloadError, download_file, download_shards, shard_files
from picochat.data.sources import iter_documents

FAST = {"attempts": 2, "backoff_s": 0.0, "timeout_s": 10.0}


def parquet_bytes(seed: int, rows: int = 300) -> bytes:
    buffer = io.BytesIO()
    texts = [f"Document {seed}-{i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(rows)]
    pq.write_table(pa.table({"text": texts, "id": list(range(rows))}), buffer, row_group_size=100)
    return buffer.getvalue()


class FakeHub:
    """A threaded HTTP server serving `files` under /cdn/<name>, like the Hub's CDN.

    With `redirect`, /resolve/<name> answers 302 to /cdn/<name> with the Hub's X-Linked-Etag (sha256)
    and X-Linked-Size headers. Behaviour switches: ignore_range, corrupt (flip bytes mid-file),
    html (send an error page instead), endless (no Content-Length, then junk after the file until the
    client hangs up, up to 64 MB), cut_first (the first answer per file stops halfway),
    fail_first (the first answer per file is this HTTP status), barrier (hold GETs until N are in flight).
    """

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.redirect = self.ignore_range = self.corrupt = self.html = self.cut_first = self.endless = False
        self.endless_sent = 0
        self.fail_first: int | None = None
        self.barrier: threading.Barrier | None = None
        self.requests: list[tuple[str, str | None]] = []
        self._answered: set[str] = set()
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub.handle(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        with self._lock:
            self.requests.append((h.path, h.headers.get("Range")))
        if self.barrier is not None and h.path.startswith("/cdn/"):
            self.barrier.wait()
        if h.path.startswith("/resolve/"):
            name = h.path.removeprefix("/resolve/")
            if name not in self.files:
                return h.send_error(404)
            h.send_response(302)
            h.send_header("Location", f"/cdn/{name}")
            h.send_header("X-Linked-Etag", f'"{hashlib.sha256(self.files[name]).hexdigest()}"')
            h.send_header("X-Linked-Size", str(len(self.files[name])))
            h.send_header("Content-Length", "0")
            return h.end_headers()
        name = h.path.removeprefix("/cdn/")
        if name not in self.files:
            return h.send_error(404)
        with self._lock:
            first_answer = name not in self._answered
            self._answered.add(name)
        if self.fail_first and first_answer:
            return h.send_error(self.fail_first)
        body = self.files[name]
        if self.corrupt:
            middle = len(body) // 2
            body = body[:middle] + bytes(b ^ 0xFF for b in body[middle : middle + 64]) + body[middle + 64 :]
        if self.html:
            body = b"<html><body>Rate limited, try later</body></html>"
        match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range") or "")
        if match and not self.ignore_range:
            start = int(match.group(1))
            if start >= len(body):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(body)}")
                h.send_header("Content-Length", "0")
                return h.end_headers()
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            payload = body[start:]
        else:
            h.send_response(200)
            payload = body
        if self.endless:
            h.end_headers()
            h.close_connection = True
            try:
                for chunk in [payload] + [bytes(2**20)] * 64:
                    h.wfile.write(chunk)
                    self.endless_sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        if self.cut_first and first_answer:
            payload = payload[: len(payload) // 2]
            h.close_connection = True
        h.wfile.write(payload)

    def gets(self, prefix: str = "/cdn/") -> list[tuple[str, str | None]]:
        return [r for r in self.requests if r[0].startswith(prefix)]


@pytest.fixture
def hub():
    server = FakeHub({f"shard_{i:05d}.parquet": parquet_bytes(i) for i in range(4)})
    yield server
    server.server.shutdown()
    server.server.server_close()


def urls(hub: FakeHub, count: int, prefix: str = "/cdn/") -> list[tuple[str, str]]:
    return [(f"{hub.url}{prefix}shard_{i:05d}.parquet", f"shard_{i:05d}.parquet") for i in range(count)]


def assert_no_leftovers(folder: Path) -> None:
    assert not list(folder.glob("*.part"))


def test_parallel_download_verifies_sha256_through_redirects(hub, tmp_path):
    hub.redirect = True
    hub.barrier = threading.Barrier(3, timeout=10)  # only passes if 3 downloads are in flight at once
    downloaded, skipped = download_shards(urls(hub, 3, "/resolve/"), tmp_path, workers=3, show_progress=False, **FAST)
    assert [p.name for p in downloaded] == ["shard_00000.parquet", "shard_00001.parquet", "shard_00002.parquet"] and skipped == []
    for path in downloaded:
        assert path.read_bytes() == hub.files[path.name]
    assert_no_leftovers(tmp_path)
    assert sum(1 for _ in iter_documents(tmp_path)) == 3 * 300


def test_complete_shards_are_skipped(hub, tmp_path):
    download_shards(urls(hub, 2), tmp_path, show_progress=False, **FAST)
    before = len(hub.requests)
    downloaded, skipped = download_shards(urls(hub, 3), tmp_path, show_progress=False, **FAST)
    assert [p.name for p in skipped] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert [p.name for p in downloaded] == ["shard_00002.parquet"]
    assert [path for path, _ in hub.requests[before:]] == ["/cdn/shard_00002.parquet"]


def test_truncated_part_is_resumed_with_a_range_request(hub, tmp_path):
    name = "shard_00001.parquet"
    data = hub.files[name]
    (tmp_path / f"{name}.part").write_bytes(data[:1000])
    download_file(f"{hub.url}/cdn/{name}", tmp_path / name, **FAST)
    assert (tmp_path / name).read_bytes() == data
    assert hub.gets() == [(f"/cdn/{name}", "bytes=1000-")]
    assert_no_leftovers(tmp_path)


def test_part_is_restarted_when_the_server_ignores_range(hub, tmp_path):
    hub.ignore_range = True
    name = "shard_00000.parquet"
    (tmp_path / f"{name}.part").write_bytes(hub.files[name][:1000])
    download_file(f"{hub.url}/cdn/{name}", tmp_path / name, **FAST)
    assert (tmp_path / name).read_bytes() == hub.files[name]
    assert hub.gets() == [(f"/cdn/{name}", "bytes=1000-")]


def test_a_cut_connection_is_resumed_on_the_next_attempt(hub, tmp_path):
    hub.cut_first = True
    name = "shard_00002.parquet"
    download_file(f"{hub.url}/cdn/{name}", tmp_path / name, **FAST)
    assert (tmp_path / name).read_bytes() == hub.files[name]
    half = len(hub.files[name]) // 2
    assert hub.gets() == [(f"/cdn/{name}", None), (f"/cdn/{name}", f"bytes={half}-")]


def test_a_whole_part_left_before_the_rename_is_finished_without_data(hub, tmp_path):
    name = "shard_00003.parquet"
    (tmp_path / f"{name}.part").write_bytes(hub.files[name])
    download_file(f"{hub.url}/cdn/{name}", tmp_path / name, **FAST)
    assert (tmp_path / name).read_bytes() == hub.files[name]
    assert hub.gets() == [(f"/cdn/{name}", f"bytes={len(hub.files[name])}-")]  # answered 416, no body
    assert_no_leftovers(tmp_path)


def test_a_stale_part_fails_the_sha256_and_is_downloaded_again(hub, tmp_path):
    hub.redirect = True
    name = "shard_00000.parquet"
    (tmp_path / f"{name}.part").write_bytes(b"\0" * 1000)  # not the file's first bytes
    download_file(f"{hub.url}/resolve/{name}", tmp_path / name, **FAST)
    assert (tmp_path / name).read_bytes() == hub.files[name]
    assert hub.gets() == [(f"/cdn/{name}", "bytes=1000-"), (f"/cdn/{name}", None)]


def test_corrupt_bytes_are_rejected_by_sha256_and_leave_no_file(hub, tmp_path):
    hub.redirect, hub.corrupt = True, True
    with pytest.raises(DownloadError, match="sha256 .* does not match"):
        download_shards(urls(hub, 1, "/resolve/"), tmp_path, show_progress=False, **FAST)
    assert list(tmp_path.iterdir()) == []
    assert len(hub.gets()) == FAST["attempts"]


def test_a_page_that_is_not_parquet_is_rejected(hub, tmp_path):
    hub.html = True
    with pytest.raises(DownloadError, match="not a parquet file"):
        download_file(f"{hub.url}/cdn/shard_00000.parquet", tmp_path / "shard_00000.parquet", **FAST)
    assert list(tmp_path.iterdir()) == []


def test_parquet_without_text_column_is_rejected(tmp_path):
    buffer = io.BytesIO()
    pq.write_table(pa.table({"content": ["a", "b"]}), buffer)
    server = FakeHub({"other.parquet": buffer.getvalue()})
    try:
        with pytest.raises(DownloadError, match="no 'text' column"):
            download_file(f"{server.url}/cdn/other.parquet", tmp_path / "other.parquet", **FAST)
    finally:
        server.server.shutdown()
        server.server.server_close()
    assert list(tmp_path.iterdir()) == []


def test_server_errors_are_retried_and_missing_files_are_not(hub, tmp_path):
    hub.fail_first = 503
    download_file(f"{hub.url}/cdn/shard_00000.parquet", tmp_path / "shard_00000.parquet", **FAST)
    assert len(hub.gets()) == 2
    with pytest.raises(DownloadError, match="HTTP 404.*--shards"):
        download_file(f"{hub.url}/cdn/shard_09999.parquet", tmp_path / "shard_09999.parquet", **{**FAST, "attempts": 5})
    assert len(hub.gets()) == 3


def test_a_body_longer_than_announced_is_cut_off_not_written_to_the_end(hub, tmp_path):
    hub.redirect, hub.endless = True, True
    name = "shard_00000.parquet"
    with pytest.raises(DownloadError, match="more than the .* bytes expected"):
        download_file(f"{hub.url}/resolve/{name}", tmp_path / name, **FAST)
    assert not (tmp_path / name).exists()
    assert_no_leftovers(tmp_path)
    assert hub.endless_sent < FAST["attempts"] * 16 * 2**20  # the client hung up early, not after 64 MB


def test_unreachable_server_gives_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=rf"cannot reach 127\.0\.0\.1:{port} .* after 2 attempts: check the network"):
        download_shards([(f"http://127.0.0.1:{port}/shard_00000.parquet", "shard_00000.parquet")], tmp_path, show_progress=False, **FAST)
    assert list(tmp_path.iterdir()) == []


def test_shard_files_layouts():
    assert shard_files("fineweb-edu-100b-shuffle", 2, start=5) == [
        ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00005.parquet", "shard_00005.parquet"),
        ("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/shard_00006.parquet", "shard_00006.parquet"),
    ]
    assert shard_files("fineweb-edu-10bt", 1, start=13, base_url="http://mirror/x/") == [
        ("http://mirror/x/sample/10BT/013_00000.parquet", "013_00000.parquet")
    ]
    with pytest.raises(ValueError, match="has shards 0..13"):
        shard_files("fineweb-edu-10bt", 2, start=13)
    with pytest.raises(ValueError, match="unknown dataset"):
        shard_files("fineweb", 1)
    assert set(DATASETS) == {"fineweb-edu-100b-shuffle", "fineweb-edu-10bt"}


def test_cli_downloads_and_reports(hub, tmp_path, capsys):
    out = tmp_path / "fineweb"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["download", "--out", str(out), "--shards", "2", "--start", "1", "--base-url", f"{hub.url}/cdn", "--workers", "2"])
    assert exit_info.value.code == 0
    assert sorted(p.name for p in out.iterdir()) == ["shard_00001.parquet", "shard_00002.parquet"]
    assert "2 shards downloaded, 0 already complete" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["download", "--out", str(out), "--shards", "1", "--base-url", f"{hub.url}/nowhere", "--attempts", "1"])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert "picochat download: error:" in error and "HTTP 404" in error


def test_cli_help_explains_options(capsys):
    with pytest.raises(SystemExit):
        cli_main(["download", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--out", "--shards", "--start", "--workers", "--dataset", "--base-url", "--attempts", "--timeout"):
        assert option in help_text
