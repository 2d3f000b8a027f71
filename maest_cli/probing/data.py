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

import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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


# ---------------------------------------------------------------- embeddings

@dataclass
class EmbeddingSet:
    """An `extract` Parquet dataset, indexed by track. Rows of one (root, path) are the
    segments of one track (segment pooling) and are averaged, as in the paper."""

    directory: str
    files: list[str]
    dim: int
    metadata: dict  # the JSON of the b"maest" schema metadata ({} if absent)
    roots: list[str]  # per track
    paths: list[str]  # per track
    row_track: np.ndarray  # [rows] track index of each row, -1 for rows left out (null, duplicate)
    n_rows: int
    segment_rows: bool
    notes: list[str] = field(default_factory=list)

    def matrix(self, tracks: np.ndarray) -> np.ndarray:
        """[len(tracks), dim] float32: the mean embedding of each listed track, read in one pass."""
        import pyarrow.parquet as pq
        import torch

        pos = np.full(len(self.paths), -1, np.int64)
        pos[tracks] = np.arange(len(tracks))
        out = torch.zeros(len(tracks), self.dim, dtype=torch.float32)
        count = torch.zeros(len(tracks), dtype=torch.float32)
        offset = 0
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                _check_embedding_type(pf.schema_arrow.field("embedding").type, self.dim, f)
                for batch in pf.iter_batches(batch_size=8192, columns=["embedding"]):
                    n = batch.num_rows
                    where = pos[np.maximum(self.row_track[offset:offset + n], 0)]
                    where[self.row_track[offset:offset + n] < 0] = -1
                    offset += n
                    valid, vec = _embedding_array(batch.column(0), self.dim, f)
                    where[~valid] = -1
                    sel = np.flatnonzero(where >= 0)
                    if not len(sel):
                        continue
                    idx = torch.from_numpy(where[sel])
                    out.index_add_(0, idx, torch.from_numpy(vec[(np.cumsum(valid) - 1)[sel]]))
                    count.index_add_(0, idx, torch.ones(len(sel)))
            except (OSError, KeyError) as e:
                raise ProbeError(f"{f}: cannot read embeddings ({e})") from None
        if offset != self.n_rows:
            raise ProbeError(f"{self.directory}: the dataset changed while it was read")
        out /= count[:, None]  # a track whose every row is null becomes NaN, dropped by the caller
        return out.numpy()


def _check_embedding_type(etype, dim: int | None, where: str) -> int | None:
    """A list of floats; a fixed size must be `dim` (None: not known yet). Returns the size
    (None for variable-length lists, checked row by row when read)."""
    import pyarrow as pa

    if not (pa.types.is_fixed_size_list(etype) or pa.types.is_list(etype) or pa.types.is_large_list(etype)) \
            or not pa.types.is_floating(etype.value_type):
        raise UsageError(f"{where}: column 'embedding' is {etype}, expected a list of floats")
    if pa.types.is_fixed_size_list(etype):
        if dim is not None and etype.list_size != dim:
            raise UsageError(f"{where}: embeddings of {etype.list_size} values, other files of this folder have "
                             f"{dim}; probe one model and block per folder")
        return etype.list_size
    return None


def _embedding_array(col, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size or plain) list column of floats -> (valid [rows] bool, [valid rows, dim] float32)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    valid = col.is_valid().to_numpy(zero_copy_only=False).astype(bool)
    if col.null_count:
        col = col.drop_null()
    if pa.types.is_fixed_size_list(col.type):
        if col.type.list_size != dim:  # never reshape rows of another size into `dim` columns
            raise UsageError(f"{where}: embeddings of {col.type.list_size} values, expected {dim}")
    else:
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != dim).any():
            raise UsageError(f"{where}: embeddings of {sorted(set(lengths.tolist()) - {dim})[0]} values, "
                             f"expected {dim} as in the rest of the folder; probe one model and block per folder")
    flat = col.flatten().to_numpy(zero_copy_only=False)
    if flat.size != len(col) * dim:
        raise UsageError(f"{where}: embeddings that are not rows of {dim} values")
    return valid, flat.astype(np.float32, copy=False).reshape(-1, dim)


