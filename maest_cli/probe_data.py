"""Probe inputs: tag annotations of the downstream datasets, the embeddings, and their join.

Each adapter reads a dataset's label files as its users have them (MagnaTagATune's
annotations_final.csv, the official MTG-Jamendo split files, or a plain TSV/CSV) into one
`Annotations` table: a path per track, its split, and a 0/1 tag matrix. The embeddings are an
`extract` Parquet dataset; tracks are matched to labels by their path relative to the audio
root, tolerating a changed audio extension (`48/948.mp3` vs `48/948.low.mp3`) and extra
leading folders on the embedding side. Only the matched rows are ever read into memory.
"""

from __future__ import annotations

import csv
import json
import posixpath
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .runtime import UsageError

SPLITS = ("train", "validation", "test")
MTG_TASKS = {  # DATASET name -> file stem of the official split files
    "mtg-jamendo-genre": "autotagging_genre",
    "mtg-jamendo-instrument": "autotagging_instrument",
    "mtg-jamendo-moodtheme": "autotagging_moodtheme",
    "mtg-jamendo-top50": "autotagging_top50tags",
}
DATASETS = ("mtt", *MTG_TASKS, "custom")
MTT_SPLIT_OF_DIR = {**{c: "train" for c in "0123456789ab"}, "c": "validation",
                    **{c: "test" for c in "def"}}
MTG_HEADER = ("TRACK_ID", "ARTIST_ID", "ALBUM_ID", "PATH", "DURATION")
CUSTOM_SPLITS = {"train": "train", "training": "train", "validation": "validation", "valid": "validation",
                 "val": "validation", "dev": "validation", "test": "test", "testing": "test"}
MAX_NOTES = 5  # skipped lines quoted per file; the rest are counted


class ProbeError(RuntimeError):
    """A probe run that cannot go on (unreadable embeddings, every run diverged); exit code 1."""


@dataclass
class Annotations:
    """Tags of a downstream dataset: one row per track (paths unique), in file order."""

    dataset: str
    source: list[str]  # the label files read
    tags: list[str]
    paths: list[str]
    splits: np.ndarray  # [N] str, one of SPLITS
    labels: np.ndarray  # [N, C] uint8
    notes: list[str] = field(default_factory=list)  # what was skipped or dropped, for the report

    def counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}


# ---------------------------------------------------------------- adapters

def load_annotations(dataset: str, root: str | Path, split: int = 0, top_n: int = 50) -> Annotations:
    """The labels of DATASET found under ROOT (see the README for what ROOT is per dataset)."""
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    root = Path(root)
    if not root.exists():
        raise UsageError(f"--dataset-root {root}: no such file or directory")
    if dataset == "mtt":
        return read_mtt(root, top_n=top_n)
    if dataset == "custom":
        return read_custom(root)
    return read_mtg_jamendo(root, dataset, split=split)


def read_mtt(root: Path, top_n: int = 50) -> Annotations:
    """MagnaTagATune: the `top_n` most frequent tags (counted over the whole file, as is
    standard) and the 12:1:3 split by the first character of mp3_path (0-b / c / d-f)."""
    path = root / "annotations_final.csv" if root.is_dir() else root
    if not path.is_file():
        raise UsageError(f"{path}: no such file (mtt needs --dataset-root to hold annotations_final.csv)")
    notes: list[str] = []
    skipped = 0
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        header = [h.strip() for h in next(rows, [])]
        if len(header) < 3 or header[0] != "clip_id" or header[-1] != "mp3_path":
            raise UsageError(f"{path}: not MagnaTagATune's annotations_final.csv (expected a tab-separated "
                             f"header clip_id, tags..., mp3_path; got {header[:2]}...{header[-1:]})")
        tag_names = header[1:-1]
        paths, splits, values = [], [], []
        for lineno, row in enumerate(rows, start=2):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            reason = None
            if len(row) != len(header):
                reason = f"{len(row)} fields, expected {len(header)}"
            else:
                mp3 = row[-1].strip()
                split_name = MTT_SPLIT_OF_DIR.get(mp3[:1].lower()) if "/" in mp3 else None
                flags = [v.strip() for v in row[1:-1]]
                if split_name is None:
                    reason = f"mp3_path {mp3!r} is not in a folder 0-9 or a-f"
                elif any(v not in ("0", "1") for v in flags):
                    reason = "tag values other than 0/1"
            if reason:
                skipped += 1
                if skipped <= MAX_NOTES:
                    notes.append(f"{path}:{lineno}: skipped ({reason})")
                continue
            paths.append(mp3)
            splits.append(split_name)
            values.append([v == "1" for v in flags])
    if skipped > MAX_NOTES:
        notes.append(f"{path}: {skipped} malformed lines skipped in all")
    if not paths:
        raise UsageError(f"{path}: no annotated clips")
    full = np.asarray(values, dtype=np.uint8)
    order = np.argsort(-full.sum(0, dtype=np.int64), kind="stable")[:top_n]  # ties: file column order
    return _dedup(Annotations("mtt", [str(path)], [tag_names[i] for i in order], paths,
                              np.asarray(splits), full[:, order], notes))


