"""The idempotency protocol: fingerprinted prefixes, a lease, and ``_MANIFEST.json`` written last.

:func:`run_step` is how every step publishes output:

1. Compute the fingerprint → prefix. If ``<prefix>_MANIFEST.json`` exists (and ``force`` is off)
   log a cache hit and return the recorded outputs: no work, no upload.
2. Take the prefix's lease (``_LEASE.json``, a create-only put). A writer that finds a live
   lease waits for the holder's manifest and returns it as a cache hit; a lease whose holder
   stopped renewing it (the process died) is taken over with a compare-and-swap on its ETag —
   once it expires, or at once when the holder ran on this machine and its process is gone.
   So two writers racing for one prefix end with one complete, consistent output — the second
   never writes a byte. A lease that does not parse (a crash mid-write) counts as expired.
   The holder fences itself: once its last successful renewal is older than
   :data:`LEASE_FENCE_FRACTION` of the TTL (renewals failing: a store outage, a partition) it
   refuses further writes and the commit with :class:`LeaseLost`, before another writer may
   take the lease over.
3. A prefix without a manifest is incomplete: nobody reads it; the new holder deletes what is
   there (unless the step resumes from it, as training does) and writes afresh. A manifest
   that does not parse is no commit either: readers report it (:class:`UnreadableManifest`,
   naming it) and the step's next writer logs a warning, removes it and recomputes.
4. The step body writes its files through :class:`StepWriter`, which records size + sha256.
5. Verify: every recorded file is listed in the store with its size.
6. Write the manifest with a create-only put — last — then drop the lease. A failure anywhere
   before that leaves no manifest: the output does not exist for anyone.

The manifest records every file (size, sha256), the config, the input fingerprints, the code
version, the writer and timings, plus the step's small JSON ``outputs``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from petdet_tasks import __version__
from petdet_tasks.errors import ConfigError, PermanentError
from petdet_tasks.layout import (
    PLAN,
    canonical_json,
    fingerprint,
    lease_key,
    manifest_key,
    split_output_uri,
    step_prefix,
)
from petdet_tasks.store import (
    FileEntry,
    NotFound,
    PreconditionFailed,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

DEFAULT_LEASE_TTL_S = 120.0
DEFAULT_WAIT_TIMEOUT_S = 6 * 3600.0
# a holder whose last successful renewal is older than this fraction of the TTL stops writing
# (LeaseLost): the rest of the TTL is the margin for a write already under way to land before
# another writer may take the expired lease over
LEASE_FENCE_FRACTION = 2 / 3


class LeaseLost(StoreError):
    """Another writer took this prefix's lease while we were writing; nothing was committed."""


class UnreadableManifest(PermanentError, StoreError):
    """A prefix's ``_MANIFEST.json`` exists but is not a JSON object (truncated by a host crash,
    edited by hand): not a committed output. Retrying the reader cannot mend it; rerunning the
    step that writes it does (it treats the prefix as incomplete and recomputes it)."""

    def __init__(self, message: str, *, what: str = ""):
        super().__init__(message)
        self.what = what or message  # "<manifest URI> is unreadable (<why>)"


class PlanMismatch(PermanentError, StoreError):
    """A recorded plan (``_plan.json``) that does not describe the prefix it is under: a retry
    reads the same record, so only running the plan task again mends it."""


@dataclass
class StepResult:
    """What a step returns (and what its operator pushes to XCom, via :meth:`to_xcom`)."""

    step: str
    uri: str
    fingerprint: str
    cache_hit: bool
    manifest: dict

    @property
    def outputs(self) -> dict:
        return self.manifest.get("outputs", {})

    def to_xcom(self) -> dict:
        """Small JSON: URI, fingerprint, cache flag and the step's few summary numbers."""
        return {
            "step": self.step,
            "uri": self.uri,
            "fingerprint": self.fingerprint,
            "cache_hit": self.cache_hit,
            **self.outputs,
        }


