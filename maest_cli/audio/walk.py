"""Find the audio files under the PATHs a user names: stable order, extension filter, and
every problem (unreadable directory, symlink loop) reported instead of stopping the run.

A file is identified by the directory it was found under (`root`, absolute) and its path
relative to that root (`path`, '/'-separated): that pair is what output datasets record, so
the same catalogue walked from another working directory gives the same keys. Names that are
not valid UTF-8 (old Latin-1 catalogues) are recorded with their bad bytes escaped ("\\xe9"),
the same text in every run; `full_path` keeps the real name for opening the file.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from maest_cli.audio.decode import AUDIO_EXTENSIONS
from maest_cli.errors import UsageError


def as_text(name: str) -> str:
    """A file system name as valid UTF-8 text: undecodable bytes escaped, stable across runs."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass(frozen=True, order=True)
class FoundFile:
    root: str  # absolute directory the file was found under (not symlink-resolved), as text
    path: str  # relative to root, '/'-separated, as text
    source: str = field(default="", compare=False)  # the real name on disk, when the text differs

    @property
    def full_path(self) -> str:
        return self.source or os.path.join(self.root, *self.path.split("/"))

    @property
    def key(self) -> tuple[str, str]:
        return (self.root, self.path)


@dataclass(frozen=True)
class WalkProblem:
    """Something the walk could not look into. `failed`: inputs may have been missed
    (an unreadable directory); a symlink loop misses nothing and is only reported."""

    root: str
    path: str
    reason: str
    failed: bool


def normalize_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    """'mp3', '.MP3', 'mp3,wav' -> ('.mp3', '.wav'); None -> the decodable formats."""
    if extensions is None:
        return AUDIO_EXTENSIONS
    out: list[str] = []
    for item in extensions:
        for e in str(item).split(","):
            e = e.strip().lower()
            if not e:
                continue
            e = e if e.startswith(".") else "." + e
            if e not in out:
                out.append(e)
    if not out:
        raise UsageError("--ext: no extension given")
    return tuple(out)


def find_audio_files(
    paths: Sequence[str | os.PathLike], extensions: Iterable[str] | None = None, skipped: Counter | None = None
) -> tuple[list[FoundFile], list[WalkProblem]]:
    """All files under `paths` whose extension is in `extensions`, each once, in order:
    PATHs as given, and under each directory sorted by relative path.

    Directories are walked recursively, following symlinks (a link back to a directory
    already visited is a loop: reported, not followed). Hidden entries (name starting with
    '.', e.g. macOS '._x.mp3' forks) are skipped. A file named explicitly is always taken,
    whatever its extension (decoding will say if it is not audio). A PATH that does not exist
    is a usage error: nothing has started yet and it is most likely a typo.

    PATHs may overlap (`lib lib/rock`, or a link to the same folder): a file (device and
    inode) reached through two PATHs is taken once, from the first, and each later PATH that
    repeated files gets one problem (not failed) saying how many. Within one PATH, hard links
    keep their own paths (only directory links are walked once, see above).

    `skipped`, if given, counts what the walk passed over, so a caller can report it (a folder
    of .m4a files should not look empty): "hidden" entries, and other files by extension
    ('.m4a', '(none)').
    """
    exts = normalize_extensions(extensions)
    if not paths:
        raise UsageError("no input PATH given")
    found: list[FoundFile] = []
    problems: list[WalkProblem] = []
    seen: set[tuple[str, str]] = set()
    first_path: dict[tuple[int, int], int] = {}  # a file's (st_dev, st_ino) -> the PATH it was found under
    for i, given in enumerate(paths):
        p = os.path.abspath(os.fspath(given))
        if not os.path.lexists(p):
            raise UsageError(f"{given}: no such file or directory")
        if os.path.isdir(p):
            files, probs = _walk_dir(p, exts, skipped)
            problems.extend(probs)
            where = (as_text(p), ".")
        else:  # a file, or something that will fail to open (dangling link, FIFO): report it later
            files = [_found(os.path.dirname(p), os.path.basename(p))]
            where = (files[0].root, files[0].path)
        repeated: Counter = Counter()  # earlier PATH -> files of this one it already gave
        for f in files:
            if f.key in seen:
                continue
            ident = _identity(f.full_path) if len(paths) > 1 else None
            if ident is not None and first_path.setdefault(ident, i) != i:
                repeated[first_path[ident]] += 1
                continue
            seen.add(f.key)
            found.append(f)
        if repeated:
            n = sum(repeated.values())
            earlier = ", ".join(as_text(os.fspath(paths[j])) for j in sorted(repeated))
            problems.append(WalkProblem(*where, f"{n} file{'s' if n > 1 else ''} already found under {earlier} "
                                                f"(overlapping PATHs): each is taken once", False))
    return found, problems


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of what a path names, following links; None if it cannot be read."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _found(root: str, rel: str) -> FoundFile:
    text = FoundFile(as_text(root), as_text(rel))
    real = os.path.join(root, *rel.split("/"))
    return text if text.full_path == real else FoundFile(text.root, text.path, real)


def _walk_dir(root: str, exts: tuple[str, ...],
              skipped: Counter | None = None) -> tuple[list[FoundFile], list[WalkProblem]]:
    files: list[FoundFile] = []
    problems: list[WalkProblem] = []
    try:
        st = os.stat(root)
    except OSError as e:
        return [], [WalkProblem(as_text(root), ".", f"cannot read directory ({e.strerror})", True)]
    # Depth-first; `visited` maps a directory's identity to the relative path it was seen at.
    visited: dict[tuple[int, int], str] = {(st.st_dev, st.st_ino): "."}
    stack = [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root, *rel.split("/")) if rel else root
        try:
            with os.scandir(here) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append(WalkProblem(as_text(root), as_text(rel or "."),
                                        f"cannot read directory ({e.strerror or e})", True))
            continue
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                if skipped is not None:
                    skipped["hidden"] += 1
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    cst = os.stat(entry.path)
                except OSError as e:
                    problems.append(WalkProblem(as_text(root), as_text(child), f"cannot read directory ({e.strerror})",
                                                True))
                    continue
                ident = (cst.st_dev, cst.st_ino)
                if ident in visited:
                    problems.append(WalkProblem(
                        as_text(root), as_text(child), f"symlink loop or duplicate: same directory as "
                                                       f"{as_text(visited[ident])!r}, not followed", False))
                    continue
                visited[ident] = child
                subdirs.append(child)
            elif os.path.splitext(entry.name)[1].lower() in exts:
                files.append(_found(root, child))
            elif skipped is not None:
                skipped[os.path.splitext(as_text(entry.name))[1].lower() or "(none)"] += 1
        stack.extend(reversed(subdirs))
    files.sort(key=lambda f: f.path)
    return files, problems
