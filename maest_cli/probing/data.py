"""Probe inputs: tag annotations of the downstream datasets, the embeddings, and their join.

The label files are read by maest_cli.mels.labels, the same readers and rules as `prepare-mels`
(MagnaTagATune's annotations_final.csv, the official MTG-Jamendo split files, a TSV/CSV
table); this module turns them into one `Annotations` table per dataset: a path per track,
its split, and a 0/1 tag matrix. The embeddings are an `extract` Parquet dataset; tracks are
matched to labels by their path relative to the audio root (exact first, else with another
audio extension, `48/948.mp3` vs `48/948.low.mp3`, or with extra leading folders on the
embedding side). Only the matched rows are ever read into memory.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.embed.reading import EmbeddingSet
from maest_cli.errors import MaestError, UsageError
from maest_cli.mels.labels import (
    SPLITS,
    LabelProblem,
    LabelTable,
    audio_key,
    mtt_split_of,
    normalize_path,
    read_label_files,
)

MTG_TASKS = {  # DATASET name -> file stem of the official split files
    "mtg-jamendo-genre": "autotagging_genre",
    "mtg-jamendo-instrument": "autotagging_instrument",
    "mtg-jamendo-moodtheme": "autotagging_moodtheme",
    "mtg-jamendo-top50": "autotagging_top50tags",
}
DATASETS = ("mtt", *MTG_TASKS, "custom")
MAX_NOTES = 5  # skipped lines quoted per kind; the rest are counted


class ProbeError(MaestError, RuntimeError):
    """A probe run that cannot go on (unreadable embeddings, every run diverged); exit code 1."""


@dataclass
class Annotations:
    """Tags of a downstream dataset: one row per track (paths unique, normalised), in file order."""

    dataset: str
    source: list[str]  # the label files read
    tags: list[str]
    paths: list[str]
    splits: np.ndarray  # [N] str, one of SPLITS
    labels: np.ndarray  # [N, C] uint8
    notes: list[str] = field(default_factory=list)  # what was skipped or dropped, for the report
    files: list[dict] = field(default_factory=list)  # path, format, rows, sha256 of each label file

    def counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}


# ---------------------------------------------------------------- adapters

def load_annotations(dataset: str, root: str | Path, split: int | None = None, top_n: int = 50) -> Annotations:
    """The labels of DATASET found under ROOT (see the README for what ROOT is per dataset).

    mtt: the top_n tags by count over the whole file (as is standard), the 12:1:3 directory
    split. MTG-Jamendo: split-N's three files, the train file's tags. custom: a table with path,
    split and tags columns, the train split's tags. Rows that do not parse are skipped and noted.
    """
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    if split is not None and dataset not in MTG_TASKS:
        raise UsageError(f"--split {split}: only the MTG-Jamendo datasets have numbered splits "
                         f"({'mtt has its fixed 12:1:3 split' if dataset == 'mtt' else 'custom files give theirs'})")
    root = Path(root)
    if not root.exists():
        raise UsageError(f"--dataset-root {root}: no such file or directory")
    if dataset == "mtt":
        path = root / "annotations_final.csv" if root.is_dir() else root
        if not path.is_file():
            raise UsageError(f"{path}: no such file (mtt needs --dataset-root to hold annotations_final.csv)")
        return _annotations(dataset, read_label_files([path], top_k=top_n, tags_from="all", format="mtt"))
    if dataset == "custom":
        if root.is_dir():
            raise UsageError(f"--dataset-root {root}: for custom, give the label file (TSV/CSV), not a folder")
        table = read_label_files([root], tags_from="train", format="tsv")
        if "split" not in table.columns or "tags" not in table.columns:
            raise UsageError(f"{root}: custom label file needs a header with columns path, split and tags "
                             f"(it gives {', '.join(table.columns)})")
        return _annotations(dataset, table)
    n = 0 if split is None else split
    if n < 0:
        raise UsageError(f"--split {n}: expected 0 or more")
    d = find_mtg_split_dir(root, n)
    files = [d / f"{MTG_TASKS[dataset]}-{s}.tsv" for s in SPLITS]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file ({dataset}, split-{n})")
    return _annotations(dataset, read_label_files(files, tags_from="train", format="mtg-jamendo"))


def _annotations(dataset: str, table: LabelTable) -> Annotations:
    """The tag matrix of the rows that have a split (MagnaTagATune: by the directory rule);
    the others are skipped and noted like malformed rows."""
    problems = list(table.problems)
    paths, splits, rows = [], [], []
    for row in table.rows:
        s = mtt_split_of(row.path) if table.format == "mtt" else row.split
        if not s:
            why = "mp3_path is not in a one-hex-digit folder 0-9 or a-f" if table.format == "mtt" else "no split given"
            problems.append(LabelProblem("malformed_row", row.path, why, row.where))
            continue
        paths.append(row.path)
        splits.append(s)
        rows.append(row)
    source = [f["path"] for f in table.files]
    if not table.vocabulary:
        raise UsageError(f"{', '.join(source)}: no tags in the training split")
    if not rows:
        raise UsageError(f"{', '.join(source)}: no usable labelled tracks")
    col = {t: i for i, t in enumerate(table.vocabulary)}
    labels = np.zeros((len(rows), len(col)), np.uint8)
    for i, row in enumerate(rows):
        labels[i, [col[t] for t in row.tags if t in col]] = 1
    return Annotations(dataset, source, list(table.vocabulary), paths, np.asarray(splits), labels,
                       _notes(problems, table), table.files)


def _notes(problems: list[LabelProblem], table: LabelTable) -> list[str]:
    """Skipped rows quoted (a few per kind) and counted; tags outside the vocabulary summarised."""
    notes = []
    for kind, verb in (("malformed_row", "skipped"), ("conflicting_rows", "listed again"),
                       ("duplicate_row", "listed again")):
        of_kind = [p for p in problems if p.kind == kind]
        for p in of_kind[:MAX_NOTES]:
            notes.append(f"{p.where}: {verb} ({p.path + ': ' if p.path and kind != 'malformed_row' else ''}"
                         f"{p.detail})")
        if len(of_kind) > MAX_NOTES:
            notes.append(f"{len(of_kind)} label rows {verb} in all")
    if table.unknown_tags:
        names = sorted(table.unknown_tags, key=lambda t: (-table.unknown_tags[t], t))
        notes.append(f"{len(names)} tags absent from the vocabulary dropped ({', '.join(names[:5])}"
                     f"{', ...' if len(names) > 5 else ''})")
    return notes


def find_mtg_split_dir(root: Path, split: int) -> Path:
    """ROOT may be the repository clone (data/splits/split-N), or any folder down to split-N itself."""
    name = f"split-{split}"
    for cand in (root / "data" / "splits" / name, root / "splits" / name, root / name, root):
        if cand == root and root.name.startswith("split-") and root.name != name:
            continue  # ROOT is another split's folder: not the files asked for
        if cand.is_dir() and any(cand.glob("autotagging*-train.tsv")):
            return cand
    raise UsageError(f"--dataset-root {root}: no {name} split files found (looked in data/splits/{name}, "
                     f"splits/{name}, {name} and the folder itself; expected a clone of mtg-jamendo-dataset)")


# ---------------------------------------------------------------- join

@dataclass
class Join:
    """Which embedding track holds each labelled track; what matched and what did not."""

    track_of_label: np.ndarray  # [N labels] embedding track index, -1 if none
    n_labelled: int
    n_matched: int
    n_embedding_tracks: int
    labels_without_embedding: list[str]  # examples
    embeddings_without_label: list[str]  # examples
    n_embeddings_without_label: int
    n_clashes: int = 0  # labelled tracks left unmatched because their path key is not unique
    clashes: list[str] = field(default_factory=list)  # examples

    def report(self) -> dict:
        return {"labelled": self.n_labelled, "matched": self.n_matched,
                "labelled_without_embedding": self.n_labelled - self.n_matched,
                "embeddings": self.n_embedding_tracks,
                "embeddings_without_label": self.n_embeddings_without_label,
                "key_clashes": self.n_clashes,
                "examples_labelled_without_embedding": self.labels_without_embedding,
                "examples_embeddings_without_label": self.embeddings_without_label,
                "examples_key_clashes": self.clashes}


def join_tracks(ann: Annotations, emb: EmbeddingSet, min_match: float = 0.5, examples: int = 3) -> Join:
    """Match labelled tracks to embedding tracks by path, with the rule `prepare-mels` uses to
    match labels to audio (labels.match_audio): the exact path first (the embedding's path, or
    ROOT/path for label files with absolute paths); then, for the rest, the one embedding with
    the same `audio_key` (another audio extension, `.low.mp3`), also after removing leading
    folders of the embedding path (extract run on a parent of the dataset's audio folder).

    A key shared by two labelled tracks or two embeddings is a clash: reported with examples,
    and the labelled track stays unmatched rather than take one of them at random.
    Fewer than `min_match` of the labelled tracks matched means the two sides do not describe
    the same audio (wrong folder, wrong dataset): a usage error that shows both sides' paths.
    """
    label_of_path = {p: i for i, p in enumerate(ann.paths)}  # paths are normalised and unique
    labels_of_key: dict[str, list[int]] = {}
    for i, p in enumerate(ann.paths):
        labels_of_key.setdefault(audio_key(p), []).append(i)
    owner = np.full(len(ann.paths), -1, np.int64)
    matched_emb = np.zeros(len(emb.paths), bool)
    full = [normalize_path(posixpath.join(r, p)) if r else None for r, p in zip(emb.roots, emb.paths)]
    rel = [normalize_path(p) for p in emb.paths]

    for j in range(len(emb.paths)):  # 1. exact paths
        for cand in (rel[j], full[j]):
            i = label_of_path.get(cand) if cand else None
            if i is not None and owner[i] < 0:
                owner[i], matched_emb[j] = j, True
                break

    candidates: dict[int, list[int]] = {}  # 2. by key, among what is left on both sides
    clashed: set[int] = set()
    clash_notes: list[str] = []
    for j in np.flatnonzero(~matched_emb):
        key = audio_key(rel[j])
        parts = key.split("/")
        keys = [key, audio_key(full[j]) if full[j] else ""] + ["/".join(parts[k:]) for k in range(1, len(parts))]
        for k in filter(None, keys):
            found = [i for i in labels_of_key.get(k, []) if owner[i] < 0]
            if len(found) == 1:
                candidates.setdefault(found[0], []).append(j)
            elif found:  # two labelled tracks differ only by their audio extension
                clashed.update(found)
                clash_notes.append(f"embedding {emb.paths[j]!r} matches labelled tracks "
                                   f"{', '.join(repr(ann.paths[i]) for i in found[:3])}")
            if found:
                break
    for i, js in candidates.items():
        if len(js) > 1:  # two embeddings differ only by their audio extension
            clashed.add(i)
            clash_notes.append(f"labelled track {ann.paths[i]!r} matches embeddings "
                               f"{', '.join(repr(emb.paths[j]) for j in js[:3])}")
        elif i not in clashed:
            owner[i], matched_emb[js[0]] = js[0], True

    n_matched = int((owner >= 0).sum())
    lost = [ann.paths[i] for i in np.flatnonzero(owner < 0)[:examples]]
    extra_idx = np.flatnonzero(~matched_emb)
    extra = [posixpath.join(emb.roots[j], emb.paths[j]) if emb.roots[j] else emb.paths[j]
             for j in extra_idx[:examples]]
    join = Join(owner, len(ann.paths), n_matched, len(emb.paths), lost, extra, len(extra_idx), len(clashed),
                clash_notes[:examples])
    if n_matched < min_match * len(ann.paths):
        emb_examples = [emb.paths[j] for j in range(min(examples, len(emb.paths)))]
        raise UsageError(
            f"only {n_matched} of {len(ann.paths)} labelled tracks ({ann.dataset}) have an embedding "
            f"(< {min_match:.0%}); labels look like {', '.join(map(repr, ann.paths[:examples]))}; "
            f"embeddings ({emb.directory}) look like {', '.join(map(repr, emb_examples)) or 'nothing'}; "
            f"check --embeddings and --dataset-root (or lower --min-match)")
    for s in SPLITS:
        if not ((owner >= 0) & (ann.splits == s)).any():
            raise UsageError(f"no {s} track of {ann.dataset} has an embedding "
                             f"(e.g. {ann.paths[int(np.flatnonzero(ann.splits == s)[0])]!r})"
                             if (ann.splits == s).any() else f"{ann.dataset}: the {s} split is empty")
    return join
