"""The search index of an extract dataset, kept beside it in DATASET/_index/ (the dataset reader
skips folders starting with '_'):

    manifest.json         what the files are, the dataset fingerprint they were made from, the
                          normalisation, the ANN library, its version and parameters (written last)
    tracks-<id>.parquet   root, path of each indexed track (row i of the vectors)
    vectors-<id>.npy      the normalised unit vectors (fp32; fp16 for large catalogues), memory-mapped
                          by exact search and used to re-score the ANN's candidates
    norm-<id>.npz         the normalisation (mean, whitening projection), applied to queries too
    ann-<id>.usearch      the approximate index (`maest index build`), absent until built
    dropped-<id>.parquet  root, path of the tracks left out (no finite embedding), when there are any

Every file is written atomically under a new <id>; the manifest is replaced last and names the
files of its build, so a reader sees one whole build. A fingerprint of the dataset's part files
tells when the dataset has changed since: the index is then rebuilt. An unreadable or
inconsistent file is rebuilt too, never fatal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.audio.walk import as_text
from maest_cli.catalogue.cached import every_file_failed
from maest_cli.embed.extraction import display_path
from maest_cli.embed.reading import EmbeddingSet, open_embeddings
from maest_cli.errors import MaestError, UsageError
from maest_cli.io.artefacts import atomic_path, write_json

FORMAT = "maest-similar-index/1"
INDEX_DIR = "_index"
MANIFEST = "manifest.json"
NORMALISATIONS = ("raw", "centred", "whitened")
DEFAULT_NORMALISATION = "whitened"
# whitening keeps this many principal directions at most, and at most one per WHITEN_TRACKS_PER_DIM
# tracks; with fewer than WHITEN_MIN_DIMS it falls back to centring (README "similar": the figures)
WHITEN_DIMS = 32
WHITEN_TRACKS_PER_DIM = 4
WHITEN_MIN_DIMS = 16
FP16_ABOVE_BYTES = 1 << 30  # the fp32 matrix of a larger catalogue is stored as fp16
CHUNK_ROWS = 65536  # vectors added to the ANN at a time
EXACT_CHUNK_ROWS = 16384  # rows of the matrix multiplied at a time by exact search

Log = Callable[[str], None]


class IndexBuildError(MaestError):
    """A dataset that cannot be indexed (exit code 1)."""


# ------------------------------------------------------------------ normalisation

@dataclass
class Normalisation:
    """x -> unit((x - mean) @ projection): cosine after centring (and PCA whitening)."""

    kind: str
    mean: np.ndarray | None = None  # [dim]
    projection: np.ndarray | None = None  # [dim, k]

    @property
    def out_dim(self) -> int | None:
        return None if self.projection is None else int(self.projection.shape[1])

    def apply(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows of `x` normalised to unit length (computed in float64 a chunk at a time) into `out`
        (default: a new float32 array; a memory-mapped file fills without a copy in memory); a
        zero row stays zero."""
        if out is None:
            out = np.empty((len(x), self.out_dim or x.shape[1]), np.float32)
        for start in range(0, len(x), CHUNK_ROWS):
            y = np.asarray(x[start:start + CHUNK_ROWS], np.float64)
            if self.mean is not None:
                y = y - self.mean
            if self.projection is not None:
                y = y @ self.projection
            n = np.linalg.norm(y, axis=1, keepdims=True)
            out[start:start + len(y)] = y / np.where(n > 0, n, 1.0)
        return out

    def save(self, path: Path) -> None:
        arrays = {"kind": np.array(self.kind)}
        if self.mean is not None:
            arrays["mean"] = self.mean
        if self.projection is not None:
            arrays["projection"] = self.projection
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    @classmethod
    def load(cls, path: Path) -> Normalisation:
        with np.load(path, allow_pickle=False) as z:
            return cls(str(z["kind"]), z["mean"] if "mean" in z else None,
                       z["projection"] if "projection" in z else None)


