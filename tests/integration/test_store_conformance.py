"""One conformance suite, run on both backends (local directory and a real SeaweedFS)."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from petdet_tasks.errors import ConfigError
from petdet_tasks.store import (
    ChecksumError,
    NotFound,
    PreconditionFailed,
    S3Store,
    open_store,
)


def test_put_get_roundtrip_and_listing(store):
    etag = store.put_bytes("a/b/c.txt", b"hello")
    assert store.get_bytes("a/b/c.txt") == (b"hello", etag)
    store.put_bytes("a/d.txt", b"x")
    store.put_bytes("ab.txt", b"y")
    assert [(o.key, o.size) for o in store.list("a/")] == [("a/b/c.txt", 5), ("a/d.txt", 1)]
    assert [o.key for o in store.list("a")] == ["a/b/c.txt", "a/d.txt", "ab.txt"]
    assert store.exists("a/d.txt") and not store.exists("a/nope")
    assert store.uri("a/d.txt") == store.root + "/a/d.txt"


def test_missing_key_is_not_found_with_uri(store):
    with pytest.raises(NotFound, match="nope.txt"):
        store.get_bytes("nope.txt")


def test_put_if_absent_refuses_second_writer(store):
    store.put_bytes("m.json", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("m.json", b"second", if_absent=True)
    assert store.get_bytes("m.json")[0] == b"first"


def test_compare_and_swap(store):
    etag = store.put_bytes("p.json", b"v1")
    etag2 = store.put_bytes("p.json", b"v2", if_match=etag)
    with pytest.raises(PreconditionFailed):
        store.put_bytes("p.json", b"v3", if_match=etag)  # stale
    assert store.get_bytes("p.json") == (b"v2", etag2)


def test_put_if_absent_race_has_exactly_one_winner(store):
    winners, losers = [], []
    barrier = threading.Barrier(8)

    def write(i):
        barrier.wait()
        try:
            store.put_bytes("race.json", f"writer-{i}".encode(), if_absent=True)
            winners.append(i)
        except PreconditionFailed:
            losers.append(i)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(winners) == 1 and len(losers) == 7
    assert store.get_bytes("race.json")[0] == f"writer-{winners[0]}".encode()


def test_large_file_streams_and_verifies(store, tmp_path, monkeypatch):
    if isinstance(store, S3Store):  # force real multipart with small parts
        monkeypatch.setattr(S3Store, "MULTIPART_THRESHOLD", 5 << 20)
        monkeypatch.setattr(S3Store, "MULTIPART_CHUNK", 5 << 20)
    src = tmp_path / "big.bin"
    data = os.urandom(12 << 20)
    src.write_bytes(data)
    entry = store.put_file("big/big.bin", src)
    assert entry.size == len(data)
    assert entry.sha256 == hashlib.sha256(data).hexdigest()
    out = tmp_path / "dl" / "big.bin"
    assert store.download_file("big/big.bin", out, sha256=entry.sha256) == entry
    assert out.read_bytes() == data


def test_download_with_wrong_checksum_writes_nothing(store, tmp_path):
    store.put_bytes("f.bin", b"content")
    out = tmp_path / "dl" / "f.bin"
    with pytest.raises(ChecksumError, match="expected sha256 0+, got"):
        store.download_file("f.bin", out, sha256="0" * 64)
    assert not out.exists()
    assert list((tmp_path / "dl").iterdir()) == []


def test_delete_prefix(store):
    for k in ("x/1", "x/2/3", "x/keep", "y/1"):
        store.put_bytes(k, b".")
    assert store.delete_prefix("x/", keep=frozenset({"x/keep"})) == 2
    assert [o.key for o in store.list("")] == ["x/keep", "y/1"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", ".petdet/x"])
def test_invalid_keys_are_refused(store, key):
    with pytest.raises(ValueError, match="invalid store key"):
        store.put_bytes(key, b"x")


def test_open_store_dispatch(tmp_path):
    assert open_store(tmp_path).root == str(tmp_path.resolve())
    assert open_store(f"file://{tmp_path}").root == str(tmp_path.resolve())
    s3 = open_store("s3://bucket/some/prefix/", s3_client=object())
    assert (s3.bucket, s3.prefix, s3.root) == ("bucket", "some/prefix", "s3://bucket/some/prefix")
    with pytest.raises(ValueError, match="unsupported store URI"):
        open_store("gs://bucket")


def test_s3_credentials_are_enforced_and_not_in_errors(seaweed):
    import boto3

    bad = boto3.client("s3", endpoint_url=seaweed.endpoint, aws_access_key_id=seaweed.access_key,
                       aws_secret_access_key="wrong-secret-123", region_name="us-east-1")
    store = S3Store("s3://petdet/creds", client=bad)
    with pytest.raises(Exception) as info:
        store.put_bytes("x", b"x")
    assert "wrong-secret-123" not in str(info.value)
    assert seaweed.secret_key not in repr(store) + str(info.value)
    assert "SignatureDoesNotMatch" in str(info.value) or "AccessDenied" in str(info.value)


@pytest.mark.parametrize("uri", [
    "s3://AKIA:p4ss@bucket/x", "S3://AKIA:p4ss@b/x", "https://u:p4ss@host/bucket",
    "file://u:p4ss@host/x", "http://u:p4ss@host]/x", "s3://AKIA:p4ss@[b/x",
])
def test_store_uri_with_credentials_is_refused_redacted(uri, caplog):
    with caplog.at_level("DEBUG"), pytest.raises(ConfigError) as info:
        open_store(uri, s3_client=object())
    text = str(info.value) + repr(info.value.args) + "".join(info.value.problems) + caplog.text
    assert "p4ss" not in text and "AKIA" not in text
    assert "has credentials in it" in str(info.value) and "***@" in str(info.value)
    with pytest.raises(ConfigError) as direct:
        S3Store("s3://AKIA:p4ss@bucket/x")
    assert "p4ss" not in str(direct.value)


def test_unsupported_store_uri_is_not_echoed(tmp_path):
    with pytest.raises(ConfigError, match=r"unsupported store URI scheme 'gs://'") as info:
        open_store("gs://bucket/x?token=t0k3n")
    assert "t0k3n" not in str(info.value)
    assert isinstance(open_store("S3://bucket/p", s3_client=object()), S3Store)
    assert open_store(f"FILE://{tmp_path}").root == str(tmp_path.resolve())


def test_list_refuses_a_prefix_outside_the_store(store):
    with pytest.raises(ValueError, match="invalid store key"):
        list(store.list("../../outside/"))


def test_local_store_sweeps_what_killed_puts_left_in_its_temp_area(tmp_path, caplog):
    """A put_file SIGKILLed mid-copy leaves its temp file in .petdet/tmp (hidden from list()),
    a killed shard task its scratch folder: opening the store removes what is older than a day,
    and nothing a running process may still be using."""
    import time

    from petdet_tasks.store import LocalStore

    root = tmp_path / "store"
    LocalStore(root).put_bytes("a/kept.bin", b"kept")
    tmp = root / ".petdet" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    old = time.time() - 2 * 24 * 3600

    def aged(path, when=old):
        os.utime(path, (when, when))
        return path

    stale_file = tmp / "0123456789abcdef0123456789abcdef"
    stale_file.write_bytes(b"\0" * (4 << 20))
    aged(stale_file)
    fresh_file = tmp / "fedcba9876543210fedcba9876543210"
    fresh_file.write_bytes(b"being written")
    stale_dir = tmp / "petdet-shard-dead"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "train-00000.tfrecord").write_bytes(b"x" * 100)
    for p in (stale_dir / "sub" / "train-00000.tfrecord", stale_dir / "sub", stale_dir):
        aged(p)
    live_dir = tmp / "petdet-shard-live"  # an old folder a running shard still writes into
    live_dir.mkdir()
    (live_dir / "old.part").write_bytes(b"o")
    aged(live_dir / "old.part")
    (live_dir / "new.part").write_bytes(b"n")
    aged(live_dir)

    with caplog.at_level("WARNING", logger="petdet"):
        store = LocalStore(root)
    assert not stale_file.exists() and not stale_dir.exists()
    assert fresh_file.exists() and live_dir.is_dir() and (live_dir / "new.part").exists()
    assert str(stale_file) in caplog.text and "(4194304 bytes" in caplog.text
    assert str(stale_dir) in caplog.text
    assert store.get_bytes("a/kept.bin")[0] == b"kept"
    assert [o.key for o in store.list()] == ["a/kept.bin"]
    assert store.sweep_tmp() == 0


def test_local_conditional_puts_are_fsynced_before_they_are_visible(tmp_path, monkeypatch):
    """The manifest (create-only) and the lease (create-only, compare-and-swap) reach the disk
    before they are linked into place, and their folder after: a host crash cannot leave a
    zero-byte manifest. Plain puts (shards) are not fsynced."""
    from petdet_tasks.store import LocalStore

    store = LocalStore(tmp_path / "store")
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        path = os.readlink(f"/proc/self/fd/{fd}")
        synced.append((path, os.path.isdir(path)))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.put_bytes("p/shard", b"data")
    assert synced == []
    store.put_bytes("p/_MANIFEST.json", b"{}", if_absent=True)
    tmp_dir = str(tmp_path / "store" / ".petdet" / "tmp")
    assert [d for _, d in synced] == [False, True]
    assert os.path.dirname(synced[0][0]) == tmp_dir  # the temp file, before its link
    assert synced[1][0] == str(tmp_path / "store" / "p")
    etag = store.put_bytes("p/_LEASE.json", b"{}", if_absent=True)
    store.put_bytes("p/_LEASE.json", b"{ }", if_match=etag)
    assert len(synced) == 6


class _BreakingBodies:
    """A boto3 client whose first ``failures`` get_object responses break off mid-body the way
    a reset connection or a read timeout does (botocore retries requests, not bodies)."""

    def __init__(self, client, failures, error):
        self._client, self.failures, self.error, self.requests = client, failures, error, 0

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_object(self, **kw):
        self.requests += 1
        resp = self._client.get_object(**kw)
        if self.failures:
            self.failures -= 1
            body, error = resp["Body"], self.error

            class Broken:
                def read(self, amt=None):
                    body.read(3)
                    raise error()

                def close(self):
                    body.close()

            resp = {**resp, "Body": Broken()}
        return resp


def _body_errors():
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return {
        "streaming": lambda: ResponseStreamingError(error=ProtocolError(
            "Connection broken: IncompleteRead(3 bytes read, 9 more expected)")),
        "incomplete": lambda: IncompleteReadError(actual_bytes=3, expected_bytes=12),
        "timeout": lambda: ReadTimeoutError(endpoint_url="http://127.0.0.1:1/b/k",
                                            error="Read timed out."),
    }


@pytest.mark.parametrize("kind", ["streaming", "incomplete", "timeout"])
def test_s3_get_retries_a_body_that_breaks_mid_read(seaweed, s3_client, monkeypatch, caplog,
                                                   kind):
    import uuid

    from petdet_tasks.store import StoreError

    monkeypatch.setattr(S3Store, "GET_BACKOFF_S", 0.01, raising=False)
    root = f"s3://{seaweed.bucket}/t-{uuid.uuid4().hex[:12]}"
    S3Store(root, client=s3_client).put_bytes("d/k.json", b'{"ok": true}')

    flaky = _BreakingBodies(s3_client, 2, _body_errors()[kind])
    store = S3Store(root, client=flaky)
    with caplog.at_level("WARNING", logger="petdet"):
        data, etag = store.get_bytes("d/k.json")
    assert data == b'{"ok": true}' and etag and flaky.requests == 3
    assert "requesting it again" in caplog.text and store.uri("d/k.json") in caplog.text

    broken = _BreakingBodies(s3_client, 99, _body_errors()[kind])
    store = S3Store(root, client=broken)
    with pytest.raises(StoreError) as info:
        store.get_bytes("d/k.json")
    message = str(info.value)
    assert message.startswith(f"get {store.uri('d/k.json')} failed: ")
    assert message.endswith("(after 4 requests)") and broken.requests == 4
    assert seaweed.secret_key not in message + caplog.text

    with pytest.raises(NotFound):  # the server's own answers are not retried
        S3Store(root, client=(missing := _BreakingBodies(s3_client, 0, None))).get_bytes("nope")
    assert missing.requests == 1
