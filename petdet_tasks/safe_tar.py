"""Safe extraction of tar archives (plain, gzip, bz2 or xz).

The whole archive is validated before anything is written, then extracted with
``tarfile``'s ``filter="data"`` as a second line of defence.

Symlinks are checked by resolving them the way the kernel will once the archive is on disk:
every symlink of the archive is substituted while walking a path, so chains such as
``deep -> .`` followed by ``deep/dir/link -> ../../x`` (lexically inside, physically outside)
are refused. This also covers the ``filter="data"`` bypasses that affect older CPython
releases (such as the 3.11.7 this project pins).
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from petdet_tasks.errors import PermanentError

__all__ = ["NotATarArchive", "UnsafeArchiveError", "check_members", "safe_extract"]

#: Maximum number of symlinks followed while resolving one path (Linux uses 40).
MAX_SYMLINK_HOPS = 40

_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class UnsafeArchiveError(PermanentError, ValueError):
    """An archive member could escape the destination or is not plain data.

    The message names the archive, the offending member and the reason; the same values are
    available as ``archive``, ``member`` and ``reason``.
    """

    def __init__(self, archive: str | os.PathLike, member: str, reason: str):
        self.archive = os.fspath(archive)
        self.member = member
        self.reason = reason
        super().__init__(f"{self.archive}: refusing archive member {member!r}: {reason}")


class NotATarArchive(tarfile.ReadError):
    """The file is not a readable tar archive (or is truncated/corrupt); the message names it."""


class _Escape(Exception):
    """Internal: path resolution left the tree (or looped)."""


def _open(tar_path: str | os.PathLike) -> tarfile.TarFile:
    try:
        return tarfile.open(tar_path, "r:*")
    except tarfile.ReadError as exc:
        raise NotATarArchive(
            f"{os.fspath(tar_path)}: not a tar archive (plain, gzip, bz2 or xz): {exc}"
        ) from exc
    except (EOFError, OSError) as exc:
        if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError):
            raise
        raise NotATarArchive(f"{os.fspath(tar_path)}: unreadable tar archive: {exc}") from exc


def _components(archive: str | os.PathLike, member: str, name: str, what: str) -> list[str]:
    """Split a member name or hard-link target into safe relative components."""
    if "\x00" in name:
        raise UnsafeArchiveError(archive, member, f"{what} contains a NUL byte")
    if "\\" in name:
        raise UnsafeArchiveError(archive, member, f"{what} contains a backslash: {name!r}")
    if _DRIVE_RE.match(name):
        raise UnsafeArchiveError(archive, member, f"{what} has a drive letter: {name!r}")
    if name.startswith("/"):
        raise UnsafeArchiveError(archive, member, f"{what} is absolute: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(archive, member, f"{what} has a '..' component: {name!r}")
    return parts


def _resolve(start: list[str], target: str, links: dict[str, str], hops: list[int]) -> list[str]:
    """Walk ``target`` from directory ``start`` (components below the root), substituting
    the archive's symlinks; raise _Escape when it leaves the root, is absolute, or loops."""
    if target.startswith("/") or "\\" in target or _DRIVE_RE.match(target):
        raise _Escape(f"absolute or non-POSIX path {target!r}")
    parts = list(start)
    for comp in target.split("/"):
        if comp in ("", "."):
            continue
        if comp == "..":
            if not parts:
                raise _Escape("it leaves the destination directory")
            parts.pop()
            continue
        parts.append(comp)
        link = links.get("/".join(parts))
        if link is not None:
            hops[0] += 1
            if hops[0] > MAX_SYMLINK_HOPS:
                raise _Escape("too many levels of symbolic links")
            parts.pop()
            parts = _resolve(parts, link, links, hops)
    return parts


def _existing_links(dest: Path) -> dict[str, str]:
    """Symlinks already under ``dest`` (relative POSIX name -> target), not following any."""
    found: dict[str, str] = {}
    if not dest.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                found[Path(full).relative_to(dest).as_posix()] = os.readlink(full)
    return found