@dataclass
class StepWriter:
    """Handed to a step body: writes files under the prefix and records them for the manifest."""

    store: Store
    prefix: str
    files: dict[str, FileEntry] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _lease: _Lease | None = field(default=None, repr=False)

    def uri(self, rel: str = "") -> str:
        return self.store.uri(self.prefix + rel)

    def _record(self, rel: str, entry: FileEntry) -> FileEntry:
        self._check_lease()
        with self._lock:
            self.files[rel] = entry
        return entry

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check(self.uri())

    def register(self, rel: str, entry: FileEntry) -> FileEntry:
        """Record a file another process already wrote under the prefix (mapped shard tasks);
        it is verified against the store's listing before commit like every other file."""
        self._check_rel(rel)
        return self._record(rel, entry)

    def put_file(self, rel: str, path: str | os.PathLike) -> FileEntry:
        self._check_rel(rel)
        self._check_lease()
        return self._record(rel, self.store.put_file(self.prefix + rel, path))

    def put_bytes(self, rel: str, data: bytes) -> FileEntry:
        import hashlib

        self._check_rel(rel)
        self._check_lease()
        self.store.put_bytes(self.prefix + rel, data)
        return self._record(rel, FileEntry(len(data), hashlib.sha256(data).hexdigest()))

    def put_json(self, rel: str, value: Any) -> FileEntry:
        return self.put_bytes(rel, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def put_tree(self, local_dir: str | os.PathLike, rel_prefix: str = "", *,
                 workers: int = 8) -> int:
        """Upload every file under ``local_dir`` (in parallel, progress logged at most every
        10 s); returns the count."""
        from concurrent.futures import ThreadPoolExecutor

        base = Path(local_dir)
        paths = sorted(p for p in base.rglob("*") if p.is_file())
        total, done, last = len(paths), 0, time.monotonic()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.put_file,
                                   rel_prefix + p.relative_to(base).as_posix(), p)
                       for p in paths]
            for fut in futures:
                fut.result()
                done += 1
                if time.monotonic() - last > 10 or done == total:
                    log.info("uploaded %d/%d files to %s", done, total, self.uri(rel_prefix))
                    last = time.monotonic()
        return total

    @staticmethod
    def _check_rel(rel: str) -> None:
        if rel.startswith("_MANIFEST") or rel.startswith("_LEASE"):
            raise ValueError(f"{rel!r} is reserved for the commit protocol")


def _pid_namespace() -> str | None:
    """This process's PID namespace (Linux), so that a pid is only compared within it."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _holder_is_gone(holder: dict) -> bool:
    """The lease's holder ran on this machine, in this PID namespace, and its process no longer
    exists (killed, crashed, its container restarted): its lease can be taken over now, rather
    than after its expiry — a killed training run resumes at once when rerun on the same
    worker. Anything uncertain (another host, another namespace, a pid that exists, perhaps
    reused) keeps the wait for the expiry; and a holder wrongly judged gone would still not
    commit, since its next renewal finds the lease changed."""
    ns = _pid_namespace()
    pid = holder.get("pid")
    if (ns is None or holder.get("pid_namespace") != ns
            or holder.get("host") != socket.gethostname()
            or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0
            or pid == os.getpid()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists, owned by another user
        return False
    return _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    """A process that exited but was not reaped yet (its parent is still running)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


