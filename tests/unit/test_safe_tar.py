"""petdet_tasks.safe_tar: hostile archives are refused before anything is written."""

from __future__ import annotations

import gzip
import io
import os
import stat
import tarfile

import pytest

from petdet_tasks import safe_tar
from petdet_tasks.errors import PermanentError
from petdet_tasks.safe_tar import (
    MIN_MAX_BYTES,
    ArchiveTooLarge,
    DamagedArchive,
    NotATarArchive,
    UnsafeArchiveError,
    check_members,
    default_max_bytes,
    safe_extract,
)


def _file(name: str, data: bytes = b"data", mode: int = 0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, io.BytesIO(data)


def _dir(name: str):
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info, None


def _link(name: str, target: str, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _special(name: str, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info, None


def make_tar(path, members, mode="w"):
    with tarfile.open(path, mode, format=tarfile.PAX_FORMAT) as tf:
        for info, fileobj in members:
            tf.addfile(info, fileobj)
    return path


def good():
    return [
        _dir("pets"),
        _file("pets/a.txt", b"alpha"),
        _dir("pets/sub"),
        _file("pets/sub/b.bin", bytes(range(256)) * 10),
        _file("./top.txt", b"top"),
    ]


@pytest.fixture
def out(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


BAD = {
    "dotdot": (lambda: [_file("../evil")], "../evil", "'..'"),
    "dotdot-inner": (lambda: [_file("ok/../../evil")], "ok/../../evil", "'..'"),
    "absolute": (lambda: [_file("/abs")], "/abs", "absolute"),
    "backslash": (lambda: [_file("..\\evil")], "..\\evil", "backslash"),
    "drive": (lambda: [_file("C:/evil")], "C:/evil", "drive"),
    "symlink-escape": (lambda: [_dir("a"), _link("a/link", "../../outside")], "a/link", "leaves"),
    "symlink-root-escape": (lambda: [_link("link", "../../outside")], "link", "leaves"),
    "symlink-absolute": (lambda: [_link("link", "/etc/passwd")], "link", "absolute"),
    "hardlink-outside": (lambda: [_link("hl", "../outside", tarfile.LNKTYPE)], "hl", "'..'"),
    "hardlink-absolute": (lambda: [_link("hl", "/etc/passwd", tarfile.LNKTYPE)], "hl", "absolute"),
    "hardlink-not-earlier": (
        lambda: [_link("hl", "later.txt", tarfile.LNKTYPE), _file("later.txt")], "hl", "earlier"),
    "chardev": (lambda: [_special("dev/null", tarfile.CHRTYPE)], "dev/null", "character device"),
    "blockdev": (lambda: [_special("dev/sda", tarfile.BLKTYPE)], "dev/sda", "block device"),
    "fifo": (lambda: [_special("pipe", tarfile.FIFOTYPE)], "pipe", "FIFO"),
    "unknown-type": (lambda: [_special("weird", b"Z")], "weird", "unsupported"),
    # Lexically inside, but "deep" is a symlink to ".", so the link really points at ../x.
    "symlink-chain-dir": (
        lambda: [_dir("dir"), _link("deep", "."), _link("deep/dir/link", "../../x")],
        "deep/dir/link", "leaves",
    ),
    # Lexically "y", physically "../y" because "s" -> ".".
    "symlink-chain-target": (lambda: [_link("s", "."), _link("t", "s/../y")], "t", "leaves"),
    "symlink-loop": (lambda: [_link("a", "b"), _link("b", "a")], "a", "too many levels"),
    "write-through-symlink": (
        lambda: [_link("ln", "real"), _dir("real"), _file("ln")], "ln", "symlink"),
    # a second member of the same name would silently replace the first
    "duplicate-file": (
        lambda: [_dir("a"), _file("a/list.txt", b"real"), _file("a/list.txt", b"forged")],
        "a/list.txt", "duplicate member name"),
    "duplicate-via-dot": (
        lambda: [_file("a.txt", b"real"), _file("./a.txt", b"forged")], "./a.txt",
        "duplicate member name"),
    # ... or write through a hard link into the file it links to
    "file-over-hardlink": (
        lambda: [_file("a.txt"), _link("h", "a.txt", tarfile.LNKTYPE), _file("h", b"forged")],
        "h", "duplicate member name"),
    "hardlink-over-file": (
        lambda: [_file("a.txt"), _file("h"), _link("h", "a.txt", tarfile.LNKTYPE)],
        "h", "duplicate member name"),
    # one name as a file and a directory: tarfile would fail half-way (NotADirectoryError...)
    "file-then-under-it": (lambda: [_file("d"), _file("d/x")], "d/x", "is a file in this"),
    "dir-then-file": (lambda: [_dir("d"), _file("d/x"), _file("d")], "d", "a directory"),
    "under-then-file": (lambda: [_file("d/x"), _file("d")], "d", "a directory"),
    "file-then-dir": (lambda: [_file("d"), _dir("d")], "d", "earlier file member"),
    "file-under-symlinked-file": (
        lambda: [_file("f"), _link("s", "f"), _file("s/x")], "s/x", "'f' is a file in this"),
    # a symlink replacing a directory that members were written into
    "symlink-over-used-dir": (
        lambda: [_file("d/x"), _dir("e"), _link("d", "e")], "d", "directory of earlier"),
}


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_refused(case, gz, tmp_path, out):
    members, name, reason = BAD[case]
    # Benign members first: a refusal must still write nothing at all.
    archive = make_tar(tmp_path / "bad.tar.gz", [_file("fine.txt"), *members()],
                       "w:gz" if gz else "w")
    with pytest.raises(UnsafeArchiveError) as ei:
        safe_extract(archive, out)
    msg = str(ei.value)
    assert repr(name) in msg and str(archive) in msg and reason in msg, msg
    assert ei.value.member == name
    assert list(out.iterdir()) == []
    assert not (tmp_path / "outside").exists() and not (tmp_path / "evil").exists()
    with pytest.raises(UnsafeArchiveError):
        check_members(archive)


def test_refusal_does_not_create_dest(tmp_path):
    archive = make_tar(tmp_path / "bad.tar", [_file("../evil")])
    with pytest.raises(UnsafeArchiveError):
        safe_extract(archive, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_inner_symlinks_and_hardlinks_allowed(tmp_path, out):
    archive = make_tar(tmp_path / "ok.tar", [
        _dir("a"), _dir("b"), _file("b/file", b"payload"),
        _link("a/link", "../b/file"),
        _link("a/dirlink", "../b"),
        _link("root", "."),
        _link("b/hard", "b/file", tarfile.LNKTYPE),
    ])
    names = safe_extract(archive, out)
    assert names == ["b/file", "b/hard"]
    assert os.readlink(out / "a" / "link") == "../b/file"
    assert (out / "a" / "link").read_bytes() == b"payload"
    assert (out / "a" / "dirlink" / "file").read_bytes() == b"payload"
    assert (out / "b" / "hard").read_bytes() == b"payload"


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["plain", "gzip"])
def test_good_archive(mode, tmp_path, out):
    # The real Oxford archives are plain tar despite the .tar.gz name: both must work.
    archive = make_tar(tmp_path / "pets.tar.gz", good(), mode)
    names = safe_extract(archive, out)
    assert names == ["pets/a.txt", "pets/sub/b.bin", "top.txt"]
    assert (out / "pets" / "a.txt").read_bytes() == b"alpha"
    assert (out / "pets" / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 10
    assert (out / "top.txt").read_bytes() == b"top"
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert found == sorted(names)
    assert [m.name for m in check_members(archive)] == [i.name for i, _ in good()]


def test_extract_into_new_nested_dir(tmp_path):
    archive = make_tar(tmp_path / "g.tar", good())
    dest = tmp_path / "x" / "y"
    safe_extract(archive, dest)
    assert (dest / "top.txt").read_bytes() == b"top"


def test_setuid_and_world_write_bits_dropped(tmp_path, out):
    archive = make_tar(tmp_path / "m.tar", [_file("suid", b"#!/bin/sh\n", 0o6777)])
    safe_extract(archive, out)
    mode = stat.S_IMODE((out / "suid").stat().st_mode)
    assert not mode & (stat.S_ISUID | stat.S_ISGID | stat.S_IWOTH | stat.S_IWGRP)


def test_not_a_tar(tmp_path, out):
    bogus = tmp_path / "images.tar.gz"
    bogus.write_bytes(b"<html>not found</html>\n" * 50)
    with pytest.raises(NotATarArchive, match="images.tar.gz.*not a tar archive"):
        safe_extract(bogus, out)
    assert isinstance(NotATarArchive("x"), tarfile.ReadError)
    assert list(out.iterdir()) == []


def test_truncated_plain_tar_refused_before_writing(tmp_path, out):
    archive = make_tar(tmp_path / "t.tar", [_file("a.txt", b"a"), _file("big", b"x" * 50_000)])
    data = archive.read_bytes()
    archive.write_bytes(data[:20_000])
    with pytest.raises(NotATarArchive, match="truncated"):
        safe_extract(archive, out)
    assert list(out.iterdir()) == []


def test_missing_file(tmp_path, out):
    with pytest.raises(FileNotFoundError):
        safe_extract(tmp_path / "nope.tar", out)


def test_symlinks_across_archives_into_one_dir(tmp_path, out):
    # Each archive is fine alone; together "s -> ." turns "t -> s/../y" into "../y".
    first = make_tar(tmp_path / "1.tar", [_link("t", "s/../y"), _file("a.txt")])
    second = make_tar(tmp_path / "2.tar", [_link("s", "."), _file("b.txt")])
    assert safe_extract(first, out) == ["a.txt"]
    with pytest.raises(UnsafeArchiveError, match=r"existing symlink 't'") as ei:
        safe_extract(second, out)
    assert ei.value.member == "t"
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "t"]


def test_existing_symlinks_in_dest(tmp_path, out):
    (out / "real").mkdir()
    (out / "ln").symlink_to("real")
    # No symlinks in the archive, nothing through the link: fine.
    assert safe_extract(make_tar(tmp_path / "a.tar", [_file("x.txt")]), out) == ["x.txt"]
    # Writing a regular file over the existing link would write through it: refused.
    with pytest.raises(UnsafeArchiveError, match="destination as a symlink"):
        safe_extract(make_tar(tmp_path / "b.tar", [_file("ln")]), out)
    # Replacing the link by another link inside the tree is fine.
    assert safe_extract(make_tar(tmp_path / "c.tar", [_link("ln", "x.txt")]), out) == []
    assert os.readlink(out / "ln") == "x.txt"


def test_repeated_directories_and_nested_files_are_fine(tmp_path, out):
    archive = make_tar(tmp_path / "ok.tar", [_dir("d"), _file("d/x"), _dir("d"), _dir("d/e"),
                                             _file("d/e/y"), _link("l", "d"), _file("l/z")])
    assert safe_extract(archive, out) == ["d/x", "d/e/y", "l/z"]
    assert (out / "d" / "z").read_bytes() == b"data"


# -- a damaged header mid-archive: tarfile alone would stop there and extract the rest short --

def _damage_header(data: bytes, member_offset: int) -> bytes:
    """``data`` (an uncompressed tar) with the checksum field of the header at
    ``member_offset`` overwritten, as a flipped bit on the way would."""
    buf = bytearray(data)
    buf[member_offset + 148:member_offset + 153] = b"99999"
    return bytes(buf)


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_damaged_header_mid_archive_is_refused_not_cut_short(gz, tmp_path, out):
    plain = make_tar(tmp_path / "t.tar", [_file(f"images/{i}.jpg", bytes([i]) * 700)
                                          for i in range(1, 8)])
    with tarfile.open(plain) as tf:
        members = tf.getmembers()
    middle = members[3]
    data = _damage_header(plain.read_bytes(), middle.offset)
    archive = tmp_path / "images.tar.gz"
    archive.write_bytes(gzip.compress(data) if gz else data)
    with tarfile.open(archive) as tf:
        assert len(tf.getmembers()) == 3, "tarfile alone silently stops at the damaged header"

    with pytest.raises(DamagedArchive) as ei:
        safe_extract(archive, out)
    msg = str(ei.value)
    assert str(archive) in msg and "damaged or not a tar archive after member 3" in msg, msg
    assert "'images/3.jpg'" in msg and f"offset {middle.offset:,}" in msg, msg
    assert isinstance(ei.value, PermanentError) and isinstance(ei.value, NotATarArchive)
    assert list(out.iterdir()) == []
    with pytest.raises(DamagedArchive):
        check_members(archive)


def test_data_appended_after_the_end_of_archive_is_refused(tmp_path, out):
    archive = make_tar(tmp_path / "t.tar", good())
    archive.write_bytes(archive.read_bytes() + b"\0" * 1024 + b"<html>junk</html>")
    with pytest.raises(DamagedArchive, match=r"after member 5 \('./top.txt'\)"):
        safe_extract(archive, out)
    assert list(out.iterdir()) == []


def test_extra_zero_padding_after_the_end_is_fine(tmp_path, out):
    archive = make_tar(tmp_path / "t.tar", good())
    archive.write_bytes(archive.read_bytes() + bytes(3 * 2**20 + 512))
    assert safe_extract(archive, out) == ["pets/a.txt", "pets/sub/b.bin", "top.txt"]


# -- size: sparse members refused, the extracted total capped --

def test_sparse_member_is_refused(tmp_path, out):
    # PAX "GNU.sparse" 0.1: 5 bytes of data standing for a 1 TB file
    info, data = _file("big.img", b"hello")
    info.pax_headers = {"GNU.sparse.map": "0,5", "GNU.sparse.size": str(10**12)}
    archive = make_tar(tmp_path / "sparse.tar", [_file("fine.txt"), (info, data)])
    with tarfile.open(archive) as tf:
        assert tf.getmember("big.img").issparse() and tf.getmember("big.img").size == 10**12
    with pytest.raises(UnsafeArchiveError, match="sparse") as ei:
        safe_extract(archive, out)
    assert ei.value.member == "big.img" and str(archive) in str(ei.value)
    assert "1,000,000,000,000 bytes" in str(ei.value)
    assert list(out.iterdir()) == []


class _Zeros(io.RawIOBase):
    """``n`` zero bytes, read without holding them in memory."""

    def __init__(self, n: int):
        self.left = n

    def readable(self):
        return True

    def readinto(self, b):
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def test_compression_bomb_is_refused_from_the_headers(tmp_path, out):
    n = MIN_MAX_BYTES + 2**20
    info = tarfile.TarInfo("images/zeros.jpg")
    info.size = n
    archive = make_tar(tmp_path / "bomb.tar.gz", [_file("a.txt"),
                                                  (info, io.BufferedReader(_Zeros(n)))], "w:gz")
    size = archive.stat().st_size
    assert size * 200 < n  # a tiny download ...
    assert default_max_bytes(archive) == MIN_MAX_BYTES
    with pytest.raises(ArchiveTooLarge) as ei:
        safe_extract(archive, out)
    msg = str(ei.value)
    assert ei.value.member == "images/zeros.jpg" and str(archive) in msg, msg
    assert f"{n:,} bytes" in msg and f"{MIN_MAX_BYTES:,} bytes" in msg and f"{size:,}" in msg
    assert isinstance(ei.value, PermanentError)
    assert list(out.iterdir()) == []
    with pytest.raises(ArchiveTooLarge):
        check_members(archive)
    # the cap is the caller's to raise
    assert safe_extract(archive, out, max_bytes=2 * n) == ["a.txt", "images/zeros.jpg"]


def test_cap_is_relative_to_the_archive_size(tmp_path, out):
    archive = make_tar(tmp_path / "t.tar.gz", [_file("x.bin", bytes(4000))], "w:gz")
    assert default_max_bytes(archive) == max(MIN_MAX_BYTES, 50 * archive.stat().st_size)
    with pytest.raises(ArchiveTooLarge, match=r"more than its cap of 3,999 bytes"):
        safe_extract(archive, out, max_bytes=3999)
    assert safe_extract(archive, out, max_bytes=4000) == ["x.bin"]


def test_cap_is_enforced_on_what_is_written_too(tmp_path, out, monkeypatch):
    # were the header check fooled, the bytes written are counted as extraction goes
    archive = make_tar(tmp_path / "t.tar", [_file("a", b"a" * 800), _file("b", b"b" * 800),
                                            _file("c", b"c")])
    real = safe_tar._read_members
    monkeypatch.setattr(safe_tar, "_read_members",
                        lambda tf, archive, cap: real(tf, archive, 10**18))
    with pytest.raises(ArchiveTooLarge, match="files written so far take 1,600 bytes") as ei:
        safe_extract(archive, out, max_bytes=1000)
    assert ei.value.member == "b"
    assert not (out / "c").exists()


# -- several archives into one folder --

def test_refuse_existing_keeps_one_archive_from_replacing_anothers_files(tmp_path, out):
    first = make_tar(tmp_path / "images.tar", [_dir("images"), _file("images/cat_1.jpg", b"REAL")])
    second = make_tar(tmp_path / "annotations.tar", [
        _file("annotations/list.txt"), _dir("images"), _file("images/cat_1.jpg", b"FORGED")])
    assert safe_extract(first, out, refuse_existing=True) == ["images/cat_1.jpg"]
    with pytest.raises(UnsafeArchiveError, match="already a file in the destination") as ei:
        safe_extract(second, out, refuse_existing=True)
    assert ei.value.member == "images/cat_1.jpg" and str(second) in str(ei.value)
    assert (out / "images" / "cat_1.jpg").read_bytes() == b"REAL"
    assert not (out / "annotations").exists(), "refused before anything was written"
    # through a symlink of the second archive, and as a symlink: refused too
    for members in ([_link("pics", "images"), _file("pics/cat_1.jpg")],
                    [_link("images/cat_1.jpg", "../x")]):
        with pytest.raises(UnsafeArchiveError, match="already a file in the destination"):
            safe_extract(make_tar(tmp_path / "3.tar", members), out, refuse_existing=True)
    assert (out / "images" / "cat_1.jpg").read_bytes() == b"REAL"
    # shared directories are fine
    assert safe_extract(make_tar(tmp_path / "4.tar", [_dir("images"), _file("images/dog.jpg")]),
                        out, refuse_existing=True) == ["images/dog.jpg"]
