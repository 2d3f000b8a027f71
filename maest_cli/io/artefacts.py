"""How every output is written and described: atomically, with checksums and tool versions.

A reader must never see half a file (temp file, fsync, rename), and every artefact records how
it was made. The primitives live here once, so each command writes the same way.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Iterator
from pathlib import Path

from maest_cli import __version__
from maest_cli.errors import UsageError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` for a writer (safetensors, pyarrow, open()) to fill; when
    the block ends it is fsynced, given the usual permissions (safetensors makes 0600 files) and
    renamed over `path`, so `path` holds its old or its complete new content, even on a kill.
    On an error the temporary file is removed and `path` is untouched."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        fsync_file(tmp)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask, read where Linux shows it: setting it to read it races other threads."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write path so that it holds either its old or its complete new content, even on a kill."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_png(path: str | os.PathLike, fig, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG, atomically (rendered in memory, then write_atomic)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file to disk (atomic_path does it before the rename)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tool_versions() -> dict[str, str]:
    """Versions of this tool and of everything that shapes its numbers."""
    import importlib.metadata

    import numpy
    import pyarrow
    import soundfile
    import soxr

    try:
        tool = importlib.metadata.version("maest-cli")
    except importlib.metadata.PackageNotFoundError:  # a source tree that is not installed
        tool = __version__
    versions = {"maest-cli": tool, "python": platform.python_version(), "numpy": numpy.__version__,
                "pyarrow": pyarrow.__version__, "soundfile": soundfile.__version__,
                "libsndfile": soundfile.__libsndfile_version__, "soxr": getattr(soxr, "__version__", "?")}
    try:
        import torch

        versions["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return versions


def check_out_file(out: str | Path | None, option: str = "--out") -> None:
    """`out` (None: not asked) can become a file: not a directory, and no file in its way."""
    if out is None:
        return
    p = Path(out)
    if p.is_dir():
        raise UsageError(f"{option} {p}: a directory; give the name of the JSON file to write")
    _nearest_is_dir(p.parents, p, option)


def check_work_dir(work: str | Path, option: str = "--work") -> None:
    """`work` is a directory, or can become one."""
    p = Path(work)
    _nearest_is_dir((p, *p.parents), p, option)


def _nearest_is_dir(candidates, shown: Path, option: str) -> None:
    """The first of `candidates` that exists must be a directory (what `shown` is made in)."""
    for q in candidates:
        if q.exists():
            if not q.is_dir():
                raise UsageError(f"{option} {shown}: {q} is a file, not a directory")
            return
