"""The writing side of `prepare-mels`: journal, shard writer, crash recovery, finalisation.

The writer stores each finished track's frames, in plan order, back to back in shard files of at
most the shard size (through np.memmap) and appends one checksummed line per track to
_work/journal, fsynced in groups after the shard. After a kill, `recover` reads the journal up
to its first torn line, cuts the shard back to the last committed track and the run goes on;
the packing depends only on the plan, so the result is byte-identical to an uninterrupted run.
A full shard is sealed: its sha256 and the training-split sums (for stats.json) are read back
and journalled. `finalize` writes index, labels, stats, errors, report and, last, the manifest,
each atomically, then removes _work (discard_work). A present manifest means "finished" whatever
else is there, so a kill during that removal can never send a rerun back to the shards. Used by
both prepare_mels and merge_datasets.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from maest_cli.audio.frontend import FRONTEND, HOP_SIZE, SAMPLE_RATE
from maest_cli.io.artefacts import (
    atomic_path,
    sha256_file,
    tool_versions,
    write_atomic,
    write_json,
)
from maest_cli.mels.dataset import (
    ERRORS,
    FORMAT,
    FORMAT_VERSION,
    FRAME_BYTES,
    INDEX,
    INDEX_SCHEMA,
    LABEL_PROBLEMS,
    LABELS,
    MANIFEST,
    N_MELS,
    REPORT,
    SHARD_DIR,
    STATS,
    WORK_DIR,
    WORK_TRASH,
    DatasetError,
    is_finished,
    shard_file,
    stats_from_sums,
)
from maest_cli.mels.labels import SPLITS

JOURNAL_MAGIC = "maest-mels-journal"

SECONDS_PER_FRAME = HOP_SIZE / SAMPLE_RATE

# ------------------------------------------------------------------ tables (atomic: artefacts.py)

def write_parquet(path: Path, table: pa.Table) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _tsv_field(x) -> str:
    return " ".join(str(x).split())


def write_tsv(path: Path, header: list[str], rows) -> None:
    lines = ["\t".join(header)] + ["\t".join(_tsv_field(x) for x in r) for r in rows]
    write_atomic(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------ journal

@dataclass
class Journal:
    """What _work/journal says is done. Items are the part's plan rows, in order."""

    n_items: int = 0
    item_start: array = field(default_factory=lambda: array("q"))  # byte position of each item's line
    ok_item: array = field(default_factory=lambda: array("q"))
    shard: array = field(default_factory=lambda: array("q"))
    offset: array = field(default_factory=lambda: array("q"))
    n_frames: array = field(default_factory=lambda: array("q"))
    crc: array = field(default_factory=lambda: array("q"))
    duration: array = field(default_factory=lambda: array("d"))
    start: array = field(default_factory=lambda: array("d"))
    errors: list = field(default_factory=list)  # (item, stage, reason)
    seals: dict = field(default_factory=dict)  # shard -> {"bytes", "sha256", "n", "sum", "sumsq", "at"}
    valid_bytes: int = 0

    def position(self) -> tuple[int, int]:
        """(shard, byte offset) where the next track goes."""
        if not self.ok_item:
            return 0, 0
        return self.shard[-1], self.offset[-1] + self.n_frames[-1] * FRAME_BYTES


def _line(fields) -> bytes:
    body = "\t".join(str(f) for f in fields)
    return f"{body}\t{zlib.crc32(body.encode()):08x}\n".encode()


