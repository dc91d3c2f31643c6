"""The download step end to end on both store backends, from local HTTP servers and folders."""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from petdet_tasks.download import (
    ARCHIVES,
    OFFICIAL_BASE,
    PINNED,
    DatasetLayoutError,
    DownloadConfig,
    download,
    expected_digests,
)
from petdet_tasks.errors import PermanentError
from petdet_tasks.fetch import ChecksumMismatch
from petdet_tasks.safe_tar import DamagedArchive, UnsafeArchiveError
from petdet_tasks.store import LocalStore, sha256_file
from tests.support.http_server import serve_directory


def _copy_sample(sample_archives, dest: Path, *, sums: bool = True) -> Path:
    src, _ = sample_archives
    dest.mkdir(parents=True, exist_ok=True)
    for name in ARCHIVES:
        shutil.copy(src / name, dest / name)
    if sums:
        shutil.copy(src / "SHA256SUMS", dest / "SHA256SUMS")
    return dest


def _datasets(store) -> list[str]:
    return [o.key for o in store.list("datasets/")]


def test_download_from_http_commits_then_cache_hit(store, sample_archives, tmp_path, caplog):
    src = _copy_sample(sample_archives, tmp_path / "mirror")
    _, summary = sample_archives
    caplog.set_level(logging.INFO)
    with serve_directory(src) as server:
        cfg = DownloadConfig(source=server.url, cache_dir=str(tmp_path / "cache"))
        first = download(store, cfg)
        assert not first.cache_hit
        out = first.outputs
        assert out["images"] == summary["images"]
        assert out["trainval"] == summary["trainval"] and out["test"] == summary["test"]
        assert out["digests"] == "SHA256SUMS"
        assert out["archives"] == {n: {"size": summary["archives"][n]["size"],
                                       "sha256": summary["archives"][n]["sha256"]}
                                   for n in ARCHIVES}
        files = first.manifest["files"]
        assert "annotations/list.txt" in files and "annotations/trainval.txt" in files
        assert sum(k.startswith("images/") for k in files) == summary["images"]
        assert first.uri == store.uri(f"datasets/{first.fingerprint}")
        fetched = [r.path for r in server.requests if r.path.endswith(".tar.gz")]
        assert sorted(fetched) == ["/annotations.tar.gz", "/images.tar.gz"]

        # the content in the store is what the archive held, byte for byte
        with tarfile.open(src / "images.tar.gz") as tf:
            member = next(m for m in tf.getmembers() if m.isfile())
            data = tf.extractfile(member).read()
        assert store.get_bytes(f"datasets/{first.fingerprint}/{member.name}")[0] == data

        n_before = len(server.requests)
        second = download(store, DownloadConfig(source=server.url,
                                                cache_dir=str(tmp_path / "cache2")))
        assert second.cache_hit and second.fingerprint == first.fingerprint
        later = [r.path for r in server.requests[n_before:]]
        assert later == ["/SHA256SUMS"], "a cache hit downloads nothing"
    assert any("cache hit" in r.getMessage() for r in caplog.records)


def test_same_bytes_from_a_folder_give_the_same_dataset(store, sample_archives, tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "folder")
    a = download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "c1")))
    b = download(store, DownloadConfig(source=f"file://{src}", cache_dir=str(tmp_path / "c2")))
    assert b.cache_hit and a.fingerprint == b.fingerprint