def fit_normalisation(x: np.ndarray, kind: str = DEFAULT_NORMALISATION, dims: int | None = None) -> Normalisation:
    """The normalisation `kind` fitted on the rows of `x` (the catalogue). Whitening keeps the
    `dims` strongest principal directions (None: WHITEN_DIMS), no more than the tracks support,
    and falls back to centring on a catalogue too small for WHITEN_MIN_DIMS of them (or for 2,
    when `dims` is asked); a single track is left raw."""
    if kind not in NORMALISATIONS:
        raise UsageError(f"--normalisation {kind!r}: choose {', '.join(NORMALISATIONS)}")
    if kind == "raw" or len(x) < 2:
        return Normalisation("raw")
    mean = np.asarray(x).mean(0, dtype=np.float64)
    k = min(dims or WHITEN_DIMS, x.shape[1], len(x) // WHITEN_TRACKS_PER_DIM)
    if kind == "centred" or k < (2 if dims else WHITEN_MIN_DIMS):
        return Normalisation("centred", mean)
    cov = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(x), CHUNK_ROWS):
        c = np.asarray(x[start:start + CHUNK_ROWS], np.float64) - mean
        cov += c.T @ c
    var, vec = np.linalg.eigh(cov / (len(x) - 1))  # ascending
    var, vec = var[::-1][:k], vec[:, ::-1][:, :k]
    keep = var > var[0] * 1e-10
    return Normalisation("whitened", mean, vec[:, keep] / np.sqrt(var[keep]))


# ------------------------------------------------------------------ the ANN library

class AnnIndex:
    """The approximate nearest-neighbour library behind one small interface (inner product of
    unit vectors), so that it can be swapped for another."""

    library = "usearch"

    def __init__(self, impl):
        self._impl = impl

    @staticmethod
    def version() -> str:
        import usearch

        return usearch.__version__

    @classmethod
    def create(cls, vectors: np.ndarray, connectivity: int = 16, expansion_add: int = 128,
               expansion_search: int = 64) -> AnnIndex:
        from usearch.index import Index

        impl = Index(ndim=vectors.shape[1], metric="ip", dtype="f16" if vectors.dtype == np.float16 else "f32",
                     connectivity=connectivity, expansion_add=expansion_add, expansion_search=expansion_search)
        for start in range(0, len(vectors), CHUNK_ROWS):
            block = np.ascontiguousarray(vectors[start:start + CHUNK_ROWS])
            impl.add(np.arange(start, start + len(block), dtype=np.uint64), block)
        return cls(impl)

    def params(self) -> dict:
        i = self._impl
        return {"metric": "ip", "dtype": str(i.dtype).rsplit(".", 1)[-1].lower(), "connectivity": i.connectivity,
                "expansion_add": i.expansion_add, "expansion_search": i.expansion_search}

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            self._impl.save(str(tmp))

    @classmethod
    def load(cls, path: Path, n: int, dim: int) -> AnnIndex:
        """The index in `path` (memory-mapped); ValueError when it is not one of n vectors of dim."""
        from usearch.index import Index

        try:
            impl = Index.restore(str(path), view=True)
        except (RuntimeError, ValueError, OSError) as e:
            raise ValueError(f"{path}: not a readable index ({e})") from None
        if impl is None or len(impl) != n or impl.ndim != dim:
            raise ValueError(f"{path}: not an index of {n} vectors of {dim} values")
        return cls(impl)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """[m, k] candidate rows of each query (-1 where fewer were found)."""
        m = self._impl.search(np.ascontiguousarray(queries, np.float32), k)
        keys = np.asarray(m.keys, np.int64).reshape(len(queries), -1)
        counts = np.asarray(m.counts).reshape(-1) if hasattr(m, "counts") else np.array([len(m)])  # one query: Matches
        keys[np.arange(keys.shape[1])[None, :] >= counts[:, None]] = -1
        return keys


# ------------------------------------------------------------------ exact search

