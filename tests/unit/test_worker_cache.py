"""The worker-local cache's budget: least recently used evicted first, never an entry in use
(by this process or another), a bad budget refused."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from petdet_tasks import worker_cache
from petdet_tasks.errors import ConfigError
from petdet_tasks.worker_cache import entries, in_use, max_bytes, prune

MB = 1_000_000


def _entry(cache: Path, area: str, name: str, mb: int, used: float | None = None) -> Path:
    """A folder entry of ``mb`` MB (two files), last used at ``used`` (its own mtime when it
    has no lock file yet, as an entry made before the cache was managed)."""
    path = cache / area / name
    (path / "sub").mkdir(parents=True)
    (path / "a.bin").write_bytes(b"\0" * (mb * MB // 2))
    (path / "sub" / "b.bin").write_bytes(b"\0" * (mb * MB - mb * MB // 2))
    if used is not None:
        os.utime(path, (used, used))
    return path


def _names(cache: Path) -> list[str]:
    return sorted(f"{e.area}/{e.name}" for e in entries(cache))


def test_prune_evicts_least_recently_used_first_until_under_budget(tmp_path):
    cache = tmp_path / "cache"
    now = time.time()
    _entry(cache, "tfrecords", "aaaa", 3, now - 400)
    _entry(cache, "models", "bbbb", 2, now - 300)
    _entry(cache, "presets", "cccc", 1, now - 200)
    _entry(cache, "training", "dddd", 4, now - 100)  # a failed run's scratch
    assert [e.name for e in entries(cache)] == ["aaaa", "bbbb", "cccc", "dddd"]
    assert [e.size for e in entries(cache)] == [3 * MB, 2 * MB, MB, 4 * MB]

    result = prune(cache, 6 * MB)  # 10 MB: the two oldest go (5 MB), 5 MB is within 6
    assert [e.name for e in result.evicted] == ["aaaa", "bbbb"]
    assert (result.before, result.after) == (10 * MB, 5 * MB)
    assert _names(cache) == ["presets/cccc", "training/dddd"]
    assert not (cache / "tfrecords" / "aaaa").exists()
    assert prune(cache, 6 * MB).evicted == []  # within budget: nothing to do
    assert [e.name for e in prune(cache, 0).evicted] == ["cccc", "dddd"]


def test_in_use_marks_entries_used_so_the_oldest_use_goes_first(tmp_path):
    cache = tmp_path / "cache"
    old = time.time() - 1000
    _entry(cache, "tfrecords", "recs1", 2, old - 10)
    _entry(cache, "tfrecords", "recs2", 2, old)
    with in_use(cache, ("tfrecords", "recs1"), budget=10 * MB):
        pass  # recs1 is now the most recently used, though its files are older
    lock = cache / ".locks" / "tfrecords" / "recs1.lock"
    assert lock.is_file() and lock.stat().st_mtime > old + 900
    assert [e.name for e in entries(cache)] == ["recs2", "recs1"]
    assert [e.name for e in prune(cache, 3 * MB).evicted] == ["recs2"]


def test_entries_in_use_are_never_evicted_and_are_reported(tmp_path, caplog):
    cache = tmp_path / "cache"
    now = time.time()
    _entry(cache, "models", "inuse", 5, now - 500)
    _entry(cache, "models", "old", 1, now - 400)
    _entry(cache, "tfrecords", "new", 1, now - 300)
    caplog.set_level("INFO", logger="petdet_tasks.worker_cache")
    # entering in_use trims the rest of the cache to the budget, its own entries kept
    with in_use(cache, ("models", "inuse"), ("tfrecords", "staging"), budget=0):
        assert _names(cache) == ["models/inuse"]
        assert (cache / "models" / "inuse" / "a.bin").is_file()
        # another prune meanwhile (another step on this worker) keeps it and says so
        result = prune(cache, 0)
        assert result.evicted == [] and [e.name for e in result.in_use] == ["inuse"]
        assert "in use and kept: models/inuse" in result.summary()
    assert "evicting 2 entries" in caplog.text and "models/old, tfrecords/new" in caplog.text
    assert [e.name for e in prune(cache, 0).evicted] == ["inuse"]  # released


_HOLDER = """
import sys
from pathlib import Path
from petdet_tasks.worker_cache import in_use
with in_use(Path(sys.argv[1]), ("models", "held"), budget=10**12):
    print("holding", flush=True)
    sys.stdin.readline()
