"""How every output is written and described: atomically, with checksums and tool versions.

A reader must never see half a file (temp file, fsync, rename), and every artefact records how
it was made. The primitives live here once, so each command writes the same way.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

from maest_cli import __version__


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write path so that it holds either its old or its complete new content, even on a kill."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_png(path: str | os.PathLike, fig, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG, atomically (rendered in memory, then write_atomic)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    write_atomic(path, buf.getvalue())


def write_json(path: str | os.PathLike, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file written by a library (pyarrow, safetensors) before it is renamed into place."""
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