def find_mtg_split_dir(root: Path, split: int) -> Path:
    """ROOT may be the repository clone (data/splits/split-N), or any folder down to split-N itself."""
    name = f"split-{split}"
    for cand in (root / "data" / "splits" / name, root / "splits" / name, root / name, root):
        if cand.is_dir() and any(cand.glob("autotagging*-train.tsv")):
            return cand
    raise UsageError(f"--dataset-root {root}: no {name} split files found (looked in data/splits/{name}, "
                     f"splits/{name}, {name} and the folder itself; expected a clone of mtg-jamendo-dataset)")


def read_mtg_jamendo(root: Path, dataset: str, split: int = 0) -> Annotations:
    """MTG-Jamendo official splits: TRACK_ID ARTIST_ID ALBUM_ID PATH DURATION, then any number of
    tab-separated tags. The vocabulary is the tags of the train file; others are dropped."""
    stem = MTG_TASKS[dataset]
    d = find_mtg_split_dir(root, split)
    files = {s: d / f"{stem}-{s}.tsv" for s in SPLITS}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file ({dataset}, split-{split})")
    notes: list[str] = []
    tracks = {s: _read_mtg_file(files[s], notes) for s in SPLITS}
    vocab = sorted({t for _, tags in tracks["train"] for t in tags})
    if not vocab:
        raise UsageError(f"{files['train']}: no tags in the training split")
    col = {t: i for i, t in enumerate(vocab)}
    paths, splits, rows = [], [], []
    for s in SPLITS:
        unknown: set[str] = set()
        for p, tags in tracks[s]:
            unknown |= tags - col.keys()
            row = np.zeros(len(vocab), np.uint8)
            row[[col[t] for t in tags if t in col]] = 1
            paths.append(p)
            splits.append(s)
            rows.append(row)
        if unknown:
            notes.append(f"{files[s]}: {len(unknown)} tags absent from the train file dropped "
                         f"({', '.join(sorted(unknown)[:5])})")
    return _dedup(Annotations(dataset, [str(p) for p in files.values()], vocab, paths, np.asarray(splits),
                              np.stack(rows), notes))


def _read_mtg_file(path: Path, notes: list[str]) -> list[tuple[str, set[str]]]:
    lines = path.read_text(encoding="utf-8").splitlines()  # the official files end lines with CRLF
    head = tuple(f.strip() for f in lines[0].split("\t")[:5]) if lines else ()
    if head != MTG_HEADER:
        raise UsageError(f"{path}: not an MTG-Jamendo split file (header should start with "
                         f"{' '.join(MTG_HEADER)})")
    out, skipped = [], 0
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 5 or not fields[3].strip():
            skipped += 1
            if skipped <= MAX_NOTES:
                notes.append(f"{path}:{lineno}: skipped ({len(fields)} fields, expected at least 5 with a PATH)")
            continue
        out.append((fields[3].strip(), {t.strip() for t in fields[5:] if t.strip()}))
    if skipped > MAX_NOTES:
        notes.append(f"{path}: {skipped} malformed lines skipped in all")
    return out


