"""Safe extraction of tar archives (plain, gzip, bz2 or xz).

The whole archive is validated before anything is written, then extracted with
``tarfile``'s ``filter="data"`` as a second line of defence.

Symlinks are checked by resolving them the way the kernel will once the archive is on disk:
every symlink of the archive is substituted while walking a path, so chains such as
``deep -> .`` followed by ``deep/dir/link -> ../../x`` (lexically inside, physically outside)
are refused. This also covers the ``filter="data"`` bypasses that affect older CPython
releases (such as the 3.11.7 this project pins).

Two more things are checked before anything is written, and again while writing:

* the whole archive is read: ``tarfile`` takes a damaged header after the first member for the
  end of the archive, so everything after the last member it read must be zero blocks (the
  end-of-archive marker and its padding), or the archive is refused as damaged rather than
  extracted short;
* the extracted size is capped (:func:`default_max_bytes`): sparse members are refused, the
  members' sizes are added up from the headers before extraction, and the bytes actually
  written are added up again as extraction goes.
"""

from __future__ import annotations

import os
import re
import tarfile
from pathlib import Path, PurePosixPath

from petdet_tasks.errors import PermanentError

__all__ = ["ArchiveTooLarge", "DamagedArchive", "NotATarArchive", "UnsafeArchiveError",
           "check_members", "default_max_bytes", "existing_links", "safe_extract"]

#: Maximum number of symlinks followed while resolving one path (Linux uses 40).
MAX_SYMLINK_HOPS = 40

# The cap on what one archive may extract to: MAX_RATIO times the archive file's size, but at
# least MIN_MAX_BYTES. A ratio rather than one absolute number: the step takes any dataset laid
# out like Oxford-IIIT Pet, so a fixed cap would either refuse a bigger real dataset or be far
# too loose for a small one. The ratio bounds what a compression bomb can make of a given
# download (deflate alone reaches ~1000x on zeros; a 291 KB .tar.gz made 300 MB), while real
# data sits far below it: a plain tar (the official archives) extracts to less than its own
# size, and JPEG/PNG barely compress; only text (lists, XML) reaches ~10-20x. The floor keeps
# small, highly compressible archives (a few XML files, test fixtures) from being refused;
# 64 MiB is harmless on any worker's disk. Callers may pass their own ``max_bytes``.
MAX_RATIO = 50
MIN_MAX_BYTES = 64 * 2**20

_ZEROS = bytes(2**20)  # what follows the last member is compared to this, 1 MiB at a time

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


class DamagedArchive(NotATarArchive, PermanentError):
    """The archive reads as tar up to some member, then holds data that is not a tar header nor
    the end-of-archive marker (a damaged header, or something appended): ``tarfile`` would stop
    there silently. The message names the archive, the last good member and the offset."""


class ArchiveTooLarge(UnsafeArchiveError):
    """The archive would extract to more than its cap (:func:`default_max_bytes`); the message
    names the archive, the member that crosses it and the figures."""


def default_max_bytes(tar_path: str | os.PathLike) -> int:
    """The default cap on the bytes one archive may extract to (see ``MAX_RATIO``)."""
    return max(MIN_MAX_BYTES, MAX_RATIO * os.path.getsize(tar_path))


def _gb(n: int) -> str:
    return f"{n:,} bytes ({n / 1e9:.3g} GB)" if n >= 10**7 else f"{n:,} bytes"


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


def existing_links(dest: str | os.PathLike) -> dict[str, str]:
    """Symlinks already under ``dest`` (relative POSIX name -> target), not following any."""
    found: dict[str, str] = {}
    dest = Path(dest)
    if not dest.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                found[Path(full).relative_to(dest).as_posix()] = os.readlink(full)
    return found