def read_journal(path: Path, plan_digest: str) -> Journal:
    """Parse the journal up to its first torn or damaged line (a kill can leave half a line)."""
    j = Journal()
    if not path.exists():
        return j
    pos = 0
    with open(path, "rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):
                break
            try:
                body, _, crc = raw[:-1].decode("utf-8").rpartition("\t")
            except UnicodeDecodeError:
                break
            if crc != f"{zlib.crc32(body.encode()):08x}":
                break
            x = body.split("\t")
            try:
                if pos == 0:
                    if x[:2] != [JOURNAL_MAGIC, "1"]:
                        break
                    if x[2:] != [plan_digest]:
                        raise DatasetError(f"{path}: journal of another plan; remove {path.parent} to start over")
                elif x[0] in ("ok", "err"):
                    if int(x[1]) != j.n_items:
                        break
                    j.item_start.append(pos)
                    if x[0] == "ok":
                        j.ok_item.append(j.n_items)
                        for arr, v in zip((j.shard, j.offset, j.n_frames, j.crc), x[3:7]):
                            arr.append(int(v))
                        j.duration.append(float(x[7]))
                        j.start.append(float(x[8]))
                    else:
                        j.errors.append((j.n_items, x[3], x[4]))
                    j.n_items += 1
                elif x[0] == "seal":
                    j.seals[int(x[1])] = {**json.loads(x[2]), "at": pos}
                else:
                    break
            except (ValueError, IndexError):
                break
            pos += len(raw)
    j.valid_bytes = pos
    return j


def _shard_sums(path: Path, extents: list[tuple[int, int]],
                chunk: int = 1 << 15) -> tuple[int, np.ndarray, np.ndarray]:
    """Frame count and per-band sum and sum of squares (float64) of the given (offset, frames),
    read back from the stored float16 so that every way of building a dataset agrees."""
    n, total, total_sq = 0, np.zeros(N_MELS), np.zeros(N_MELS)
    if extents:
        mm = np.memmap(path, dtype=np.float16, mode="r").reshape(-1, N_MELS)
        for off, k in extents:
            for first in range(off // FRAME_BYTES, off // FRAME_BYTES + k, chunk):
                x = np.asarray(mm[first: min(first + chunk, off // FRAME_BYTES + k)], np.float64)
                n, total, total_sq = n + len(x), total + x.sum(0), total_sq + np.square(x).sum(0)
        del mm
    return n, total, total_sq


class ShardWriter:
    """The one writer: frames of finished tracks into shards, a journal line per track.

    Commits (fsync of the shard, then the journal lines, then fsync of the journal) happen every
    `commit_every` tracks or `commit_seconds`, at every seal and at the end; what a kill loses
    since the last commit is redone on resume.
    """

    def __init__(self, out: Path, limit: int, journal: Journal, is_train: np.ndarray, plan_rows: np.ndarray,
                 commit_every: int = 64, commit_seconds: float = 5.0):
        self.out, self.limit, self.is_train, self.plan_rows = out, limit, is_train, plan_rows
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self.shard, self.offset = journal.position()
        self.item = journal.n_items
        self.extents = [(journal.offset[i], journal.n_frames[i]) for i in range(len(journal.ok_item))
                        if journal.shard[i] == self.shard and is_train[journal.ok_item[i]]]
        self._file = None
        self._pending: list[bytes] = []
        self._last_commit = time.monotonic()
        self._journal = open(out / WORK_DIR / "journal", "ab")

    def _open_shard(self) -> None:
        path = self.out / shard_file(self.shard)
        self._file = open(path, "r+b" if path.exists() else "w+b")

    def write(self, result: tuple) -> tuple[int, int] | None:
        """Store one plan item's result; returns (shard, offset) of stored frames."""
        k, row = self.item, int(self.plan_rows[self.item])
        self.item += 1
        if result[0] != "ok":
            self._pending.append(_line(["err", k, row, _tsv_field(result[1]), _tsv_field(result[2])]))
            self._maybe_commit()
            return None
        frames, duration, start = result[1], result[2], result[3]
        nbytes = frames.shape[0] * FRAME_BYTES
        if self.offset and self.offset + nbytes > self.limit:
            self.seal()
            self.shard, self.offset, self.extents = self.shard + 1, 0, []
        if self._file is None:
            self._open_shard()
        os.ftruncate(self._file.fileno(), self.offset + nbytes)
        mm = np.memmap(self._file, dtype=np.float16, mode="r+", offset=self.offset, shape=frames.shape)
        mm[:] = frames
        del mm
        crc = zlib.crc32(np.ascontiguousarray(frames, np.float16))
        self._pending.append(_line(["ok", k, row, self.shard, self.offset, frames.shape[0], crc,
                                    repr(float(duration)), repr(float(start))]))
        if self.is_train[k]:
            self.extents.append((self.offset, frames.shape[0]))
        where = (self.shard, self.offset)
        self.offset += nbytes
        self._maybe_commit()
        return where

    def _maybe_commit(self) -> None:
        if len(self._pending) >= self.commit_every or time.monotonic() - self._last_commit >= self.commit_seconds:
            self.commit()

    def commit(self) -> None:
        if self._file is not None:
            os.fsync(self._file.fileno())
        if self._pending:
            self._journal.write(b"".join(self._pending))
            self._journal.flush()
            os.fsync(self._journal.fileno())
            self._pending = []
        self._last_commit = time.monotonic()

    def seal(self) -> None:
        """Close the current shard: journal its size, sha256 and training-split sums."""
        self.commit()
        if self._file is not None:
            self._file.close()
            self._file = None
        path = self.out / shard_file(self.shard)
        if not path.exists():
            return
        self._pending.append(_seal_line(path, self.shard, self.extents))
        self.commit()

    def close(self) -> None:
        self.commit()
        if self._file is not None:
            self._file.close()
        self._journal.close()


def _seal_line(path: Path, shard: int, extents: list[tuple[int, int]]) -> bytes:
    n, total, total_sq = _shard_sums(path, extents)
    info = {"bytes": path.stat().st_size, "sha256": sha256_file(path), "n": n,
            "sum": total.tolist(), "sumsq": total_sq.tolist()}
    return _line(["seal", shard, json.dumps(info, separators=(",", ":"))])


# ------------------------------------------------------------------ the run

def dir_state(out: Path) -> str:
    """finished (a manifest: whatever work files a kill left are leftovers, see discard_work),
    unfinished (a plan in _work), unplanned (killed while planning), new, or foreign."""
    if is_finished(out):
        return "finished"
    if (out / WORK_DIR / "plan.json").is_file():
        return "unfinished"
    if (out / WORK_DIR).exists():
        return "unplanned"
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return "new"
    return "foreign"


def discard_work(out: Path) -> None:
    """Remove _work once the manifest is written: one rename takes journal and plan away
    together (a rerun never sees one without the other), then the renamed directory is deleted.
    Also removes what a kill of an earlier removal left, and temp files of killed atomic writes."""
    _fsync_dir(out)  # the manifest's rename is on disk before _work goes
    if (out / WORK_DIR).exists():
        shutil.rmtree(out / WORK_TRASH, ignore_errors=True)
        os.replace(out / WORK_DIR, out / WORK_TRASH)
        _fsync_dir(out)
    shutil.rmtree(out / WORK_TRASH, ignore_errors=True)
    for name in (INDEX, LABELS, STATS, ERRORS, REPORT, MANIFEST, LABEL_PROBLEMS):
        for tmp in out.glob(f".{name}.tmp*"):
            tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_fresh(out: Path) -> None:
    """Remove what an interrupted planning left (only our own files) and make the directories."""
    shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    shutil.rmtree(out / WORK_TRASH, ignore_errors=True)
    for p in (out / SHARD_DIR).glob("mels-*.f16") if (out / SHARD_DIR).is_dir() else []:
        p.unlink()
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    (out / SHARD_DIR).mkdir(exist_ok=True)


def recover(out: Path, info: dict) -> Journal:
    """Bring _work and the shards back to the last committed track before going on.

    Drops a torn journal tail, seals of the shard still being written (it will get more tracks),
    tracks of that shard whose bytes are not on disk as journalled, shard files beyond it and
    bytes after its last track.
    """
    path = out / WORK_DIR / "journal"
    digest = info["plan_sha256"]
    while True:
        if not path.exists() or path.stat().st_size == 0:
            write_atomic(path, _line([JOURNAL_MAGIC, "1", digest]))
        j = read_journal(path, digest)
        cut = j.valid_bytes
        shard, end = j.position()
        stale = [s["at"] for k, s in j.seals.items() if k >= shard]
        if stale:
            cut = min(cut, min(stale))
        spath = out / shard_file(shard)
        size = spath.stat().st_size if spath.exists() else 0
        for i in range(len(j.ok_item)):
            if j.shard[i] != shard:
                continue
            off, nb = j.offset[i], j.n_frames[i] * FRAME_BYTES
            bad = off + nb > size
            if not bad:
                with open(spath, "rb") as f:
                    f.seek(off)
                    bad = zlib.crc32(f.read(nb)) != j.crc[i]
            if bad:
                cut = min(cut, j.item_start[j.ok_item[i]])
                break
        if cut >= os.path.getsize(path):
            break
        with open(path, "r+b") as f:
            f.truncate(cut)
            os.fsync(f.fileno())
    for p in (out / SHARD_DIR).glob("mels-*.f16"):
        k = int(p.stem.split("-")[1])
        if k > shard or (k == shard and end == 0):
            p.unlink()
    if end and (out / shard_file(shard)).exists():
        with open(out / shard_file(shard), "r+b") as f:
            f.truncate(end)
    return j


def finalize(out: Path, info: dict, items: pa.Table, carried_errors: list | None = None) -> dict:
    """Seal what is unsealed, then write index, labels, stats, errors, report, manifest (last)."""
    digest = info["plan_sha256"]
    j = read_journal(out / WORK_DIR / "journal", digest)
    if j.n_items != items.num_rows:
        raise DatasetError(f"{out}: journal has {j.n_items} of {items.num_rows} tracks; cannot finalise")
    is_train = np.asarray(items["split"].to_pylist()) == "train" if items.num_rows else np.zeros(0, bool)
    n_shards = (max(j.shard) + 1) if j.ok_item else 0
    ok = np.asarray(j.ok_item, np.int64)
    shard_col = np.asarray(j.shard, np.int64)
    offset_col = np.asarray(j.offset, np.int64)
    nf_col = np.asarray(j.n_frames, np.int64)
    new_seals = []
    for s in range(n_shards):
        path = out / shard_file(s)
        seal = j.seals.get(s)
        if seal is None or seal["bytes"] != path.stat().st_size:
            sel = (shard_col == s) & is_train[ok]
            new_seals.append(_seal_line(path, s, list(zip(offset_col[sel].tolist(), nf_col[sel].tolist()))))
    if new_seals:
        with open(out / WORK_DIR / "journal", "ab") as f:
            f.write(b"".join(new_seals))
            f.flush()
            os.fsync(f.fileno())
        j = read_journal(out / WORK_DIR / "journal", digest)

    index = items.take(pa.array(ok, pa.int64()))
    extra = {"shard": pa.array(shard_col, pa.int32()), "offset": pa.array(offset_col, pa.int64()),
             "n_frames": pa.array(nf_col, pa.int32()), "crc32": pa.array(np.asarray(j.crc, np.int64)),
             "duration_s": pa.array(np.asarray(j.duration, np.float64)),
             "start_s": pa.array(np.asarray(j.start, np.float64))}
    index = pa.table({f.name: (extra[f.name] if f.name in extra else index[f.name]) for f in INDEX_SCHEMA},
                     schema=INDEX_SCHEMA)

    vocab = info["vocabulary"]
    n = sum(j.seals[s]["n"] for s in range(n_shards))
    total = sum((np.asarray(j.seals[s]["sum"]) for s in range(n_shards)), np.zeros(N_MELS))
    total_sq = sum((np.asarray(j.seals[s]["sumsq"]) for s in range(n_shards)), np.zeros(N_MELS))
    stats = {"split": "train", "frames": int(n), **stats_from_sums(n, total, total_sq),
             "normalisation": "(x - mean) / (2 * std), as the official models do",
             "official": {"mean": FRONTEND.norm_mean, "std": FRONTEND.norm_std},
             "tracks_per_split": {}, "label_counts": {}}
    for s in SPLITS:
        rows = index.filter(pc.equal(index["split"], s))
        flat = pc.list_flatten(rows["labels"]).to_numpy(zero_copy_only=False).astype(np.int64)
        stats["tracks_per_split"][s] = rows.num_rows
        stats["label_counts"][s] = np.bincount(flat, minlength=len(vocab)).tolist()

    item_rows = items["plan_row"].to_pylist()
    item_paths = items["path"].to_pylist()
    errors = [(item_rows[k], item_paths[k], stage, reason) for k, stage, reason in j.errors]
    errors = sorted(errors + [tuple(e) for e in carried_errors or []])
    shards = []
    for s in range(n_shards):
        sel = shard_col == s
        shards.append({"file": shard_file(s), "bytes": j.seals[s]["bytes"], "sha256": j.seals[s]["sha256"],
                       "tracks": int(sel.sum()), "frames": int(nf_col[sel].sum())})
    report = {**info["report"], "written": index.num_rows, "written_per_split": stats["tracks_per_split"],
              "failed": len(errors), "shards": n_shards,
              "bytes": int(sum(s["bytes"] for s in shards)), "frames": int(nf_col.sum())}

    write_parquet(out / INDEX, index)
    write_atomic(out / LABELS, "".join(f"{t}\n" for t in vocab))
    write_json(out / STATS, stats)
    write_tsv(out / ERRORS, ["plan_row", "path", "stage", "reason"], errors)
    write_json(out / REPORT, report)
    write_json(out / MANIFEST, _manifest(info, index.num_rows, len(errors), shards))
    discard_work(out)
    return report


def _manifest(info: dict, n_tracks: int, n_failed: int, shards: list[dict]) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "created": info["created"],
            "tool": "maest prepare-mels", "versions": tool_versions(), "frontend": FRONTEND.to_dict(),
            "dtype": "float16", "layout": f"[frames, {N_MELS}] row-major, tracks back to back",
            "frame_bytes": FRAME_BYTES, "frame_seconds": SECONDS_PER_FRAME,
            "values": "unnormalised log-mel log10(1 + 10000 x); normalise with stats.json",
            "crop": info["options"]["crop"], "options": info["options"], "part": info.get("part"),
            "plan_sha256": info["plan_sha256"], "merged_from": info.get("merged_from"),
            "n_tracks": n_tracks, "n_failed": n_failed, "n_labels": len(info["vocabulary"]), "shards": shards}


def run_plan(out: Path, info: dict, items: pa.Table, produce: Callable[[int], Iterator[tuple]],
             progress: bool, commit_every: int, commit_seconds: float) -> dict:
    """Resume or start the journal, store every item's result, finalise. Returns run facts."""
    journal = recover(out, info)
    resumed_at = journal.n_items
    is_train = (np.asarray(items["split"].to_pylist()) == "train") if items.num_rows else np.zeros(0, bool)
    writer = ShardWriter(out, info["options"]["shard_size"], journal, is_train,
                         np.asarray(items["plan_row"].to_pylist(), np.int64), commit_every, commit_seconds)
    paths = items["path"].to_pylist()
    t0 = last = time.monotonic()
    done, failed, frames = 0, 0, 0
    try:
        for result in produce(resumed_at):
            k = writer.item
            writer.write(result)
            done += 1
            if result[0] == "ok":
                frames += result[1].shape[0]
            else:
                failed += 1
                if progress:
                    print(f"maest: {paths[k]}: {result[2]} ({result[1]})", file=sys.stderr)
            if progress and time.monotonic() - last > 10:
                last = time.monotonic()
                rate = frames * SECONDS_PER_FRAME / 60 / max(last - t0, 1e-9)
                print(f"prepare-mels: {resumed_at + done}/{items.num_rows} tracks, {failed} failed, "
                      f"{rate:.2f} audio-min/s, shard {writer.shard}", file=sys.stderr)
        writer.seal()
    finally:
        writer.close()
    elapsed = time.monotonic() - t0
    report = finalize(out, info, items, info.get("carried_errors"))
    return {**report, "out": str(out), "resumed_from": resumed_at, "elapsed_s": round(elapsed, 3),
            "audio_minutes_per_s": round(frames * SECONDS_PER_FRAME / 60 / elapsed, 3) if elapsed > 0 else None}