def read_custom(path: Path) -> Annotations:
    """A TSV or CSV with a header holding `path`, `split` and `tags` columns (tags separated by
    ',' or '|'; an empty field is a track with no tag). The vocabulary is the train split's tags."""
    if path.is_dir():
        raise UsageError(f"--dataset-root {path}: for custom, give the label file (TSV/CSV), not a folder")
    text = path.read_text(encoding="utf-8-sig")
    first = text.split("\n", 1)[0]
    delim = "\t" if "\t" in first else ","
    rows = csv.reader(text.splitlines(), delimiter=delim)
    header = [h.strip().lower() for h in next(rows, [])]
    need = ("path", "split", "tags")
    if any(c not in header for c in need):
        raise UsageError(f"{path}: custom label file needs columns path, split and tags (found {header})")
    ip, is_, it = (header.index(c) for c in need)
    notes: list[str] = []
    tracks: list[tuple[str, str, set[str]]] = []
    for lineno, row in enumerate(rows, start=2):
        if not any(v.strip() for v in row):
            continue
        if len(row) <= max(ip, is_):
            raise UsageError(f"{path}:{lineno}: {len(row)} fields, expected {len(header)}")
        row = row + [""] * (len(header) - len(row))  # a missing trailing tags field: no tags
        split_name = CUSTOM_SPLITS.get(row[is_].strip().lower())
        if split_name is None:
            raise UsageError(f"{path}:{lineno}: split {row[is_]!r} is not train, validation or test")
        tags = {t.strip() for t in row[it].replace("|", ",").split(",") if t.strip()}
        tracks.append((row[ip].strip(), split_name, tags))
    vocab = sorted({t for _, s, tags in tracks if s == "train" for t in tags})
    if not vocab:
        raise UsageError(f"{path}: no tags in the train split")
    col = {t: i for i, t in enumerate(vocab)}
    dropped = {t for _, _, tags in tracks for t in tags} - col.keys()
    if dropped:
        notes.append(f"{path}: {len(dropped)} tags absent from the train split dropped "
                     f"({', '.join(sorted(dropped)[:5])})")
    labels = np.zeros((len(tracks), len(vocab)), np.uint8)
    for i, (_, _, tags) in enumerate(tracks):
        labels[i, [col[t] for t in tags if t in col]] = 1
    return _dedup(Annotations("custom", [str(path)], vocab, [p for p, _, _ in tracks],
                              np.asarray([s for _, s, _ in tracks]), labels, notes))


def _dedup(ann: Annotations) -> Annotations:
    """Keep the first row of a path listed twice (a track in two splits would leak)."""
    seen: dict[str, int] = {}
    keep = []
    for i, p in enumerate(ann.paths):
        if p in seen:
            continue
        seen[p] = i
        keep.append(i)
    if len(keep) < len(ann.paths):
        ann.notes.append(f"{len(ann.paths) - len(keep)} duplicate paths in the label files ignored "
                         f"(first kept), e.g. {next(p for i, p in enumerate(ann.paths) if seen[p] != i)!r}")
        idx = np.asarray(keep)
        ann.paths = [ann.paths[i] for i in keep]
        ann.splits, ann.labels = ann.splits[idx], ann.labels[idx]
    return ann


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
                for batch in pq.ParquetFile(f).iter_batches(batch_size=8192, columns=["embedding"]):
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
            except OSError as e:
                raise ProbeError(f"{f}: cannot read embeddings ({e})") from None
        if offset != self.n_rows:
            raise ProbeError(f"{self.directory}: the dataset changed while it was read")
        out /= count[:, None]  # a track whose every row is null becomes NaN, dropped by the caller
        return out.numpy()