class _Lease:
    """A renewable, expiring claim on a prefix, kept in ``<prefix>_LEASE.json``."""

    def __init__(self, store: Store, prefix: str, ttl_s: float, run_id: str | None):
        self.store = store
        self.key = lease_key(prefix)
        self.ttl_s = ttl_s
        self.owner = {
            "id": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "run_id": run_id,
        }
        self.etag: str | None = None
        self.lost = threading.Event()
        self.lost_why = "was taken over by another writer"
        # monotonic time at which the body of the last successful acquire/renewal was made
        # (its expires_at counts from then): the fence counts from it
        self._renewed_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        return canonical_json({**self.owner, "renewed_at": now, "expires_at": now + self.ttl_s}
                              ).encode()

    def _put(self, **conditions) -> None:
        made = time.monotonic()
        self.etag = self.store.put_bytes(self.key, self._body(), **conditions)
        self._renewed_at = made

    def try_acquire(self) -> dict | None:
        """Acquire; returns None on success, else the current holder's lease record."""
        try:
            self._put(if_absent=True)
            return None
        except PreconditionFailed:
            pass
        try:
            data, etag = self.store.get_bytes(self.key)
        except NotFound:
            return {"expires_at": 0, "id": None, "released": True}  # released meanwhile: retry
        holder, unreadable = _parse_lease(data)
        expired = unreadable is None and holder["expires_at"] < time.time()
        if unreadable is not None or expired or _holder_is_gone(holder):
            try:
                self._put(if_match=etag)
            except (PreconditionFailed, NotFound):
                return {"expires_at": 0, "id": None, "released": True}
            if unreadable is not None:
                log.warning("took over the unreadable lease on %s (%s): taken for an abandoned "
                            "one", self.store.uri(self.key), unreadable)
            else:
                log.warning(
                    "took over the %s lease on %s from %s (pid %s on %s, run %s)",
                    "expired" if expired else "dead process's", self.store.uri(self.key),
                    holder.get("id"), holder.get("pid"), holder.get("host"),
                    holder.get("run_id"),
                )
            return None
        return holder

    def start_renewing(self) -> None:
        self._thread = threading.Thread(target=self._renew_loop, name="petdet-lease", daemon=True)
        self._thread.start()

    def _fenced(self) -> bool:
        """True (and the lease marked lost) once the last successful renewal is too old for
        this holder to go on writing: another writer may take the lease over soon."""
        if self.lost.is_set():
            return True
        if self._renewed_at is None:
            return False
        age = time.monotonic() - self._renewed_at
        if age < self.ttl_s * LEASE_FENCE_FRACTION:
            return False
        self.lost_why = (f"could not be renewed for {age:.1f}s (it expires {self.ttl_s:g}s after "
                         "its last renewal, and another writer may then take it over)")
        if not self.lost.is_set():
            self.lost.set()
            log.error("the lease on %s %s: refusing further writes", self.store.uri(self.key),
                      self.lost_why)
        return True

    def check(self, uri: str) -> None:
        """:class:`LeaseLost` if the lease was taken over or could not be renewed in time."""
        if self._fenced():
            raise LeaseLost(f"lease on {uri} {self.lost_why}; stopping without committing")

    def _renew_loop(self) -> None:
        interval = self.ttl_s / 3
        wait = interval
        while not self._stop.wait(wait):
            try:
                self._put(if_match=self.etag)
                wait = interval
            except (PreconditionFailed, NotFound):
                log.error("lost the lease on %s to another writer", self.store.uri(self.key))
                self.lost.set()
                return
            except Exception as e:  # transient: try again soon, until the fence is reached
                if self._fenced():
                    return
                log.warning("could not renew the lease on %s: %s", self.store.uri(self.key), e)
                wait = interval / 4
            if self._fenced():  # a renewal that succeeded too late
                return

    def still_held(self) -> bool:
        if self.lost.is_set():
            return False
        try:
            data, _ = self.store.get_bytes(self.key)
        except NotFound:
            return False
        holder, unreadable = _parse_lease(data)
        return unreadable is None and holder.get("id") == self.owner["id"]

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost.is_set() and self.still_held():
            self.store.delete(self.key)


def _parse_lease(data: bytes) -> tuple[dict, str | None]:
    """(the lease record, None) or ({}, why it is unreadable): a lease that is not a JSON object
    with a numeric ``expires_at`` was cut short by a crash; nobody holds it."""
    try:
        holder = json.loads(data)
    except (ValueError, RecursionError) as e:
        return {}, f"{len(data)} bytes, not JSON: {e}"
    if not isinstance(holder, dict):
        return {}, f"a JSON {type(holder).__name__}, not an object"
    expires = holder.get("expires_at", 0)
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        return {}, f"expires_at is {expires!r}, not a time"
    return holder, None


def save_plan_record(store: Store, prefix: str, doc: dict) -> str:
    """Record a sharded step's plan under its prefix (``_plan.json``), for its shard tasks and
    gather to run exactly that plan rather than planning again (inputs that can change, such
    as a prefix gaining images, would give them another fingerprint). Returns the key."""
    key = prefix + PLAN
    store.put_bytes(key, json.dumps(doc, sort_keys=True, allow_nan=False).encode())
    return key


