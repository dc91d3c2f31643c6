"""The download step: the Oxford-IIIT Pet archives, verified, extracted safely, in the store.

``download(store, DownloadConfig(source=...))`` →  ``datasets/<fingerprint>/`` holding the
extracted dataset exactly as the archives lay it out (``images/*.jpg``,
``annotations/{list,trainval,test}.txt``, ``annotations/xmls/``, ``annotations/trimaps/``)
plus ``_MANIFEST.json``.

Where the archives come from (``source``):

* the official base URL (default) or its older alias: checked against the pinned sizes and
  sha256 digests below;
* any other http(s) mirror or a local directory / ``file://`` URL: checked against a
  ``SHA256SUMS`` file beside the archives; without one, the digests are computed from what
  was downloaded and recorded, with a warning (and a re-run has to fetch again to know
  whether anything changed).

The fingerprint is made of the archives' digests only, not of the URL: the same bytes from a
mirror give the same dataset prefix, and when the digests are known in advance a second run
is a cache hit that downloads and uploads nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from petdet_tasks.defaults import OFFICIAL_BASE
from petdet_tasks.fetch import (
    FetchError,
    fetch,
    join_source,
    parse_sha256sums,
    read_text,
    redact_url,
)

# DatasetLayoutError and decode_list_file live in layout (light: the tfrecords plan uses them)
from petdet_tasks.layout import DatasetLayoutError, cache_root, decode_list_file, fingerprint
from petdet_tasks.manifest import StepResult, StepWriter, run_step
from petdet_tasks.safe_tar import UnsafeArchiveError, existing_links, safe_extract
from petdet_tasks.store import Store, sha256_file
from petdet_tasks.worker_cache import _open_lock, _size

log = logging.getLogger(__name__)

STEP = "download"
SCHEMA_VERSION = 1

LEGACY_BASES = (
    "http://www.robots.ox.ac.uk/~vgg/data/pets/data/",
    "https://www.robots.ox.ac.uk/~vgg/data/pets/data/",
)
ARCHIVES = ("images.tar.gz", "annotations.tar.gz")
PINNED: dict[str, tuple[int, str]] = {
    "images.tar.gz": (
        791_918_971, "67195c5e1c01f1ab5f9b6a5d22b8c27a580d896ece458917e61d459337fa318d"),
    "annotations.tar.gz": (
        19_173_078, "52425fb6de5c424942b7626b428656fcbd798db970a937df61750c0f1d358e91"),
}
REQUIRED = ("annotations/list.txt", "annotations/trainval.txt", "annotations/test.txt")


@dataclass(frozen=True)
class DownloadConfig:
    """:param source: base URL or local folder holding ``images.tar.gz`` and
        ``annotations.tar.gz`` (default: the official site).
    :param cache_dir: where archives are downloaded (resumable ``.part`` files) and kept by
        digest for re-use; default ``$PETDET_CACHE_DIR`` or ``~/.cache/petdet``.
    :param force: rebuild the dataset prefix even if it is complete.
    :param keep_archives: keep the verified archives in the cache after a successful run.
    """

    source: str = OFFICIAL_BASE
    cache_dir: str | None = None
    force: bool = False
    keep_archives: bool = True
    retries: int = 5
    upload_workers: int = 8

    def resolved_cache_dir(self) -> Path:
        return cache_root(self.cache_dir) / "downloads"


def _norm(base: str) -> str:
    return base if base.endswith("/") else base + "/"


def expected_digests(source: str) -> tuple[dict[str, tuple[int | None, str | None]], str]:
    """(name → (size, sha256)) for the two archives, and how they are known:
    ``pinned`` (official source), ``SHA256SUMS`` (file beside the archives) or ``none``."""
    if _norm(source) in (OFFICIAL_BASE, *LEGACY_BASES):
        return {n: PINNED[n] for n in ARCHIVES}, "pinned"
    sums_text = read_text(join_source(source, "SHA256SUMS"))
    if sums_text is None:
        return {n: (None, None) for n in ARCHIVES}, "none"
    sums = parse_sha256sums(sums_text)
    missing = [n for n in ARCHIVES if n not in sums]
    if missing:
        raise FetchError(
            f"SHA256SUMS at {redact_url(join_source(source, 'SHA256SUMS'))} has no entry for "
            f"{', '.join(missing)}"
        )
    return {n: (None, sums[n]) for n in ARCHIVES}, "SHA256SUMS"


def _cached_archive(cache: Path, name: str, sha256: str | None) -> Path:
    return cache / (f"{sha256[:16]}-{name}" if sha256 else f"unverified-{name}")


def _fetch_archive(cfg: DownloadConfig, cache: Path, name: str, size: int | None,
                   sha256: str | None) -> tuple[Path, str]:
    """A verified local copy of one archive (re-used from the cache when already there)."""
    dest = _cached_archive(cache, name, sha256)
    if sha256 and dest.exists():
        entry = sha256_file(dest)
        if entry.sha256 == sha256:
            log.info("%s: verified copy already in the cache (%s)", name, dest)
            return dest, sha256
        log.warning("%s: cached copy %s is corrupt (sha256 %s); fetching again", name, dest,
                    entry.sha256)
        dest.unlink()
    result = fetch(join_source(cfg.source, name), dest, expected_sha256=sha256,
                   expected_size=size, retries=cfg.retries, log=log)
    return result.path, result.sha256


def read_list_file(path: Path, where: str) -> str:
    return decode_list_file(path.read_bytes(), where)


EXTRACT_PREFIX = "extract-"


def _lock_of(work: Path) -> Path:
    return work.with_name(work.name + ".lock")


@contextlib.contextmanager
def _extract_dir(cache: Path) -> Iterator[Path]:
    """A fresh ``extract-XXXX`` folder in ``cache``, removed when the block ends. Held for the
    block by an exclusive ``flock`` on ``extract-XXXX.lock`` beside it (released by the kernel
    if the process dies), taken before the folder exists, so that :func:`_remove_stale_extracts`
    in another download never removes it while in use, and does remove it once its process
    was killed."""
    while True:
        fd, lock_name = tempfile.mkstemp(prefix=EXTRACT_PREFIX, suffix=".lock", dir=cache)
        lock = Path(lock_name)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if _same_file(fd, lock):
            break
        os.close(fd)  # a sweep took it for a killed download's before we locked it: again
    try:
        work = lock.with_name(lock.name.removesuffix(".lock"))
        work.mkdir()
        try:
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.unlink(missing_ok=True)
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _remove_stale_extracts(cache: Path) -> None:
    """Remove the ``extract-*`` folders (and lock files) that no live download holds: those of
    a download killed mid-extraction (a full copy of the dataset each, ~800 MB on the real
    data), which its own clean-up never ran for. Housekeeping: it never fails the step."""
    try:
        found = sorted(cache.glob(EXTRACT_PREFIX + "*"))
    except OSError as e:
        log.warning("could not list %s for stale extraction folders: %s", cache, e)
        return
    for path in found:
        is_lock = path.name.endswith(".lock")
        work = path.with_name(path.name.removesuffix(".lock")) if is_lock else path
        if is_lock and (work.exists() or not path.exists()):
            continue  # listed with its folder (and removed with it)
        lock = _lock_of(work)
        try:
            fd = _open_lock(lock)
        except OSError as e:
            log.warning("stale extraction folder %s: cannot open its lock %s: %s", work, lock, e)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running download's
            if not _same_file(fd, lock):
                continue  # removed (and perhaps made again) meanwhile: not the file we locked
            if work.is_dir() and not work.is_symlink():
                size = _size(work)
                shutil.rmtree(work, ignore_errors=True)
                if work.exists():
                    log.warning("could not remove the stale extraction folder %s", work)
                    continue
                log.info("removed the stale extraction folder %s (%.1f MB) left by a download "
                         "that was killed", work, size / 1e6)
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        except OSError as e:
            log.warning("could not remove the stale extraction folder %s: %s", work, e)
        finally:
            os.close(fd)


def _check_links(work: Path, added: dict[str, Path]) -> None:
    """Symlinks in the extracted tree must lead to files. The store holds no links: the upload
    copies the file a link leads to, but does not descend into a linked folder, so its files
    would be counted here and missing from the dataset (and a dangling link is dropped).
    ``added``: each symlink's name → the archive it came from."""
    for name, archive in sorted(added.items()):
        path = work / name
        if path.is_file():
            continue
        target = os.readlink(path)
        what = ("a symlink to a directory" if path.is_dir()
                else "a symlink that leads to no file in the archives")
        raise UnsafeArchiveError(
            archive, name,
            f"{what} (-> {target!r}): the dataset is stored without links, so what it "
            "names would be missing from the store; only symlinks to files are accepted")


