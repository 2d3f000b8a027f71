"""Label files for `prepare-mels`: a plain TSV, MTG-Jamendo split files, MagnaTagATune's CSV.

All three are read into `LabelRow`s (path relative to the audio root, tags, artist, split,
track id) and paired with the audio files found on disk. Nothing is dropped quietly: rows that
do not parse, rows whose audio is missing, audio without a row, and tags outside the vocabulary
are all returned as `LabelProblem`s for the dataset's report.

Formats (detected from the first line):
- tsv: `path<TAB>tag1,tag2[<TAB>artist]`, or with a header naming the columns (in any order)
  among path, tags, artist, split, track_id. Fields may be quoted; a row may have no tags.
- mtg-jamendo: TRACK_ID, ARTIST_ID, ALBUM_ID, PATH, DURATION, then one tag per column (a
  variable number). The split comes from the file name (`...-train.tsv`, `-validation`, `-test`).
  PATH `48/948.mp3` also matches the `48/948.low.mp3` of the low-quality audio package.
- mtt: annotations_final.csv (tab-separated, quoted): clip_id, 188 tag columns of 0/1,
  mp3_path. The vocabulary is the `top_k` most frequent tags. The Magnatune artist slug (file
  name up to the first '-') is the artist, so artist-disjoint splits keep a song's clips together.
"""

from __future__ import annotations

import csv
import hashlib
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

from .audio import AUDIO_EXTENSIONS
from .runtime import UsageError

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
JAMENDO_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION")
TSV_COLUMNS = {"path": "path", "file": "path", "filename": "path", "audio": "path", "tags": "tags",
               "tag": "tags", "labels": "tags", "artist": "artist", "artist_id": "artist",
               "split": "split", "track_id": "track_id", "id": "track_id"}


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
    """One line of the dataset's label_problems.tsv."""

    kind: str  # malformed_row | conflicting_rows | label_without_audio | audio_without_labels | unknown_tag
    path: str
    detail: str = ""
    where: str = ""


@dataclass
class LabelTable:
    rows: list[LabelRow]  # one per distinct path, in file order
    vocabulary: list[str]
    format: str
    files: list[dict] = field(default_factory=list)  # path, format, rows, sha256
    problems: list[LabelProblem] = field(default_factory=list)
    unknown_tags: dict[str, int] = field(default_factory=dict)  # tag -> rows carrying it


def normalize_path(p: str) -> str:
    """The form paths are compared in: '/'-separated, no leading './' or '/'."""
    p = p.strip().replace("\\", "/")
    p = posixpath.normpath(p) if p else p
    return p.lstrip("/") if p not in (".", "") else ""


def detect_format(path: Path) -> str:
    with open(path, encoding="utf-8-sig", newline="") as f:
        first = next((line for line in f if line.strip()), "")
    fields = [c.strip().strip('"').strip() for c in first.rstrip("\r\n").split("\t")]
    if tuple(c.upper() for c in fields[:5]) == JAMENDO_HEADER:
        return "mtg-jamendo"
    if len(fields) > 2 and fields[0] == "clip_id" and fields[-1] == "mp3_path":
        return "mtt"
    return "tsv"


def _split_from_name(path: Path) -> str:
    m = re.search(r"[-_.](train|training|validation|valid|val|test)$", path.stem, re.IGNORECASE)
    return SPLIT_ALIASES[m.group(1).lower()] if m else ""


