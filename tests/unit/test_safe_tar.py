"""petdet_tasks.safe_tar: hostile archives are refused before anything is written."""

from __future__ import annotations

import io
import os
import stat
import tarfile

import pytest

from petdet_tasks.safe_tar import (
    NotATarArchive,
    UnsafeArchiveError,
    check_members,
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