def _read_members(tf: tarfile.TarFile, archive: str | os.PathLike,
                  max_bytes: int) -> list[tarfile.TarInfo]:
    """Every member, read one header at a time so that sparse members and a size over
    ``max_bytes`` are refused before tarfile reads (decompresses) past them; then check that
    nothing but zero blocks follows the last member."""
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        while (m := tf.next()) is not None:
            members.append(m)
            if m.issparse():
                raise UnsafeArchiveError(
                    archive, m.name,
                    f"sparse file (apparent size {_gb(m.size)}): sparse members are not "
                    "supported (they can expand far beyond the archive)")
            if m.isreg():
                total += m.size
                if total > max_bytes:
                    raise ArchiveTooLarge(
                        archive, m.name,
                        f"the archive would extract to more than its cap of {_gb(max_bytes)} "
                        f"(this member: {_gb(m.size)}; members so far: {_gb(total)}; archive "
                        f"file: {_gb(os.path.getsize(archive))}; the cap is {MAX_RATIO}x the "
                        f"archive's size, at least {_gb(MIN_MAX_BYTES)})")
        _check_end(tf, archive, members, max_bytes)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, NotATarArchive):
            raise
        raise NotATarArchive(f"{os.fspath(archive)}: corrupt or truncated archive: {exc}") from exc
    return members


def _check_end(tf: tarfile.TarFile, archive: str | os.PathLike,
               members: list[tarfile.TarInfo], max_bytes: int) -> None:
    """Refuse anything but zero bytes from the end of the last member (``tf.offset``) to the end
    of the (decompressed) archive: tarfile reads an invalid header after the first as the end of
    the archive and would drop every member after it. Streams in 1 MiB reads."""
    end = tf.offset
    fileobj = tf.fileobj
    last = members[-1].name if members else "the start of the archive"
    # tarfile last read the 512-byte block at ``end``; a compressed stream seeks back within
    # its read buffer, a plain file seeks at no cost
    fileobj.seek(end)
    seen = 0
    while chunk := fileobj.read(len(_ZEROS)):
        if chunk != _ZEROS[:len(chunk)]:
            at = end + seen + len(chunk) - len(chunk.lstrip(b"\0"))
            raise DamagedArchive(
                f"{os.fspath(archive)}: damaged or not a tar archive after member "
                f"{len(members)} ({last!r}): non-zero data at offset {at:,} (byte "
                f"{at - end:,} after the end of that member) where only the end-of-archive "
                "marker (zero blocks) may follow; tarfile would silently stop there and drop "
                "the rest")
        seen += len(chunk)
        if seen > max(max_bytes, MIN_MAX_BYTES):  # a bomb of zeros after the end
            raise ArchiveTooLarge(
                archive, last,
                f"more than {_gb(max(max_bytes, MIN_MAX_BYTES))} of zero padding after this "
                "last member")


def _validate(
    tf: tarfile.TarFile,
    archive: str | os.PathLike,
    existing_links: dict[str, str] | None = None,
    max_bytes: int | None = None,
    dest: Path | None = None,
) -> list[tarfile.TarInfo]:
    members = _read_members(
        tf, archive, default_max_bytes(archive) if max_bytes is None else max_bytes)

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
            if dest is not None:
                _refuse_existing(archive, m, dest, parent + parts[-1:])
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


def _refuse_existing(archive: str | os.PathLike, m: tarfile.TarInfo, dest: Path,
                     path: list[str]) -> None:
    """Refuse a member whose (resolved) path already exists under ``dest`` (put there by
    another archive): tarfile would replace it. A directory may be shared."""
    target = dest.joinpath(*path)
    if m.isdir() and (target.is_dir() and not target.is_symlink()):
        return
    if not os.path.lexists(target):
        return
    what = ("a directory" if target.is_dir() and not target.is_symlink()
            else "a symlink" if target.is_symlink() else "a file")
    raise UnsafeArchiveError(
        archive, m.name,
        f"{'/'.join(path)!r} is already {what} in the destination, from another archive "
        "extracted there: it would be replaced")


def check_members(tar_path: str | os.PathLike, *,
                  max_bytes: int | None = None) -> list[tarfile.TarInfo]:
    """Validate every member of ``tar_path`` without writing anything; return them in order.

    Raises :class:`UnsafeArchiveError` (naming the member and the reason) for: absolute
    names, ``..`` components, backslashes, drive letters or NUL bytes in names; symlinks
    whose target is absolute or resolves outside the tree (following the archive's other
    symlinks) or loops; member paths whose directory resolves outside through a symlink; a
    name that is both a symlink and another member; a name used twice for a file (a regular
    file or hard link: tarfile would replace the first or write through the link), or as both
    a file and a directory, or as a symlink after other members were put under it; hard links
    whose target is not an earlier regular-file member; character/block devices, FIFOs and
    any other type that is not a regular file, directory, symlink or hard link; sparse
    members. Raises :class:`ArchiveTooLarge` (an :class:`UnsafeArchiveError`) when the regular
    members add up to more than ``max_bytes`` (default :func:`default_max_bytes`). Raises
    :class:`NotATarArchive` for a file that is not a (complete) tar archive, and its subclass
    :class:`DamagedArchive` when anything but zero blocks follows the last member tarfile
    could read (a damaged header mid-archive, which tarfile alone takes for the end).
    """
    with _open(tar_path) as tf:
        return _validate(tf, tar_path, max_bytes=max_bytes)