def open_embeddings(directory: str | Path) -> EmbeddingSet:
    """Index an `extract` output folder: which rows belong to which track (embeddings not read)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    d = Path(directory)
    if not d.exists():
        raise UsageError(f"--embeddings {d}: no such file or directory")
    # the data files: *.parquet, skipping names that start with '_' or '.' (manifests, staging)
    files = [str(d)] if d.is_file() else sorted(
        str(p) for p in d.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in p.relative_to(d).parts))
    if not files:
        raise UsageError(f"--embeddings {d}: no Parquet files (run `maest extract` first)")
    try:
        ds = pads.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise ProbeError(f"{d}: not a readable Parquet dataset ({e})") from None
    names = ds.schema.names
    missing = [c for c in ("path", "embedding") if c not in names]
    if missing:
        raise UsageError(f"{d}: not a `maest extract` dataset (no column {', '.join(missing)})")
    # every file's own column type: a dataset schema is the first file's, and a part file of
    # another size would otherwise be reshaped into the wrong number of columns
    dim, dim_file, metas = None, None, {}
    for f in files:
        try:
            schema = pq.read_schema(f)
        except (pa.ArrowInvalid, OSError) as e:
            raise ProbeError(f"{f}: cannot read ({e})") from None
        if "embedding" not in schema.names:
            raise UsageError(f"{f}: no column 'embedding' (not a `maest extract` file)")
        size = _check_embedding_type(schema.field("embedding").type, None, f)
        if size is not None and dim is not None and size != dim:
            raise UsageError(f"{d}: embeddings of different sizes: {dim_file} has {dim} values per row, {f} has "
                             f"{size}; probe one model and block per folder")
        if size is not None and dim is None:
            dim, dim_file = size, f
        raw = (schema.metadata or {}).get(b"maest")
        try:
            metas[f] = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            metas[f] = {}
    described = {json.dumps(describe_embeddings(m), sort_keys=True) for m in metas.values()}
    if len(described) > 1:
        raise UsageError(f"{d}: files made with different settings are mixed "
                         f"({' vs '.join(sorted(described)[:2])}); probe one setting per folder")

    segment_rows = "segment" in names
    id_cols = [c for c in ("root", "path", "segment") if c in names]
    tables = []
    for f in files:
        try:
            tables.append(pq.read_table(f, columns=id_cols))
        except (pa.ArrowInvalid, OSError) as e:
            raise ProbeError(f"{f}: cannot read ({e})") from None
    ids = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    n_rows = ids.num_rows
    path_col = pc.cast(ids.column("path"), pa.string())
    root_col = pc.cast(ids.column("root"), pa.string()) if "root" in names else pa.array([""] * n_rows)
    ident = pc.binary_join_element_wise(pc.fill_null(root_col, ""), pc.fill_null(path_col, ""), "\x00")
    enc = ident.combine_chunks().dictionary_encode() if isinstance(ident, pa.ChunkedArray) \
        else ident.dictionary_encode()
    row_track = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    notes = []
    null_path = np.asarray(pc.is_null(path_col).to_numpy(zero_copy_only=False), bool)
    if null_path.any():
        row_track[null_path] = -1
        notes.append(f"{int(null_path.sum())} rows without a path ignored")
    if segment_rows:  # an interrupted-and-resumed extract may hold a segment twice: count it once
        seg = pc.cast(pc.fill_null(ids.column("segment"), -1), pa.int64()).to_numpy(zero_copy_only=False)
        _, first = np.unique(np.stack([row_track, seg], 1), axis=0, return_index=True)
        dup = np.ones(n_rows, bool)
        dup[first] = False
        if dup.any():
            row_track[dup] = -1
            notes.append(f"{int(dup.sum())} duplicate segment rows ignored")
    split = [s.split("\x00", 1) for s in enc.dictionary.to_pylist()]
    dim = dim if dim is not None else _first_length(files)
    return EmbeddingSet(str(d), files, int(dim), metas[files[0]], [r for r, _ in split], [p for _, p in split],
                        row_track, n_rows, segment_rows, notes)


def _first_length(files: list[str]) -> int:
    """The size of the first non-null embedding (variable-length list columns)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    for file in files:
        col = pq.read_table(file, columns=["embedding"]).column(0)
        lengths = pc.list_value_length(col).drop_null().to_numpy(zero_copy_only=False)
        if len(lengths):
            return int(lengths[0])
    raise ProbeError(f"{files[0]}: no embeddings")


def describe_embeddings(meta: dict) -> dict:
    """model, block, tokens and preset of an `extract` output, from its b"maest" metadata."""
    model = meta.get("model", meta.get("model_name"))
    if isinstance(model, dict):
        model = model.get("name") or model.get("path")
    preset = meta.get("preset")
    if isinstance(preset, dict):
        preset = preset.get("name")
    tokens = meta.get("tokens")
    if isinstance(tokens, (list, tuple)):
        tokens = "+".join(map(str, tokens))
    return {"model": model, "block": meta.get("block"), "tokens": tokens, "preset": preset}


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
