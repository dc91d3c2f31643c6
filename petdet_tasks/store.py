"""Object storage: one small interface, two backends (S3 over boto3, a local directory).

Every petdet step reads and writes through a :class:`Store` rooted at a URI:

* ``s3://bucket/prefix`` — :class:`S3Store`. The boto3 client comes from the standard AWS
  environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``, profiles, ...) unless the caller passes one (inside Airflow it is the
  Amazon provider's ``S3Hook(...).get_conn()``).
* a local path or ``file://`` URL — :class:`LocalStore`.

Keys are POSIX paths relative to the root. Both backends give the same guarantees:

* an object is never visible half-written (S3 puts are atomic; locally a temp file in the
  store's own ``.petdet/tmp`` is renamed into place). Locally a conditional put (the manifest,
  the lease) is also durable before it is visible: its temp file is fsynced before it is
  linked/renamed into place, and its folder after, so a host crash cannot leave a zero-byte
  manifest. Temp files a killed process left there are swept when a store is opened once
  they are older than :data:`TMP_MAX_AGE_S`;
* ``put_bytes(..., if_absent=True)`` is a create-only put (S3 ``IfNoneMatch="*"``, locally a
  hard link that fails when the name exists) and ``if_match=etag`` a compare-and-swap; the
  loser gets :class:`PreconditionFailed`;
* large files stream in bounded memory (multipart uploads on S3) and every upload/download
  reports the size and sha256 of what was moved; downloads verify a given sha256;
* on S3 a GET whose response body fails mid-read (a reset connection, a read timeout, fewer
  bytes than announced) is requested again a few times with backoff: botocore retries a
  failed request, not a body that breaks after the headers arrived.

Credentials are never part of a store's ``repr``, its URIs, or its error messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import random
import re
import shutil
import stat
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from petdet_tasks.errors import ConfigError

log = logging.getLogger(__name__)

HASH_CHUNK = 1 << 20
_INTERNAL = ".petdet"  # LocalStore's own temp/lock area; never listed
# a temp file or scratch folder in a LocalStore's .petdet/tmp untouched for this long was left
# by a killed process (a put streams into it and renames it away; a shard's scratch is written
# to throughout its task): swept when a store is opened
TMP_MAX_AGE_S = 24 * 3600.0


class StoreError(RuntimeError):
    """A storage operation failed; the message names the URI."""


class NotFound(StoreError, KeyError):
    """The key does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PreconditionFailed(StoreError):
    """A create-only put found the key present, or a compare-and-swap saw another ETag."""


class ChecksumError(StoreError):
    """Downloaded bytes do not have the sha256 the caller expected."""


