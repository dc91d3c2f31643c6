"""The commit protocol (petdet_tasks.manifest) on both backends."""

from __future__ import annotations

import hashlib
import json
import threading
import time

import pytest

from petdet_tasks.layout import fingerprint, lease_key, manifest_key, split_output_uri, step_prefix
from petdet_tasks.manifest import LeaseLost, load_output, read_manifest, run_step
from petdet_tasks.store import StoreError

INPUTS = {"archive": "ab" * 32}
CONFIG = {"extract": True}


def _body(calls, content=b"payload", sleep_s=0.0):
    def body(w):
        calls.append(threading.get_ident())
        w.put_bytes("data/one.bin", content)
        if sleep_s:
            time.sleep(sleep_s)
        w.put_json("report.json", {"n": 1})
        return {"count": 1}
    return body


def _run(store, body, **kw):
    kw.setdefault("lease_ttl_s", 2.0)
    return run_step(store, "download", 1, inputs=INPUTS, config=CONFIG, body=body, **kw)


def _assert_consistent(store, result):
    m = read_manifest(store, step_prefix("download", result.fingerprint))
    assert m is not None
    for rel, entry in m["files"].items():
        data, _ = store.get_bytes(step_prefix("download", result.fingerprint) + rel)
        assert len(data) == entry["size"]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    return m


def test_commit_then_cache_hit(store):
    calls = []
    first = _run(store, _body(calls))
    assert not first.cache_hit and len(calls) == 1
    fp = fingerprint("download", 1, INPUTS, CONFIG)
    assert first.fingerprint == fp
    assert first.uri == store.uri(f"datasets/{fp}")
    m = _assert_consistent(store, first)
    assert set(m["files"]) == {"data/one.bin", "report.json"}
    assert m["inputs"] == INPUTS and m["config"] == CONFIG and m["outputs"] == {"count": 1}
    assert {"started_at", "finished_at", "seconds"} <= set(m["timings"])
    assert m["code_version"]
    # the manifest is the last thing written and the lease is gone
    assert not store.exists(lease_key(step_prefix("download", fp)))

    second = _run(store, _body(calls))
    assert second.cache_hit and len(calls) == 1
    assert second.manifest == first.manifest
    assert second.to_xcom() == {"step": "download", "uri": first.uri, "fingerprint": fp,
                                "cache_hit": True, "count": 1}
    assert load_output(store, first.uri, expect_step="download").manifest == first.manifest


def test_incomplete_prefix_is_ignored_and_overwritten(store):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    store.put_bytes(prefix + "data/one.bin", b"half-written junk")
    store.put_bytes(prefix + "stale-from-an-old-attempt.bin", b"junk")
    assert read_manifest(store, prefix) is None
    with pytest.raises(StoreError, match="incomplete or absent"):
        load_output(store, store.uri(prefix.rstrip("/")))
    calls = []
    result = _run(store, _body(calls))
    assert not result.cache_hit and len(calls) == 1
    m = _assert_consistent(store, result)
    assert [o.key[len(prefix):] for o in store.list(prefix)] == sorted(
        [*m["files"], "_MANIFEST.json"])


