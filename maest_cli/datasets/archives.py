"""Unpacking archives safely: nothing lands outside the destination, every byte is checked.

A zip cut into parts is read through `JoinedFile` (the parts as one file, without writing the
joined copy); each member is streamed to a temporary name, its CRC-32 (zipfile checks it at the
end of the read) and size checked, then renamed into place. Tar members go through tarfile's
"data" filter; only directories and regular files are accepted.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from maest_cli.errors import MaestError


class ArchiveError(MaestError):
    """An archive that is corrupt or holds a member that may not be unpacked (outside the root, a link)."""


class UnsafeMember(ArchiveError):
    """A member that would land outside the destination, or a link: the archive is refused, never re-fetched."""


class JoinedFile(io.RawIOBase):
    """Read-only, seekable view of several files one after the other (a zip cut with `split`)."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self.sizes = [p.stat().st_size for p in self.paths]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.total = sum(self.sizes)
        self.pos = 0
        self.handles = [open(p, "rb") for p in self.paths]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.total}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buf) -> int:
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view) and self.pos < self.total:
            i = max(k for k, s in enumerate(self.starts) if s <= self.pos)
            f = self.handles[i]
            f.seek(self.pos - self.starts[i])
            n = f.readinto(view[done:done + min(len(view) - done, self.starts[i] + self.sizes[i] - self.pos)])
            if not n:
                break
            done += n
            self.pos += n
        return done

    def close(self) -> None:
        for f in self.handles:
            f.close()
        super().close()


def safe_member_path(dest: Path, name: str, archive: str) -> Path:
    """dest/name, refusing absolute names, '..' and anything that would resolve outside dest."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or (pure.parts and ":" in pure.parts[0]):
        raise UnsafeMember(f"{archive}: member {name!r} would land outside {dest}; nothing unpacked")
    target = dest.joinpath(*pure.parts)
    if not target.resolve().is_relative_to(dest.resolve()):
        raise UnsafeMember(f"{archive}: member {name!r} would land outside {dest}; nothing unpacked")
    return target


def _bar(total: int, what: str, progress: bool):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   disable=not (progress and console.is_terminal), transient=True, console=console)
    return bar, what, total


def zip_members(parts: list[Path], archive: str) -> list[zipfile.ZipInfo]:
    """The members of a (split) zip, checked before anything is written: no links, no names out of the root."""
    with JoinedFile(parts) as raw, _open_zip(raw, archive) as zf:
        infos = zf.infolist()
    for info in infos:
        if stat.S_ISLNK(info.external_attr >> 16):
            raise UnsafeMember(f"{archive}: member {info.filename!r} is a symbolic link; nothing unpacked")
    return infos


def _open_zip(raw, archive: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(io.BufferedReader(raw, 1 << 20))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ArchiveError(f"{archive}: not a readable zip ({e})") from None


def unzip_parts(parts: list[Path], dest: Path, archive: str, progress: bool = True) -> dict:
    """Unpack a split zip into dest, checking each member's CRC-32 and size; members already in place
    with the right size and CRC are kept (an interrupted unpack resumes). Returns counts and bytes."""
    dest.mkdir(parents=True, exist_ok=True)
    infos = zip_members(parts, archive)
    for info in infos:  # every name checked before the first byte is written
        safe_member_path(dest, info.filename, archive)
    files = [i for i in infos if not i.is_dir()]
    written = kept = 0
    bar, what, total = _bar(len(files), archive, progress)
    with JoinedFile(parts) as raw, _open_zip(raw, archive) as zf, bar:
        task = bar.add_task(f"unpacking {what}", total=total)
        for info in files:
            target = safe_member_path(dest, info.filename, archive)
            if target.is_file() and target.stat().st_size == info.file_size and _crc32(target) == info.CRC:
                kept += 1
            else:
                _write_member(lambda i=info: zf.open(i), target, info.file_size, f"{archive}: {info.filename}")
                written += 1
            bar.update(task, advance=1)
    return {"members": len(files), "written": written, "kept": kept,
            "bytes": sum(i.file_size for i in files)}


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def _write_member(opener: Callable, target: Path, size: int, what: str) -> None:
    """Stream a member to a temporary name beside target, check its size, rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    try:
        with opener() as src, open(tmp, "wb") as out:
            while block := src.read(1 << 20):
                out.write(block)
        got = tmp.stat().st_size
        if got != size:
            raise ArchiveError(f"{what}: {got} bytes unpacked, the archive says {size}")
        os.replace(tmp, target)
    except (zipfile.BadZipFile, zlib.error, EOFError, tarfile.TarError) as e:  # zipfile: "Bad CRC-32 for file ..."
        raise ArchiveError(f"{what}: corrupt ({e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def tar_members(path: Path, dest: Path, archive: str) -> list[tarfile.TarInfo]:
    """The members of a tar, checked before anything is written: directories and regular files only,
    each passing tarfile's "data" filter for dest (no absolute names, nothing outside dest)."""
    try:
        with tarfile.open(path, "r:") as tf:
            members = tf.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"{archive}: not a readable tar ({e})") from None
    for m in members:
        if not (m.isfile() or m.isdir()):
            raise UnsafeMember(f"{archive}: member {m.name!r} is a link or device, not a file; nothing unpacked")
        safe_member_path(dest, m.name, archive)
        try:
            tarfile.data_filter(m, str(dest))
        except tarfile.FilterError as e:
            raise UnsafeMember(f"{archive}: member {m.name!r} refused ({e}); nothing unpacked") from None
    return members


def untar(path: Path, dest: Path, archive: str, progress: bool = True) -> Iterator[tuple[str, Path]]:
    """Unpack a tar's files into dest (each streamed to a temporary name, then renamed); yields
    (member name, unpacked path) for each file so the caller can check it."""
    dest.mkdir(parents=True, exist_ok=True)
    members = tar_members(path, dest, archive)
    for m in members:
        if m.isdir():
            safe_member_path(dest, m.name, archive).mkdir(parents=True, exist_ok=True)
    members = [m for m in members if m.isfile()]
    bar, what, total = _bar(len(members), archive, progress)
    with tarfile.open(path, "r:") as tf, bar:
        task = bar.add_task(f"unpacking {what}", total=total)
        for m in members:
            target = safe_member_path(dest, m.name, archive)
            _write_member(lambda m=m: tf.extractfile(m), target, m.size, f"{archive}: {m.name}")
            bar.update(task, advance=1)
            yield m.name, target
