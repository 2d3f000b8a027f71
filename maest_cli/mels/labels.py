"""Label files of tagged audio, read one way for every command (`prepare-mels`, `probe`).

Three formats, one reader each, all giving `LabelRow`s (path relative to the audio root, tags,
artist, split, track id, file:line) plus `LabelProblem`s for the rows they skip:

- tsv: a table, tab- or comma-separated (the first line decides: a tab makes it a TSV, else a
  comma a CSV). With a header naming its columns in any order among path, tags, artist, split,
  track_id (aliases in TABLE_COLUMNS; other columns are ignored), or without one as
  `path<TAB>tags[<TAB>artist]`. Tags are separated by ',' or '|' (`rock|pop`, or a quoted
  `"rock,pop"` in a CSV); a row may have no tags; fields may be quoted.
- mtg-jamendo: the official split files: TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, DURATION, then
  one tag per column (a variable number). The split comes from the file name (`...-train.tsv`,
  `-validation`, `-test`).
- mtt: MagnaTagATune's annotations_final.csv (tab-separated, quoted): clip_id, 188 tag columns
  of 0/1, mp3_path. The Magnatune artist slug (file name up to the first '-') is the artist.
  Its split is the 12:1:3 rule on the first directory (`mtt_split_of`), applied by the caller.

One rule each for what both commands share: the split aliases (SPLIT_ALIASES), the path key
that ignores the audio extension (`audio_key`), the MagnaTagATune directory split, the top-k
vocabulary (`top_k_tags`), how rows naming the same track merge (`merge_rows`) and where the
vocabulary comes from (`read_label_files(tags_from=...)`). Files are read as UTF-8 (a BOM is
fine); a file that cannot be read as its format is a UsageError naming file:line.
"""

from __future__ import annotations

import csv
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from maest_cli.audio.decode import AUDIO_EXTENSIONS
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
JAMENDO_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION")
TABLE_COLUMNS = {"path": "path", "file": "path", "filename": "path", "audio": "path", "tags": "tags",
                 "tag": "tags", "labels": "tags", "artist": "artist", "artist_id": "artist",
                 "split": "split", "track_id": "track_id", "id": "track_id"}
TSV_COLUMNS = TABLE_COLUMNS  # the former name
TAG_SEPARATORS = re.compile(r"[,|]")
FORMATS = {"tsv": "a TSV/CSV label table (a header with a path column, or path<TAB>tags rows)",
           "mtg-jamendo": "an MTG-Jamendo split file (header TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION, tags)",
           "mtt": "MagnaTagATune's annotations_final.csv (a tab-separated header clip_id, tags..., mp3_path)"}


@dataclass(frozen=True)
class LabelRow:
    path: str  # relative to the audio root, '/'-separated, as written in the label file
    tags: tuple[str, ...]
    artist: str = ""
    split: str = ""  # "" when the file does not say
    track_id: str = ""
    where: str = ""  # file:line, for messages


@dataclass(frozen=True)
class LabelProblem:
    """One line of a dataset's label_problems.tsv, or one note of a probe."""

    kind: str  # malformed_row | conflicting_rows | duplicate_row | label_without_audio | audio_without_labels
    #            | unknown_tag
    path: str
    detail: str = ""
    where: str = ""


@dataclass
class LabelFile:
    """What one reader got from one file."""

    path: str
    format: str
    rows: list[LabelRow]
    problems: list[LabelProblem]
    columns: tuple[str, ...]  # the fields the file gives: path, tags, artist, split, track_id
    tag_columns: list[str] = field(default_factory=list)  # mtt: the tag columns in header order


@dataclass
class LabelTable:
    rows: list[LabelRow]  # one per distinct path, in file order
    vocabulary: list[str]
    format: str
    files: list[dict] = field(default_factory=list)  # path, format, rows, sha256
    problems: list[LabelProblem] = field(default_factory=list)
    unknown_tags: dict[str, int] = field(default_factory=dict)  # tag -> rows carrying it
    columns: tuple[str, ...] = ()  # fields given by every file