def register_plan_record(writer: StepWriter) -> None:
    """List the recorded plan (if the plan ran as its own task) in the manifest the gather
    commits: part of what the output was made from. Planned in the same process (the CLI):
    there is none."""
    try:
        data = writer.store.get_bytes(writer.prefix + PLAN)[0]
    except NotFound:
        return
    writer.register(PLAN, FileEntry(len(data), hashlib.sha256(data).hexdigest()))


def read_plan_record(store: Store, step: str, fp: str, *, force: bool = False
                     ) -> tuple[dict | None, dict | None, bool]:
    """(the plan recorded for ``step``'s output ``fp`` or None, its manifest or None, whether
    it is a cache hit). A StoreError (retryable) when there is neither a recorded plan nor a
    complete output to describe it: the plan task has not run yet."""
    prefix = step_prefix(step, fp)
    manifest = read_manifest(store, prefix)
    cache_hit = not force and manifest is not None
    try:
        return json.loads(store.get_bytes(prefix + PLAN)[0]), manifest, cache_hit
    except NotFound:
        if cache_hit:
            return None, manifest, True
        raise StoreError(f"{store.uri(prefix.rstrip('/'))} has no {PLAN}: the plan task "
                         "records it; run it first") from None


def load_manifest(store: Store, prefix: str) -> dict | None:
    """The committed manifest of a prefix, None if it has none (absent or incomplete), and
    :class:`UnreadableManifest` (naming it) if it has one that is not a JSON object."""
    key = manifest_key(prefix)
    try:
        data, _ = store.get_bytes(key)
    except NotFound:
        return None
    try:
        manifest = json.loads(data)
        why = None if isinstance(manifest, dict) else \
            f"a JSON {type(manifest).__name__}, not an object"
    except (ValueError, RecursionError) as e:
        why = f"{len(data)} bytes, not JSON: {e}"
    if why is not None:
        what = f"{store.uri(key)} is unreadable ({why})"
        raise UnreadableManifest(
            f"{what}, so {store.uri(prefix.rstrip('/'))} is no committed output: rerun the step "
            "that writes it (it removes the unreadable manifest and recomputes the output), or "
            "rerun it with force", what=what)
    return manifest


def read_manifest(store: Store, prefix: str, *, warn: bool = True) -> dict | None:
    """The committed manifest of a prefix, or None if the prefix is absent or incomplete; an
    unreadable manifest (:func:`load_manifest`) counts as incomplete, with a warning."""
    try:
        return load_manifest(store, prefix)
    except UnreadableManifest as e:
        if warn:
            log.warning("%s; treating it as incomplete", e)
        return None


def resolve_output_uri(store: Store, uri: str) -> str:
    """An output's URI from its URI or its ``<folder>/<fingerprint>`` relative to the store's
    root (``datasets/<fp>``, ``models/<fp>``, ...)."""
    uri = str(uri).strip().rstrip("/")
    if "://" not in uri and not os.path.isabs(uri) and uri.count("/") == 1:
        return store.uri(uri)
    return uri


def load_output(store: Store, uri: str, *, expect_step: str | None = None) -> StepResult:
    """A committed output by URI (as passed between steps) or by its ``<folder>/<fingerprint>``
    relative to the store's root; a clear error if incomplete. A URI of the wrong step or
    outside this store is a :class:`ConfigError`; a missing manifest a (retryable)
    :class:`StoreError`, since the output may still be on its way; an unreadable one an
    :class:`UnreadableManifest` (permanent: only rerunning the step that writes it mends it)."""
    uri = resolve_output_uri(store, uri)
    root, step, fp = split_output_uri(uri)
    if expect_step is not None and step != expect_step:
        raise ConfigError(f"{uri} is a {step!r} output, expected a {expect_step!r} output")
    if root.rstrip("/") != store.root.rstrip("/"):
        raise ConfigError(f"{uri} is not under the store root {store.root}")
    prefix = step_prefix(step, fp)
    manifest = load_manifest(store, prefix)  # UnreadableManifest: permanent, names the file
    if manifest is None:
        raise StoreError(f"{uri} has no {manifest_key('')}: the output is incomplete or absent")
    return StepResult(step, uri, fp, True, manifest)