def _count_layout(root: Path) -> dict[str, int]:
    """The dataset's counts, of exactly what the upload stores: regular files, or links to
    them (see :func:`_check_links`); never a folder that happens to end in ``.jpg``."""
    missing = [p for p in REQUIRED if not (root / p).is_file()]
    images = (sorted(p for p in (root / "images").glob("*.jpg") if p.is_file())
              if (root / "images").is_dir() else [])
    if missing or not images:
        what = ", ".join(missing + ([] if images else ["images/*.jpg"]))
        raise DatasetLayoutError(
            f"the archives do not hold the Oxford-IIIT Pet layout: missing {what} "
            f"(expected images/*.jpg and annotations/list.txt, trainval.txt, test.txt, xmls/)"
        )

    def listed(name: str) -> int:
        lines = read_list_file(root / "annotations" / name, f"annotations/{name}").splitlines()
        return sum(1 for ln in lines if ln.strip() and not ln.startswith("#"))

    def count(folder: str, pattern: str) -> int:
        d = root / folder
        return sum(1 for p in d.glob(pattern)
                   if not p.name.startswith("._") and p.is_file()) if d.is_dir() else 0

    return {
        "images": len(images),
        "xmls": count("annotations/xmls", "*.xml"),
        "trimaps": count("annotations/trimaps", "*.png"),
        "listed": listed("list.txt"),
        "trainval": listed("trainval.txt"),
        "test": listed("test.txt"),
    }