def _validate(
    tf: tarfile.TarFile,
    archive: str | os.PathLike,
    existing_links: dict[str, str] | None = None,
) -> list[tarfile.TarInfo]:
    try:
        members = tf.getmembers()
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise NotATarArchive(f"{os.fspath(archive)}: corrupt or truncated archive: {exc}") from exc

    archive_size = None
    with open(archive, "rb") as f:
        if not f.read(6).startswith(_COMPRESSED_MAGIC):
            archive_size = os.fstat(f.fileno()).st_size

    keys: list[str] = []
    # Every symlink the tree will hold: those already in the destination, then the archive's.
    existing = dict(existing_links or {})
    links: dict[str, str] = dict(existing)
    for m in members:
        parts = _components(archive, m.name, m.name, "name")
        key = "/".join(parts)
        if not key and not m.isdir():
            raise UnsafeArchiveError(archive, m.name, "empty name for a non-directory")
        if m.ischr():
            raise UnsafeArchiveError(archive, m.name, "character device")
        if m.isblk():
            raise UnsafeArchiveError(archive, m.name, "block device")
        if m.isfifo():
            raise UnsafeArchiveError(archive, m.name, "FIFO (named pipe)")
        if not (m.isreg() or m.isdir() or m.issym() or m.islnk()):
            raise UnsafeArchiveError(archive, m.name, f"unsupported member type {m.type!r}")
        if m.issym():
            if not m.linkname:
                raise UnsafeArchiveError(archive, m.name, "symlink with an empty target")
            if key in links and key not in existing:
                raise UnsafeArchiveError(archive, m.name, "symlink defined twice")
            existing.pop(key, None)  # tarfile replaces an existing link of the same name
            links[key] = m.linkname
        if (
            archive_size is not None and m.isreg() and not m.issparse()
            and m.offset_data + m.size > archive_size
        ):
            raise NotATarArchive(
                f"{os.fspath(archive)}: truncated archive: member {m.name!r} needs "
                f"{m.offset_data + m.size} bytes, the file has {archive_size}"
            )
        keys.append(key)

    if len(links) > len(existing):
        # New symlinks can change where the destination's existing symlinks lead.
        for key, target in existing.items():
            parts = key.split("/")
            try:
                _resolve(_resolve([], "/".join(parts[:-1]), links, [0]), target, links, [0])
            except _Escape as exc:
                raise UnsafeArchiveError(
                    archive, key,
                    f"with this archive's symlinks, the existing symlink {key!r} -> {target!r} "
                    f"in the destination would be unsafe: {exc}",
                ) from None

    files: set[str] = set()  # regular files (and hard links to them) seen so far
    # what each path of the tree will be, symlinks followed: "dir" (a directory member or the
    # directory of one) or "file" (a regular file or a hard link)
    kinds: dict[str, str] = {}
    used_as_dir: set[str] = set()  # member names (unresolved) that earlier members are under
    for m, key in zip(members, keys, strict=True):
        parts = key.split("/") if key else []
        try:
            parent = _resolve([], "/".join(parts[:-1]), links, [0])
        except _Escape as exc:
            raise UnsafeArchiveError(
                archive, m.name, f"its directory resolves outside: {exc}"
            ) from None
        if key in links and not m.issym():
            where = "the destination" if key in existing else "the archive"
            raise UnsafeArchiveError(archive, m.name, f"also present in {where} as a symlink")
        if m.issym() and key in used_as_dir:
            raise UnsafeArchiveError(
                archive, m.name, "a symlink with the name of a directory of earlier members")
        if parts:
            used_as_dir.update("/".join(parts[:i]) for i in range(1, len(parts)))
            if not m.issym():
                _claim(archive, m, parent + parts[-1:], kinds)
        if m.issym():
            try:
                _resolve(parent, m.linkname, links, [0])
            except _Escape as exc:
                raise UnsafeArchiveError(
                    archive, m.name, f"symlink target {m.linkname!r} is unsafe: {exc}"
                ) from None
        elif m.islnk():
            target = _components(archive, m.name, m.linkname, "hard link target")
            tkey = "/".join(target)
            if tkey not in files:
                raise UnsafeArchiveError(
                    archive, m.name,
                    f"hard link target {m.linkname!r} is not an earlier regular file member",
                )
            files.add(key)
        elif m.isreg():
            files.add(key)
        else:  # directory
            files.discard(key)
    return members