# ---------------------------------------------------------------- paths and splits

def normalize_path(p: str) -> str:
    """The form paths are compared in: '/'-separated, no leading './' or '/'."""
    p = p.strip().replace("\\", "/")
    p = posixpath.normpath(p) if p else p
    return p.lstrip("/") if p not in (".", "") else ""


def audio_key(path: str) -> str:
    """The path a track is known by whatever its audio copy: normalised, without a known audio
    extension, and without MTG-Jamendo's `.low` before it (`48/948.low.mp3` -> `48/948`). Only
    audio extensions go: `live/take.v2` and `live/take.v3` stay two tracks."""
    p = normalize_path(path)
    stem, ext = posixpath.splitext(p)
    if ext.lower() in AUDIO_EXTENSIONS:
        p = stem
        low_stem, low = posixpath.splitext(p)
        if low.lower() == ".low" and posixpath.basename(low_stem):
            p = low_stem
    return p


def split_name(value: str) -> str | None:
    """The canonical split of a written one ('' stays ''), None if it is not a split."""
    v = value.strip().lower()
    return "" if not v else SPLIT_ALIASES.get(v)


def mtt_split_of(path: str) -> str | None:
    """MagnaTagATune's 12:1:3 split by the clip's one-hex-digit directory: 0-b train,
    c validation, d-f test. None if the path is not in such a directory."""
    p = normalize_path(path)
    first = p.split("/", 1)[0]
    if "/" not in p or len(first) != 1 or first.lower() not in "0123456789abcdef":
        return None
    part = int(first, 16)
    return "train" if part < 12 else "validation" if part == 12 else "test"


def mtt_directory_split(path: str) -> str:
    """`mtt_split_of`, for callers where a path outside the rule is a usage error."""
    split = mtt_split_of(path)
    if split is None:
        raise UsageError(f"--split-by mtt-directory: {path!r} is not in a one-hex-digit directory (0-9, a-f)")
    return split


def _split_from_name(path: Path) -> str:
    m = re.search(r"[-_.](train|training|validation|valid|val|test)$", path.stem, re.IGNORECASE)
    return SPLIT_ALIASES[m.group(1).lower()] if m else ""


# ---------------------------------------------------------------- reading text

def _bad_utf8_line(path: Path) -> int:
    """The 1-based line of the first byte that is not UTF-8 (the file read again in binary;
    a newline byte never occurs inside a UTF-8 character, so lines decode on their own)."""
    n = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                return n
    return max(n, 1)


def _unreadable(path: Path, e: Exception, line: int | None = None) -> UsageError:
    if isinstance(e, UnicodeDecodeError):
        return UsageError(f"{path}:{_bad_utf8_line(path)}: not UTF-8 text ({e.reason} at byte "
                          f"0x{e.object[e.start]:02x}); save the label file as UTF-8")
    if isinstance(e, csv.Error):
        return UsageError(f"{path}:{line}: cannot be parsed ({e})")
    return UsageError(f"{path}: cannot be read ({e})")


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return next((line for line in f if line.strip()), "").rstrip("\r\n")
    except (UnicodeDecodeError, OSError) as e:
        raise _unreadable(path, e) from None


