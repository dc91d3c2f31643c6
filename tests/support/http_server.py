"""A local HTTP file server for tests, with knobs to misbehave.

Usage::

    from tests.support.http_server import serve_directory

    with serve_directory(tmp_path, drop_after_bytes=1000) as server:
        fetch(server.url + "data.bin", dest)
        assert server.requests[1].range == "bytes=1000-"

The server binds 127.0.0.1 on an ephemeral port, runs in daemon threads of the current
process (so it also serves an in-process Airflow ``dag.test()``), never writes an access log
and is shut down (socket closed, thread joined) when the ``with`` block exits.

Served: GET and HEAD of regular files under ``root`` (anything else, or a path escaping
``root``, is 404); ``Range: bytes=N-``, ``bytes=N-M`` and ``bytes=-N`` answered with 206 and
``Content-Range``; an unsatisfiable range with 416 and ``Content-Range: bytes */SIZE``;
``Content-Length`` on every response.

Misbehaviour:

* ``drop_after_bytes``: the first GET of each file that gets a body (200/206) announces the
  full ``Content-Length`` but the connection is closed after that many body bytes.
* ``fail_first``: the first K GETs (any path) are answered ``503`` (with ``Retry-After: 0``).
* ``ignore_range``: ``Range`` is ignored; every GET is a 200 with the whole file.
"""

from __future__ import annotations

import contextlib
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

__all__ = ["LocalHTTPServer", "ServedRequest", "serve_directory"]


class ServedRequest(NamedTuple):
    """One request as answered: raw request path, its Range header (or None), status sent."""

    path: str
    range: str | None
    status: int


def _parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for a single byte range; None to ignore it; "416" if unsatisfiable."""
    header = header.strip()
    if not header.lower().startswith("bytes=") or "," in header:
        return None
    spec = header[6:].strip()
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first == "":  # suffix: the last N bytes
            n = int(last)
            if n <= 0:
                return "416"
            return max(0, size - n), size - 1
        start = int(first)
        end = int(last) if last else size - 1
    except ValueError:
        return None
    if start >= size:
        return "416"
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    server: LocalHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "petdet-test-http/1"
    timeout = 10  # idle keep-alive connections do not outlive a test for long

    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _simple(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                head: bool = False) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and not head:
            self.wfile.write(body)

    def _serve(self, head: bool) -> None:
        srv = self.server
        rng = self.headers.get("Range")
        if not head and srv._take_failure():
            srv._record(self, rng, 503)
            self._simple(503, b"try again\n", {"Retry-After": "0"}, head)
            return
        path = srv._resolve(self.path)
        if path is None:
            srv._record(self, rng, 404)
            self._simple(404, b"not found\n", head=head)
            return
        size = path.stat().st_size
        status, start, end = 200, 0, size - 1
        if rng is not None and not srv.ignore_range:
            parsed = _parse_range(rng, size)
            if parsed == "416":
                srv._record(self, rng, 416)
                self._simple(416, b"", {"Content-Range": f"bytes */{size}"}, head)
                return
            if parsed is not None:
                status, (start, end) = 206, parsed
        length = max(0, end - start + 1)
        limit = length
        if not head and srv.drop_after_bytes is not None and srv._first_body_get(path):
            limit = min(length, srv.drop_after_bytes)
        srv._record(self, rng, status)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "none" if srv.ignore_range else "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        with open(path, "rb") as f:
            f.seek(start)
            remaining = limit
            while remaining > 0:
                chunk = f.read(min(remaining, 64 * 1024))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
        if limit < length:  # simulate a dropped connection: close mid-body
            self.wfile.flush()
            self.close_connection = True


class LocalHTTPServer(ThreadingHTTPServer):
    """The server object yielded by :func:`serve_directory`."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, root: str | Path, *, drop_after_bytes: int | None = None,
                 fail_first: int = 0, ignore_range: bool = False, host: str = "127.0.0.1"):
        self.root = Path(root).resolve()
        self.drop_after_bytes = drop_after_bytes
        self.fail_first = fail_first
        self.ignore_range = ignore_range
        self._lock = threading.Lock()
        self._requests: list[ServedRequest] = []
        self._headers: list[dict[str, str]] = []
        self._gets = 0
        self._dropped: set[Path] = set()
        super().__init__((host, 0), _Handler)

    # -- public -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL with a trailing slash, e.g. ``http://127.0.0.1:PORT/``."""
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"

    def url_for(self, name: str) -> str:
        """The URL of ``name`` (relative to ``root``), percent-encoded."""
        return self.url + urllib.parse.quote(name)

    @property
    def requests(self) -> list[ServedRequest]:
        """A snapshot of the requests answered so far, in order."""
        with self._lock:
            return list(self._requests)

    @property
    def request_headers(self) -> list[dict[str, str]]:
        """Request headers, parallel to :attr:`requests`."""
        with self._lock:
            return [dict(h) for h in self._headers]

    def requests_for(self, name: str) -> list[ServedRequest]:
        """The requests whose path (without query) is ``/name``."""
        want = "/" + urllib.parse.quote(name.lstrip("/"))
        return [r for r in self.requests if urllib.parse.urlsplit(r.path).path == want]

    # -- handler helpers ----------------------------------------------------------------

    def _record(self, handler: BaseHTTPRequestHandler, rng: str | None, status: int) -> None:
        with self._lock:
            self._requests.append(ServedRequest(handler.path, rng, status))
            self._headers.append(dict(handler.headers.items()))

    def _take_failure(self) -> bool:
        with self._lock:
            self._gets += 1
            return self._gets <= self.fail_first

    def _first_body_get(self, path: Path) -> bool:
        with self._lock:
            if path in self._dropped:
                return False
            self._dropped.add(path)
            return True

    def _resolve(self, raw_path: str) -> Path | None:
        rel = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path).lstrip("/")
        try:
            path = (self.root / rel).resolve()
        except (OSError, ValueError):
            return None
        if not path.is_relative_to(self.root) or not path.is_file():
            return None
        return path

    def handle_error(self, request, client_address):
        """Clients hanging up mid-response are expected in these tests: stay quiet."""


@contextlib.contextmanager
def serve_directory(
    root: str | Path,
    drop_after_bytes: int | None = None,
    fail_first: int = 0,
    ignore_range: bool = False,
) -> Iterator[LocalHTTPServer]:
    """Serve ``root`` over HTTP on 127.0.0.1:<ephemeral> for the duration of the block."""
    server = LocalHTTPServer(root, drop_after_bytes=drop_after_bytes, fail_first=fail_first,
                             ignore_range=ignore_range)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"test-http-{server.server_address[1]}", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
