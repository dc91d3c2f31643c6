"""The worker-local cache, kept under a size budget: least recently used first, never an entry
in use.

Steps copy what they read from the store to the worker's disk (:func:`layout.cache_root`):
staged TFRecord shards (``tfrecords/<fp>/``), exported models (``models/<fp>/``), presets
synced from the store (``presets/<hash>/``), and their own scratch (``training/<fp>/``,
``export/<fp>/``, ``evaluate/<fp>/``: :func:`scratch`, removed when the step ends, left
behind only by one that was killed). A worker that retrains every week gains a new records
copy and a new model each time; unbounded, the cache fills its disk. The store holds the
truth, so any entry can be evicted: the next step that needs it copies it again.

A step declares the entries it uses with :func:`in_use` for as long as it uses them (an
evaluation reads its staged shards until it ends, a training run for hours). That holds a
shared ``flock`` on ``.locks/<area>/<name>.lock`` (released by the kernel if the process dies)
and marks the entry used now, then trims the cache to its budget: entries are evicted oldest
use first, each under an exclusive lock taken without waiting, so an entry that any process
on this worker is using is skipped, never deleted under it. The budget is checked when a step
starts, before it copies anything, and again when it ends, still holding its entries: what
it staged meanwhile can take the cache past the budget only while it runs.

The budget: ``$PETDET_CACHE_MAX_GB`` (decimal GB, default 50; ``0`` keeps only what is in
use). Archives under ``downloads/`` are not evicted here: the download step keeps them by
digest (``keep_archives``) so that a forced rebuild downloads nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from petdet_tasks.errors import ConfigError

log = logging.getLogger(__name__)

AREAS = ("tfrecords", "models", "presets", "training", "export", "evaluate")
LOCKS = ".locks"
DEFAULT_MAX_GB = 50.0
ENV = "PETDET_CACHE_MAX_GB"
_NAME_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z_.-]*")


def max_bytes(env: dict[str, str] | None = None) -> int:
    """The budget in bytes from ``$PETDET_CACHE_MAX_GB`` (decimal GB), default 50 GB."""
    raw = (os.environ if env is None else env).get(ENV, "").strip()
    return gb_to_bytes(raw, ENV) if raw else int(DEFAULT_MAX_GB * 1e9)


def gb_to_bytes(raw: str, what: str) -> int:
    """A budget in (decimal) GB as bytes; ``what`` names where it came from in the error."""
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")  # reported below
    if not 0 <= gb < float("inf"):
        raise ConfigError(f"{what}={raw!r}: expected the worker cache's size budget in GB, a "
                          "number >= 0 (0 keeps only what a running step uses)")
    return int(gb * 1e9)


def _check(area: str, name: str) -> None:
    if area not in AREAS:
        raise ValueError(f"unknown cache area {area!r}: one of {', '.join(AREAS)}")
    if not _NAME_RE.fullmatch(name):
        raise ValueError(f"invalid cache entry name {name!r}")


def _lock_path(cache: Path, area: str, name: str) -> Path:
    return cache / LOCKS / area / f"{name}.lock"


def _open_lock(path: Path) -> int:
    """A descriptor of an entry's lock file, created if need be (read-only when another user
    made it: ``flock`` works on any descriptor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError:
        return os.open(path, os.O_RDONLY)