def _embedding_array(col, dim: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A (fixed-size or plain) list column of floats -> (valid [rows] bool, [valid rows, dim] float32)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    valid = col.is_valid().to_numpy(zero_copy_only=False).astype(bool)
    if col.null_count:
        col = col.drop_null()
    if not pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != dim).any():
            raise ProbeError(f"{where}: embeddings of different lengths ({sorted(set(lengths.tolist()))[:3]})")
    flat = col.flatten().to_numpy(zero_copy_only=False)
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
    etype = ds.schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(etype) or pa.types.is_list(etype) or pa.types.is_large_list(etype)):
        raise UsageError(f"{d}: column 'embedding' is {etype}, expected a list of floats")

    metas = {}
    for f in files:
        raw = (pq.read_schema(f).metadata or {}).get(b"maest")
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
    track_key = pc.binary_join_element_wise(pc.fill_null(root_col, ""), pc.fill_null(path_col, ""), "\x00")
    enc = track_key.combine_chunks().dictionary_encode() if isinstance(track_key, pa.ChunkedArray) \
        else track_key.dictionary_encode()
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
    dim = etype.list_size if pa.types.is_fixed_size_list(etype) else _first_length(files[0])
    return EmbeddingSet(str(d), files, int(dim), metas[files[0]], [r for r, _ in split], [p for _, p in split],
                        row_track, n_rows, segment_rows, notes)


def _first_length(file: str) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    col = pq.read_table(file, columns=["embedding"]).column(0)
    lengths = pc.list_value_length(col).drop_null().to_numpy(zero_copy_only=False)
    if not len(lengths):
        raise ProbeError(f"{file}: no embeddings")
    return int(lengths[0])


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

def track_key(path: str) -> str:
    """A path with its audio extension (and MTG-Jamendo's `.low`) removed: the join key."""
    p = posixpath.normpath(path.strip().replace("\\", "/"))
    head, name = posixpath.split(p)
    stem, dot, ext = name.rpartition(".")
    if dot and stem:
        name = stem[:-4] if stem.endswith(".low") and len(stem) > 4 else stem
    return posixpath.join(head, name) if head else name


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
    n_ambiguous: int  # embedding tracks that matched a label already taken

    def report(self) -> dict:
        return {"labelled": self.n_labelled, "matched": self.n_matched,
                "labelled_without_embedding": self.n_labelled - self.n_matched,
                "embeddings": self.n_embedding_tracks,
                "embeddings_without_label": self.n_embeddings_without_label,
                "ambiguous_embeddings": self.n_ambiguous,
                "examples_labelled_without_embedding": self.labels_without_embedding,
                "examples_embeddings_without_label": self.embeddings_without_label}


def join_tracks(ann: Annotations, emb: EmbeddingSet, min_match: float = 0.5, examples: int = 3) -> Join:
    """Match labelled tracks to embedding tracks by path key: first the path as it is (or
    ROOT/path, for label files with absolute paths), then with leading folders of the
    embedding path removed (extract run on a parent of the dataset's audio folder).

    Fewer than `min_match` of the labelled tracks matched means the two sides do not describe
    the same audio (wrong folder, wrong dataset): a usage error that shows both sides' paths.
    """
    by_key: dict[str, int] = {}
    for i, p in enumerate(ann.paths):
        by_key.setdefault(track_key(p), i)
    owner = np.full(len(ann.paths), -1, np.int64)
    matched_emb = np.zeros(len(emb.paths), bool)
    ambiguous = 0

    def claim(i: int, j: int) -> None:
        nonlocal ambiguous
        if owner[i] < 0:
            owner[i] = j
            matched_emb[j] = True
        else:
            ambiguous += 1

    for j, (root, path) in enumerate(zip(emb.roots, emb.paths)):
        for cand in (path, posixpath.join(root, path) if root else None):
            i = by_key.get(track_key(cand)) if cand else None
            if i is not None:
                claim(i, j)
                break
    for j in np.flatnonzero(~matched_emb):
        parts = track_key(emb.paths[j]).split("/")
        for k in range(1, len(parts)):
            i = by_key.get("/".join(parts[k:]))
            if i is not None and owner[i] < 0:
                claim(i, j)
                break
    n_matched = int((owner >= 0).sum())
    lost = [ann.paths[i] for i in np.flatnonzero(owner < 0)[:examples]]
    extra_idx = np.flatnonzero(~matched_emb)
    extra = [posixpath.join(emb.roots[j], emb.paths[j]) if emb.roots[j] else emb.paths[j]
             for j in extra_idx[:examples]]
    join = Join(owner, len(ann.paths), n_matched, len(emb.paths), lost, extra, len(extra_idx), ambiguous)
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