def _claim(archive: str | os.PathLike, m: tarfile.TarInfo, path: list[str],
           kinds: dict[str, str]) -> None:
    """Record what the member at (resolved) ``path`` makes of it; refuse a name that another
    member already took: tarfile would silently replace a file (or write through a hard link
    to it), or fail half-way with NotADirectoryError/IsADirectoryError."""
    for i in range(1, len(path)):
        above = "/".join(path[:i])
        if kinds.setdefault(above, "dir") != "dir":
            raise UnsafeArchiveError(
                archive, m.name, f"{above!r} is a file in this archive, not a directory")
    full = "/".join(path)
    kind = "dir" if m.isdir() else "file"
    before = kinds.get(full)
    if before == "file":
        raise UnsafeArchiveError(
            archive, m.name,
            "duplicate member name: it would replace (or write through a hard link to) the "
            "file an earlier member wrote" if kind == "file"
            else "the name of an earlier file member, used here as a directory")
    if before == "dir" and kind == "file":
        raise UnsafeArchiveError(
            archive, m.name, "the name of a directory in this archive, used here as a file")
    kinds[full] = kind


def check_members(tar_path: str | os.PathLike) -> list[tarfile.TarInfo]:
    """Validate every member of ``tar_path`` without writing anything; return them in order.

    Raises :class:`UnsafeArchiveError` (naming the member and the reason) for: absolute
    names, ``..`` components, backslashes, drive letters or NUL bytes in names; symlinks
    whose target is absolute or resolves outside the tree (following the archive's other
    symlinks) or loops; member paths whose directory resolves outside through a symlink; a
    name that is both a symlink and another member; a name used twice for a file (a regular
    file or hard link: tarfile would replace the first or write through the link), or as both
    a file and a directory, or as a symlink after other members were put under it; hard links
    whose target is not an earlier regular-file member; character/block devices, FIFOs and
    any other type that is not a regular file, directory, symlink or hard link. Raises
    :class:`NotATarArchive` for a file that is not a (complete) tar archive.
    """
    with _open(tar_path) as tf:
        return _validate(tf, tar_path)


def safe_extract(tar_path: str | os.PathLike, dest_dir: str | os.PathLike) -> list[str]:
    """Validate the whole archive, then extract it into ``dest_dir`` (created if missing).

    Nothing is written unless every member passes :func:`check_members`, with the symlinks
    already under ``dest_dir`` taken into account too: a member may not replace one of them
    by a non-link, and an archive's symlinks may not make one of them lead outside (so
    extracting several archives into one directory keeps every symlink inside it). Extraction uses
    ``filter="data"`` (no special files, no setuid/setgid/sticky bits, no group/other write,
    owner read/write, links kept inside) as defence in depth. Returns the names, relative to
    ``dest_dir`` in POSIX form without ``./``, of the regular files written (hard links
    included), in archive order without duplicates.

    An archive that fails mid-way (e.g. a truncated gzip stream) raises and may leave the
    files extracted so far; extract into a fresh directory when that matters.
    """
    dest = Path(dest_dir)
    with _open(tar_path) as tf:
        members = _validate(tf, tar_path, _existing_links(dest))
        dest.mkdir(parents=True, exist_ok=True)
        try:
            tf.extractall(dest, members=members, filter="data")
        except (tarfile.ReadError, EOFError) as exc:
            raise NotATarArchive(
                f"{os.fspath(tar_path)}: corrupt or truncated archive: {exc}"
            ) from exc
    names: dict[str, None] = {}
    for m in members:
        if m.isreg() or m.islnk():
            names[str(PurePosixPath(*_components(tar_path, m.name, m.name, "name")))] = None
    return list(names)