def test_failed_body_commits_nothing_and_frees_the_prefix(store):
    def bad(w):
        w.put_bytes("data/one.bin", b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _run(store, bad)
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    assert read_manifest(store, prefix) is None
    assert not store.exists(lease_key(prefix))
    calls = []
    assert not _run(store, _body(calls), wait_timeout_s=1).cache_hit  # no waiting on a lease


@pytest.mark.parametrize("writers", [2, 6])
def test_racing_writers_end_with_one_consistent_output(store, writers):
    calls, results, errors = [], [], []
    barrier = threading.Barrier(writers)

    def go(i):
        barrier.wait()
        try:
            results.append(_run(store, _body(calls, content=f"writer {i}".encode(), sleep_s=0.3),
                                poll_s=0.05))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1, "exactly one writer did the work"
    assert sorted(r.cache_hit for r in results) == [False] + [True] * (writers - 1)
    manifests = {json.dumps(r.manifest, sort_keys=True) for r in results}
    assert len(manifests) == 1
    _assert_consistent(store, results[0])


def test_expired_lease_of_a_dead_writer_is_taken_over(store):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    store.put_bytes(lease_key(prefix), json.dumps(
        {"id": "dead", "pid": 1, "host": "gone", "expires_at": time.time() - 5}).encode())
    calls = []
    assert not _run(store, _body(calls), wait_timeout_s=2).cache_hit
    assert len(calls) == 1


def test_live_lease_makes_others_wait_then_give_up_clearly(store):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    store.put_bytes(lease_key(prefix), json.dumps(
        {"id": "busy-writer", "pid": 42, "host": "h", "expires_at": time.time() + 60}).encode())
    with pytest.raises(StoreError, match="busy-writer"):
        _run(store, _body([]), wait_timeout_s=0.3, poll_s=0.05)


def test_force_recomputes(store):
    calls = []
    first = _run(store, _body(calls, content=b"v1"))
    forced = _run(store, _body(calls, content=b"v2"), force=True)
    assert len(calls) == 2 and not forced.cache_hit
    assert forced.manifest["files"]["data/one.bin"] != first.manifest["files"]["data/one.bin"]
    _assert_consistent(store, forced)


def test_resume_keeps_leftovers(store):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    store.put_bytes(prefix + "ckpt/step-10", b"state")
    seen = []

    def body(w):
        seen.append(store.get_bytes(prefix + "ckpt/step-10")[0])
        w.put_bytes("final.bin", b"done")
        return {}

    _run(store, body, resume=True)
    assert seen == [b"state"]


def test_force_on_a_resumable_step_starts_from_scratch_and_its_retry_resumes(store):
    """resume continues an incomplete attempt, never a complete output: a forced training run
    must not restore the committed run's last checkpoint and re-commit the same weights. Once
    the forced attempt has removed the old output, a retry of it resumes what it wrote."""
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))

    def first(w):
        w.put_bytes("ckpt/step-100", b"old final state")
        return {"step": 100}

    _run(store, first, resume=True)
    seen = []

    def forced_then_dies(w):
        seen.append(sorted(o.key[len(prefix):] for o in store.list(prefix)))
        w.put_bytes("ckpt/step-10", b"new state")
        raise RuntimeError("worker lost")

    with pytest.raises(RuntimeError, match="worker lost"):
        _run(store, forced_then_dies, resume=True, force=True)
    assert seen == [["_LEASE.json"]], "the committed run's checkpoint must be gone"
    assert read_manifest(store, prefix) is None

    def retry(w):
        seen.append(sorted(o.key[len(prefix):] for o in store.list(prefix)))
        w.put_bytes("ckpt/step-100", b"new final state")
        return {"step": 100}

    result = _run(store, retry, resume=True, force=True)
    assert seen[1] == ["_LEASE.json", "ckpt/step-10"], "the retry resumes the forced attempt"
    assert store.get_bytes(prefix + "ckpt/step-100")[0] == b"new final state"
    assert not result.cache_hit
    _assert_consistent(store, result)


def test_lost_lease_commits_nothing(store):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))

    def body(w):
        w.put_bytes("a.bin", b"a")
        # another writer believes our lease expired and takes it over
        store.put_bytes(lease_key(prefix), json.dumps(
            {"id": "intruder", "expires_at": time.time() + 60}).encode())
        return {}

    with pytest.raises(LeaseLost):
        _run(store, body)
    assert read_manifest(store, prefix) is None
    assert store.exists(lease_key(prefix)), "the intruder's lease is left alone"


def test_fingerprint_rules():
    base = fingerprint("download", 1, {"a": "1"}, {"x": 1, "y": [1, 2]})
    assert base == fingerprint("download", 1, {"a": "1"}, {"y": [1, 2], "x": 1})
    assert base != fingerprint("download", 2, {"a": "1"}, {"x": 1, "y": [1, 2]})
    assert base != fingerprint("download", 1, {"a": "2"}, {"x": 1, "y": [1, 2]})
    assert base != fingerprint("download", 1, {"a": "1"}, {"x": 2, "y": [1, 2]})
    assert base != fingerprint("tfrecords", 1, {"a": "1"}, {"x": 1, "y": [1, 2]})
    assert len(base) == 20
    root, step, fp = split_output_uri(f"s3://b/p/datasets/{base}")
    assert (root, step, fp) == ("s3://b/p", "download", base)
    with pytest.raises(ValueError, match="not a step output URI"):
        split_output_uri("s3://b/p/elsewhere/" + base)
    assert manifest_key("datasets/x/") == "datasets/x/_MANIFEST.json"


def _lease_of(pid, **kw):
    import os
    import socket

    return json.dumps({"id": "earlier-writer", "pid": pid, "host": socket.gethostname(),
                       "pid_namespace": os.readlink("/proc/self/ns/pid"),
                       "expires_at": time.time() + 600, **kw}).encode()