def download(store: Store, cfg: DownloadConfig = DownloadConfig(), *,
             run_id: str | None = None) -> StepResult:
    """Run the download step (module doc); returns the committed (or cached) output."""
    cache = cfg.resolved_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    _remove_stale_extracts(cache)
    expected, how = expected_digests(cfg.source)
    source = redact_url(cfg.source)
    log.info("source %s; archive digests: %s", source, how)

    fetched: dict[str, Path] = {}
    if how == "none":
        log.warning(
            "no SHA256SUMS beside the archives at %s: their digests will be computed from the "
            "download and recorded, not verified (put a SHA256SUMS file there to verify, and to "
            "let a re-run skip the download)", source)
        for name in ARCHIVES:
            path, digest = _fetch_archive(cfg, cache, name, None, None)
            final = _cached_archive(cache, name, digest)
            os.replace(path, final)
            fetched[name] = final
            expected[name] = (final.stat().st_size, digest)

    inputs = {name: expected[name][1] for name in ARCHIVES}
    config = {"layout": "oxford-iiit-pet", "extracted": True}
    fp = fingerprint(STEP, SCHEMA_VERSION, inputs, config)
    # run_step checks the manifest before calling body, so a cache hit fetches nothing
    def body(writer: StepWriter) -> dict:
        archives = {}
        for name in ARCHIVES:
            size, sha = expected[name]
            path = fetched.get(name)
            if path is None:
                path, sha = _fetch_archive(cfg, cache, name, size, sha)
                fetched[name] = path
            archives[name] = {"size": path.stat().st_size, "sha256": sha}
        with _extract_dir(cache) as work:
            links: dict[str, Path] = {}
            for name in ARCHIVES:
                # refuse_existing: a path in both archives would replace the first one's file
                n = len(safe_extract(fetched[name], work, refuse_existing=True))
                links.update({k: fetched[name] for k in existing_links(work) if k not in links})
                log.info("%s: %d files extracted safely", name, n)
            _check_links(work, links)
            counts = _count_layout(work)
            log.info("dataset layout: %s", counts)
            uploaded = writer.put_tree(work, workers=cfg.upload_workers)
        return {**counts, "files": uploaded, "archives": archives, "source": source,
                "digests": how}

    result = run_step(store, STEP, SCHEMA_VERSION, inputs=inputs, config=config, body=body,
                      force=cfg.force, fp=fp, run_id=run_id,
                      extra_manifest={"download_config": {**asdict(cfg), "source": source}})
    if not cfg.keep_archives:
        for path in fetched.values():
            path.unlink(missing_ok=True)
    return result