@dataclass(frozen=True)
class FileEntry:
    """What the manifest records for one file."""

    size: int
    sha256: str

    def to_json(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str | None = None  # S3 listings carry one; local listings do not


def sha256_file(path: str | os.PathLike) -> FileEntry:
    """Size and sha256 of a local file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return FileEntry(size=size, sha256=h.hexdigest())


def _check_key(key: str) -> str:
    """A relative POSIX key with no empty, '.' or '..' component (a trailing '/' is allowed,
    for folder prefixes) and not inside the reserved ``.petdet/``. String tests only: this runs
    for every object read."""
    if (not key or key[0] == "/" or "\\" in key or "//" in key
            or key in (".", "..", _INTERNAL) or key.startswith(("./", "../", _INTERNAL + "/"))
            or "/./" in key or "/../" in key or key.endswith(("/.", "/.."))):
        if key == _INTERNAL or key.startswith(_INTERNAL + "/"):
            raise ValueError(f"invalid store key {key!r}: {_INTERNAL}/ is reserved")
        raise ValueError(
            f"invalid store key {key!r}: expected a relative POSIX path without empty, "
            "'.' or '..' components")
    return key


class Store(ABC):
    """The storage interface every step uses. Keys are relative to :attr:`root`."""

    root: str
    remote: bool  # True when each request pays network latency

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root!r})"

    def uri(self, key: str = "") -> str:
        """Absolute URI of ``key`` (or of the root), safe to log and to pass in XCom."""
        return self.root.rstrip("/") + ("/" + key if key else "")

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike, *, entry: FileEntry | None = None,
                 move: bool = False) -> FileEntry:
        """Upload a local file (streamed); returns its size and sha256.

        :param entry: the file's size and sha256 when the caller already has them (computed
            while writing it): saves reading the file once more.
        :param move: the caller gives the file up: a local store renames it into place
            instead of copying (when ``path`` is in :meth:`scratch_dir`).
        """

    def scratch_dir(self) -> Path | None:
        """A folder for files about to be put with ``move=True`` (None: any temp folder)."""
        return None

    @abstractmethod
    def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        """Write a small object; returns its ETag. See the module doc for the conditions."""

    @abstractmethod
    def get_bytes(self, key: str) -> tuple[bytes, str]:
        """(content, etag) of a small object; :class:`NotFound` if absent."""

    @abstractmethod
    def _download(self, key: str, tmp_path: Path) -> None:
        """Copy the object to a local temp path (no verification)."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (recursive, sorted by key)."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing key is not an error."""

    def exists(self, key: str) -> bool:
        try:
            self.get_bytes(key)
        except NotFound:
            return False
        return True

    def read_text(self, key: str) -> str:
        return self.get_bytes(key)[0].decode("utf-8")

    def download_file(
        self, key: str, path: str | os.PathLike, *, sha256: str | None = None
    ) -> FileEntry:
        """Download to ``path`` atomically; with ``sha256`` a mismatch raises and writes nothing."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        os.close(fd)
        tmp_path = Path(tmp)
        try:
            self._download(key, tmp_path)
            entry = sha256_file(tmp_path)
            if sha256 is not None and entry.sha256 != sha256:
                raise ChecksumError(
                    f"checksum mismatch for {self.uri(key)}: expected sha256 {sha256}, "
                    f"got {entry.sha256} ({entry.size} bytes)"
                )
            os.replace(tmp_path, path)
            return entry
        finally:
            tmp_path.unlink(missing_ok=True)

    def delete_prefix(self, prefix: str, *, keep: frozenset[str] = frozenset()) -> int:
        """Delete every object under ``prefix`` except the keys in ``keep``; returns the count."""
        if not prefix.endswith("/"):
            raise ValueError(f"delete_prefix needs a folder prefix ending in '/', got {prefix!r}")
        n = 0
        for obj in list(self.list(prefix)):
            if obj.key not in keep:
                self.delete(obj.key)
                n += 1
        return n