"""


def test_an_entry_another_process_uses_is_kept_until_it_stops(tmp_path):
    cache = tmp_path / "cache"
    _entry(cache, "models", "held", 2)
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(cache)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = prune(cache, 0)
        assert result.evicted == [] and [e.name for e in result.in_use] == ["held"]
        assert (cache / "models" / "held").is_dir()
        holder.kill()  # a worker killed mid-step: the kernel releases its lock
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert [e.name for e in prune(cache, 0).evicted] == ["held"]


def test_only_the_cache_areas_entries_are_evicted(tmp_path):
    cache = tmp_path / "cache"
    _entry(cache, "tfrecords", "abcd", 1)
    (cache / "downloads").mkdir()
    archive = cache / "downloads" / "0123456789abcdef-images.tar.gz"
    archive.write_bytes(b"\0" * MB)  # kept by the download step (keep_archives)
    (cache / "tfrecords" / ".tmp-download").write_bytes(b"\0" * MB)  # not an entry name
    (cache / "elsewhere").mkdir()
    (cache / "elsewhere" / "file").write_bytes(b"\0" * MB)
    assert _names(cache) == ["tfrecords/abcd"]
    prune(cache, 0)
    assert archive.is_file() and (cache / "tfrecords" / ".tmp-download").is_file()
    assert (cache / "elsewhere" / "file").is_file() and _names(cache) == []
    with pytest.raises(ValueError, match="unknown cache area 'downloads'"):
        with in_use(cache, ("downloads", "x"), budget=0):
            pass
    with pytest.raises(ValueError, match="invalid cache entry name '../x'"):
        with in_use(cache, ("models", "../x"), budget=0):
            pass


def test_the_budget_comes_from_the_environment(monkeypatch):
    assert max_bytes({}) == 50 * 10**9
    assert max_bytes({worker_cache.ENV: "1.5"}) == 1_500_000_000
    assert max_bytes({worker_cache.ENV: " 0 "}) == 0
    for bad in ("ten", "-1", "inf", "nan"):
        with pytest.raises(ConfigError, match=f"PETDET_CACHE_MAX_GB={bad!r}: expected"):
            max_bytes({worker_cache.ENV: bad})
    monkeypatch.setenv(worker_cache.ENV, "0.000002")
    assert max_bytes() == 2000


def test_an_entry_used_after_the_listing_is_not_evicted(tmp_path, monkeypatch):
    """Another process may stage and use an entry between a prune's listing and its eviction:
    it is no longer the least recently used, so it stays."""
    cache = tmp_path / "cache"
    now = time.time()
    _entry(cache, "tfrecords", "busy", 1, now - 100)
    _entry(cache, "tfrecords", "idle", 1, now - 50)
    for name in ("busy", "idle"):
        with in_use(cache, ("tfrecords", name), budget=10 * MB):
            pass
        lock = cache / ".locks" / "tfrecords" / f"{name}.lock"
        os.utime(lock, (now - 100 if name == "busy" else now - 50,) * 2)
    listed = entries(cache)
    assert [e.name for e in listed] == ["busy", "idle"]
    with in_use(cache, ("tfrecords", "busy"), budget=10 * MB):
        pass  # used again after the listing below was taken
    monkeypatch.setattr(worker_cache, "entries", lambda _cache: listed)
    assert [e.name for e in prune(cache, 0).evicted] == ["idle"]
    assert (cache / "tfrecords" / "busy").is_dir()


def test_what_a_step_staged_is_trimmed_for_when_it_ends(tmp_path, caplog):
    """The budget is checked again when the step ends: what it staged past the budget evicts
    older entries then, not at some later step's start; the step's own entries stay."""
    cache = tmp_path / "cache"
    now = time.time()
    _entry(cache, "tfrecords", "old", 2, now - 300)
    _entry(cache, "models", "older", 1, now - 400)
    with caplog.at_level("INFO", logger="petdet_tasks.worker_cache"):
        with in_use(cache, ("tfrecords", "new"), ("models", "m2"), budget=5 * MB):
            assert _names(cache) == ["models/older", "tfrecords/old"]  # 3 MB: within 5
            _entry(cache, "tfrecords", "new", 3)  # staged: 6 MB
            _entry(cache, "models", "m2", 1)  # 7 MB
    assert _names(cache) == ["models/m2", "tfrecords/new"]  # the two older ones went
    assert "as the step ends (0.01 GB" in caplog.text
    with pytest.raises(RuntimeError, match="failed"):  # however the step ends
        with in_use(cache, ("tfrecords", "new"), budget=3 * MB):
            raise RuntimeError("failed")
    assert _names(cache) == ["tfrecords/new"]


def test_trimming_never_fails_the_step(tmp_path, monkeypatch, caplog):
    cache = tmp_path / "cache"

    def broken(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(worker_cache, "prune", broken)
    with in_use(cache, ("models", "m1"), budget=0):
        ran = True
    assert ran and "could not trim it to 0.00 GB as the step starts" in caplog.text
    assert "could not trim it to 0.00 GB as the step ends" in caplog.text


def test_the_cache_command_reports_and_trims(tmp_path, capsys, monkeypatch):
    import json

    from petdet_tasks.__main__ import main

    cache = tmp_path / "cache"
    now = time.time()
    _entry(cache, "tfrecords", "old", 2, now - 300)
    _entry(cache, "models", "held", 1, now - 200)
    _entry(cache, "training", "left", 3, now - 100)  # a killed run's scratch
    monkeypatch.setenv("PETDET_CACHE_DIR", str(cache))
    with in_use(cache, ("models", "held"), budget=10**12):
        assert main(["cache"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["cache"] == str(cache) and shown["bytes"] == 6 * MB
        assert shown["budget_bytes"] == 50 * 10**9 and "evicted" not in shown
        assert [(e["entry"], e["bytes"], e["in_use"]) for e in shown["entries"]] == [
            ("tfrecords/old", 2 * MB, False), ("training/left", 3 * MB, False),
            ("models/held", MB, True)]  # in_use marked it used now: the most recent
        assert not (cache / ".locks" / "tfrecords" / "old.lock").exists(), "a look, not a use"

        assert main(["cache", "--trim", "--max-gb", "0.004"]) == 0
        trimmed = json.loads(capsys.readouterr().out)
        assert [e["entry"] for e in trimmed["evicted"]] == ["tfrecords/old"]
        assert trimmed["bytes"] == 4 * MB

        assert main(["cache", "--cache-dir", str(cache), "--trim", "--max-gb", "0"]) == 0
        trimmed = json.loads(capsys.readouterr().out)
        assert [e["entry"] for e in trimmed["evicted"]] == ["training/left"]
        assert [e["entry"] for e in trimmed["entries"]] == ["models/held"]
    with pytest.raises(SystemExit) as usage:
        main(["cache", "--max-gb", "lots"])
    assert usage.value.code == 2 and "--max-gb='lots': expected" in capsys.readouterr().err


def test_a_steps_scratch_starts_empty_is_held_and_goes_when_it_ends(tmp_path):
    from petdet_tasks.worker_cache import held, scratch

    cache = tmp_path / "cache"
    left = _entry(cache, "training", "run1", 1)  # a killed attempt's
    with scratch(cache, "training", "run1", ("tfrecords", "recs"), budget=0) as work:
        assert work == left and list(work.iterdir()) == []
        assert held(cache, "training", "run1") and held(cache, "tfrecords", "recs")
        (work / "ckpt").mkdir()
    assert not work.exists() and not held(cache, "training", "run1")
    with pytest.raises(RuntimeError, match="diverged"):
        with scratch(cache, "export", "m1", budget=0) as work:
            (work / "saved_model").mkdir()
            raise RuntimeError("diverged")
    assert not work.exists(), "a failed step's scratch goes too: the store holds what it keeps"