def _read_rows(path: Path):
    """(line number, fields) of every non-blank line; fields unquoted, CR/LF stripped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quotechar='"')
        for fields in reader:
            if any(c.strip() for c in fields):
                yield reader.line_num, [c.strip() for c in fields]


def _read_tsv(path: Path, problems: list[LabelProblem]) -> list[LabelRow]:
    rows, columns = [], None
    for line, fields in _read_rows(path):
        where = f"{path}:{line}"
        names = [TSV_COLUMNS.get(c.lower()) for c in fields if c]
        if columns is None and not rows and "path" in names and None not in names:  # a header line
            columns = [TSV_COLUMNS.get(c.lower(), "") for c in fields]
            continue
        cols = columns or ["path", "tags", "artist"]
        if columns is None and len(fields) > 3:
            problems.append(LabelProblem("malformed_row", fields[0], f"{len(fields)} columns, expected "
                                         "path, tags[, artist] (or a header line)", where))
            continue
        rec = {name: value for name, value in zip(cols, fields) if name}
        split = rec.get("split", "")
        if split and split.lower() not in SPLIT_ALIASES:
            problems.append(LabelProblem("malformed_row", rec.get("path", ""), f"unknown split {split!r}", where))
            continue
        if not rec.get("path"):
            problems.append(LabelProblem("malformed_row", "", "empty path", where))
            continue
        tags = tuple(t.strip() for t in rec.get("tags", "").split(",") if t.strip())
        rows.append(LabelRow(rec["path"], tags, rec.get("artist", ""), SPLIT_ALIASES.get(split.lower(), ""),
                             rec.get("track_id", "") or rec["path"], where))
    return rows


def _read_jamendo(path: Path, problems: list[LabelProblem]) -> list[LabelRow]:
    rows, split = [], _split_from_name(path)
    for line, fields in _read_rows(path):
        where = f"{path}:{line}"
        if tuple(c.upper() for c in fields[:5]) == JAMENDO_HEADER:
            continue
        if len(fields) < 5 or not fields[3]:
            problems.append(LabelProblem("malformed_row", fields[3] if len(fields) > 3 else "",
                                         f"{len(fields)} columns, expected at least 5", where))
            continue
        tags = tuple(t for t in fields[5:] if t)
        rows.append(LabelRow(fields[3], tags, fields[1], split, fields[0], where))
    return rows


def _read_mtt(path: Path, problems: list[LabelProblem]) -> tuple[list[LabelRow], list[str]]:
    """Rows with all their positive tags, and the tag columns in header order."""
    rows, header = [], None
    for line, fields in _read_rows(path):
        where = f"{path}:{line}"
        if header is None:
            header = fields
            continue
        if len(fields) != len(header):
            problems.append(LabelProblem("malformed_row", fields[-1] if fields else "",
                                         f"{len(fields)} columns, header has {len(header)}", where))
            continue
        values = fields[1:-1]
        if any(v not in ("0", "1") for v in values):
            problems.append(LabelProblem("malformed_row", fields[-1], "tag values other than 0/1", where))
            continue
        if not fields[-1]:
            problems.append(LabelProblem("malformed_row", "", f"clip {fields[0]} has no mp3_path", where))
            continue
        tags = tuple(t for t, v in zip(header[1:-1], values) if v == "1")
        artist = posixpath.basename(fields[-1]).split("-", 1)[0]
        rows.append(LabelRow(fields[-1], tags, artist, "", fields[0], where))
    return rows, (header or [])[1:-1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_label_files(paths: list[str | os.PathLike], vocabulary: list[str] | None = None,
                     top_k: int = 50) -> LabelTable:
    """Read one or more label files of one format into a LabelTable.

    Rows naming the same path are merged (tags united): several MTG-Jamendo task files can be
    given together. A fixed `vocabulary` (e.g. a model's label list) makes other tags unknown;
    without one it is every tag seen, sorted (MagnaTagATune: the top_k by count).
    """
    files, problems, rows, formats, mtt_columns = [], [], [], set(), []
    for p in map(Path, paths):
        if not p.is_file():
            raise UsageError(f"--labels {p}: no such file")
        fmt = detect_format(p)
        formats.add(fmt)
        if fmt == "mtg-jamendo":
            got = _read_jamendo(p, problems)
        elif fmt == "mtt":
            got, mtt_columns = _read_mtt(p, problems)
        else:
            got = _read_tsv(p, problems)
        files.append({"path": str(p), "format": fmt, "rows": len(got), "sha256": _sha256(p)})
        rows.extend(got)
    if len(formats) > 1:
        raise UsageError(f"--labels: files of different formats ({', '.join(sorted(formats))}); give one kind")
    fmt = formats.pop() if formats else "none"

    merged: dict[str, LabelRow] = {}
    for row in rows:
        key = normalize_path(row.path)
        old = merged.get(key)
        if old is None:
            merged[key] = replace(row, path=key)
            continue
        if old.split and row.split and old.split != row.split:
            problems.append(LabelProblem("conflicting_rows", key, f"split {row.split!r} here, {old.split!r} at "
                                         f"{old.where}; keeping {old.split!r}", row.where))
        tags = old.tags + tuple(t for t in row.tags if t not in old.tags)
        merged[key] = replace(old, tags=tags, split=old.split or row.split, artist=old.artist or row.artist)

    if vocabulary is None:
        if fmt == "mtt":
            counts = Counter(t for r in merged.values() for t in r.tags)
            order = {t: i for i, t in enumerate(mtt_columns)}
            vocabulary = sorted(mtt_columns, key=lambda t: (-counts[t], order[t]))[:top_k]
        else:
            vocabulary = sorted({t for r in merged.values() for t in r.tags})
    known = set(vocabulary)
    unknown = Counter(t for r in merged.values() for t in r.tags if t not in known)
    for tag, n in sorted(unknown.items(), key=lambda kv: (-kv[1], kv[0])):
        problems.append(LabelProblem("unknown_tag", "", f"tag {tag!r} on {n} rows, not in the vocabulary"))
    return LabelTable(list(merged.values()), list(vocabulary), fmt, files, problems, dict(unknown))


def _audio_key(path: str) -> str:
    """A path without its audio extension and a trailing '.low' (MTG-Jamendo's low-quality copies)."""
    stem, ext = posixpath.splitext(path)
    if ext.lower() in AUDIO_EXTENSIONS:
        path = stem
    return path[:-4] if path.endswith(".low") else path


@dataclass
class Matching:
    pairs: list[tuple[str, LabelRow]]  # (audio path, its row), in audio path order
    problems: list[LabelProblem]
    without_audio: int = 0
    audio_without_labels: int = 0


def match_audio(rows: list[LabelRow], audio_paths: list[str]) -> Matching:
    """Pair label rows with audio files: the exact path, else the same path with another audio
    extension or with/without '.low' (one candidate only; several are reported as ambiguous)."""
    exact = set(audio_paths)
    by_key: dict[str, list[str]] = {}
    for a in audio_paths:
        by_key.setdefault(_audio_key(a), []).append(a)
    pairs, problems, used = {}, [], set()
    for row in rows:
        if row.path in exact:
            audio = row.path
        else:
            candidates = by_key.get(_audio_key(row.path), [])
            if len(candidates) != 1:
                detail = ("no audio file" if not candidates else
                          "ambiguous: " + ", ".join(sorted(candidates)))
                problems.append(LabelProblem("label_without_audio", row.path, detail, row.where))
                continue
            audio = candidates[0]
        if audio in used:
            problems.append(LabelProblem("conflicting_rows", row.path, f"audio {audio} already matched by "
                                         f"{pairs[audio].where}; keeping that row", row.where))
            continue
        used.add(audio)
        pairs[audio] = row
    without_audio = sum(p.kind == "label_without_audio" for p in problems)
    orphans = [a for a in audio_paths if a not in used]
    problems += [LabelProblem("audio_without_labels", a) for a in orphans]
    return Matching(sorted(pairs.items()), problems, without_audio, len(orphans))