class LocalStore(Store):
    """A directory used as an object store (the embedded default and the demo)."""

    remote = False

    def __init__(self, root: str | os.PathLike):
        path = Path(str(root).removeprefix("file://")).expanduser().resolve()
        self.path = path
        self.root = str(path)
        self._tmp = path / _INTERNAL / "tmp"
        self._locks = path / _INTERNAL / "locks"
        self.sweep_tmp()

    def sweep_tmp(self, max_age_s: float = TMP_MAX_AGE_S) -> int:
        """Remove what killed processes left in ``.petdet/tmp``: entries (a put's temp file, a
        shard's scratch folder) with nothing in them modified for ``max_age_s``; each removal
        is logged. Housekeeping: a failure is logged, never raised. Returns the count."""
        try:
            entries = list(os.scandir(self._tmp))
        except FileNotFoundError:
            return 0
        except OSError as e:
            log.warning("could not sweep %s: %s", self._tmp, e)
            return 0
        cutoff = time.time() - max_age_s
        removed = 0
        for entry in entries:
            try:
                newest, size = _newest_mtime(entry)
                if newest >= cutoff:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            except FileNotFoundError:
                continue  # its process finished with it meanwhile
            except OSError as e:
                log.warning("could not remove the stale temp entry %s: %s", entry.path, e)
                continue
            removed += 1
            log.warning("removed %s left in the store's temp area by a killed process "
                        "(%d bytes, untouched for %.1f h)", entry.path, size,
                        (time.time() - newest) / 3600)
        return removed

    def _p(self, key: str) -> Path:
        return self.path / _check_key(key)

    def _tmpfile(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp / uuid.uuid4().hex

    @contextlib.contextmanager
    def _key_lock(self, key: str) -> Iterator[None]:
        self._locks.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha1(key.encode(), usedforsecurity=False).hexdigest()
        with open(self._locks / name, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    @staticmethod
    def _etag(st: os.stat_result) -> str:
        """Identity of one version of a file. Every write makes a new inode (temp file, then
        rename/link), so inode + mtime + size change with every version; costs no read."""
        return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"

    def scratch_dir(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        return self._tmp

    def put_file(self, key: str, path: str | os.PathLike, *, entry: FileEntry | None = None,
                 move: bool = False) -> FileEntry:
        dest = self._p(key)
        if move and entry is not None and self._tmp in Path(path).resolve().parents:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, dest)  # same filesystem: atomic, no copy
            return entry
        tmp = self._tmpfile()
        h = hashlib.sha256()
        size = 0
        try:
            with open(path, "rb") as src, open(tmp, "wb") as out:
                while chunk := src.read(HASH_CHUNK):
                    h.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return FileEntry(size=size, sha256=h.hexdigest())

    def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        dest = self._p(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._tmpfile()
        # a conditional put is the commit protocol's (the manifest, the lease): durable before
        # it is visible, so a host crash leaves it absent or whole, never empty. Other puts
        # (shards, per-image results) skip the fsync: a prefix is only read once its manifest
        # is there.
        durable = if_absent or if_match is not None
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if durable:
                    os.fsync(fd)
                etag = self._etag(os.fstat(fd))
            finally:
                os.close(fd)
            with self._key_lock(key):
                if if_absent:
                    try:
                        os.link(tmp, dest)  # atomic create-only, content already complete
                    except FileExistsError:
                        raise PreconditionFailed(f"{self.uri(key)} already exists") from None
                elif if_match is not None:
                    try:
                        current = self._etag(os.stat(dest))
                    except FileNotFoundError:
                        raise PreconditionFailed(f"{self.uri(key)} no longer exists") from None
                    if current != if_match:
                        raise PreconditionFailed(
                            f"{self.uri(key)} changed: expected ETag {if_match}, found {current}"
                        )
                    os.replace(tmp, dest)
                else:
                    os.replace(tmp, dest)
            if durable:
                fsync_dir(dest.parent)
        finally:
            tmp.unlink(missing_ok=True)
        return etag

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        # os-level calls: open, fstat, read, close — a Python file object would add an isatty
        # ioctl, two seeks and a second fstat per file (the TFRecord step reads thousands)
        try:
            fd = os.open(os.path.join(self.root, _check_key(key)), os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"{self.uri(key)} does not exist") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise NotFound(f"{self.uri(key)} does not exist")
            # asking one byte more than fstat says: a regular file's read returns it all and
            # stops at EOF; anything else (grown, shrunk, a partial read) is read on to EOF
            chunks = [os.read(fd, st.st_size + 1)]
            if len(chunks[0]) != st.st_size:
                while chunk := os.read(fd, 1 << 20):
                    chunks.append(chunk)
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        finally:
            os.close(fd)
        return data, self._etag(st)

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def _download(self, key: str, tmp_path: Path) -> None:
        try:
            shutil.copyfile(self._p(key), tmp_path)
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"{self.uri(key)} does not exist") from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if prefix:
            _check_key(prefix)  # no '..' walk out of the store (S3Store.list checks it too)
        if not self.path.is_dir():
            return
        start = self.path
        # walk only the folder the prefix names, then filter by the full prefix
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if folder:
            start = self.path / folder
            if not start.is_dir():
                return
        found = []
        for dirpath, dirnames, filenames in os.walk(start):
            rel_dir = os.path.relpath(dirpath, self.path)
            if rel_dir == ".":
                dirnames[:] = [d for d in dirnames if d != _INTERNAL]
                rel_dir = ""
            for name in filenames:
                key = f"{rel_dir}/{name}" if rel_dir else name
                if key.startswith(prefix):
                    found.append(ObjectInfo(key, os.path.getsize(os.path.join(dirpath, name))))
        yield from sorted(found, key=lambda o: o.key)

    def delete(self, key: str) -> None:
        p = self._p(key)
        p.unlink(missing_ok=True)
        # prune empty parent folders so a deleted prefix leaves nothing behind
        parent = p.parent
        while parent != self.path:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


class S3Store(Store):
    """``s3://bucket/prefix`` over a boto3 client (thread-safe; used from worker threads)."""

    remote = True  # per-request latency: worth fetching ahead in threads

    MULTIPART_THRESHOLD = 64 << 20
    MULTIPART_CHUNK = 16 << 20
    MAX_CONCURRENCY = 4  # peak upload buffer ≈ MAX_CONCURRENCY * MULTIPART_CHUNK
    GET_ATTEMPTS = 4  # requests for one get_bytes whose response body keeps failing mid-read
    GET_BACKOFF_S = 0.25  # before the 2nd request (doubling, ±50% jitter)

    def __init__(self, root: str, client=None):
        _refuse_credentials(root)
        try:
            parsed = urlparse(root)
        except ValueError as e:  # e.g. an unbalanced '[' in the bucket part
            raise ConfigError(f"invalid store URI {_redact(root)}: {e}") from None
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ConfigError(f"expected s3://bucket[/prefix], got {_redact(root)!r}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.root = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._client = client
        # a client handed in (an Airflow connection's) cannot be rebuilt in another process
        self.has_explicit_client = client is not None

    @property
    def client(self):
        if self._client is None:
            self._client = default_s3_client()
        return self._client

    def _k(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _transfer_config(self):
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=self.MULTIPART_THRESHOLD,
            multipart_chunksize=self.MULTIPART_CHUNK,
            max_concurrency=self.MAX_CONCURRENCY,
        )

    def _error(self, action: str, key: str, exc: Exception) -> StoreError:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            code = exc.response.get("Error", {}).get("Code", "")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchKey", "404", "NotFound") or status == 404 and code != "NoSuchBucket":
                return NotFound(f"{self.uri(key)} does not exist")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return PreconditionFailed(
                    f"{action} {self.uri(key)}: precondition failed ({code})")
            if code == "NoSuchBucket":
                return StoreError(
                    f"{action} {self.uri(key)}: bucket {self.bucket!r} does not exist")
            return StoreError(f"{action} {self.uri(key)} failed: {code} (HTTP {status})")
        return StoreError(f"{action} {self.uri(key)} failed: {type(exc).__name__}: {exc}")

    def put_file(self, key: str, path: str | os.PathLike, *, entry: FileEntry | None = None,
                 move: bool = False) -> FileEntry:
        k = self._k(key)
        entry = entry or sha256_file(path)
        try:
            self.client.upload_file(str(path), self.bucket, k, Config=self._transfer_config())
        except Exception as e:
            raise self._error("upload to", key, e) from e
        return entry

    def put_bytes(
        self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None
    ) -> str:
        k = self._k(key)
        kwargs = {}
        if if_absent:
            kwargs["IfNoneMatch"] = "*"
        elif if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            resp = self.client.put_object(Bucket=self.bucket, Key=k, Body=data, **kwargs)
        except Exception as e:
            raise self._error("put", key, e) from e
        return resp["ETag"]

    def get_bytes(self, key: str) -> tuple[bytes, str]:
        k = self._k(key)
        requests = 0
        while True:
            requests += 1
            try:  # botocore has retried the request itself already
                resp = self.client.get_object(Bucket=self.bucket, Key=k)
            except Exception as e:
                err = self._error("get", key, e)
                if requests > 1 and type(err) is StoreError:
                    err = StoreError(f"{err} (after {requests} requests)")
                raise err from e
            try:
                return resp["Body"].read(), resp["ETag"]
            except Exception as e:
                err = self._error("get", key, e)
                if not _is_body_read_error(e):
                    raise err from e
                if requests >= self.GET_ATTEMPTS:
                    raise StoreError(f"{err} (after {requests} requests)") from e
                delay = self.GET_BACKOFF_S * 2 ** (requests - 1) * (0.5 + random.random())
                log.warning("%s (request %d of %d); requesting it again in %.1fs", err,
                            requests, self.GET_ATTEMPTS, delay)
                with contextlib.suppress(Exception):
                    resp["Body"].close()
                time.sleep(delay)

    def exists(self, key: str) -> bool:
        k = self._k(key)
        try:
            self.client.head_object(Bucket=self.bucket, Key=k)
        except Exception as e:
            err = self._error("head", key, e)
            if isinstance(err, NotFound):
                return False
            raise err from e
        return True

    def _download(self, key: str, tmp_path: Path) -> None:
        k = self._k(key)
        try:
            self.client.download_file(self.bucket, k, str(tmp_path), Config=self._transfer_config())
        except Exception as e:
            raise self._error("download", key, e) from e

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        full = self._k(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        if prefix.endswith("/") and not full.endswith("/"):
            full += "/"
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(obj["Key"][strip:], obj["Size"], obj.get("ETag"))
        except Exception as e:
            raise self._error("list", prefix, e) from e

    def delete(self, key: str) -> None:
        k = self._k(key)
        try:
            self.client.delete_object(Bucket=self.bucket, Key=k)
        except Exception as e:
            raise self._error("delete", key, e) from e

    def ensure_bucket(self) -> None:
        """Create the bucket if it is missing (demo and tests; production buckets pre-exist)."""
        from botocore.exceptions import ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError:
            self.client.create_bucket(Bucket=self.bucket)


def _newest_mtime(entry: os.DirEntry) -> tuple[float, int]:
    """(the newest mtime in a temp entry — itself or, for a folder, anything under it — and
    its size in bytes)."""
    st = entry.stat(follow_symlinks=False)
    if not entry.is_dir(follow_symlinks=False):
        return st.st_mtime, st.st_size
    newest, size = st.st_mtime, 0
    for dirpath, _, filenames in os.walk(entry.path):
        with contextlib.suppress(FileNotFoundError):
            newest = max(newest, os.stat(dirpath).st_mtime)
        for name in filenames:
            with contextlib.suppress(FileNotFoundError):
                fst = os.stat(os.path.join(dirpath, name), follow_symlinks=False)
                newest, size = max(newest, fst.st_mtime), size + fst.st_size
    return newest, size


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a folder's entries (a file just linked/renamed into it) durable; a filesystem that
    cannot fsync a folder is left as it is."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _is_body_read_error(exc: Exception) -> bool:
    """An S3 response whose body broke off mid-read (a reset or closed connection, a read
    timeout, fewer bytes than its Content-Length): worth another GET. A ClientError (the
    server's answer: 404, 403, ...) is not."""
    import http.client

    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError

    if isinstance(exc, ClientError):
        return False
    if isinstance(exc, HTTPClientError | IncompleteReadError | http.client.IncompleteRead
                  | ConnectionError | TimeoutError):
        return True
    try:
        from urllib3.exceptions import ProtocolError, ReadTimeoutError
    except ImportError:  # pragma: no cover - urllib3 comes with botocore
        return False
    return isinstance(exc, ProtocolError | ReadTimeoutError)


def default_s3_client():
    """A boto3 S3 client from the standard AWS environment, with retries and path-style URLs.

    ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` select a non-AWS server (SeaweedFS, MinIO);
    credentials come from the usual chain and are never logged.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 5, "mode": "standard"},
        s3={"addressing_style": "path"},
        max_pool_connections=32,
    )
    return boto3.session.Session().client(
        "s3", region_name=os.environ.get("AWS_DEFAULT_REGION") or "us-east-1", config=config
    )


_URI_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def _redact(root: str) -> str:
    from petdet_tasks.fetch import redact_url  # fetch is heavy to import; only on errors

    return redact_url(root)


def split_authority(uri: str) -> tuple[str, str, str] | None:
    """``scheme://``, the authority and the rest of a URI, by its text alone (no parsing that
    can fail: safe on the malformed URIs whose secrets must not be echoed); None without a
    scheme."""
    scheme = _URI_SCHEME.match(uri)
    if scheme is None:
        return None
    rest = uri[scheme.end():]
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    return scheme.group(0), rest[:end], rest[end:]


def _refuse_credentials(root: str) -> None:
    """A URI with a userinfo part (``s3://KEY:SECRET@bucket``) is refused with a
    :class:`~petdet_tasks.errors.ConfigError` showing it redacted: a store's URI is logged and
    passed around (XCom, manifests), so it must never carry a secret."""
    parts = split_authority(root)
    if parts is not None and "@" in parts[1]:
        raise ConfigError(
            f"store URI {_redact(root)} has credentials in it (user:password@): refused, as "
            "a store URI is logged and recorded; give S3 credentials through the AWS "
            "environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, a profile) or an Airflow "
            "connection")


def open_store(root: str | os.PathLike, *, s3_client=None) -> Store:
    """The store for a root URI: ``s3://...`` → S3Store, a ``file://`` URL or a local path →
    LocalStore. A URI with credentials in it or another scheme is a
    :class:`~petdet_tasks.errors.ConfigError` (whose message never shows a secret)."""
    root = str(root)
    scheme = _URI_SCHEME.match(root)
    if scheme is None:
        return LocalStore(root)
    _refuse_credentials(root)
    name = scheme.group(1).lower()
    if name == "s3":
        return S3Store(root, client=s3_client)
    if name == "file":
        return LocalStore(root[scheme.end():])
    raise ConfigError(f"unsupported store URI scheme {name + '://'!r}: use s3://bucket/prefix "
                      "or a local path")
