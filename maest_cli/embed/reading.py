"""Reading an `extract` Parquet dataset back: which rows are which track, and the mean embedding
of each track, read in one pass (only the rows asked for are ever in memory).

Used by everything that consumes embeddings (probes, tags, similarity search).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.errors import MaestError, UsageError


class EmbeddingsError(MaestError, RuntimeError):
    """An embeddings dataset that cannot be read (a broken file, one changed while read); exit code 1."""


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

    def matrix(self, tracks: np.ndarray, column: str = "embedding", width: int | None = None) -> np.ndarray:
        """[len(tracks), width] float32: the mean of each listed track's rows of `column` (a list
        column of `width` floats, default the embedding's size), read in one pass. Null and
        non-finite rows are left out; a track with no row left is NaN."""
        import pyarrow.parquet as pq
        import torch

        width = self.dim if width is None else int(width)
        pos = np.full(len(self.paths), -1, np.int64)
        pos[tracks] = np.arange(len(tracks))
        out = torch.zeros(len(tracks), width, dtype=torch.float32)
        count = torch.zeros(len(tracks), dtype=torch.float32)
        offset = 0
        for f in self.files:
            try:
                pf = pq.ParquetFile(f)
                if column not in pf.schema_arrow.names:
                    raise UsageError(f"{f}: no column {column!r}")
                _check_embedding_type(pf.schema_arrow.field(column).type, width, f, column)
                for batch in pf.iter_batches(batch_size=8192, columns=[column]):
                    n = batch.num_rows
                    where = pos[np.maximum(self.row_track[offset:offset + n], 0)]
                    where[self.row_track[offset:offset + n] < 0] = -1
                    offset += n
                    valid, vec = _embedding_array(batch.column(0), width, f)
                    finite = np.zeros_like(valid)
                    finite[valid] = np.isfinite(vec).all(axis=1)
                    where[~finite] = -1  # a null or non-finite row counts as no row
                    sel = np.flatnonzero(where >= 0)
                    if not len(sel):
                        continue
                    idx = torch.from_numpy(where[sel])
                    out.index_add_(0, idx, torch.from_numpy(vec[(np.cumsum(valid) - 1)[sel]]))
                    count.index_add_(0, idx, torch.ones(len(sel)))
            except (OSError, KeyError) as e:
                raise EmbeddingsError(f"{f}: cannot read column {column!r} ({e})") from None
        if offset != self.n_rows:
            raise EmbeddingsError(f"{self.directory}: the dataset changed while it was read")
        out /= count[:, None]  # a track whose every row is null becomes NaN, dropped by the caller
        return out.numpy()


def _check_embedding_type(etype, dim: int | None, where: str, column: str = "embedding") -> int | None:
    """A list of floats; a fixed size must be `dim` (None: not known yet). Returns the size
    (None for variable-length lists, checked row by row when read)."""
    import pyarrow as pa

    if not (pa.types.is_fixed_size_list(etype) or pa.types.is_list(etype) or pa.types.is_large_list(etype)) \
            or not pa.types.is_floating(etype.value_type):
        raise UsageError(f"{where}: column {column!r} is {etype}, expected a list of floats")
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


def open_embeddings(directory: str | Path, option: str = "--embeddings") -> EmbeddingSet:
    """Index an `extract` output folder: which rows belong to which track (embeddings not read).
    `option`: the command-line option that named the folder, for the messages."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    d = Path(directory)
    where = f"{option} {d}".strip()
    if not d.exists():
        raise UsageError(f"{where}: no such file or directory")
    # the data files: *.parquet, skipping names that start with '_' or '.' (manifests, staging)
    files = [str(d)] if d.is_file() else sorted(
        str(p) for p in d.rglob("*.parquet") if not any(part.startswith(("_", ".")) for part in p.relative_to(d).parts))
    if not files:
        raise UsageError(f"{where}: no Parquet files (run `maest extract` first)")
    try:
        ds = pads.dataset(files, format="parquet")
    except (pa.ArrowInvalid, OSError) as e:
        raise EmbeddingsError(f"{d}: not a readable Parquet dataset ({e})") from None
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
            raise EmbeddingsError(f"{f}: cannot read ({e})") from None
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
            raise EmbeddingsError(f"{f}: cannot read ({e})") from None
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
    raise EmbeddingsError(f"{files[0]}: no embeddings")


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
