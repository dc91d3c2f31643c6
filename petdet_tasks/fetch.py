"""Streaming downloads with resume, verification, retries and progress logging.

Everything here is standard library only (``urllib``, ``hashlib``).

Guarantees of :func:`fetch`:

* Memory use is bounded by ``chunk_size`` whatever the file size: the body is streamed to
  ``<dest>.part`` while it is hashed.
* ``dest`` only ever appears complete: it is created by an atomic :func:`os.replace` of the
  verified ``.part`` file and never exists because of a failed or unverified download.
* A failed network download keeps its ``.part`` file; the next call (in this or another
  process) resumes from it with an HTTP ``Range`` request. A verification failure deletes it.
* Credentials embedded in a URL (``https://user:pass@host/...``) are sent as HTTP basic auth
  but never appear in log lines or exception messages.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import http.client
import importlib.metadata
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from petdet_tasks.store import fsync_dir, split_authority

__all__ = [
    "ChecksumMismatch",
    "FetchError",
    "FetchResult",
    "fetch",
    "is_remote",
    "join_source",
    "parse_sha256sums",
    "read_text",
    "redact_url",
]

_LOG = logging.getLogger(__name__)

#: HTTP statuses that are worth retrying (besides every 5xx).
RETRY_STATUSES = frozenset({408, 425, 429})
#: Upper bound of one backoff sleep, in seconds.
MAX_BACKOFF_S = 60.0

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_CONTENT_RANGE_RE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE_RE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Errors and results


class FetchError(RuntimeError):
    """A download failed: retries exhausted, a non-retryable HTTP status, or a bad source.

    The message names the (credential-redacted) URL or path and the cause. ``url`` holds the
    redacted source and ``status`` the last HTTP status, when there was one.
    """

    def __init__(self, message: str, *, url: str | None = None, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class ChecksumMismatch(FetchError):
    """The downloaded bytes do not match the expected sha256 and/or size.

    The message names the source, the destination, the expected and the actual sha256, and
    both sizes when they differ. When this is raised neither ``dest`` nor its ``.part`` file
    has been left behind by the call.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        path: Path | None = None,
        expected_sha256: str | None = None,
        actual_sha256: str | None = None,
        expected_size: int | None = None,
        actual_size: int | None = None,
    ):
        super().__init__(message, url=url)
        self.path = path
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256
        self.expected_size = expected_size
        self.actual_size = actual_size


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` produced.

    ``path`` is the final destination, ``size``/``sha256`` describe its bytes (always
    computed, verified against the expectations when given), ``attempts`` counts the
    requests made (1 when the first one succeeded; always 1 for local sources) and
    ``resumed_from`` is the number of bytes already on disk when the last, successful
    attempt started (0 when it downloaded from the beginning).
    """

    path: Path
    size: int
    sha256: str
    attempts: int
    resumed_from: int


class _Retryable(Exception):
    """Internal: a transient failure of one attempt; ``retry_after`` from the server if any."""

    def __init__(self, cause: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(cause)
        self.cause = cause
        self.status = status
        self.retry_after = retry_after


# --------------------------------------------------------------------------------------------
# Source helpers


def is_remote(source: str) -> bool:
    """True when ``source`` is an ``http://`` or ``https://`` URL (case-insensitive scheme)."""
    return urllib.parse.urlsplit(str(source)).scheme.lower() in ("http", "https")


def redact_url(source: str) -> str:
    """``source`` with any URL userinfo (``user:password@``) replaced by ``***@``.

    Plain paths and URLs without userinfo are returned unchanged, so this is safe to apply
    to anything that is about to be logged or put into an exception message. It fails safe:
    a URL that ``urllib`` cannot parse (``http://u:p@host]/x``) still has everything up to the
    last ``@`` of its authority replaced, and a string that is not even that but holds an
    ``@`` is not returned at all.
    """
    source = str(source)
    try:
        parts = urllib.parse.urlsplit(source)
    except ValueError:
        split = split_authority(source)
        if split is None:
            return "<unparsable URL>" if "@" in source else source
        scheme, authority, rest = split
        if "@" not in authority:
            return source
        return f"{scheme}***@{authority.rpartition('@')[2]}{rest}"
    if "@" not in parts.netloc:
        return source
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"***@{host}"))


def _split_credentials(url: str) -> tuple[str, str | None]:
    """Return (url without userinfo, ``Authorization`` header value or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    auth = "Basic " + base64.b64encode(token.encode("utf-8")).decode("ascii")
    return urllib.parse.urlunsplit(parts._replace(netloc=host)), auth


def _local_path(source: str) -> Path:
    """The filesystem path of a ``file://`` URL or a plain path."""
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() == "file":
        if parts.netloc not in ("", "localhost"):
            raise FetchError(
                f"{redact_url(source)}: file:// URLs with a remote host are not supported",
                url=redact_url(source),
            )
        return Path(urllib.request.url2pathname(parts.path))
    return Path(source)


def _check_scheme(source: str) -> None:
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    # A one-letter "scheme" is a Windows drive letter, i.e. a plain path.
    if len(scheme) > 1 and scheme not in ("http", "https", "file"):
        raise FetchError(
            f"{redact_url(source)}: unsupported URL scheme {scheme!r} "
            "(expected http, https, file or a local path)",
            url=redact_url(source),
        )


def join_source(base: str, name: str) -> str:
    """The location of file ``name`` inside ``base``.

    ``base`` may be an ``http(s)://`` URL or a ``file://`` URL (with or without a trailing
    slash; a query string is kept) or a plain local directory. ``name`` is a relative
    POSIX-style name; it is percent-encoded for URLs. Raises ValueError for an empty or
    absolute ``name`` or one with a ``..`` component, so the result is always inside ``base``.
    """
    name = str(name)
    if not name or name.startswith("/") or "\\" in name:
        raise ValueError(f"join_source: name must be a relative POSIX path, got {name!r}")
    if ".." in name.split("/"):
        raise ValueError(f"join_source: name must not contain '..', got {name!r}")
    base = str(base)
    parts = urllib.parse.urlsplit(base)
    if is_remote(base) or parts.scheme.lower() == "file":
        path = parts.path.rstrip("/") + "/" + urllib.parse.quote(name)
        return urllib.parse.urlunsplit(parts._replace(path=path, fragment=""))
    return os.path.join(base, *name.split("/"))


def parse_sha256sums(text: str) -> dict[str, str]:
    """Parse a ``sha256sum`` listing into ``{name: lowercase hex digest}``.

    Accepted lines: ``<hex>  name`` (text mode), ``<hex> *name`` (binary mode), GNU's
    backslash-escaped form (``\\<hex>  na\\nme``) and BSD's ``SHA256 (name) = <hex>``. Blank
    lines and lines starting with ``#`` are ignored, a leading ``./`` of a name is dropped.
    Raises ValueError naming the line number and content for anything else, and for a name
    listed twice with different digests.
    """
    result: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\\?)([0-9a-fA-F]{64})[ \t]+\*?(\S.*)", line)
        if m:
            escaped, digest, name = m.groups()
            if escaped:
                name = _unescape_sha256sum_name(name)
        else:
            m = re.fullmatch(r"SHA256 ?\((.+)\) ?= ?([0-9a-fA-F]{64})", line)
            if not m:
                shown = raw if len(raw) <= 200 else raw[:200] + "..."
                raise ValueError(f"SHA256SUMS line {lineno}: malformed line {shown!r}")
            name, digest = m.groups()
        if name.startswith("./"):
            name = name[2:]
        digest = digest.lower()
        if result.get(name, digest) != digest:
            raise ValueError(
                f"SHA256SUMS line {lineno}: {name!r} listed again with a different digest"
            )
        result[name] = digest
    return result


def _unescape_sha256sum_name(name: str) -> str:
    out, i = [], 0
    while i < len(name):
        c = name[i]
        if c == "\\" and i + 1 < len(name):
            nxt = name[i + 1]
            out.append({"n": "\n", "r": "\r", "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


# --------------------------------------------------------------------------------------------
# HTTP plumbing


@functools.cache
def _user_agent() -> str:
    try:
        version = importlib.metadata.version("petdet")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    return f"petdet/{version}"


def _request(url: str, auth: str | None, *, range_from: int = 0) -> urllib.request.Request:
    req = urllib.request.Request(url, method="GET")
    req.add_header("User-Agent", _user_agent())
    req.add_header("Accept-Encoding", "identity")
    if range_from:
        req.add_header("Range", f"bytes={range_from}-")
    if auth:
        # Unredirected: never forwarded to another host by a redirect.
        req.add_unredirected_header("Authorization", auth)
    return req


def _describe(exc: BaseException) -> str:
    """One line for a network exception, without URLs (ours are credential-free anyway)."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = exc.reason
        if isinstance(reason, BaseException):
            return f"{type(reason).__name__}: {reason}"
        return f"URLError: {reason}"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    if value is None:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None  # an HTTP date: use our own backoff


def _backoff(backoff_s: float, retry_index: int, retry_after: float | None) -> float:
    delay = backoff_s * (2**retry_index)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, MAX_BACKOFF_S)


# --------------------------------------------------------------------------------------------
# Progress


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class _Progress:
    """Rate-limited progress lines: done / total, percent, MB/s, ETA."""

    def __init__(self, log: logging.Logger, label: str, every_s: float):
        self.log = log
        self.label = label
        self.every_s = every_s
        self.total: int | None = None
        self.started = time.monotonic()
        self._last = self.started
        self._attempt_start = self.started
        self._attempt_offset = 0
        self.transferred = 0  # bytes received by this call, all attempts together

    def begin_attempt(self, offset: int, total: int | None) -> None:
        self.total = total
        self._attempt_start = time.monotonic()
        self._attempt_offset = offset

    def _rate(self, done: int, now: float) -> float:
        elapsed = now - self._attempt_start
        return (done - self._attempt_offset) / elapsed if elapsed > 0 else 0.0

    def update(self, done: int, received: int) -> None:
        """Record ``received`` new bytes; ``done`` is the file's size so far."""
        self.transferred += received
        now = time.monotonic()
        if now - self._last < self.every_s:
            return
        self._last = now
        rate = self._rate(done, now)
        if self.total:
            pct = 100.0 * done / self.total
            eta = _duration((self.total - done) / rate) if rate > 0 else "?"
            self.log.info(
                "%s: %s / %s (%.1f%%), %.2f MB/s, ETA %s",
                self.label, _human(done), _human(self.total), pct, rate / 1e6, eta,
            )
        else:
            self.log.info("%s: %s / ?, %.2f MB/s", self.label, _human(done), rate / 1e6)

    def finish(self, size: int, sha256: str, attempts: int, resumed_from: int) -> None:
        elapsed = time.monotonic() - self.started
        rate = self.transferred / elapsed if elapsed > 0 else 0.0
        self.log.info(
            "%s: done, %s (100%%), %s transferred in %s (%.2f MB/s), sha256 %s, "
            "%d attempt(s), resumed from byte %d",
            self.label, _human(size), _human(self.transferred), _duration(elapsed), rate / 1e6,
            sha256, attempts, resumed_from,
        )


# --------------------------------------------------------------------------------------------
# The part file and its running digest


class _Part:
    """``dest.part`` plus a sha256 state that covers exactly its current bytes."""

    def __init__(self, path: Path):
        self.path = path
        self.hasher = hashlib.sha256()
        self.hashed = -1  # bytes covered by ``hasher``; -1: unknown, rehash before use

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def sync_hash(self, chunk_size: int) -> int:
        """Make the digest cover the part's current bytes (rehash if needed); return its size."""
        size = self.size()
        if size != self.hashed:
            self.hasher = hashlib.sha256()
            self.hashed = 0
            if size:
                buf = bytearray(chunk_size)
                view = memoryview(buf)
                with open(self.path, "rb") as f:
                    while n := f.readinto(buf):
                        self.hasher.update(view[:n])
                        self.hashed += n
        return size

    def reset(self) -> None:
        """Empty the part file and the digest."""
        with open(self.path, "wb"):
            pass
        self.hasher = hashlib.sha256()
        self.hashed = 0

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.hasher = hashlib.sha256()
        self.hashed = -1


# --------------------------------------------------------------------------------------------
# fetch


def fetch(
    source: str,
    dest: str | os.PathLike,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    retries: int = 5,
    backoff_s: float = 1.0,
    timeout_s: float = 60.0,
    chunk_size: int = 1 << 20,
    progress_every_s: float = 10.0,
    log: logging.Logger | None = None,
) -> FetchResult:
    """Download (or copy) ``source`` to ``dest`` and verify it.

    ``source`` is an ``http(s)://`` URL, a ``file://`` URL or a local path. The bytes go to
    ``<dest>.part`` in ``chunk_size`` pieces while being hashed; the parent directory of
    ``dest`` is created if needed.

    HTTP specifics: an existing ``.part`` (from an earlier attempt or process) is resumed with
    ``Range: bytes=<size>-``; a ``206`` whose ``Content-Range`` starts elsewhere, or a ``200``,
    restarts from byte 0; a ``416`` when the part already has ``expected_size`` bytes (or
    the size the server reports) counts as complete. Dropped connections, short bodies,
    timeouts, URL errors, 5xx, 408, 425 and 429 are retried up to ``retries`` times with
    exponential backoff ``backoff_s * 2**i`` capped at 60 s (a larger ``Retry-After`` wins);
    any other 4xx raises :class:`FetchError` at once. Exhausted retries raise
    :class:`FetchError` and keep the ``.part`` for a later resume. A part larger than
    ``expected_size`` is discarded first.

    Verification: the size against ``expected_size`` and the sha256 against
    ``expected_sha256`` (when given). On mismatch the ``.part`` is deleted and
    :class:`ChecksumMismatch` is raised; ``dest`` is not created (a pre-existing ``dest`` is
    left untouched). On success the part is fsync'ed and atomically renamed to ``dest``.

    Progress is logged at INFO on ``log`` (default logger ``petdet_tasks.fetch``) at most
    every ``progress_every_s`` seconds and once at the end; each retry logs a WARNING with
    its cause and resume offset. URL credentials are redacted everywhere. ``timeout_s``
    bounds connecting and each socket read, not the whole download. Local filesystem errors
    while writing (e.g. a full disk) are not retried and propagate as OSError.
    """
    log = log or _LOG
    source = os.fspath(source)
    if expected_sha256 is not None:
        if not _SHA256_RE.match(expected_sha256):
            raise ValueError(f"expected_sha256 is not a sha256 hex digest: {expected_sha256!r}")
        expected_sha256 = expected_sha256.lower()
    if expected_size is not None and expected_size < 0:
        raise ValueError(f"expected_size must be >= 0, got {expected_size}")
    if retries < 0 or chunk_size <= 0:
        raise ValueError("retries must be >= 0 and chunk_size > 0")
    _check_scheme(source)

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _Part(dest.with_name(dest.name + ".part"))
    shown = redact_url(source)
    progress = _Progress(log, f"fetch {shown}", progress_every_s)

    if is_remote(source):
        attempts, resumed_from = _fetch_http(
            source, part, expected_size=expected_size, retries=retries, backoff_s=backoff_s,
            timeout_s=timeout_s, chunk_size=chunk_size, progress=progress, log=log,
        )
    else:
        _copy_local(source, part, chunk_size=chunk_size, progress=progress)
        attempts, resumed_from = 1, 0

    size = part.sync_hash(chunk_size)
    digest = part.hasher.hexdigest()
    size_bad = expected_size is not None and size != expected_size
    sha_bad = expected_sha256 is not None and digest != expected_sha256
    if size_bad or sha_bad:
        part.discard()
        details = [f"expected sha256 {expected_sha256 or '(not given)'}", f"actual sha256 {digest}"]
        if size_bad:
            details.append(f"expected size {expected_size} bytes, actual size {size} bytes")
        if resumed_from:
            details.append(f"download resumed from byte {resumed_from}; partial file discarded")
        raise ChecksumMismatch(
            f"{shown} -> {dest}: {'size' if size_bad and not sha_bad else 'checksum'} mismatch: "
            + "; ".join(details),
            url=shown, path=dest, expected_sha256=expected_sha256, actual_sha256=digest,
            expected_size=expected_size, actual_size=size,
        )

    with open(part.path, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(part.path, dest)
    fsync_dir(dest.parent)
    progress.finish(size, digest, attempts, resumed_from)
    return FetchResult(path=dest, size=size, sha256=digest, attempts=attempts,
                       resumed_from=resumed_from)


def _copy_local(source: str, part: _Part, *, chunk_size: int, progress: _Progress) -> None:
    path = _local_path(source)
    try:
        src = open(path, "rb")
    except OSError as exc:
        raise FetchError(
            f"{redact_url(source)}: cannot read: {type(exc).__name__}: {exc.strerror or exc}",
            url=redact_url(source),
        ) from exc
    with src:
        try:
            total = os.fstat(src.fileno()).st_size
        except OSError:
            total = None
        progress.begin_attempt(0, total)
        part.reset()
        buf = bytearray(chunk_size)
        view = memoryview(buf)
        done = 0
        with open(part.path, "wb") as out:
            while n := src.readinto(buf):
                out.write(view[:n])
                part.hasher.update(view[:n])
                part.hashed += n
                done += n
                progress.update(done, n)


def _fetch_http(
    source: str,
    part: _Part,
    *,
    expected_size: int | None,
    retries: int,
    backoff_s: float,
    timeout_s: float,
    chunk_size: int,
    progress: _Progress,
    log: logging.Logger,
) -> tuple[int, int]:
    """Run the attempt/retry loop; return (attempts, resumed_from). The part is complete."""
    url, auth = _split_credentials(source)
    shown = redact_url(source)
    opener = urllib.request.build_opener()
    buf = bytearray(chunk_size)
    for attempt in range(retries + 1):
        offset = part.sync_hash(chunk_size)
        if expected_size is not None and offset > expected_size:
            log.warning(
                "%s: partial file %s has %d bytes, more than the expected %d; starting over",
                shown, part.path, offset, expected_size,
            )
            part.discard()
            offset = part.sync_hash(chunk_size)
        try:
            resumed_from = _attempt(
                url, auth, shown, part, offset, opener=opener, buf=buf,
                expected_size=expected_size, timeout_s=timeout_s, progress=progress, log=log,
            )
            return attempt + 1, resumed_from
        except _Retryable as exc:
            if attempt >= retries:
                raise FetchError(
                    f"GET {shown} failed after {attempt + 1} attempt(s): {exc.cause}",
                    url=shown, status=exc.status,
                ) from exc.__cause__
            delay = _backoff(backoff_s, attempt, exc.retry_after)
            log.warning(
                "%s: attempt %d/%d failed (%s); retrying in %.2fs, resuming from byte %d",
                shown, attempt + 1, retries + 1, exc.cause, delay, part.size(),
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _attempt(
    url: str,
    auth: str | None,
    shown: str,
    part: _Part,
    offset: int,
    *,
    opener: urllib.request.OpenerDirector,
    buf: bytearray,
    expected_size: int | None,
    timeout_s: float,
    progress: _Progress,
    log: logging.Logger,
) -> int:
    """One GET. Returns the offset it resumed from once the part is complete, or raises."""
    try:
        resp = opener.open(_request(url, auth, range_from=offset), timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        with exc:
            status, reason, headers = exc.code, exc.reason, exc.headers
        if status == 416 and offset > 0:
            m = _UNSATISFIED_RANGE_RE.match((headers or {}).get("Content-Range", "") or "")
            remote_size = int(m.group(1)) if m else None
            if (expected_size is not None and offset == expected_size) or (
                expected_size is None and remote_size == offset
            ):
                log.info("%s: partial file already complete (%d bytes)", shown, offset)
                return offset
            part.discard()
            raise _Retryable(
                f"HTTP 416 for a resume from byte {offset} (remote size {remote_size}); "
                "discarded the partial file", status=416,
            ) from exc
        if status >= 500 or status in RETRY_STATUSES:
            raise _Retryable(
                f"HTTP {status} {reason}", status=status, retry_after=_retry_after(headers)
            ) from exc
        raise FetchError(f"GET {shown}: HTTP {status} {reason}", url=shown, status=status) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # URLError, timeouts, refused/reset connections, bad status lines, ...
        if isinstance(exc, ValueError) and not isinstance(exc, http.client.HTTPException):
            raise FetchError(f"GET {shown}: invalid request: {exc}", url=shown) from None
        raise _Retryable(_describe(exc)) from exc

    with resp:
        status = resp.status
        length_header = resp.headers.get("Content-Length")
        body_len = int(length_header) if length_header and length_header.isdigit() else None
        if status == 206:
            cr = resp.headers.get("Content-Range", "")
            m = _CONTENT_RANGE_RE.match(cr)
            if not m or int(m.group(1)) != offset:
                part.discard()
                raise _Retryable(
                    f"asked for bytes {offset}- but got Content-Range {cr!r}; "
                    "discarded the partial file", status=206,
                )
            start, end, total = int(m.group(1)), int(m.group(2)), m.group(3)
            total_size = int(total) if total != "*" else None
            if body_len is None:
                body_len = end - start + 1
        elif status == 200:
            if offset:
                log.info("%s: server ignored the Range request; downloading from byte 0", shown)
            part.reset()
            offset = 0
            total_size = body_len
        else:
            raise FetchError(
                f"GET {shown}: unexpected HTTP {status} {resp.reason}", url=shown, status=status
            )

        progress.begin_attempt(offset, total_size if total_size is not None else expected_size)
        view = memoryview(buf)
        received = 0
        with open(part.path, "ab") as out:
            while True:
                try:
                    n = resp.readinto(buf)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retryable(
                        f"{_describe(exc)} after {received} body bytes", status=status
                    ) from exc
                if not n:
                    break
                out.write(view[:n])
                part.hasher.update(view[:n])
                part.hashed += n
                received += n
                progress.update(offset + received, n)
        if body_len is not None and received < body_len:
            raise _Retryable(
                f"connection closed after {received} of {body_len} body bytes", status=status
            )
    return offset


# --------------------------------------------------------------------------------------------
# read_text


def read_text(
    source: str,
    *,
    timeout_s: float = 30.0,
    retries: int = 3,
    backoff_s: float = 1.0,
    max_bytes: int = 16 << 20,
) -> str | None:
    """Read a small text file (e.g. ``SHA256SUMS``) from an http(s)/file URL or a path.

    Returns the UTF-8 decoded text (a BOM is dropped), or None when the file does not exist
    (HTTP 404/410, missing local file). Transient HTTP failures (as in :func:`fetch`) are
    retried ``retries`` times; anything else, a body over ``max_bytes`` or invalid UTF-8
    raises :class:`FetchError`. Credentials in the URL are redacted from messages.
    """
    source = os.fspath(source)
    shown = redact_url(source)
    _check_scheme(source)
    if not is_remote(source):
        path = _local_path(source)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise FetchError(f"{shown}: cannot read: {exc}", url=shown) from exc
        return _decode(data, shown, max_bytes)

    url, auth = _split_credentials(source)
    opener = urllib.request.build_opener()
    for attempt in range(retries + 1):
        try:
            try:
                resp = opener.open(_request(url, auth), timeout=timeout_s)
            except urllib.error.HTTPError as exc:
                with exc:
                    status, reason, headers = exc.code, exc.reason, exc.headers
                if status in (404, 410):
                    return None
                if status >= 500 or status in RETRY_STATUSES:
                    raise _Retryable(
                        f"HTTP {status} {reason}", status=status, retry_after=_retry_after(headers)
                    ) from exc
                raise FetchError(
                    f"GET {shown}: HTTP {status} {reason}", url=shown, status=status
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Retryable(_describe(exc)) from exc
            with resp:
                length = resp.headers.get("Content-Length")
                try:
                    data = resp.read(max_bytes + 1)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Retryable(_describe(exc)) from exc
            if length and length.isdigit() and len(data) < int(length) <= max_bytes:
                raise _Retryable(f"connection closed after {len(data)} of {length} bytes")
            return _decode(data, shown, max_bytes)
        except _Retryable as exc:
            if attempt >= retries:
                raise FetchError(
                    f"GET {shown} failed after {attempt + 1} attempt(s): {exc.cause}",
                    url=shown, status=exc.status,
                ) from exc.__cause__
            delay = _backoff(backoff_s, attempt, exc.retry_after)
            _LOG.warning("%s: %s; retrying in %.2fs", shown, exc.cause, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _decode(data: bytes, shown: str, max_bytes: int) -> str:
    if len(data) > max_bytes:
        raise FetchError(
            f"{shown}: larger than {max_bytes} bytes; not a small text file", url=shown
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FetchError(f"{shown}: not UTF-8 text: {exc}", url=shown) from None