def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int, self_rows: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(rows [m, k], similarities [m, k]) of the k largest inner products of each query with
    the rows of `vectors` (memory-mapped: read in chunks), best first. `self_rows`: the row of
    each query in `vectors`, never its own neighbour."""
    n, m = len(vectors), len(queries)
    k = min(k, n)
    best_i = np.full((m, k), -1, np.int64)
    best_s = np.full((m, k), -np.inf, np.float32)
    q = np.ascontiguousarray(queries, np.float32)
    for start in range(0, n, EXACT_CHUNK_ROWS):
        block = np.asarray(vectors[start:start + EXACT_CHUNK_ROWS], np.float32)
        sims = q @ block.T  # [m, c]
        if self_rows is not None:
            own = self_rows - start
            ok = (own >= 0) & (own < len(block))
            sims[np.flatnonzero(ok), own[ok]] = -np.inf
        kk = min(k, sims.shape[1])
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        all_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], 1)
        all_i = np.concatenate([best_i, part + start], 1)
        top = np.argpartition(-all_s, k - 1, axis=1)[:, :k]
        best_i, best_s = np.take_along_axis(all_i, top, 1), np.take_along_axis(all_s, top, 1)
    order = np.argsort(-best_s, axis=1, kind="stable")
    best_i, best_s = np.take_along_axis(best_i, order, 1), np.take_along_axis(best_s, order, 1)
    best_i[~np.isfinite(best_s)] = -1  # fewer rows than k (a query's own row left out)
    return best_i, best_s


# ------------------------------------------------------------------ the index of a dataset

@dataclass
class TrackIndex:
    """An opened index: the tracks, their normalised vectors, the normalisation and the ANN (or None)."""

    dataset: str
    roots: list[str]
    paths: list[str]
    vectors: np.ndarray  # [n, dim'] unit rows, memory-mapped when stored
    normalisation: Normalisation
    ann: AnnIndex | None
    manifest: dict
    stored: bool = True  # False: held in memory only (the dataset folder is not writable)
    notes: list[str] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (root, path) of tracks left out
    _lookup: tuple | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def method(self) -> str:
        return "exact" if self.ann is None else AnnIndex.library

    def search(self, queries: np.ndarray, k: int, exact: bool = False, self_rows: np.ndarray | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Normalised queries -> (rows [m, k], cosines [m, k]), best first; -1 and NaN pad a short list.
        Through the ANN when there is one and not `exact` (its candidates re-scored exactly, so
        the scores are exact search's); `self_rows`: each query's own row, left out."""
        m = len(queries)
        rows = np.full((m, k), -1, np.int64)
        sims = np.full((m, k), np.nan, np.float32)
        k_eff = min(k, len(self) - (1 if self_rows is not None else 0))
        if k_eff <= 0 or not m:
            return rows, sims
        if self.ann is None or exact:
            r, s = exact_topk(self.vectors, queries, k_eff, self_rows)
        else:
            cand = self.ann.search(queries, min(len(self), max(2 * k_eff + 1, k_eff + 8)))
            r, s = self._rescore(queries, cand, k_eff, self_rows)
        rows[:, :r.shape[1]], sims[:, :s.shape[1]] = r, s
        sims[rows < 0] = np.nan
        return rows, sims

    def _rescore(self, queries: np.ndarray, cand: np.ndarray, k: int, self_rows: np.ndarray | None):
        """Exact cosines of the ANN's candidates, the best k first."""
        if self_rows is not None:
            cand = np.where(cand == self_rows[:, None], -1, cand)
        safe = np.maximum(cand, 0)
        uniq = np.unique(safe)
        vec = np.asarray(self.vectors[uniq], np.float32)
        s = np.einsum("md,mkd->mk", np.asarray(queries, np.float32), vec[np.searchsorted(uniq, safe)])
        s[cand < 0] = -np.inf
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(cand, order, 1), np.take_along_axis(s, order, 1)

    def locate(self, path: str | os.PathLike) -> int | None:
        """The row of a track given by its path (as on disk, or as the dataset stores it), or None."""
        return self.lookup(path)[0]

    def lookup(self, path: str | os.PathLike) -> tuple[int | None, str | None]:
        """(row, None) for a track of the index; (None, why) for a path that names a track of the
        dataset that cannot be used (no finite embedding) or several tracks; (None, None) else.

        A file that exists is that file: it matches by its absolute (or resolved) path only, never
        by a relative path that happens to be stored under another root. A path that does not
        exist on disk may also be a path as the dataset stores it, relative to its root."""
        if self._lookup is None:
            full: dict[str, int] = {}
            rel: dict[str, list[int]] = {}
            entries = [*zip(self.roots, self.paths), *self.dropped]
            for i, (root, p) in enumerate(entries):  # rows >= len(self): dropped tracks
                full.setdefault(os.path.normpath(display_path(root, p)), i)
                rel.setdefault(os.path.normpath(p), []).append(i)
            self._lookup = (full, rel, entries)
        full, rel, entries = self._lookup

        def answer(i: int) -> tuple[int | None, str | None]:
            return (i, None) if i < len(self) else (None, "a track of the dataset that has no finite embedding "
                                                    "(not indexed; extract it again)")
        p = os.fspath(path)
        on_disk = os.path.exists(p)
        cands = (os.path.abspath(p), os.path.realpath(p)) if on_disk else (os.path.abspath(p),)
        for cand in cands:
            if as_text(cand) in full:
                return answer(full[as_text(cand)])
        if on_disk:
            return None, None
        hits = rel.get(os.path.normpath(as_text(p)), [])
        if len(hits) > 1:
            a, b = (display_path(*entries[i]) for i in hits[:2])
            return None, (f"ambiguous: {len(hits)} tracks of the dataset have this path, e.g. {a} and {b}; "
                          "give the whole path")
        return answer(hits[0]) if hits else (None, None)

    def location(self, row: int) -> str:
        """The track's file as found on disk (root joined with path)."""
        return os.path.join(self.roots[row], self.paths[row])