def safe_extract(tar_path: str | os.PathLike, dest_dir: str | os.PathLike, *,
                 max_bytes: int | None = None, refuse_existing: bool = False) -> list[str]:
    """Validate the whole archive, then extract it into ``dest_dir`` (created if missing).

    Nothing is written unless every member passes :func:`check_members`, with the symlinks
    already under ``dest_dir`` taken into account too: a member may not replace one of them
    by a non-link, and an archive's symlinks may not make one of them lead outside (so
    extracting several archives into one directory keeps every symlink inside it). Extraction uses
    ``filter="data"`` (no special files, no setuid/setgid/sticky bits, no group/other write,
    owner read/write, links kept inside) as defence in depth. Returns the names, relative to
    ``dest_dir`` in POSIX form without ``./``, of the regular files written (hard links
    included), in archive order without duplicates.

    ``max_bytes`` caps what the archive may extract to (default :func:`default_max_bytes`):
    checked from the headers before anything is written and again, from the files written, as
    extraction goes (:class:`ArchiveTooLarge`). With ``refuse_existing``, a member whose path
    already exists in ``dest_dir`` (other than a directory that both share) is refused before
    anything is written, instead of replaced: for several archives extracted into one folder.

    An archive that fails mid-way (e.g. a truncated gzip stream) raises and may leave the
    files extracted so far; extract into a fresh directory when that matters.
    """
    dest = Path(dest_dir)
    cap = default_max_bytes(tar_path) if max_bytes is None else max_bytes
    with _open(tar_path) as tf:
        members = _validate(tf, tar_path, existing_links(dest), cap,
                            dest if refuse_existing else None)
        dest.mkdir(parents=True, exist_ok=True)
        written = _WrittenBytes(tar_path, cap)
        try:
            # members validated above; the filter is tarfile.data_filter plus the size count
            tf.extractall(dest, members=members, filter=written)  # noqa: S202
            written.finish()
        except (tarfile.ReadError, EOFError) as exc:
            raise NotATarArchive(
                f"{os.fspath(tar_path)}: corrupt or truncated archive: {exc}"
            ) from exc
    names: dict[str, None] = {}
    for m in members:
        if m.isreg() or m.islnk():
            names[str(PurePosixPath(*_components(tar_path, m.name, m.name, "name")))] = None
    return list(names)


class _WrittenBytes:
    """tarfile's ``data`` filter, which also adds up the bytes each regular file took on disk
    once written (tarfile calls the filter for a member after writing the one before) and
    refuses to go on past the cap: the headers were checked before extraction, this checks
    what was written, whatever a header said."""

    def __init__(self, archive: str | os.PathLike, cap: int):
        self.archive, self.cap = archive, cap
        self.total = 0
        self.last: tuple[str, str] | None = None  # (member name, path) of the last file

    def _count_last(self) -> None:
        if self.last is None:
            return
        name, path = self.last
        self.last = None
        try:
            self.total += os.lstat(path).st_size
        except FileNotFoundError:
            return
        if self.total > self.cap:
            raise ArchiveTooLarge(
                self.archive, name,
                f"the files written so far take {_gb(self.total)}, over the archive's cap of "
                f"{_gb(self.cap)}: extraction stopped")

    def __call__(self, member: tarfile.TarInfo, path: str) -> tarfile.TarInfo | None:
        self._count_last()
        filtered = tarfile.data_filter(member, path)
        if filtered is not None and filtered.isreg():
            self.last = (member.name, os.path.join(path, filtered.name))
        return filtered

    def finish(self) -> None:
        self._count_last()