def _size(path: Path) -> int:
    """Bytes under ``path`` (a file or a folder; links not followed; vanished files skipped)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return 0
    if not path.is_dir() or path.is_symlink():
        return st.st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(root, f)).st_size
    return total


@dataclass
class Entry:
    area: str
    name: str
    path: Path
    size: int
    last_used: float  # epoch seconds: its lock file's mtime (set by in_use), else its own
    lock_mtime: float | None = None  # its lock file's mtime when listed (None: no lock file)


@dataclass
class Pruned:
    """What :func:`prune` did: sizes in bytes."""

    budget: int
    before: int
    after: int
    evicted: list[Entry] = field(default_factory=list)
    in_use: list[Entry] = field(default_factory=list)  # over budget but in use: kept

    def summary(self) -> str:
        gb = 1e9
        text = (f"{self.after / gb:.2f} GB after evicting {len(self.evicted)} entries "
                f"({(self.before - self.after) / gb:.2f} GB, least recently used first: "
                f"{', '.join(f'{e.area}/{e.name}' for e in self.evicted) or 'none'})")
        if self.in_use:
            text += (f"; {len(self.in_use)} entries over the budget are in use and kept: "
                     + ", ".join(f"{e.area}/{e.name}" for e in self.in_use))
        return text


def entries(cache: Path) -> list[Entry]:
    """The evictable entries of the cache, least recently used first."""
    out = []
    for area in AREAS:
        folder = cache / area
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if not _NAME_RE.fullmatch(child.name):
                continue  # not an entry this module names (e.g. a temporary download)
            lock = _lock_path(cache, area, child.name)
            try:
                used = lock_mtime = lock.stat().st_mtime
            except FileNotFoundError:
                lock_mtime = None
                try:
                    used = child.lstat().st_mtime  # made before the cache was managed
                except FileNotFoundError:
                    continue  # evicted by another process meanwhile
            out.append(Entry(area, child.name, child, _size(child), used, lock_mtime))
    out.sort(key=lambda e: (e.last_used, e.area, e.name))
    return out


@contextlib.contextmanager
def _exclusive(cache: Path, area: str, name: str) -> Iterator[bool]:
    """An exclusive lock on the entry, without waiting: True if taken (nobody uses it)."""
    fd = _open_lock(_lock_path(cache, area, name))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # releases the lock


def prune(cache: Path, budget: int) -> Pruned:
    """Evict entries, least recently used first, until the cache holds at most ``budget``
    bytes; an entry some process holds :func:`in_use` is skipped (module doc)."""
    found = entries(cache)
    total = sum(e.size for e in found)
    result = Pruned(budget, total, total)
    for e in found:
        if result.after <= budget:
            break
        with _exclusive(cache, e.area, e.name) as free:
            if not free:
                result.in_use.append(e)
                continue
            if e.lock_mtime is not None and \
                    _lock_path(cache, e.area, e.name).stat().st_mtime != e.lock_mtime:
                continue  # used since the listing (staged again, say): not the oldest now
            if e.path.is_dir() and not e.path.is_symlink():
                shutil.rmtree(e.path, ignore_errors=True)
            else:
                e.path.unlink(missing_ok=True)
            if e.path.exists() or e.path.is_symlink():
                log.warning("worker cache: could not remove %s", e.path)
                continue
        result.evicted.append(e)
        result.after -= e.size
    return result


def held(cache: Path, area: str, name: str) -> bool:
    """Whether some process holds the entry :func:`in_use` now (a probe that neither creates
    its lock file nor marks it used)."""
    try:
        fd = os.open(_lock_path(cache, area, name), os.O_RDONLY)
    except FileNotFoundError:
        return False  # a holder creates the lock file first
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def report(cache: Path, *, trim: bool = False, budget: int | None = None) -> dict:
    """What the cache holds (entries least recently used first, with their size, last use and
    whether a step holds them now) and, with ``trim``, what trimming it to ``budget`` (default
    :func:`max_bytes`) evicted: ``python -m petdet_tasks cache``."""
    budget = max_bytes() if budget is None else budget
    evicted = prune(cache, budget).evicted if trim else []
    listed = entries(cache)
    return {
        "cache": str(cache.resolve()), "budget_bytes": budget, "bytes": sum(e.size for e in listed),
        "entries": [{"entry": f"{e.area}/{e.name}", "bytes": e.size,
                     "last_used": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.last_used)),
                     "in_use": held(cache, e.area, e.name)} for e in listed],
        **({"evicted": [{"entry": f"{e.area}/{e.name}", "bytes": e.size} for e in evicted]}
           if trim else {}),
    }


@contextlib.contextmanager
def scratch(cache: Path, area: str, name: str, *used: tuple[str, str],
            budget: int | None = None) -> Iterator[Path]:
    """A step's scratch folder ``cache/<area>/<name>``, empty, held :func:`in_use` with the
    entries ``used`` for the block and removed when the block ends, however it ends (the store
    holds what the step keeps); a killed step's is evicted like any other entry."""
    work = cache / area / name
    with in_use(cache, (area, name), *used, budget=budget):
        shutil.rmtree(work, ignore_errors=True)  # a killed attempt's
        work.mkdir(parents=True)
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def in_use(cache: Path, *used: tuple[str, str], budget: int | None = None) -> Iterator[None]:
    """Hold the cache entries ``used`` (``(area, name)`` pairs, e.g. ``("tfrecords", fp)``)
    for the duration of the block: no process on this worker evicts them meanwhile. On entry
    they are marked used now and the rest of the cache is trimmed to ``budget`` (default
    :func:`max_bytes`); on exit, however the block ends, they are marked used again (their
    use ended now) and the rest is trimmed again (what the block staged counts now), before
    they are released."""
    budget = max_bytes() if budget is None else budget
    for area, name in used:
        _check(area, name)
    fds: list[int] = []
    entered = False
    try:
        for area, name in used:
            fd = _open_lock(_lock_path(cache, area, name))
            fds.append(fd)
            fcntl.flock(fd, fcntl.LOCK_SH)  # waits only for a prune evicting it right now
            with contextlib.suppress(OSError):  # another user's lock file: not ours to touch
                os.utime(fd)
        _trim(cache, budget, "starts")
        entered = True
        yield
    finally:
        try:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.utime(fd)
            if entered:  # not when taking the locks failed
                _trim(cache, budget, "ends")
        finally:
            for fd in fds:
                os.close(fd)


def _trim(cache: Path, budget: int, when: str) -> None:
    """Trim the cache to ``budget`` as a step ``when`` (starts / ends): housekeeping, it never
    fails the step."""
    started = time.monotonic()
    try:
        result = prune(cache, budget)
    except OSError as e:
        log.warning("worker cache %s: could not trim it to %.2f GB as the step %s: %s", cache,
                    budget / 1e9, when, e)
        return
    if result.evicted or result.in_use:
        log.info("worker cache %s over its budget of %.2f GB as the step %s (%.2f GB; %s): %s "
                 "[%.2fs]", cache, budget / 1e9, when, result.before / 1e9, ENV,
                 result.summary(), time.monotonic() - started)