def dataset_fingerprint(emb: EmbeddingSet) -> str:
    """Names, sizes and modification times of the dataset's part files: it changes when a part is
    added, removed or rewritten."""
    h = hashlib.sha256()
    base = Path(emb.directory)
    for f in sorted(emb.files):
        st = os.stat(f)
        rel = os.path.relpath(f, base) if base.is_dir() else os.path.basename(f)
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def index_dir(dataset: str | os.PathLike) -> Path:
    return Path(dataset) / INDEX_DIR


def read_manifest(dataset: str | os.PathLike) -> dict | None:
    """The index manifest of `dataset`, or None when there is none or it is not one."""
    p = index_dir(dataset) / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _unindexed_note(dropped: list[tuple[str, str]]) -> str:
    n = len(dropped)
    return (f"{n} track{'s' if n > 1 else ''} of the dataset {'have' if n > 1 else 'has'} no finite embedding and "
            f"{'are' if n > 1 else 'is'} not indexed (first: {display_path(*dropped[0])})")


def _load(dataset: Path, manifest: dict, want_ann: bool) -> TrackIndex:
    """The stored build the manifest names; ValueError (or OSError) when a file is missing or inconsistent."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = index_dir(dataset)
    files = manifest["files"]
    try:
        tracks = pq.read_table(d / files["tracks"], columns=["root", "path"])
    except pa.ArrowException as e:
        raise ValueError(str(e)) from None
    vectors = np.load(d / files["vectors"], mmap_mode="r", allow_pickle=False)
    norm = Normalisation.load(d / files["normalisation"])
    n, dim = int(manifest["tracks"]), int(manifest["dim"])
    if tracks.num_rows != n or vectors.shape != (n, dim) or (norm.out_dim or manifest["embedding_dim"]) != dim:
        raise ValueError(f"{d}: files of different builds")
    ann = AnnIndex.load(d / files["ann"], n, dim) if want_ann and files.get("ann") else None
    dropped = []
    if files.get("dropped"):
        try:
            t = pq.read_table(d / files["dropped"], columns=["root", "path"])
        except pa.ArrowException as e:
            raise ValueError(str(e)) from None
        dropped = list(zip(t.column("root").to_pylist(), t.column("path").to_pylist()))
    return TrackIndex(str(dataset), tracks.column("root").to_pylist(), tracks.column("path").to_pylist(), vectors,
                      norm, ann, manifest, notes=[_unindexed_note(dropped)] if dropped else [], dropped=dropped)


def open_index(dataset: str | os.PathLike, *, normalisation: str | None = None, dims: int | None = None,
               ann: bool | None = None, force: bool = False, log: Log | None = None, option: str = "--dataset",
               **ann_params) -> TrackIndex:
    """The index of `dataset`, up to date: the stored one when its fingerprint matches the
    dataset's, else (re)built and stored, with one line to `log` when an existing index is
    rebuilt. `ann`: None uses the ANN when one was built, True builds it when missing, False
    never loads it. `normalisation`/`dims`: None keeps the stored choice. `force`: build anew.
    `option`: the command-line option that named the dataset, for the messages."""
    d = Path(dataset)
    if every_file_failed(d):
        raise IndexBuildError(f"{d}: every file failed when it was extracted: no track to index (see {d}/_errors)")
    emb = open_embeddings(d, option=option)
    fingerprint = dataset_fingerprint(emb)
    old = read_manifest(d)
    try:
        old_norm = old["normalisation"] if old else {}
        wanted_norm = normalisation or old_norm.get("requested") or DEFAULT_NORMALISATION
        wanted_dims = dims if dims is not None else old_norm.get("dims")
        with_ann = bool(old["files"].get("ann")) if ann is None and old else bool(ann)
        fresh = (old is not None and old["fingerprint"] == fingerprint and old_norm["requested"] == wanted_norm
                 and old_norm.get("dims") == wanted_dims)
        reason = None if old is None else ("the dataset changed since it was built" if old["fingerprint"] != fingerprint
                                           else "other index settings were asked for")
    except (KeyError, TypeError, AttributeError):
        wanted_norm, wanted_dims, with_ann = normalisation or DEFAULT_NORMALISATION, dims, bool(ann)
        fresh, reason = False, "its manifest is unreadable"
    if fresh and not force:
        try:
            idx = _load(d, old, with_ann)
            return _add_ann(d, idx, **ann_params) if with_ann and idx.ann is None else idx
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = f"its files are unreadable ({' '.join(str(e).split())[:200]})"
    if reason and not force and log:
        log(f"maest: {d / INDEX_DIR}: {reason}; rebuilding it ({len(emb.paths)} tracks)")
    if with_ann and not ann_params:  # a rebuild keeps the ANN parameters it was built with
        old_params = ((old or {}).get("ann") or {}).get("params") or {}
        ann_params = {k: old_params[k] for k in ("connectivity", "expansion_add", "expansion_search")
                      if isinstance(old_params.get(k), int)}
    return build(emb, fingerprint, wanted_norm, wanted_dims, with_ann, log, **ann_params)


def build(emb: EmbeddingSet, fingerprint: str, normalisation: str, dims: int | None, with_ann: bool,
          log: Log | None = None, **ann_params) -> TrackIndex:
    """Read the tracks' mean embeddings, fit the normalisation and store the index (in memory
    only when the dataset folder cannot be written). The normalised vectors are written a chunk
    at a time into the memory-mapped file that becomes the index's, so memory holds the matrix once."""
    t0 = time.perf_counter()
    tracks = np.arange(len(emb.paths))
    x = emb.matrix(tracks)
    ok = np.isfinite(x).all(1)
    if not ok.all():  # copied only when tracks are left out
        tracks, x = tracks[ok], x[ok]
    if not len(tracks):
        raise IndexBuildError(f"{emb.directory}: no track has an embedding to index")
    dropped = [(emb.roots[i], emb.paths[i]) for i in np.flatnonzero(~ok)]
    norm = fit_normalisation(x, normalisation, dims)
    shape = (len(x), norm.out_dim or x.shape[1])
    dtype = np.float16 if shape[0] * shape[1] * 4 > FP16_ABOVE_BYTES else np.float32
    vectors, staging = _vectors_file(index_dir(emb.directory), shape, dtype)
    try:
        norm.apply(x, out=vectors)
        del x
        if isinstance(vectors, np.memmap):
            vectors.flush()
        roots, paths = [emb.roots[i] for i in tracks], [emb.paths[i] for i in tracks]
        manifest = {"format": FORMAT, "dataset": os.path.abspath(emb.directory), "fingerprint": fingerprint,
                    "parts": len(emb.files), "tracks": len(paths), "dim": int(vectors.shape[1]),
                    "embedding_dim": emb.dim, "dtype": str(vectors.dtype),
                    "normalisation": {"requested": normalisation, "kind": norm.kind, "dims": dims,
                                      "out_dim": norm.out_dim},
                    "embeddings": {k: emb.metadata.get(k) for k in ("model", "preset", "block", "tokens", "hop")},
                    "files": {}, "ann": None, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        notes = [_unindexed_note(dropped)] if dropped else []
        if dropped:
            manifest["notes"] = notes
        idx = TrackIndex(emb.directory, roots, paths, vectors, norm, None, manifest, stored=False,
                         notes=list(notes), dropped=dropped)
        if with_ann:
            _attach_ann(idx, **ann_params)
        manifest["build_seconds"] = round(time.perf_counter() - t0, 3)
        try:
            _store(Path(emb.directory), idx, vectors_file=staging)
        except OSError as e:
            note = (f"{emb.directory}/{INDEX_DIR}: cannot be written ({e.strerror or e}); searching with an index "
                    "built in memory")
            idx.notes.append(note)
            if log:
                log(f"maest: warning: {note}")
        return idx
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)