def test_resume_after_dropped_connection(store, sample_archives, tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "mirror")
    size = (src / "images.tar.gz").stat().st_size
    with serve_directory(src, drop_after_bytes=size // 2) as server:
        result = download(store, DownloadConfig(source=server.url,
                                                cache_dir=str(tmp_path / "cache")))
        ranges = [r.range for r in server.requests if r.path == "/images.tar.gz"]
    assert not result.cache_hit
    assert ranges[0] is None and ranges[1] == f"bytes={size // 2}-"


def test_checksum_mismatch_commits_nothing(store, sample_archives, tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "mirror")
    good = sha256_file(src / "images.tar.gz").sha256
    bad = "0" * 64
    (src / "SHA256SUMS").write_text((src / "SHA256SUMS").read_text().replace(good, bad))
    with pytest.raises(ChecksumMismatch) as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert bad in str(info.value) and good in str(info.value)
    assert _datasets(store) == []


def test_source_without_sha256sums_records_computed_digests(store, sample_archives, tmp_path,
                                                            caplog):
    src = _copy_sample(sample_archives, tmp_path / "nosums", sums=False)
    caplog.set_level(logging.WARNING)
    result = download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert result.outputs["digests"] == "none"
    _, summary = sample_archives
    assert result.manifest["inputs"] == {n: summary["archives"][n]["sha256"] for n in ARCHIVES}
    assert any("no SHA256SUMS" in r.getMessage() for r in caplog.records)


def _evil_tar(path: Path, kind: str) -> None:
    with tarfile.open(path, "w") as tf:
        ok = tarfile.TarInfo("images/ok.jpg")
        ok.size = 3
        tf.addfile(ok, io.BytesIO(b"abc"))
        if kind == "dotdot":
            evil = tarfile.TarInfo("images/../../evil.txt")
            evil.size = 4
            tf.addfile(evil, io.BytesIO(b"evil"))
        else:
            link = tarfile.TarInfo("images/escape")
            link.type = tarfile.SYMTYPE
            link.linkname = "../../../etc/passwd"
            tf.addfile(link)


@pytest.mark.parametrize("kind,member", [("dotdot", "images/../../evil.txt"),
                                         ("symlink", "images/escape")])
def test_unsafe_archives_are_refused_and_commit_nothing(store, sample_archives, tmp_path, kind,
                                                        member):
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)
    _evil_tar(src / "images.tar.gz", kind)
    with pytest.raises(UnsafeArchiveError) as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert member in str(info.value)
    assert _datasets(store) == []
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()


def test_archives_without_the_pets_layout_are_refused(store, tmp_path):
    src = tmp_path / "other"
    src.mkdir()
    for name in ARCHIVES:
        with tarfile.open(src / name, "w") as tf:
            info = tarfile.TarInfo(f"readme-{name}.txt")  # one name in both would be refused
            info.size = 2
            tf.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(DatasetLayoutError, match="annotations/list.txt"):
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert _datasets(store) == []


def test_official_sources_use_the_pinned_digests_without_network():
    for base in (OFFICIAL_BASE, OFFICIAL_BASE.rstrip("/"),
                 "http://www.robots.ox.ac.uk/~vgg/data/pets/data/"):
        digests, how = expected_digests(base)
        assert how == "pinned" and digests == PINNED