def _records(path: Path, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every non-blank record; fields unquoted and stripped, CR/LF
    and BOM gone. A file that is not UTF-8 or breaks the CSV rules is a UsageError at its line."""
    reader = None
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, delimiter=delimiter, quotechar='"', strict=True)
            for fields in reader:
                if any("\x00" in c for c in fields):  # csv reads NUL since Python 3.11: not text
                    raise csv.Error("NUL byte, not a text file")
                if any(c.strip() for c in fields):
                    yield reader.line_num, [c.strip() for c in fields]
    except (UnicodeDecodeError, csv.Error, OSError) as e:
        raise _unreadable(path, e, reader.line_num if reader else None) from None


def _tags(text: str | Iterable[str]) -> tuple[str, ...]:
    """Distinct non-empty tags in order, from a ','/'|'-separated field or a list of fields."""
    parts = TAG_SEPARATORS.split(text) if isinstance(text, str) else text
    return tuple(dict.fromkeys(t.strip() for t in parts if t.strip()))


def detect_format(path: Path) -> str:
    """mtg-jamendo or mtt by their headers, else tsv."""
    fields = [c.strip().strip('"').strip() for c in _first_line(Path(path)).split("\t")]
    if tuple(c.upper() for c in fields[:5]) == JAMENDO_HEADER:
        return "mtg-jamendo"
    if len(fields) > 2 and fields[0] == "clip_id" and fields[-1] == "mp3_path":
        return "mtt"
    return "tsv"


# ---------------------------------------------------------------- one reader per format

def read_table(path: str | os.PathLike) -> LabelFile:
    """A TSV/CSV label table (module docstring). Rows that do not fit are skipped and noted."""
    path = Path(path)
    first = _first_line(path)
    delimiter = "\t" if "\t" in first or "," not in first else ","
    rows, problems = [], []
    header: list[str] | None = None  # the column of each field, from a header line
    plain = ["path", "tags", "artist"]  # without a header
    for k, (line, fields) in enumerate(_records(path, delimiter)):
        where = f"{path}:{line}"
        if k == 0:
            names = [TABLE_COLUMNS.get(c.lower(), "") for c in fields]
            if "path" in names:
                twice = sorted({n for n in names if n and names.count(n) > 1})
                if twice:
                    raise UsageError(f"{where}: the header names the {twice[0]} column twice")
                header = names
                continue
        columns = header or plain
        if any(fields[len(columns):]):
            expected = f"{len(columns)} as in the header" if header else "path, tags[, artist] (or a header line)"
            problems.append(LabelProblem("malformed_row", fields[0], f"{len(fields)} fields, expected {expected}",
                                         where))
            continue
        rec = {name: value for name, value in zip(columns, fields) if name}
        split = split_name(rec.get("split", ""))
        if split is None:
            problems.append(LabelProblem("malformed_row", rec.get("path", ""), f"unknown split {rec['split']!r} "
                                         "(expected train, validation or test)", where))
            continue
        if not normalize_path(rec.get("path", "")):
            problems.append(LabelProblem("malformed_row", "", "empty path", where))
            continue
        rows.append(LabelRow(rec["path"], _tags(rec.get("tags", "")), rec.get("artist", ""), split,
                             rec.get("track_id", "") or rec["path"], where))
    columns = header or plain
    given = tuple(c for c in ("path", "tags", "artist", "split", "track_id") if c in columns)
    return LabelFile(str(path), "tsv", rows, problems, given)


def read_jamendo(path: str | os.PathLike) -> LabelFile:
    """An MTG-Jamendo split file; the split is taken from its name."""
    path = Path(path)
    rows, problems, split, header = [], [], _split_from_name(path), False
    for line, fields in _records(path, "\t"):
        where = f"{path}:{line}"
        is_header = tuple(c.upper() for c in fields[:5]) == JAMENDO_HEADER
        if not header:
            if not is_header:
                raise UsageError(f"{where}: not {FORMATS['mtg-jamendo']}")
            header = True
            continue
        if is_header:  # files concatenated with their headers
            continue
        if len(fields) < 5 or not normalize_path(fields[3]):
            problems.append(LabelProblem("malformed_row", fields[3] if len(fields) > 3 else "",
                                         f"{len(fields)} fields, expected at least 5 with a PATH", where))
            continue
        rows.append(LabelRow(fields[3], _tags(fields[5:]), fields[1], split, fields[0], where))
    if not header:
        raise UsageError(f"{path}: empty file, expected {FORMATS['mtg-jamendo']}")
    columns = ("path", "tags", "artist", "track_id") + (("split",) if split else ())
    return LabelFile(str(path), "mtg-jamendo", rows, problems, columns)


def read_mtt(path: str | os.PathLike) -> LabelFile:
    """MagnaTagATune's annotations_final.csv: every row with all its positive tags, and the
    tag columns in header order (for the top-k rule)."""
    path = Path(path)
    rows, problems, header = [], [], None
    for line, fields in _records(path, "\t"):
        where = f"{path}:{line}"
        if header is None:
            if len(fields) < 3 or fields[0] != "clip_id" or fields[-1] != "mp3_path":
                raise UsageError(f"{where}: not {FORMATS['mtt']}; got {', '.join(fields[:2])}, ..., "
                                 f"{fields[-1] if fields else ''}")
            header = fields
            continue
        if len(fields) != len(header):
            problems.append(LabelProblem("malformed_row", fields[-1] if fields else "",
                                         f"{len(fields)} fields, header has {len(header)}", where))
            continue
        values = fields[1:-1]
        if any(v not in ("0", "1") for v in values):
            problems.append(LabelProblem("malformed_row", fields[-1], "tag values other than 0/1", where))
            continue
        if not normalize_path(fields[-1]):
            problems.append(LabelProblem("malformed_row", "", f"clip {fields[0]} has no mp3_path", where))
            continue
        tags = tuple(t for t, v in zip(header[1:-1], values) if v == "1")
        artist = posixpath.basename(fields[-1]).split("-", 1)[0]
        rows.append(LabelRow(fields[-1], tags, artist, "", fields[0], where))
    if header is None:
        raise UsageError(f"{path}: empty file, expected {FORMATS['mtt']}")
    return LabelFile(str(path), "mtt", rows, problems, ("path", "tags", "artist", "track_id"), header[1:-1])


READERS = {"tsv": read_table, "mtg-jamendo": read_jamendo, "mtt": read_mtt}


def read_label_file(path: str | os.PathLike, format: str | None = None) -> LabelFile:
    """One file in its own format; `format` makes any other a UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    fmt = detect_format(path)
    if format is not None and fmt != format:
        raise UsageError(f"{path}:1: not {FORMATS[format]} (its first line reads as {fmt})")
    return READERS[fmt](path)


# ---------------------------------------------------------------- rows to a table

def merge_rows(rows: Iterable[LabelRow]) -> tuple[list[LabelRow], list[LabelProblem]]:
    """One row per normalised path, in first-seen order: tags united (several MTG-Jamendo task
    files), the first split, artist and track id kept; a second split is reported, and so is a
    path listed twice in one file."""
    merged: dict[str, LabelRow] = {}
    problems = []
    for row in rows:
        key = normalize_path(row.path)
        old = merged.get(key)
        if old is None:
            merged[key] = replace(row, path=key)
            continue
        if old.split and row.split and old.split != row.split:
            problems.append(LabelProblem("conflicting_rows", key, f"split {row.split!r} here, {old.split!r} at "
                                         f"{old.where}; keeping {old.split!r}", row.where))
        elif old.where and old.where.rpartition(":")[0] == row.where.rpartition(":")[0]:  # twice in one file
            problems.append(LabelProblem("duplicate_row", key, f"also at {old.where}; tags united", row.where))
        merged[key] = replace(old, tags=old.tags + tuple(t for t in row.tags if t not in old.tags),
                              split=old.split or row.split, artist=old.artist or row.artist)
    return list(merged.values()), problems


def top_k_tags(rows: Iterable[LabelRow], columns: list[str], k: int) -> list[str]:
    """The k tags with most rows; ties in column order (MagnaTagATune's top 50)."""
    counts = Counter(t for r in rows for t in r.tags)
    order = {t: i for i, t in enumerate(columns)}
    return sorted(columns, key=lambda t: (-counts[t], order[t]))[:k]


def read_label_files(paths: list[str | os.PathLike], vocabulary: list[str] | None = None, top_k: int = 50,
                     tags_from: str = "all", format: str | None = None) -> LabelTable:
    """Read one or more label files of one format into a LabelTable.

    Rows naming the same path are merged (`merge_rows`). A fixed `vocabulary` (e.g. a model's
    label list) makes other tags unknown; without one it is the tags of the rows `tags_from`
    says ("all" rows, or the "train" split's only, so that a probe never has a tag it cannot
    learn), sorted; for MagnaTagATune the top_k of them by count.
    """
    if tags_from not in ("all", "train"):
        raise ValueError(f"tags_from={tags_from!r}: expected 'all' or 'train'")
    files, problems, rows, formats, columns, mtt_columns = [], [], [], set(), None, []
    for p in map(Path, paths):
        if not p.is_file():
            raise UsageError(f"--labels {p}: no such file")
        got = read_label_file(p, format)
        formats.add(got.format)
        mtt_columns = got.tag_columns or mtt_columns
        columns = got.columns if columns is None else tuple(c for c in columns if c in got.columns)
        files.append({"path": str(p), "format": got.format, "rows": len(got.rows), "sha256": sha256_file(p)})
        problems += got.problems
        rows += got.rows
    if len(formats) > 1:
        raise UsageError(f"--labels: files of different formats ({', '.join(sorted(formats))}); give one kind")
    fmt = formats.pop() if formats else "none"
    merged, conflicts = merge_rows(rows)
    problems += conflicts

    if vocabulary is None:
        source = [r for r in merged if tags_from == "all" or r.split == "train"]
        if fmt == "mtt":
            vocabulary = top_k_tags(source, mtt_columns, top_k)
        else:
            vocabulary = sorted({t for r in source for t in r.tags})
    known = set(vocabulary)
    unknown = Counter(t for r in merged for t in r.tags if t not in known)
    for tag, n in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0])):
        problems.append(LabelProblem("unknown_tag", "", f"tag {tag!r} on {n} rows, not in the vocabulary"))
    return LabelTable(merged, list(vocabulary), fmt, files, problems, dict(unknown), columns or ())