def _vectors_file(d: Path, shape: tuple[int, int], dtype) -> tuple[np.ndarray, Path | None]:
    """A memory-mapped .npy in the index folder for the normalised vectors (moved into place by
    _store), or an array in memory when the folder cannot be written."""
    staging = d / f".vectors-{secrets.token_hex(4)}.npy.tmp"
    try:
        d.mkdir(parents=True, exist_ok=True)
        return np.lib.format.open_memmap(staging, mode="w+", dtype=dtype, shape=shape), staging
    except OSError:
        staging.unlink(missing_ok=True)
        return np.empty(shape, dtype), None


def _attach_ann(idx: TrackIndex, **ann_params) -> None:
    idx.ann = AnnIndex.create(np.asarray(idx.vectors), **ann_params)
    idx.manifest["ann"] = {"library": AnnIndex.library, "version": AnnIndex.version(), "params": idx.ann.params()}


def _add_ann(d: Path, idx: TrackIndex, **ann_params) -> TrackIndex:
    """Build the ANN of a stored, up-to-date index (its other files are kept)."""
    _attach_ann(idx, **ann_params)
    try:
        _store(d, idx, ann_only=True)
    except OSError as e:
        idx.notes.append(f"{d}/{INDEX_DIR}: cannot be written ({e.strerror or e}); the ANN index is in memory only")
    return idx