def run_step(
    store: Store,
    step: str,
    schema_version: int,
    *,
    inputs: dict[str, str],
    config: dict,
    body: Callable[[StepWriter], dict],
    force: bool = False,
    resume: bool = False,
    force_clears: bool = True,
    fp: str | None = None,
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    poll_s: float | None = None,
    run_id: str | None = None,
    extra_manifest: dict | None = None,
) -> StepResult:
    """Run ``body`` under the commit protocol (module doc) and return the committed result.

    :param inputs: input name → fingerprint or digest (part of the fingerprint).
    :param config: the config fields that change the output (part of the fingerprint).
    :param body: writes files through the StepWriter, returns small JSON ``outputs``.
    :param force: recompute from scratch even if a manifest exists (its manifest is removed
        first, then its files, also with ``resume``).
    :param resume: keep what an earlier incomplete attempt left under the prefix (training).
    :param force_clears: with ``force`` and a complete output, remove its files too (the
        default). False for a gather whose shards, written under the prefix before it by this
        forced attempt, are the new output's.
    :param fp: a precomputed fingerprint (must equal ``fingerprint(step, ...)`` of the same
        arguments; given when the caller needed it before calling).
    """
    fp = fp or fingerprint(step, schema_version, inputs, config)
    prefix = step_prefix(step, fp)
    uri = store.uri(prefix.rstrip("/"))
    poll_s = poll_s if poll_s is not None else min(5.0, max(0.05, lease_ttl_s / 10))

    if not force:
        manifest = read_manifest(store, prefix, warn=False)  # unreadable: warned under the lease
        if manifest is not None:
            log.info("cache hit: %s %s is complete (%d files); nothing to do", step, uri,
                     len(manifest.get("files", {})))
            return StepResult(step, uri, fp, True, manifest)

    lease = _Lease(store, prefix, lease_ttl_s, run_id)
    waited_since = time.monotonic()
    announced = False
    while True:
        holder = lease.try_acquire()
        if holder is None:
            break
        if not force:
            manifest = read_manifest(store, prefix, warn=False)
            if manifest is not None:
                log.info("cache hit: %s %s was completed by another writer", step, uri)
                return StepResult(step, uri, fp, True, manifest)
        if holder.get("released"):
            continue
        if not announced:
            log.info("%s is being written by %s (pid %s on %s, run %s); waiting for it",
                     uri, holder.get("id"), holder.get("pid"), holder.get("host"),
                     holder.get("run_id"))
            announced = True
        if time.monotonic() - waited_since > wait_timeout_s:
            raise StoreError(
                f"gave up after {wait_timeout_s:.0f}s waiting for {uri}: still leased by "
                f"{holder.get('id')} (pid {holder.get('pid')} on {holder.get('host')})"
            )
        time.sleep(poll_s)

    lease.start_renewing()
    started = time.time()
    try:
        try:
            existing = load_manifest(store, prefix)
        except UnreadableManifest as e:
            # no commit: the prefix is incomplete (force: the output it stood for goes, as a
            # complete one would). Removed now, under the lease, or the create-only put of the
            # new manifest would find it there
            log.warning("%s: no commit; removing it and recomputing %s%s", e.what, uri,
                        " (force)" if force else "")
            store.delete(manifest_key(prefix))
            existing = {} if force else None
        if existing is not None and not force:
            log.info("cache hit: %s %s was completed by another writer", step, uri)
            return StepResult(step, uri, fp, True, existing)
        if existing is not None:
            # force recomputes from scratch: the committed output's files go too, even for a
            # resumable step (resume continues an incomplete attempt, never a complete one:
            # a forced training run restarts at step 0 instead of re-committing its last
            # checkpoint). The manifest goes first, so nobody reads the prefix meanwhile; a
            # retry of this forced attempt finds no manifest and resumes it.
            log.info("force: recomputing %s (removing its manifest%s)", uri,
                     ", then its files" if force_clears else "")
            store.delete(manifest_key(prefix))
            if force_clears:
                removed = store.delete_prefix(prefix, keep=frozenset({lease_key(prefix)}))
                log.info("force: removed %d files under %s", removed, uri)
        if not resume and not (existing is not None and force_clears):
            stale = store.delete_prefix(prefix, keep=frozenset({lease_key(prefix)}))
            if stale:
                log.warning("%s was incomplete (no manifest): removed %d leftover files",
                            uri, stale)
        writer = StepWriter(store, prefix, _lease=lease)
        outputs = body(writer)
        if not isinstance(outputs, dict):
            raise TypeError(f"step {step!r} body returned {type(outputs).__name__}, expected dict")
        canonical_json(outputs)  # outputs must be plain JSON

        _verify(store, prefix, writer.files)
        if not lease.still_held():
            lease.check(uri)  # could not be renewed in time: say so
            raise LeaseLost(f"lease on {uri} was lost before commit; nothing was committed")
        finished = time.time()
        manifest = {
            "step": step,
            "schema_version": schema_version,
            "fingerprint": fp,
            "uri": uri,
            "inputs": inputs,
            "config": config,
            "outputs": outputs,
            "files": {k: v.to_json() for k, v in sorted(writer.files.items())},
            "code_version": __version__,
            "writer": lease.owner,
            "timings": {
                "started_at": datetime.fromtimestamp(started, UTC).isoformat(timespec="seconds"),
                "finished_at": datetime.fromtimestamp(finished, UTC).isoformat(timespec="seconds"),
                "seconds": round(finished - started, 3),
            },
            **(extra_manifest or {}),
        }
        lease.check(uri)  # last: the renewals may have failed while it verified
        try:
            store.put_bytes(manifest_key(prefix),
                            (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode(),
                            if_absent=True)
        except PreconditionFailed as e:
            raise LeaseLost(f"{uri} was committed by another writer while we held the lease"
                            ) from e
        log.info("committed %s: %d files in %.1fs", uri, len(writer.files), finished - started)
        return StepResult(step, uri, fp, False, manifest)
    finally:
        lease.release()


def _verify(store: Store, prefix: str, files: dict[str, FileEntry]) -> None:
    """Every recorded file is in the store with its recorded size (tfx-style post-check)."""
    listed = {o.key[len(prefix):]: o.size for o in store.list(prefix)}
    problems = []
    for rel, entry in files.items():
        if rel not in listed:
            problems.append(f"{rel}: missing")
        elif listed[rel] != entry.size:
            problems.append(f"{rel}: size {listed[rel]}, expected {entry.size}")
    if problems:
        raise StoreError(
            f"verification of {store.uri(prefix)} failed before commit: " + "; ".join(problems[:10])
            + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else "")
        )


