"""Downloads and the user cache: HTTPS, resumable (.part + Range), verified, atomic.

Every fetch of the tool (model weights, datasets) goes through `download_file`: a truncated
transfer leaves DEST.part to resume from on the next run; a file that fails its size or sha256
check is deleted, so a bad download never sits at DEST.
"""

from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path

from maest_cli.errors import MaestError
from maest_cli.io.artefacts import sha256_file

USER_AGENT = "maest-cli (+https://github.com/palonso/MAEST)"


class DownloadError(MaestError):
    """A download failed (HTTP error, interrupted, or a file that does not match its pin)."""


class TransientDownloadError(DownloadError):
    """A failure worth retrying: the connection failed or dropped, or the server was busy (5xx, 408, 429)."""


class VerificationError(DownloadError):
    """The file arrived whole but is not the one pinned (wrong size or sha256); it was deleted."""


class NoSpaceError(DownloadError):
    """Not enough free disk for a download (and what unpacking it needs)."""


def check_free_space(folder: Path, need: int, what: str) -> None:
    """Refuse in one line, before writing, when `folder`'s disk has less than `need` bytes free."""
    probe = Path(folder)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise NoSpaceError(f"{what}: needs {_human(need)} free in {folder}, {_human(free)} available; "
                           f"free some space or put the data on another disk")


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover - the loop returns


def cache_dir() -> Path:
    env = os.environ.get("MAEST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "maest-cli"


def offline() -> bool:
    return os.environ.get("MAEST_OFFLINE", "").lower() in ("1", "true", "yes")


def download_file(url: str, dest: Path, sha256: str | None = None, size: int | None = None,
                  progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch url to dest: resume from dest.part, verify, then rename into place.

    A truncated transfer leaves dest.part to resume from; a file that fails verification
    is deleted, so a bad download never sits at dest.
    """
    return download_with_digest(url, Path(dest), sha256, size, progress, timeout)[0]


def download_with_digest(url: str, dest: Path, sha256: str | None = None, size: int | None = None,
                         progress: bool = True, timeout: float = 60.0, retries: int = 0, backoff: float = 2.0,
                         unpack_ratio: float | None = None) -> tuple[Path, str]:
    """download_file, also returning the sha256 (computed once: it verifies or gets recorded).

    retries: a transient failure (TransientDownloadError) is retried this often, resuming the .part,
    after backoff, 2 backoff, 4 backoff ... seconds. unpack_ratio: when set, the disk must have room
    for the rest of the file plus unpack_ratio times its size (what unpacking it will write), checked
    once the size is known and before any byte is written (NoSpaceError otherwise).
    """
    for attempt in range(retries + 1):
        try:
            return _download(url, Path(dest), sha256, size, progress, timeout, unpack_ratio)
        except TransientDownloadError:
            if attempt == retries:
                raise
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _download(url: str, dest: Path, sha256: str | None, size: int | None, progress: bool, timeout: float,
              unpack_ratio: float | None) -> tuple[Path, str]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:  # cannot be the start of the pinned file
        part.unlink()
        have = 0

    def restart() -> tuple[Path, str]:
        """The .part cannot be resumed: delete it and fetch the whole file (once: no .part left)."""
        part.unlink(missing_ok=True)
        return _download(url, dest, sha256, size, progress, timeout, unpack_ratio)

    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            busy = e.code >= 500 or e.code in (408, 429)
            raise (TransientDownloadError if busy else DownloadError)(f"{url}: HTTP {e.code} {e.reason}") from None
        # Range not satisfiable: the .part is already whole (verified below), unless the server
        # says the file is shorter than it ("Content-Range: bytes */N").
        total = _range_total(e.headers.get("Content-Range"))
        if total is not None and total != have:
            return restart()
        resp = None
    except (urllib.error.URLError, OSError) as e:
        raise TransientDownloadError(f"{url}: {getattr(e, 'reason', e)}") from None

    if resp is not None:
        with resp:
            if have and getattr(resp, "status", 200) != 206:
                have = 0  # the server ignored the range and sends the whole file: start over
            elif have and _range_start(resp.headers.get("Content-Range")) not in (None, have):
                return restart()  # a range other than the one asked for
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            if size is not None and total is not None and total != size:
                if have:
                    return restart()  # the .part may be of another file
                raise DownloadError(f"{dest.name}: expected {size} bytes, the server at {url} offers {total}")
            whole = total if total is not None else size
            if unpack_ratio is not None and whole is not None:
                check_free_space(dest.parent, whole - have + int(unpack_ratio * whole), dest.name)
            _stream(resp, part, have, total if total is not None else size, url, progress)
        if total is not None and part.stat().st_size != total:
            raise TransientDownloadError(f"{url}: transfer interrupted at {part.stat().st_size} bytes; "
                                         f"run again to resume")
    got = part.stat().st_size
    if size is not None and got != size:
        part.unlink(missing_ok=True)
        raise VerificationError(f"{dest.name}: expected {size} bytes, got {got}; the download from {url} was deleted")
    digest = sha256_file(part)
    if sha256 and digest != sha256.lower():
        part.unlink(missing_ok=True)
        raise VerificationError(f"{dest.name}: expected sha256 {sha256.lower()}, got {digest}; the download from "
                            f"{url} was deleted")
    os.replace(part, dest)
    return dest, digest


def _range_total(header: str | None) -> int | None:
    """N of "bytes */N" or "bytes a-b/N" (None when absent or "*")."""
    tail = (header or "").rpartition("/")[2].strip()
    return int(tail) if tail.isdigit() else None


def _range_start(header: str | None) -> int | None:
    """a of "bytes a-b/N" (None when absent)."""
    head = (header or "").partition("/")[0].replace("bytes", "").strip().partition("-")[0]
    return int(head) if head.isdigit() else None


def _stream(resp, part: Path, have: int, total: int | None, url: str, progress: bool) -> None:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    mode = "ab" if have else "wb"
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    progress_console = Console(stderr=True)  # stdout carries the results (`maest models download` prints paths)
    bar_on = progress and progress_console.is_terminal  # in a pipe or a log a bar only leaves blank lines
    with open(part, mode) as out, Progress(*columns, disable=not bar_on, transient=True,
                                           console=progress_console) as bar:
        task = bar.add_task(url.rsplit("/", 1)[-1], total=total, completed=have)
        while True:
            try:
                chunk = resp.read(1 << 16)
            except (OSError, ValueError, http.client.HTTPException) as e:  # reset, IncompleteRead
                out.flush()
                os.fsync(out.fileno())
                raise TransientDownloadError(f"{url}: transfer interrupted ({e}); run again to resume") from None
            if not chunk:
                break
            out.write(chunk)  # a local failure (a full disk) is not the transfer's: it is raised as it is
            bar.update(task, advance=len(chunk))
        out.flush()
        os.fsync(out.fileno())
