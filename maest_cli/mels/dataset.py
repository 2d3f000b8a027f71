"""Reading a prepared mel dataset (the output of `prepare-mels`), and checking one.

Layout of DATASET_DIR:
  shards/mels-00000.f16  raw float16 [frames, 96] log-mel, tracks back to back (never split)
  index.parquet          one row per track: where its frames are, split, labels, artist
  labels.txt             the vocabulary; label i of the index is line i
  stats.json             mean/std of the training split's log-mel, label counts per split
  manifest.json          frontend constants, crop, options, versions, shard sizes and sha256
  errors.tsv             audio that could not be decoded (plan_row, path, stage, reason); plan_row -1:
                         a directory the walk could not read (its audio is missing from the dataset)
  label_problems.tsv     label rows without audio, audio without labels, unknown tags, ...
  report.json            the counts of the run
Frames are stored UNNORMALISED; the reader returns float32 crops of them without reading the
rest of the shard (numpy memmap slices), so training can draw random crops from terabytes.
This module does not import torch: DataLoader workers stay light.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maest_cli.errors import MaestError
from maest_cli.io.artefacts import sha256_file

FORMAT = "maest-mels"
FORMAT_VERSION = 1
N_MELS = 96  # frontend.N_MELS, repeated here so reading a dataset does not import torch
FRAME_BYTES = N_MELS * 2  # float16
SPLITS = ("train", "validation", "test")
MANIFEST, INDEX, LABELS, STATS = "manifest.json", "index.parquet", "labels.txt", "stats.json"
ERRORS, REPORT, LABEL_PROBLEMS = "errors.tsv", "report.json", "label_problems.tsv"
WORK_DIR, SHARD_DIR = "_work", "shards"
WORK_TRASH = "_work.done"  # _work renamed once the manifest is written, then deleted

INDEX_SCHEMA = pa.schema([
    ("plan_row", pa.int64()),  # position in the full, sorted input list (stable across --shard parts)
    ("track_id", pa.string()),
    ("path", pa.string()),  # audio file, relative to the audio root
    ("split", pa.string()),
    ("artist", pa.string()),
    ("labels", pa.list_(pa.int32())),  # indices into labels.txt
    ("shard", pa.int32()),  # index into manifest["shards"]
    ("offset", pa.int64()),  # byte offset of the first frame in the shard
    ("n_frames", pa.int32()),
    ("crc32", pa.int64()),  # zlib.crc32 of the track's bytes
    ("duration_s", pa.float64()),  # of the source audio (header)
    ("start_s", pa.float64()),  # where the stored crop starts in the source
])


def shard_file(k: int) -> str:
    return f"{SHARD_DIR}/mels-{k:05d}.f16"


def is_finished(root: str | os.PathLike) -> bool:
    """A manifest of ours is there. It is written last, atomically, after every other file, so
    its presence means the dataset is complete; leftover _work files are then only garbage."""
    try:
        return json.loads((Path(root) / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def stats_from_sums(n: int, total: np.ndarray, total_sq: np.ndarray) -> dict:
    """Mean and (population) std, overall and per band, from per-band sums in float64."""
    if n == 0:
        return {"mean": None, "std": None, "mean_per_band": None, "std_per_band": None}
    total, total_sq = np.asarray(total, np.float64), np.asarray(total_sq, np.float64)
    band_mean = total / n
    band_var = np.maximum(total_sq / n - band_mean ** 2, 0.0)
    mean = float(total.sum() / (n * N_MELS))
    var = max(float(total_sq.sum() / (n * N_MELS)) - mean ** 2, 0.0)
    return {"mean": mean, "std": math.sqrt(var), "mean_per_band": band_mean.tolist(),
            "std_per_band": np.sqrt(band_var).tolist()}


class DatasetError(MaestError):
    """A dataset directory that cannot be opened; the message names the file and the reason."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except NotADirectoryError:
        raise DatasetError(f"{path.parent}: not a directory (a prepare-mels dataset is a folder)") from None
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (not a finished prepare-mels dataset?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: not valid JSON ({e})") from None


class MelDataset:
    """Random access to the tracks of a prepared dataset.

    Opening reads only the metadata (index, labels, stats, manifest); shards are memory-mapped
    on first use, and a crop touches only its own bytes. Pickles without its open maps, so it can
    be handed to DataLoader worker processes.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if (self.root / WORK_DIR).exists() and not (self.root / MANIFEST).exists():
            raise DatasetError(f"{self.root}: an unfinished prepare-mels run; rerun the same command to finish it")
        self.manifest = _read_json(self.root / MANIFEST)
        if self.manifest.get("format") != FORMAT:
            raise DatasetError(f"{self.root / MANIFEST}: not a {FORMAT} manifest")
        if self.manifest.get("format_version", 0) > FORMAT_VERSION:
            raise DatasetError(f"{self.root}: format version {self.manifest['format_version']} is newer "
                               f"than this maest-cli reads ({FORMAT_VERSION}); upgrade maest-cli")
        self.stats = _read_json(self.root / STATS)
        try:
            self.labels = (self.root / LABELS).read_text(encoding="utf-8").splitlines()
            self.index = pq.read_table(self.root / INDEX)
        except (OSError, pa.ArrowException) as e:
            raise DatasetError(f"{self.root}: cannot read labels.txt / index.parquet ({e})") from None
        idx = self.index
        self._frame0 = idx["offset"].to_numpy() // FRAME_BYTES
        self._n_frames = idx["n_frames"].to_numpy().astype(np.int64)
        self._shard = idx["shard"].to_numpy()
        lab = idx["labels"].combine_chunks() if idx.num_rows else pa.array([], pa.list_(pa.int32()))
        self._label_offsets = lab.offsets.to_numpy()
        self._label_values = lab.values.to_numpy(zero_copy_only=False).astype(np.int64)
        self._files = [self.root / s["file"] for s in self.manifest["shards"]]
        self._maps: dict[int, np.memmap] = {}
        self._split_rows: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return self.index.num_rows

    def __repr__(self) -> str:
        return f"MelDataset({str(self.root)!r}, tracks={len(self)}, labels={len(self.labels)})"

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    @property
    def mean(self) -> float | None:
        return self.stats.get("mean")

    @property
    def std(self) -> float | None:
        return self.stats.get("std")

    def split_rows(self, split: str) -> np.ndarray:
        """Row numbers of 'train', 'validation' or 'test'."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        if split not in self._split_rows:
            mask = pc.equal(self.index["split"], split).to_numpy(zero_copy_only=False)
            self._split_rows[split] = np.flatnonzero(mask)
        return self._split_rows[split].copy()  # callers may shuffle it in place

    def _label_elements(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in rows, label index) of every label of the given rows."""
        starts, ends = self._label_offsets[rows], self._label_offsets[rows + 1]
        lengths = ends - starts
        owner = np.repeat(np.arange(len(rows)), lengths)
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return owner, self._label_values[np.repeat(starts, lengths) + within]

    def targets(self, rows) -> np.ndarray:
        """[len(rows), C] multi-hot float32."""
        rows = np.atleast_1d(np.asarray(rows, np.int64))
        out = np.zeros((len(rows), len(self.labels)), np.float32)
        owner, label = self._label_elements(rows)
        out[owner, label] = 1.0
        return out

    def label_counts(self, split: str = "train") -> np.ndarray:
        """[C] tracks of the split carrying each label (for class weights)."""
        _, label = self._label_elements(self.split_rows(split))
        return np.bincount(label, minlength=len(self.labels)).astype(np.int64)

    def n_frames(self, row: int) -> int:
        return int(self._n_frames[row])

    def _shard_array(self, k: int) -> np.ndarray:
        """Shard k as a read-only [frames, 96] float16 memmap, opened on first use."""
        mm = self._maps.get(k)
        if mm is None:
            path = self._files[k]
            try:
                frames = os.path.getsize(path) // FRAME_BYTES
                mm = np.memmap(path, dtype=np.float16, mode="r", shape=(frames, N_MELS))
            except (OSError, ValueError) as e:
                raise DatasetError(f"{path}: cannot map shard ({e}); run `maest prepare-mels --verify "
                                   f"{self.root}`") from None
            self._maps[k] = mm
        return mm

    def _read(self, row: int, start: int, stop: int) -> np.ndarray:
        first = int(self._frame0[row])
        part = self._shard_array(int(self._shard[row]))[first + start: first + stop]
        if len(part) != stop - start:
            raise DatasetError(f"{self._files[int(self._shard[row])]}: track row {row} runs past the end of "
                               f"the shard (truncated?); run `maest prepare-mels --verify {self.root}`")
        return np.asarray(part, dtype=np.float32)

    def frames(self, row: int) -> np.ndarray:
        """The whole stored track, [n_frames, 96] float32, unnormalised log-mel."""
        return self._read(row, 0, self.n_frames(row))

    def crop(self, row: int, n_frames: int, start: int | None = None,
             rng: np.random.Generator | None = None) -> np.ndarray:
        """[n_frames, 96] float32 unnormalised log-mel of one track.

        `start` given: that frame; else a random start when `rng` is given; else centred.
        A track shorter than n_frames is returned whole, centred between zeros (log-mel 0 is
        silence), whatever start/rng say. Only the crop's bytes are read.
        """
        n = self.n_frames(row)
        if n_frames <= 0:
            raise ValueError(f"n_frames must be positive, got {n_frames}")
        if n < n_frames:
            out = np.zeros((n_frames, N_MELS), np.float32)
            left = (n_frames - n) // 2
            out[left: left + n] = self._read(row, 0, n)
            return out
        if start is None:
            start = int(rng.integers(0, n - n_frames + 1)) if rng is not None else (n - n_frames) // 2
        elif not 0 <= start <= n - n_frames:
            raise ValueError(f"row {row}: start {start} outside 0..{n - n_frames} for a crop of {n_frames} "
                             f"of {n} frames")
        return self._read(row, int(start), int(start) + n_frames)


def verify_dataset(root: str | os.PathLike) -> list[str]:
    """Every problem of a dataset directory, one line each (empty: the dataset is sound).

    Checks the shard files against the sizes and sha256 recorded at finalisation, and every index
    row against its shard: bounds, frame alignment, overlaps, the crc32 of its bytes, NaN/inf,
    label indices and split names.
    """
    root = Path(root)
    problems: list[str] = []
    if (root / WORK_DIR).exists() and not (root / MANIFEST).exists():
        problems.append(f"{root / WORK_DIR}: an unfinished prepare-mels run (rerun the same command to finish it)")
    try:
        manifest = _read_json(root / MANIFEST)
        stats = _read_json(root / STATS)
        labels = (root / LABELS).read_text(encoding="utf-8").splitlines()
        index = pq.read_table(root / INDEX)
    except (DatasetError, OSError, pa.ArrowException) as e:
        return problems + [str(e)]
    missing = {f.name for f in INDEX_SCHEMA} - set(index.column_names)
    if missing:
        return problems + [f"{root / INDEX}: missing columns {', '.join(sorted(missing))}"]
    shards = manifest.get("shards", [])
    if manifest.get("n_tracks") != index.num_rows:
        problems.append(f"{root / INDEX}: {index.num_rows} rows, manifest says {manifest.get('n_tracks')}")

    sizes = []
    for s in shards:
        path = root / s["file"]
        if not path.is_file():
            problems.append(f"{path}: missing shard")
            sizes.append(-1)
            continue
        size = path.stat().st_size
        sizes.append(size)
        if size != s["bytes"]:
            problems.append(f"{path}: {size} bytes, manifest says {s['bytes']} (truncated or appended to)")
        elif sha256_file(path) != s["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (contents changed)")

    cols = {name: index[name].to_numpy(zero_copy_only=False) for name in
            ("shard", "offset", "n_frames", "crc32", "path", "split")}
    label_lists = index["labels"].to_pylist()
    order = np.lexsort((cols["offset"], cols["shard"]))
    maps: dict[int, np.memmap] = {}
    prev_end = {}  # shard -> end byte of the previous row
    for r in order:
        r = int(r)
        k, off, n = int(cols["shard"][r]), int(cols["offset"][r]), int(cols["n_frames"][r])
        where = f"{root / INDEX}: row {r} ({cols['path'][r]})"
        if cols["split"][r] not in SPLITS:
            problems.append(f"{where}: split {cols['split'][r]!r} is not one of {', '.join(SPLITS)}")
        bad_labels = [x for x in label_lists[r] or [] if not 0 <= x < len(labels)]
        if bad_labels:
            problems.append(f"{where}: label indices {bad_labels} outside 0..{len(labels) - 1}")
        if not 0 <= k < len(shards):
            problems.append(f"{where}: shard {k} does not exist (manifest has {len(shards)})")
            continue
        if n <= 0 or off < 0 or off % FRAME_BYTES:
            problems.append(f"{where}: bad extent (offset {off}, {n} frames)")
            continue
        end = off + n * FRAME_BYTES
        if off < prev_end.get(k, 0):
            problems.append(f"{where}: overlaps the previous track in {shards[k]['file']}")
        prev_end[k] = max(prev_end.get(k, 0), end)
        if sizes[k] < 0:
            continue
        if end > sizes[k]:
            problems.append(f"{where}: frames end at byte {end}, past the end of {shards[k]['file']} "
                            f"({sizes[k]} bytes)")
            continue
        if k not in maps:
            maps[k] = np.memmap(root / shards[k]["file"], dtype=np.uint8, mode="r")
        raw = np.asarray(maps[k][off:end])
        if zlib.crc32(raw) != int(cols["crc32"][r]):
            problems.append(f"{where}: crc32 of its frames differs from the index (bytes changed)")
        frames = raw.view(np.float16)
        if not np.isfinite(frames).all():
            problems.append(f"{where}: {int((~np.isfinite(frames)).sum())} NaN/inf values")
    if not problems and index.num_rows:
        _check_stats(root, stats, index, len(labels), problems)
    return problems


def _check_stats(root: Path, stats: dict, index: pa.Table, n_labels: int, problems: list[str]) -> None:
    counts = stats.get("label_counts", {})
    for split in SPLITS:
        rows = index.filter(pc.equal(index["split"], split))
        flat = pc.list_flatten(rows["labels"]).to_numpy(zero_copy_only=False)
        want = np.bincount(flat.astype(np.int64), minlength=n_labels).tolist()
        if counts.get(split) != want:
            problems.append(f"{root / STATS}: label counts of {split} do not match the index")
    if stats.get("mean") is not None and not (math.isfinite(stats["mean"]) and math.isfinite(stats["std"])):
        problems.append(f"{root / STATS}: mean/std not finite")
