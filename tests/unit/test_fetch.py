"""petdet_tasks.fetch against a local HTTP server (tests/support/http_server.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time

import pytest

from petdet_tasks.fetch import (
    ChecksumMismatch,
    FetchError,
    fetch,
    is_remote,
    join_source,
    parse_sha256sums,
    read_text,
    redact_url,
)
from tests.support.http_server import serve_directory

FAST = {"backoff_s": 0.01, "timeout_s": 5.0, "chunk_size": 4096}
SIZE = 300_000


@pytest.fixture
def payload(tmp_path):
    root = tmp_path / "srv"
    root.mkdir()
    data = os.urandom(SIZE)
    (root / "data.bin").write_bytes(data)
    (root / "SHA256SUMS").write_text(f"{hashlib.sha256(data).hexdigest()}  data.bin\n")
    return root, data, hashlib.sha256(data).hexdigest()


def gets(server):
    return [r for r in server.requests if r.path == "/data.bin"]


def test_full_download_with_digest(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "out" / "data.bin"
    with serve_directory(root) as server:
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest.upper(),
                    expected_size=SIZE, **FAST)
        headers = server.request_headers
    assert dest.read_bytes() == data
    assert (res.path, res.size, res.sha256, res.attempts, res.resumed_from) == (
        dest, SIZE, digest, 1, 0)
    assert not dest.with_name("data.bin.part").exists()
    assert headers[0]["User-Agent"].startswith("petdet/")
    assert "Range" not in headers[0]


def test_resume_after_dropped_connection(payload, tmp_path, caplog):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    with serve_directory(root, drop_after_bytes=SIZE // 2 + 123) as server:
        with caplog.at_level(logging.INFO, logger="petdet_tasks.fetch"):
            res = fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
        reqs = gets(server)
    assert dest.read_bytes() == data
    assert len(reqs) == 2
    assert reqs[0].range is None and reqs[0].status == 200
    offset = SIZE // 2 + 123
    assert reqs[1].range == f"bytes={offset}-" and reqs[1].status == 206
    assert res.attempts == 2 and res.resumed_from == offset
    assert res.sha256 == digest
    assert f"resuming from byte {offset}" in caplog.text
    assert f"closed after {offset} of {SIZE}" in caplog.text


def test_resume_part_left_by_earlier_call(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    half = SIZE // 2
    dest.with_name("data.bin.part").write_bytes(data[:half])
    with serve_directory(root) as server:
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
        reqs = gets(server)
    assert [(r.range, r.status) for r in reqs] == [(f"bytes={half}-", 206)]
    assert res.resumed_from == half and res.attempts == 1
    assert dest.read_bytes() == data


def test_server_ignoring_range_restarts_from_zero(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(data[:1000])
    with serve_directory(root, ignore_range=True) as server:
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
        reqs = gets(server)
    assert [(r.range, r.status) for r in reqs] == [("bytes=1000-", 200)]
    assert res.resumed_from == 0
    assert dest.read_bytes() == data


def test_ignore_range_and_drop_still_correct(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    with serve_directory(root, ignore_range=True, drop_after_bytes=5000) as server:
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
        reqs = gets(server)
    assert [r.status for r in reqs] == [200, 200]
    assert reqs[1].range == "bytes=5000-"
    assert res.attempts == 2 and res.resumed_from == 0
    assert dest.read_bytes() == data


def test_503_then_success_is_retried(payload, tmp_path, caplog):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    with serve_directory(root, fail_first=2) as server:
        with caplog.at_level(logging.WARNING, logger="petdet_tasks.fetch"):
            res = fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
        reqs = gets(server)
    assert [r.status for r in reqs] == [503, 503, 200]
    assert res.attempts == 3
    assert dest.read_bytes() == data
    assert "HTTP 503" in caplog.text


def test_retries_exhausted_keeps_part(payload, tmp_path):
    root, data, _ = payload
    dest = tmp_path / "data.bin"
    with serve_directory(root, fail_first=10) as server:
        with pytest.raises(FetchError, match=r"failed after 3 attempt\(s\): HTTP 503") as ei:
            fetch(server.url + "data.bin", dest, retries=2, **FAST)
        assert len(gets(server)) == 3
    assert ei.value.status == 503
    assert not dest.exists()


def test_failed_download_keeps_part_for_next_call(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    part = tmp_path / "data.bin.part"
    with serve_directory(root, drop_after_bytes=1000) as server:
        with pytest.raises(FetchError, match="closed after 1000 of 300000"):
            fetch(server.url + "data.bin", dest, expected_sha256=digest, retries=0, **FAST)
        assert not dest.exists() and part.read_bytes() == data[:1000]
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, retries=0, **FAST)
        assert gets(server)[-1].range == "bytes=1000-"
    assert res.resumed_from == 1000 and res.attempts == 1 and dest.read_bytes() == data
    assert not part.exists()


def test_404_fails_fast_without_retries(payload, tmp_path):
    root, _, _ = payload
    dest = tmp_path / "missing.bin"
    with serve_directory(root) as server:
        t0 = time.monotonic()
        with pytest.raises(FetchError) as ei:
            fetch(server.url + "missing.bin", dest, retries=5, backoff_s=1.0)
        elapsed = time.monotonic() - t0
        assert len(server.requests) == 1
    assert elapsed < 1.0
    assert "404" in str(ei.value) and server.url + "missing.bin" in str(ei.value)
    assert ei.value.status == 404
    assert not isinstance(ei.value, ChecksumMismatch)
    assert not dest.exists() and not dest.with_name("missing.bin.part").exists()


def test_checksum_mismatch(payload, tmp_path):
    root, _, digest = payload
    dest = tmp_path / "data.bin"
    wrong = "0" * 64
    with serve_directory(root) as server:
        with pytest.raises(ChecksumMismatch) as ei:
            fetch(server.url + "data.bin", dest, expected_sha256=wrong, **FAST)
    msg = str(ei.value)
    assert wrong in msg and digest in msg and "data.bin" in msg
    assert (ei.value.expected_sha256, ei.value.actual_sha256) == (wrong, digest)
    assert not dest.exists()
    assert not dest.with_name("data.bin.part").exists()


def test_size_mismatch(payload, tmp_path):
    root, _, digest = payload
    dest = tmp_path / "data.bin"
    with serve_directory(root) as server:
        with pytest.raises(ChecksumMismatch) as ei:
            fetch(server.url + "data.bin", dest, expected_size=SIZE + 10, **FAST)
    msg = str(ei.value)
    assert f"expected size {SIZE + 10}" in msg and f"actual size {SIZE}" in msg
    assert digest in msg
    assert not dest.exists() and not dest.with_name("data.bin.part").exists()


def test_part_larger_than_expected_is_discarded(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"x" * (SIZE + 1))
    with serve_directory(root) as server:
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, expected_size=SIZE,
                    **FAST)
        reqs = gets(server)
    assert [r.range for r in reqs] == [None]
    assert res.resumed_from == 0 and dest.read_bytes() == data


def test_complete_part_416_is_accepted(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(data)
    with serve_directory(root) as server:
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, expected_size=SIZE,
                    **FAST)
        reqs = gets(server)
    assert [(r.range, r.status) for r in reqs] == [(f"bytes={SIZE}-", 416)]
    assert res.resumed_from == SIZE and dest.read_bytes() == data


def test_corrupt_part_is_detected(payload, tmp_path):
    root, data, digest = payload
    dest = tmp_path / "data.bin"
    dest.with_name("data.bin.part").write_bytes(b"\0" * 1000)
    with serve_directory(root) as server:
        with pytest.raises(ChecksumMismatch, match="resumed from byte 1000"):
            fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
        # The bad part is gone, so the next call starts from scratch and succeeds.
        res = fetch(server.url + "data.bin", dest, expected_sha256=digest, **FAST)
    assert res.resumed_from == 0 and dest.read_bytes() == data


def test_timeout_is_retried_then_fails(tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept_and_stall():
        try:
            while True:
                conn, _ = listener.accept()
                accepted.append(conn)  # never answer
        except OSError:
            pass

    t = threading.Thread(target=accept_and_stall, daemon=True)
    t.start()
    port = listener.getsockname()[1]
    try:
        with pytest.raises(FetchError, match="timed out"):
            fetch(f"http://127.0.0.1:{port}/x", tmp_path / "x", retries=1, backoff_s=0.01,
                  timeout_s=0.2)
    finally:
        listener.close()
        for c in accepted:
            c.close()
    assert len(accepted) == 2


def test_progress_logging(payload, tmp_path, caplog):
    root, _, digest = payload
    with serve_directory(root) as server:
        with caplog.at_level(logging.INFO, logger="petdet_tasks.fetch"):
            fetch(server.url + "data.bin", tmp_path / "d", progress_every_s=0.0, **FAST)
    lines = [r.getMessage() for r in caplog.records]
    progress = [m for m in lines if "%)" in m and "MB/s" in m and "ETA" in m]
    assert progress, lines
    assert "300.0 kB" in progress[-1]
    assert any("done" in m and digest in m for m in lines)


def test_custom_logger_and_rate_limit(payload, tmp_path, caplog):
    root, _, _ = payload
    log = logging.getLogger("petdet.test.fetch")
    with serve_directory(root) as server:
        with caplog.at_level(logging.INFO, logger="petdet.test.fetch"):
            fetch(server.url + "data.bin", tmp_path / "d", log=log, progress_every_s=3600,
                  **FAST)
    mine = [r for r in caplog.records if r.name == "petdet.test.fetch"]
    assert len(mine) == 1 and "done" in mine[0].getMessage()


def test_file_url_and_plain_path(payload, tmp_path):
    root, data, digest = payload
    src = root / "data.bin"
    r1 = fetch(src.as_uri(), tmp_path / "a.bin", expected_sha256=digest, chunk_size=4096)
    r2 = fetch(str(src), tmp_path / "b.bin", expected_sha256=digest, expected_size=SIZE)
    assert (tmp_path / "a.bin").read_bytes() == data == (tmp_path / "b.bin").read_bytes()
    assert r1.sha256 == r2.sha256 == digest and r1.attempts == 1 and r2.resumed_from == 0
    with pytest.raises(ChecksumMismatch):
        fetch(src, tmp_path / "c.bin", expected_sha256="f" * 64)
    assert not (tmp_path / "c.bin").exists() and not (tmp_path / "c.bin.part").exists()
    with pytest.raises(FetchError, match="nope.bin"):
        fetch(str(root / "nope.bin"), tmp_path / "d.bin")


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="sha256"):
        fetch("/x", tmp_path / "x", expected_sha256="abc")
    with pytest.raises(FetchError, match="unsupported URL scheme"):
        fetch("ftp://example.com/x", tmp_path / "x")


def test_credentials_are_redacted(payload, tmp_path, caplog):
    root, _, _ = payload
    with serve_directory(root, fail_first=1) as server:
        url = server.url.replace("http://", "http://alice:s3cr3t@")
        with caplog.at_level(logging.DEBUG):
            with pytest.raises(FetchError) as ei:
                fetch(url + "missing.bin", tmp_path / "m", **FAST)
            assert read_text(url + "SHA256SUMS", backoff_s=0.01) is not None
        auth = [h.get("Authorization") for h in server.request_headers]
    text = str(ei.value) + repr(ei.value.args) + str(ei.value.url) + caplog.text
    assert "s3cr3t" not in text and "alice" not in text
    assert "***@127.0.0.1" in str(ei.value)
    # The credentials still reach the server as basic auth.
    assert auth and all(a == "Basic YWxpY2U6czNjcjN0" for a in auth)
    assert redact_url("https://u:p@h:1/x?y") == "https://***@h:1/x?y"
    assert redact_url("/plain/path") == "/plain/path"


def test_parse_sha256sums():
    a, b, c = "a" * 64, "B" * 64, "c" * 64
    text = (
        "# comment\n\n"
        f"{a}  images.tar.gz\n"
        f"{b} *annotations.tar.gz\r\n"
        f"{c}  ./sub/dir file.txt\n"
        f"SHA256 (bsd.bin) = {a}\n"
        f"\\{c}  new\\nline\n"
    )
    assert parse_sha256sums(text) == {
        "images.tar.gz": a,
        "annotations.tar.gz": "b" * 64,
        "sub/dir file.txt": c,
        "bsd.bin": a,
        "new\nline": c,
    }
    assert parse_sha256sums("") == {}
    with pytest.raises(ValueError, match=r"line 2.*not-a-digest"):
        parse_sha256sums(f"{a}  ok\nnot-a-digest  file\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_sha256sums("d41d8cd98f00b204e9800998ecf8427e  md5.txt\n")
    with pytest.raises(ValueError, match="different digest"):
        parse_sha256sums(f"{a}  x\n{c}  x\n")


def test_join_source():
    assert join_source("https://example.com/pets/", "images.tar.gz") == (
        "https://example.com/pets/images.tar.gz")
    assert join_source("https://example.com/pets", "images.tar.gz") == (
        "https://example.com/pets/images.tar.gz")
    assert join_source("http://h/a/", "x y.txt") == "http://h/a/x%20y.txt"
    assert join_source("file:///data/pets", "SHA256SUMS") == "file:///data/pets/SHA256SUMS"
    assert join_source("file:///data/pets/", "SHA256SUMS") == "file:///data/pets/SHA256SUMS"
    assert join_source("/data/pets", "a/b.txt") == os.path.join("/data/pets", "a", "b.txt")
    assert join_source("rel/dir/", "b.txt") == os.path.join("rel/dir", "b.txt")
    for bad in ("../x", "/etc/passwd", "", "a/../../b"):
        with pytest.raises(ValueError):
            join_source("https://example.com/", bad)


def test_is_remote():
    assert is_remote("http://x/y") and is_remote("HTTPS://x/y")
    assert not is_remote("file:///x") and not is_remote("/x") and not is_remote("x/y")


def test_read_text(payload, tmp_path):
    root, _, digest = payload
    with serve_directory(root) as server:
        assert read_text(server.url + "SHA256SUMS") == f"{digest}  data.bin\n"
        assert read_text(server.url + "nope") is None
        assert len(server.requests) == 2
    assert read_text(str(root / "SHA256SUMS")).startswith(digest)
    assert read_text((root / "SHA256SUMS").as_uri()).startswith(digest)
    assert read_text(str(root / "nope")) is None
    assert read_text((root / "nope").as_uri()) is None


def test_read_text_retries_and_errors(payload, tmp_path):
    root, _, digest = payload
    with serve_directory(root, fail_first=1) as server:
        assert read_text(server.url + "SHA256SUMS", backoff_s=0.01).startswith(digest)
        assert [r.status for r in server.requests] == [503, 200]
    with serve_directory(root, fail_first=5) as server:
        with pytest.raises(FetchError, match="503"):
            read_text(server.url + "SHA256SUMS", retries=1, backoff_s=0.01)
    with pytest.raises(FetchError, match="larger than"):
        read_text(str(root / "data.bin"), max_bytes=1000)


def test_redact_url_fails_safe_on_urls_urllib_cannot_parse():
    assert redact_url("http://u:p4ss@host]/x") == "http://***@host]/x"
    assert redact_url("s3://AKIA:p4ss@[bucket/k?q") == "s3://***@[bucket/k?q"
    assert redact_url("http://[::1/x") == "http://[::1/x"  # no userinfo: unchanged