def fetch_tree(store: Store, result: StepResult, rel_prefix: str, dest: str | os.PathLike
               ) -> Path:
    """Copy the files of a committed output under ``rel_prefix`` (``"preset/"``,
    ``"saved_model/"``) into ``dest``, each checked against the manifest's sha256. Files already
    in ``dest`` with the right size and sha256 are kept (a warm cache costs a hash, not a
    download); anything else in ``dest`` is left alone. Returns ``dest``."""
    from petdet_tasks.store import sha256_file

    dest = Path(dest)
    prefix = step_prefix(result.step, result.fingerprint)
    files = {rel: e for rel, e in result.manifest.get("files", {}).items()
             if rel.startswith(rel_prefix)}
    if not files:
        raise StoreError(f"{result.uri} has no files under {rel_prefix!r} in its manifest")
    fetched = 0
    for rel, entry in sorted(files.items()):
        local = dest / rel[len(rel_prefix):]
        if local.is_file() and local.stat().st_size == entry["size"] \
                and sha256_file(local).sha256 == entry["sha256"]:
            continue
        store.download_file(prefix + rel, local, sha256=entry["sha256"])
        fetched += 1
    log.info("%s%s → %s (%d files, %d downloaded)", result.uri + "/", rel_prefix, dest,
             len(files), fetched)
    return dest