@contextlib.contextmanager
def _locked(d: Path):
    """One writer of an index folder at a time (the kernel drops the lock when a process dies)."""
    import fcntl

    d.mkdir(parents=True, exist_ok=True)
    fd = os.open(d / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _store(dataset: Path, idx: TrackIndex, ann_only: bool = False, vectors_file: Path | None = None) -> None:
    """Write the build's files under a new id, then the manifest, then remove other builds' files.
    `vectors_file`: a .npy already holding idx.vectors (in the index folder), moved into place."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = index_dir(dataset)
    with _locked(d):
        build_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
        if ann_only:
            files = {k: v for k, v in idx.manifest["files"].items() if k != "ann"}
        else:
            files = {"tracks": f"tracks-{build_id}.parquet", "vectors": f"vectors-{build_id}.npy",
                     "normalisation": f"norm-{build_id}.npz"}
            with atomic_path(d / files["tracks"]) as tmp, open(tmp, "wb") as f:
                pq.write_table(pa.table({"root": pa.array(idx.roots, pa.string()),
                                         "path": pa.array(idx.paths, pa.string())}), f)
            with atomic_path(d / files["vectors"]) as tmp:
                if vectors_file is not None:
                    os.replace(vectors_file, tmp)
                else:
                    with open(tmp, "wb") as f:
                        np.save(f, np.asarray(idx.vectors), allow_pickle=False)
            if idx.dropped:
                files["dropped"] = f"dropped-{build_id}.parquet"
                with atomic_path(d / files["dropped"]) as tmp, open(tmp, "wb") as f:
                    pq.write_table(pa.table({"root": pa.array([r for r, _ in idx.dropped], pa.string()),
                                             "path": pa.array([p for _, p in idx.dropped], pa.string())}), f)
            idx.normalisation.save(d / files["normalisation"])
        if idx.ann is not None:
            files["ann"] = f"ann-{build_id}.usearch"
            idx.ann.save(d / files["ann"])
        idx.manifest["files"] = files
        write_json(d / MANIFEST, idx.manifest)
        idx.stored = True
        keep = set(files.values())
        for p in d.iterdir():
            if p.name not in keep and p.name.split("-", 1)[0] in ("tracks", "vectors", "norm", "ann", "dropped"):
                p.unlink(missing_ok=True)
    if not ann_only:  # search the stored copy (memory-mapped), not the build's arrays
        idx.vectors = np.load(d / files["vectors"], mmap_mode="r", allow_pickle=False)