# ---------------------------------------------------------------- rows to audio files

@dataclass
class Matching:
    pairs: list[tuple[str, LabelRow]]  # (audio path, its row), in audio path order
    problems: list[LabelProblem]
    without_audio: int = 0
    audio_without_labels: int = 0


def match_audio(rows: list[LabelRow], audio_paths: list[str]) -> Matching:
    """Pair label rows with audio files: the exact path first, else the one audio file with
    the same `audio_key` not taken by another row. Several candidates are reported as
    ambiguous, a candidate already taken as a conflict: never a silent choice."""
    exact = set(audio_paths)
    by_key: dict[str, list[str]] = {}
    for a in audio_paths:
        by_key.setdefault(audio_key(a), []).append(a)
    pairs: dict[str, LabelRow] = {}
    problems: list[LabelProblem] = []
    rest = []
    for row in rows:  # exact paths first, so a row never loses its own file to a look-alike
        if row.path in exact and row.path not in pairs:
            pairs[row.path] = row
        else:
            rest.append(row)
    for row in rest:
        candidates = by_key.get(audio_key(row.path), [])
        free = [a for a in candidates if a not in pairs]
        if len(free) == 1:
            pairs[free[0]] = row
        elif candidates and not free:
            problems.append(LabelProblem("conflicting_rows", row.path, f"audio {candidates[0]} already matched "
                                         f"by {pairs[candidates[0]].where}; keeping that row", row.where))
        else:
            detail = "no audio file" if not free else "ambiguous: " + ", ".join(sorted(free))
            problems.append(LabelProblem("label_without_audio", row.path, detail, row.where))
    without_audio = sum(p.kind == "label_without_audio" for p in problems)
    orphans = [a for a in audio_paths if a not in pairs]
    problems += [LabelProblem("audio_without_labels", a) for a in orphans]
    return Matching(sorted(pairs.items()), problems, without_audio, len(orphans))
