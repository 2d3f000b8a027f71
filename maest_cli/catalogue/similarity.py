"""`maest similar`: the tracks of an extract dataset nearest a query, and near-duplicate pairs.

A query is a path already in the dataset (its stored embedding) or an audio file, embedded with
the settings the dataset records (model, preset, block, tokens, hop; engine, dtype and device
may differ) through the cached extract of catalogue.cached. Similarity is the cosine after the
normalisation stored with the dataset's index (catalogue.index): exact search over the
memory-mapped matrix, or the ANN index when `maest index build` made one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.audio.walk import as_text, find_audio_files
from maest_cli.catalogue.cached import cache_folder, cached_extract, split_spec_fields
from maest_cli.catalogue.index import (
    NORMALISATIONS,
    Log,
    TrackIndex,
    index_dir,
    open_index,
)
from maest_cli.catalogue.tables import write_csv
from maest_cli.embed.reading import open_embeddings
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import PART_GLOB, read_errors, read_metadata
from maest_cli.errors import UsageError

# cosine (after each normalisation) from which two tracks are reported as the same recording:
# from the distributions of re-encoded copies, other renderings and distinct pieces (README)
DUPLICATE_THRESHOLDS = {"raw": 0.997, "centred": 0.995, "whitened": 0.95}
DUPLICATE_NEIGHBOURS = 10
DUPLICATE_QUERY_ROWS = 256  # tracks searched at a time
# --duplicates on a larger dataset without an ANN index builds one: the exact k-NN of every track
# costs n² products (4e8 at 20 000 tracks, seconds; growing a hundredfold per tenfold tracks)
DUPLICATE_ANN_ABOVE = 20_000
# what must agree between the dataset and a query's embedding for the two to be comparable
COMPARABLE = ("block", "tokens", "embedding_dim")


@dataclass(frozen=True)
class Neighbour:
    rank: int
    path: str  # the track's file (root joined with its path in the dataset)
    similarity: float


@dataclass(frozen=True)
class QueryResult:
    query: str  # as given
    source: str  # "dataset": its stored embedding; "audio": embedded now
    neighbours: list[Neighbour]


@dataclass(frozen=True)
class QueryFailure:
    query: str
    reason: str

    def __str__(self) -> str:
        return f"{self.query}: {self.reason}"


@dataclass
class SimilarTable:
    """What `similar` returns and every output format is made from."""

    dataset: str
    results: list[QueryResult]
    failures: list[QueryFailure]
    k: int
    search: str  # "exact" or the ANN library
    normalisation: str
    tracks: int  # in the index
    notes: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def rows(self) -> list[dict]:
        return [{"query": r.query, "source": r.source, "rank": n.rank, "path": n.path, "similarity": n.similarity}
                for r in self.results for n in r.neighbours]

    def to_csv(self) -> str:
        return write_csv(self.rows(), ("query", "source", "rank", "path", "similarity"))

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "k": self.k, "search": self.search, "normalisation": self.normalisation,
                "tracks": self.tracks, "results": [asdict(r) for r in self.results],
                "failures": [asdict(f) for f in self.failures]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)


@dataclass(frozen=True)
class DuplicatePair:
    a: str
    b: str
    similarity: float


@dataclass
class DuplicateTable:
    """What `duplicates` returns: pairs of tracks that are the same recording, most similar first."""

    dataset: str
    pairs: list[DuplicatePair]
    threshold: float
    search: str
    normalisation: str
    tracks: int
    notes: list[str] = field(default_factory=list)

    exit_code = 0

    def rows(self) -> list[dict]:
        return [asdict(p) for p in self.pairs]

    def to_csv(self) -> str:
        return write_csv(self.rows(), ("a", "b", "similarity"))

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "threshold": self.threshold, "search": self.search,
                "normalisation": self.normalisation, "tracks": self.tracks, "pairs": self.rows()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)


# ------------------------------------------------------------------ the dataset's spec

def dataset_spec(meta: dict, **run) -> InferenceSpec:
    """The InferenceSpec that made an extract dataset, from its recorded metadata; `run`: the
    fields that may differ (device, dtype, engine)."""
    model = meta.get("model") or {}
    weights = model.get("path") if model.get("path") and os.path.exists(model["path"]) else model.get("name")
    if not weights:
        raise UsageError("the dataset does not record its model: queries cannot be embedded like it "
                         "(give paths already in the dataset)")
    preset = meta.get("preset") or {}
    name, custom = str(preset.get("name", "none")), str(preset.get("name", "")).endswith("+custom")
    overrides = {"time_keep_every": preset.get("time_keep_every"),
                 "drop_freq_rows": preset.get("drop_freq_rows")} if custom else {}
    return InferenceSpec(model=weights, preset=name.split("+", 1)[0], **overrides, block=meta.get("block"),
                         tokens=meta.get("tokens") or ("cls", "dist", "avg"), pool="track",
                         hop=(meta.get("hop") or {}).get("spec", "half"), **run)


def _check_comparable(dataset: str, meta: dict, made: dict) -> None:
    """The query's embeddings were made like the dataset's (the same weights and settings)."""
    theirs, ours = (made.get("model") or {}).get("sha256"), (meta.get("model") or {}).get("sha256")
    if theirs != ours:
        raise UsageError(f"{dataset}: its model (sha256 {str(ours)[:12]}) is not the one queries were embedded "
                         f"with ({str(theirs)[:12]}); the weights it records have changed")
    for key in COMPARABLE:
        if made.get(key) != meta.get(key):
            raise UsageError(f"{dataset}: queries embedded with {key} {made.get(key)!r}, the dataset has "
                             f"{meta.get(key)!r}")
    for key in ("segment", "hop"):
        if (made.get(key) or {}).get("frames") != (meta.get(key) or {}).get("frames"):
            raise UsageError(f"{dataset}: queries embedded with other {key} frames than the dataset")


# ------------------------------------------------------------------ the API

def similar(queries, dataset, *, k: int = 10, exact: bool = False, device: str = "auto", dtype: str = "auto",
            engine: str = "auto", cache_root: str | os.PathLike | None = None, log: Log | None = None,
            progress: bool = False, **run_options) -> SimilarTable:
    """The `k` tracks of `dataset` most similar to each query, best first.

    A query that is a track of the dataset uses its stored embedding; another file is embedded
    as the dataset was (catalogue.cached: a rerun reuses it). A query that is missing, a folder,
    or cannot be decoded is listed in `failures` (never raised); the others are answered. The
    ANN index is used when `maest index build` made one, unless `exact`. `log` gets one line
    when the stored index is rebuilt because the dataset changed. `run_options` go to extract."""
    k = int(k)
    if k < 1:
        raise UsageError("-k must be >= 1")
    queries = [queries] if isinstance(queries, (str, os.PathLike)) else list(queries or [])
    if not queries:
        raise UsageError("no QUERY given (an audio file, or a path in the dataset)")
    idx = _open(dataset, log)
    found: dict[int, np.ndarray] = {}
    sources: dict[int, str] = {}
    failures: dict[int, QueryFailure] = {}
    audio: dict[int, str] = {}
    for i, q in enumerate(queries):
        row, reason = idx.lookup(q)
        if row is not None:
            found[i], sources[i] = np.asarray(idx.vectors[row], np.float32), "dataset"
        elif reason is not None:
            failures[i] = QueryFailure(as_text(os.fspath(q)), reason)
        elif not os.path.lexists(q):
            failures[i] = QueryFailure(as_text(os.fspath(q)), "no such file, and not a path in the dataset")
        elif os.path.isdir(q):
            failures[i] = QueryFailure(as_text(os.fspath(q)), "a directory; give audio files or paths in the dataset")
        else:
            audio[i] = os.fspath(q)
    notes = list(idx.notes)
    if audio:
        vectors, failed, embed_notes = _embed(audio, dataset, idx, device, dtype, engine, cache_root, progress,
                                              run_options)
        notes += [n for n in dict.fromkeys(embed_notes) if n not in notes]
        for i in audio:
            if i in vectors:
                found[i], sources[i] = vectors[i], "audio"
            else:
                failures[i] = QueryFailure(as_text(audio[i]), failed[i])
    order = sorted(found)
    results = []
    if order:
        rows, sims = idx.search(np.stack([found[i] for i in order]), k, exact=exact)
        for i, r, s in zip(order, rows, sims):
            results.append(QueryResult(as_text(os.fspath(queries[i])), sources[i], [
                Neighbour(rank + 1, idx.location(int(row)), float(sim))
                for rank, (row, sim) in enumerate(zip(r, s)) if row >= 0]))
    return SimilarTable(str(dataset), results, [failures[i] for i in sorted(failures)], k,
                        "exact" if exact else idx.method, idx.normalisation.kind, len(idx), notes)


def _open(dataset, log: Log | None, option: str = "--dataset ", **index_options) -> TrackIndex:
    d = Path(dataset)
    if not d.exists():
        raise UsageError(f"{option}{d}: no such file or directory")
    if not d.is_dir():
        raise UsageError(f"{option}{d}: not a folder (give the folder `maest extract` wrote)")
    return open_index(d, log=log, option=option.strip(), **index_options)


def _embed(queries: dict[int, str], dataset, idx: TrackIndex, device: str, dtype: str, engine: str, cache_root,
           progress: bool, run_options: dict) -> tuple[dict[int, np.ndarray], dict[int, str], list[str]]:
    """Embed audio files as the dataset was: ({query: normalised vector}, {query: why it failed},
    notes). Each file has its own cache folder, named by its path, size and modification time
    (catalogue.cached): asking again reuses it without loading the model, a file replaced under its
    name is embedded again. Queries that are one file (hard links) are embedded once."""
    meta = read_metadata(dataset)
    spec, run_options = split_spec_fields(dataset_spec(meta, device=device, dtype=dtype, engine=engine), run_options)
    first: dict[tuple[int, int], int] = {}
    same: dict[int, int] = {}
    for i, q in queries.items():
        try:
            st = os.stat(q)
            same[i] = first.setdefault((st.st_dev, st.st_ino), i)
        except (OSError, ValueError):  # a dangling link: extract says why
            same[i] = i
    vectors: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    notes: list[str] = []
    for i in sorted(set(same.values())):
        (f,), _ = find_audio_files([queries[i]])  # a file named is always taken; f.key: as extract records it
        out = cache_folder([queries[i]], spec, cache_root)
        v, why = _stored_query(out, f.key, dataset, meta, idx, check=False)
        if v is None:
            out, summary = cached_extract([queries[i]], spec, cache_root=cache_root, progress=progress,
                                          **{"workers": 0, **run_options})
            notes += summary.warnings
            errors = {(r["root"], r["path"]): r["reason"] for r in read_errors(out).to_pylist()}
            v, why = _stored_query(out, f.key, dataset, meta, idx, check=True)
            why = errors.get(f.key, why)
        if v is not None:
            vectors[i] = v
        else:
            failed[i] = why
    for i, j in same.items():
        if i != j:
            if j in vectors:
                vectors[i] = vectors[j]
            else:
                failed[i] = failed[j]
    return vectors, failed, notes


def _stored_query(out: Path, key: tuple[str, str], dataset, meta: dict, idx: TrackIndex, check: bool
                  ) -> tuple[np.ndarray | None, str]:
    """(normalised vector, "") of file `key` in the query cache folder `out`, or (None, why not).
    `check`: the folder must have been made like the dataset (else a UsageError); without it, a
    folder of other weights is passed over (extract redoes it)."""
    if not any(out.glob(PART_GLOB)):
        return None, "it could not be embedded (no embedding was written)"
    made = read_metadata(out)
    if not check and (made.get("model") or {}).get("sha256") != (meta.get("model") or {}).get("sha256"):
        return None, ""
    _check_comparable(str(dataset), meta, made)
    emb = open_embeddings(out)
    rows = [j for j, k in enumerate(zip(emb.roots, emb.paths)) if k == key]
    if not rows:
        return None, "it could not be embedded (no embedding was written)"
    x = emb.matrix(np.asarray(rows[:1]))
    if x.shape[1] != idx.manifest["embedding_dim"]:
        raise UsageError(f"{dataset}: queries have {x.shape[1]} values per embedding, the dataset "
                         f"{idx.manifest['embedding_dim']}")
    if not np.isfinite(x).all():
        return None, "its embedding has non-finite values (the model's output overflowed?)"
    return idx.normalisation.apply(x)[0], ""


def find_duplicates(dataset, *, threshold: float | None = None, neighbours: int = DUPLICATE_NEIGHBOURS,
               exact: bool = False, log: Log | None = None) -> DuplicateTable:
    """Pairs of tracks of `dataset` that are the same recording (re-encodes, trims, other
    containers), found among each track's `neighbours` nearest (the ANN index when there is
    one, unless `exact`): every pair whose cosine is at least `threshold` (default: the one
    measured for the index's normalisation), each pair once, most similar first."""
    if threshold is not None and not (math.isfinite(threshold) and -1.0 <= threshold <= 1.0):
        raise UsageError(f"--threshold {threshold}: a cosine similarity, choose -1..1")
    if int(neighbours) < 1:
        raise UsageError("neighbours must be >= 1")
    idx = _open(dataset, log)
    if idx.ann is None and not exact and len(idx) > DUPLICATE_ANN_ABOVE:
        if log:
            log(f"maest: {dataset}: {len(idx)} tracks and no approximate index: building one for --duplicates "
                "(as `maest index build` does; --exact compares every track instead)")
        idx = _open(dataset, log, ann=True)
    limit = DUPLICATE_THRESHOLDS[idx.normalisation.kind] if threshold is None else float(threshold)
    found_a, found_b, found_s = [], [], []
    for start in range(0, len(idx), DUPLICATE_QUERY_ROWS):
        own = np.arange(start, min(start + DUPLICATE_QUERY_ROWS, len(idx)))
        rows, sims = idx.search(np.asarray(idx.vectors[own], np.float32), int(neighbours), exact=exact,
                                self_rows=own)
        hit = (rows >= 0) & (sims >= limit)
        i, j = np.broadcast_to(own[:, None], rows.shape)[hit], rows[hit]
        found_a.append(np.minimum(i, j))
        found_b.append(np.maximum(i, j))
        found_s.append(sims[hit])
    a, b, s = (np.concatenate(v) for v in (found_a, found_b, found_s))
    best: dict[tuple[int, int], float] = {}
    for x, y, sim in zip(a.tolist(), b.tolist(), s.tolist()):  # a pair found from both ends counts once
        best[(x, y)] = max(best.get((x, y), -2.0), sim)
    pairs = sorted(((idx.location(a), idx.location(b), s) for (a, b), s in best.items()), key=lambda p: (-p[2], p[0]))
    return DuplicateTable(str(dataset), [DuplicatePair(*p) for p in pairs], limit, "exact" if exact else idx.method,
                          idx.normalisation.kind, len(idx), list(idx.notes))


@dataclass
class IndexSummary:
    dataset: str
    index: str  # the folder
    tracks: int
    dim: int
    normalisation: str
    library: str
    version: str
    params: dict
    build_seconds: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))


def build_index(dataset, *, normalisation: str | None = None, dims: int | None = None, log: Log | None = None,
                **ann_params) -> IndexSummary:
    """Build the ANN index of `dataset` (and its normalised matrix) into DATASET/_index/, anew;
    `similar` then uses it. `normalisation`: raw, centred or whitened (None: the stored choice,
    else the default); `dims`: the whitening's kept dimensions."""
    if normalisation is not None and normalisation not in NORMALISATIONS:
        raise UsageError(f"--normalisation {normalisation!r}: choose {', '.join(NORMALISATIONS)}")
    if dims is not None and int(dims) < 2:
        raise UsageError("--dims must be >= 2")
    d = Path(dataset)
    idx = _open(d, log, "", normalisation=normalisation, dims=dims, ann=True, force=True, **ann_params)
    ann = idx.manifest["ann"]
    return IndexSummary(str(d), str(index_dir(d)), len(idx), int(idx.manifest["dim"]), idx.normalisation.kind,
                        ann["library"], ann["version"], ann["params"], float(idx.manifest.get("build_seconds", 0)),
                        list(idx.notes))