@pytest.mark.parametrize("how", ["exited", "zombie"])
def test_a_lease_whose_process_is_gone_is_taken_over_at_once(store, caplog, how):
    """A killed run rerun on the same machine resumes now, not after the lease's expiry. A
    zombie (exited, its parent has not reaped it yet) is gone too."""
    import subprocess
    import sys

    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    if how == "exited":
        child.wait()
    else:
        while open(f"/proc/{child.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            time.sleep(0.01)
    try:
        store.put_bytes(lease_key(prefix), _lease_of(child.pid))
        t = time.monotonic()
        with caplog.at_level("WARNING", logger="petdet"):
            result = _run(store, _body([]), wait_timeout_s=30, poll_s=0.05)
    finally:
        child.wait()
    assert time.monotonic() - t < 10 and not result.cache_hit
    assert "took over the dead process's lease" in caplog.text


@pytest.mark.parametrize("why", ["alive", "other host", "other namespace", "older writer"])
def test_a_lease_of_a_live_or_unknown_process_is_waited_for(store, why):
    import socket
    import subprocess
    import sys

    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = {
            "alive": _lease_of(live.pid),
            "other host": _lease_of(999_999_999, host="another-machine"),
            "other namespace": _lease_of(999_999_999, pid_namespace="pid:[1]"),
            # written by an older petdet: no namespace recorded, so no judgement
            "older writer": json.dumps({"id": "earlier-writer", "pid": 999_999_999,
                                        "host": socket.gethostname(),
                                        "expires_at": time.time() + 600}).encode(),
        }[why]
        store.put_bytes(lease_key(prefix), lease)
        with pytest.raises(StoreError, match="earlier-writer"):
            _run(store, _body([]), wait_timeout_s=0.3, poll_s=0.05)
    finally:
        live.kill()
        live.wait()


def test_a_forced_gather_keeps_the_shards_this_attempt_wrote_before_it(store):
    """tfrecords and detection write their (forced) shards under the prefix before the gather
    commits: a forced gather removes the old manifest but not those shards."""
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    _run(store, _body([], content=b"v1"), resume=True)
    store.put_bytes(prefix + "data/shard-0", b"rewritten by this forced attempt")

    def gather(w):
        data, _ = store.get_bytes(prefix + "data/shard-0")
        w.put_bytes("data/merged", data)
        return {}

    result = _run(store, gather, resume=True, force=True, force_clears=False)
    assert not result.cache_hit
    assert store.get_bytes(prefix + "data/merged")[0] == b"rewritten by this forced attempt"
    _assert_consistent(store, result)


def test_load_output_by_uri_or_store_relative_and_clear_permanent_errors(store):
    from petdet_tasks.errors import ConfigError

    result = _run(store, _body([]))
    rel = step_prefix("download", result.fingerprint).rstrip("/")  # datasets/<fp>
    for uri in (result.uri, result.uri + "/", rel, rel + "/"):
        assert load_output(store, uri, expect_step="download").manifest == result.manifest
    cases = {
        result.uri: "is a 'download' output, expected a 'tfrecords' output",
        "s3://elsewhere/root/" + rel: "is not under the store root",
        "datasets": "is not a step output URI",
        store.uri("datasets/deadbeef"): "invalid fingerprint",
        store.uri("nothing/" + result.fingerprint): "folder 'nothing' is not one of",
    }
    for uri, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_output(store, uri, expect_step="tfrecords" if uri == result.uri else None)
    # a well-formed output that is not (yet) there may still be on its way: retryable
    with pytest.raises(StoreError) as missing:
        load_output(store, "datasets/" + "0" * 20)
    assert not isinstance(missing.value, ConfigError)


def _corrupt(store, key, content):
    """What a host crash leaves of an un-fsynced put (or a hand edit): the key, not its JSON."""
    store.delete(key)
    store.put_bytes(key, content)


@pytest.mark.parametrize("content", [b"", b'{"files": {"data/one.bin": ', b"[1, 2]"])
@pytest.mark.parametrize("resume", [False, True])
def test_an_unreadable_manifest_is_named_and_recomputed(store, caplog, content, resume):
    """A manifest that does not parse (zero bytes after a host crash) is no commit: a reader
    gets a permanent error naming it; the step's next run warns, removes it and recomputes
    (also a resumable step, whose create-only commit would otherwise find it there)."""
    from petdet_tasks.errors import PermanentError
    from petdet_tasks.manifest import UnreadableManifest

    first = _run(store, _body([], content=b"v1"), resume=resume)
    prefix = step_prefix("download", first.fingerprint)
    _corrupt(store, manifest_key(prefix), content)
    shown = store.uri(manifest_key(prefix))

    with caplog.at_level("WARNING", logger="petdet"):
        assert read_manifest(store, prefix) is None
    assert f"{shown} is unreadable" in caplog.text and "treating it as incomplete" in caplog.text
    with pytest.raises(UnreadableManifest) as info:
        load_output(store, first.uri)
    assert isinstance(info.value, PermanentError)
    assert shown in str(info.value) and "force" in str(info.value)

    caplog.clear()
    calls = []
    with caplog.at_level("WARNING", logger="petdet"):
        again = _run(store, _body(calls, content=b"v2"), resume=resume)
    assert not again.cache_hit and len(calls) == 1
    assert f"{shown} is unreadable" in caplog.text and "removing it and recomputing" in caplog.text
    _assert_consistent(store, again)
    assert _run(store, _body(calls)).cache_hit and len(calls) == 1
    assert load_output(store, first.uri).manifest == again.manifest


@pytest.mark.parametrize("resume", [False, True])
def test_force_replaces_an_unreadable_manifest_from_scratch(store, resume):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    _run(store, _body([], content=b"v1"), resume=resume)
    store.put_bytes(prefix + "ckpt/old", b"old state")
    _corrupt(store, manifest_key(prefix), b"")
    seen = []

    def body(w):
        seen.append(sorted(o.key[len(prefix):] for o in store.list(prefix)))
        w.put_bytes("data/one.bin", b"v2")
        return {"count": 2}

    result = _run(store, body, force=True, resume=resume)
    assert not result.cache_hit and result.outputs == {"count": 2}
    assert seen == [["_LEASE.json"]], "force starts from scratch, as for a readable manifest"
    _assert_consistent(store, result)


@pytest.mark.parametrize("content", [b"", b'{"id": "half', b"null",
                                     b'{"id": "w", "expires_at": "later"}'])
def test_an_unreadable_lease_is_taken_over(store, caplog, content):
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    store.put_bytes(lease_key(prefix), content)
    calls = []
    with caplog.at_level("WARNING", logger="petdet"):
        result = _run(store, _body(calls), wait_timeout_s=5, poll_s=0.05)
    assert not result.cache_hit and len(calls) == 1
    assert f"took over the unreadable lease on {store.uri(lease_key(prefix))}" in caplog.text
    _assert_consistent(store, result)
    assert not store.exists(lease_key(prefix))


def _failing_renewals(monkeypatch, store, run_id, failures):
    """The lease renewals (and only those) of run ``run_id`` fail with a transient error, the
    first ``failures`` of them (None: all)."""
    put = store.put_bytes
    left = [failures]

    def put_bytes(key, data, **kw):
        if (key.endswith("_LEASE.json") and kw.get("if_match")
                and threading.current_thread().name == "petdet-lease"
                and f'"run_id":"{run_id}"'.encode() in data and left[0] != 0):
            if left[0] is not None:
                left[0] -= 1
            raise StoreError(f"simulated: connection reset renewing {key}")
        return put(key, data, **kw)

    monkeypatch.setattr(store, "put_bytes", put_bytes)


def test_a_holder_that_cannot_renew_stops_writing_before_a_takeover(store, monkeypatch, caplog):
    """A's renewals fail (a partition): its lease expires and B takes over, clears and commits.
    A must notice on its own — before the lease expires — and refuse its next write and its
    commit, instead of overwriting B's committed file."""
    _failing_renewals(monkeypatch, store, "A", None)
    b_committed = threading.Event()
    outcome = {}

    def body_a(w):
        time.sleep(1.2)  # working; its renewals fail meanwhile
        b_committed.wait(30)
        outcome["a wrote"] = True
        w.put_bytes("data/one.bin", b"AAAA")
        return {}

    def run_a():
        try:
            _run(store, body_a, lease_ttl_s=1.0, run_id="A")
        except Exception as e:
            outcome["a"] = e

    a = threading.Thread(target=run_a)
    with caplog.at_level("WARNING", logger="petdet"):
        a.start()
        time.sleep(0.3)
        b = _run(store, _body([], content=b"BBBB"), lease_ttl_s=1.0, run_id="B",
                 wait_timeout_s=30, poll_s=0.05)
        b_committed.set()
        a.join(30)
    assert not b.cache_hit
    _assert_consistent(store, b)
    assert store.get_bytes(step_prefix("download", b.fingerprint) + "data/one.bin")[0] == b"BBBB"
    assert "a wrote" in outcome  # it tried, after B's commit, and was refused
    assert isinstance(outcome.get("a"), LeaseLost), outcome
    assert "could not be renewed" in str(outcome["a"])


def test_a_holder_that_cannot_renew_does_not_commit(store, monkeypatch):
    _failing_renewals(monkeypatch, store, "A", None)

    def body(w):
        w.put_bytes("data/one.bin", b"x")
        time.sleep(1.0)  # past 2/3 of the TTL without a renewal
        return {}

    with pytest.raises(LeaseLost, match="could not be renewed"):
        _run(store, body, lease_ttl_s=1.2, run_id="A")
    prefix = step_prefix("download", fingerprint("download", 1, INPUTS, CONFIG))
    assert read_manifest(store, prefix) is None


def test_one_failed_renewal_is_retried_and_the_lease_kept(store, monkeypatch):
    _failing_renewals(monkeypatch, store, "A", 1)
    calls = []
    result = _run(store, _body(calls, sleep_s=2.0), lease_ttl_s=1.5, run_id="A")
    assert not result.cache_hit and len(calls) == 1
    _assert_consistent(store, result)