def test_cli_prints_one_json_line_last(sample_archives, tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "mirror")
    store_dir = tmp_path / "store"
    cmd = [sys.executable, "-m", "petdet_tasks", "download", "--store", str(store_dir),
           "--source", str(src), "--cache-dir", str(tmp_path / "cache")]
    runs = [subprocess.run(cmd, capture_output=True, text=True, timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first["cache_hit"] is False and second["cache_hit"] is True
    assert first["uri"] == second["uri"] == f"{store_dir}/datasets/{first['fingerprint']}"
    assert "cache hit" in runs[1].stderr


def test_cli_sample_data(tmp_path):
    out = subprocess.run([sys.executable, "-m", "petdet_tasks", "sample-data", str(tmp_path / "s"),
                          "--breeds", "3", "--per-breed", "4", "--seed", "7"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["images"] == 12 and len(summary["breeds"]) == 3
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "SHA256SUMS", "annotations.tar.gz", "images.tar.gz"]


def test_cli_reports_errors_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "petdet_tasks", "download", "--store",
                          str(tmp_path / "s"), "--source", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "download failed" in out.stderr and "Traceback" not in out.stderr


def _rewrite_annotations(src: Path, edit) -> None:
    """Rebuild ``annotations.tar.gz`` (plain tar, as the official one) with ``edit(name, data)``
    → the (name, data) pairs to write for each regular member."""
    path = src / "annotations.tar.gz"
    with tarfile.open(path) as tf_:
        members = [(m, tf_.extractfile(m).read() if m.isfile() else None)
                   for m in tf_.getmembers()]
    with tarfile.open(path, "w") as out:
        for m, data in members:
            if data is None:
                out.addfile(m)
                continue
            for name, new in edit(m.name, data):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(new), m.mode
                out.addfile(info, io.BytesIO(new))


def test_a_list_file_appended_twice_to_the_archive_is_refused(store, sample_archives,
                                                              tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)

    def append_forged(name, data):
        yield name, data
        if name.endswith("annotations/trainval.txt"):
            yield name, b"Abyssinian_1 1 1 1\n"  # a second member of the same name

    _rewrite_annotations(src, append_forged)
    with pytest.raises(UnsafeArchiveError, match="duplicate member name") as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert "annotations/trainval.txt" in str(info.value)
    assert "annotations.tar.gz" in str(info.value)
    assert _datasets(store) == []


def test_a_list_file_that_is_not_utf8_is_a_layout_error_naming_file_and_line(
        store, sample_archives, tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)

    def latin1(name, data):
        if name.endswith("annotations/test.txt"):
            lines = data.splitlines(keepends=True)
            lines[2] = b"Caf\xe9_1 1 1 1\n"
            data = b"".join(lines)
        yield name, data

    _rewrite_annotations(src, latin1)
    with pytest.raises(DatasetLayoutError) as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    msg = str(info.value)
    assert "annotations/test.txt" in msg and "line 3" in msg and "UTF-8" in msg, msg
    assert _datasets(store) == []


def _rewrite(path: Path, edit) -> None:
    """Rebuild the plain tar at ``path`` with ``edit(member, data)`` → the (TarInfo, data or
    None) pairs to write for each member."""
    with tarfile.open(path) as tf_:
        members = [(m, tf_.extractfile(m).read() if m.isfile() else None)
                   for m in tf_.getmembers()]
    with tarfile.open(path, "w") as out:
        for m, data in members:
            for info, new in edit(m, data):
                out.addfile(info, None if new is None else io.BytesIO(new))


def test_a_damaged_header_mid_archive_commits_nothing(store, sample_archives, tmp_path):
    # tarfile takes an invalid header after the first for the end of the archive: without the
    # check the download extracted half the images and committed them (exit 0)
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)
    path = src / "images.tar.gz"
    with tarfile.open(path) as tf_:
        members = tf_.getmembers()
    middle = members[len(members) // 2]
    data = bytearray(path.read_bytes())
    data[middle.offset + 148:middle.offset + 153] = b"99999"  # its header's checksum field
    path.write_bytes(bytes(data))
    with pytest.raises(DamagedArchive) as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    msg = str(info.value)
    assert "images.tar.gz" in msg and f"after member {len(members) // 2}" in msg, msg
    assert f"offset {middle.offset:,}" in msg, msg
    assert isinstance(info.value, PermanentError)
    assert _datasets(store) == []
    assert list((tmp_path / "cache" / "downloads").glob("extract-*")) == []


def test_a_path_in_both_archives_is_refused(store, sample_archives, tmp_path):
    # annotations.tar.gz must not replace a file of images.tar.gz (extracted into one folder)
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)
    with tarfile.open(src / "images.tar.gz") as tf_:
        image = next(m.name for m in tf_.getmembers() if m.isfile())

    def add_forged_image(name, data):
        yield name, data
        if name.endswith("annotations/list.txt"):
            yield image, b"FORGED"

    _rewrite_annotations(src, add_forged_image)
    with pytest.raises(UnsafeArchiveError, match="already a file in the destination") as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert info.value.member == image and "annotations.tar.gz" in str(info.value)
    assert isinstance(info.value, PermanentError)
    assert _datasets(store) == []


def test_a_symlinked_folder_is_refused_so_counts_match_the_manifest(store, sample_archives,
                                                                   tmp_path):
    # images -> imgs: counted through the link, but the upload does not descend into linked
    # folders (the output said images 72, the manifest held none): refused
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)

    def move_images(m, data):
        m.name = "imgs" + m.name[len("images"):]
        yield m, data
        if m.name == "imgs":
            link = tarfile.TarInfo("images")
            link.type, link.linkname = tarfile.SYMTYPE, "imgs"
            yield link, None

    _rewrite(src / "images.tar.gz", move_images)
    with pytest.raises(UnsafeArchiveError, match="a symlink to a directory") as info:
        download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    assert info.value.member == "images" and "images.tar.gz" in str(info.value)
    assert _datasets(store) == []


def test_symlinks_to_files_are_counted_as_uploaded(store, sample_archives, tmp_path):
    src = _copy_sample(sample_archives, tmp_path / "mirror", sums=False)
    _, summary = sample_archives

    def add_links(m, data):
        yield m, data
        if m.isfile() and m.name.endswith(".jpg") and not hasattr(add_links, "done"):
            add_links.done = True
            link = tarfile.TarInfo("images/zz_link_1.jpg")
            link.type, link.linkname = tarfile.SYMTYPE, m.name.rpartition("/")[2]
            yield link, None
            folder = tarfile.TarInfo("images/zz_folder.jpg")  # a folder is not an image
            folder.type = tarfile.DIRTYPE
            yield folder, None

    _rewrite(src / "images.tar.gz", add_links)
    result = download(store, DownloadConfig(source=str(src), cache_dir=str(tmp_path / "cache")))
    files = result.manifest["files"]
    stored = sum(k.startswith("images/") and k.endswith(".jpg") for k in files)
    assert result.outputs["images"] == stored == summary["images"] + 1
    assert result.outputs["files"] == len(files)


def test_a_killed_download_leaves_no_extraction_folder_behind(sample_archives, tmp_path, caplog):
    src = _copy_sample(sample_archives, tmp_path / "mirror")
    cache = tmp_path / "cache"
    downloads = cache / "downloads"
    # a download killed (SIGKILL: no clean-up runs) once the dataset is extracted
    script = (
        "import sys, time\n"
        "import petdet_tasks.download as d\n"
        "def stop(root):\n"
        "    print('extracted', flush=True); time.sleep(600)\n"
        "d._count_layout = stop\n"
        "from petdet_tasks.store import LocalStore\n"
        "d.download(LocalStore(sys.argv[1]), d.DownloadConfig(source=sys.argv[2],"
        " cache_dir=sys.argv[3]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "killed-store"),
                             str(src), str(cache)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout.readline().strip() == "extracted"
    finally:
        proc.kill()
        proc.wait(timeout=60)
    left = [p for p in downloads.glob("extract-*") if p.is_dir()]
    assert len(left) == 1 and (left[0] / "annotations" / "list.txt").is_file()
    # one a running download holds (its lock taken) is not touched
    live = downloads / "extract-live"
    (live / "x").mkdir(parents=True)
    fd = os.open(downloads / "extract-live.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        caplog.set_level(logging.INFO)
        result = download(LocalStore(tmp_path / "store"),
                          DownloadConfig(source=str(src), cache_dir=str(cache)))
        assert not result.cache_hit
        assert sorted(p.name for p in downloads.glob("extract-*")) == [
            "extract-live", "extract-live.lock"]
    finally:
        os.close(fd)
    removed = [r.getMessage() for r in caplog.records if "stale extraction" in r.getMessage()]
    assert len(removed) == 1 and str(left[0]) in removed[0] and " MB)" in removed[0], removed
    # ... and once released, the next download removes it
    download(LocalStore(tmp_path / "store"), DownloadConfig(source=str(src), cache_dir=str(cache)))
    assert list(downloads.glob("extract-*")) == []
