"""`maest prepare-mels`: audio files -> sharded float16 log-mel memmaps with an index.

A run is a plan, then the writer (melwriter.py):
- plan: the audio files under the root, paired with their labels (labels.py), sorted by path,
  split into train/validation/test (from the label files, else artist-disjoint from a seed).
  Computed over the whole input, so every `--shard I/N` part agrees on it; stored in
  DATASET_DIR/_work, so a rerun after a kill goes on with the same plan.
- decode: `--workers` processes (io/workers.py's WorkerPool) decode and compute the mel of each
  track; results come back in plan order whatever the timing, and one writer stores them. A
  decoder that dies (segfault, out-of-memory kill) fails its track, not the run (_decode_all).
`merge_datasets` joins the parts of one plan through the same writer. The dataset format and
its reader are in meldataset.py.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import re
import shutil
import sys
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from maest_cli.audio.decode import AUDIO_EXTENSIONS, AudioError, audio_info, iter_audio
from maest_cli.audio.frontend import SAMPLE_RATE, StreamingMel, file_mel
from maest_cli.audio.walk import WalkProblem, find_audio_files
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file, write_json
from maest_cli.io.config import read_labels
from maest_cli.io.workers import TaskDied, WorkerPool
from maest_cli.mels.dataset import (
    ERRORS,
    FRAME_BYTES,
    INDEX_SCHEMA,
    LABEL_PROBLEMS,
    MANIFEST,
    REPORT,
    WORK_DIR,
    DatasetError,
    MelDataset,
    verify_dataset,
)
from maest_cli.mels.labels import (
    SPLITS,
    LabelProblem,
    match_audio,
    mtt_directory_split,
    read_label_files,
)
from maest_cli.mels.writer import (
    dir_state,
    discard_work,
    run_plan,
    start_fresh,
    write_parquet,
    write_tsv,
)

__all__ = ["prepare_mels", "merge_datasets", "verify_dataset", "MelDataset", "Crop", "parse_size",
           "assign_splits", "build_plan", "decode_track"]

SPLIT_BY = ("artist", "none", "mtt-directory")


# ------------------------------------------------------------------ options

@dataclass(frozen=True)
class Crop:
    """What of each track is stored: the central `seconds`, or the whole file (mode 'full')."""

    mode: str
    seconds: float | None = None

    @classmethod
    def parse(cls, text: str) -> Crop:
        text = text.strip().lower()
        if text == "full":
            return cls("full")
        m = re.fullmatch(r"center:(\d+(?:\.\d*)?)", text)
        if not m or float(m.group(1)) <= 0:
            raise UsageError(f"--crop {text!r}: expected full or center:SECONDS (e.g. center:30)")
        return cls("center", float(m.group(1)))

    def window(self, duration_s: float) -> tuple[float, float | None]:
        """(start, length) to decode; a track no longer than the crop is stored whole."""
        if self.mode == "full" or duration_s <= self.seconds:
            return 0.0, None
        return (duration_s - self.seconds) / 2.0, self.seconds

    def __str__(self) -> str:
        return "full" if self.mode == "full" else f"center:{self.seconds:g}"


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "k": 2**10, "kib": 2**10, "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "tib": 2**40}


def parse_size(text: str | int) -> int:
    """'2GB' -> 2e9 bytes ('2GiB' -> 2**31); at least one frame (192 bytes)."""
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([a-zA-Z]*)\s*", text)
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"--shard-size {text!r}: expected a size such as 2GB, 512MB or 1GiB")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size < FRAME_BYTES:
        raise UsageError(f"--shard-size {text!r}: smaller than one frame ({FRAME_BYTES} bytes)")
    return size


def parse_part(text: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """'2/4' -> (2, 4): the second of four parts of the input list (1-based)."""
    if text is None:
        return None
    if isinstance(text, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if not m:
            raise UsageError(f"--shard {text!r}: expected I/N, e.g. 1/4")
        text = (int(m.group(1)), int(m.group(2)))
    i, n = text
    if not 1 <= i <= n:
        raise UsageError(f"--shard {i}/{n}: I must be between 1 and N")
    return (i, n)


# ------------------------------------------------------------------ plan

@dataclass
class Scan:
    """The audio files under a root, and what the walk passed over or could not enter."""

    paths: list[str]  # relative to the root, '/'-separated text (bad bytes escaped), sorted
    sources: list[bytes]  # the same files' real relative names on disk, to open them
    hidden: int  # hidden entries skipped
    other: dict[str, int]  # other files by extension
    problems: list[WalkProblem]  # symlink loops (not followed), unreadable directories


def scan_audio(root: Path) -> Scan:
    """Audio files under root, through the walker extract uses (walk.py): sorted, symlink
    loops reported and not followed, unreadable directories reported. Hidden and other files
    are counted (so that, say, a folder of .m4a files is reported rather than silently empty)."""
    skipped: Counter = Counter()
    found, problems = find_audio_files([root], AUDIO_EXTENSIONS, skipped)
    base = os.path.abspath(root)
    sources = [os.fsencode(os.path.relpath(f.full_path, base)) for f in found]
    hidden = skipped.pop("hidden", 0)
    return Scan([f.path for f in found], sources, hidden, dict(sorted(skipped.items())), problems)


def assign_splits(paths: list[str], artists: list[str], given: list[str], split_by: str,
                  val_fraction: float, test_fraction: float, seed: int) -> list[str]:
    """A split for every track: the one given, else by rule. 'artist' keeps each artist in one
    split (tracks without an artist stand alone); groups are shuffled with `seed` and filled into
    test, then validation, up to their fractions of the tracks, the rest is train."""
    splits = list(given)
    todo = [i for i, s in enumerate(splits) if not s]
    if not todo:
        return splits
    if split_by == "mtt-directory":
        for i in todo:
            splits[i] = mtt_directory_split(paths[i])
        return splits
    group_of = {i: (f"artist:{artists[i]}" if split_by == "artist" and artists[i] else f"track:{paths[i]}")
                for i in todo}
    sizes = Counter(group_of.values())
    groups = sorted(sizes)
    order = np.random.default_rng(seed).permutation(len(groups))
    want_test, want_val = round(test_fraction * len(todo)), round(val_fraction * len(todo))
    n_test = n_val = 0
    chosen = {}
    for g in (groups[j] for j in order):
        if n_test < want_test:
            chosen[g], n_test = "test", n_test + sizes[g]
        elif n_val < want_val:
            chosen[g], n_val = "validation", n_val + sizes[g]
        else:
            chosen[g] = "train"
    for i in todo:
        splits[i] = chosen[group_of[i]]
    return splits


@dataclass
class Plan:
    table: pa.Table  # PLAN_SCHEMA + SOURCE: the whole input, sorted by path
    vocabulary: list[str]
    report: dict
    problems: list[LabelProblem] = field(default_factory=list)
    walk_errors: list[list] = field(default_factory=list)  # errors.tsv rows of unreadable directories


PLAN_SCHEMA = pa.schema([f for f in INDEX_SCHEMA if f.name in
                         ("plan_row", "track_id", "path", "split", "artist", "labels")])
SOURCE = "source"  # plan column (not in the index): the file's real relative name, as bytes
WALK_ROW = -1  # plan_row of an errors.tsv line about a directory rather than a track


def build_plan(audio_root: Path, labels: list[str] | None, vocabulary: list[str] | None, top_k: int,
               split_by: str, val_fraction: float, test_fraction: float, seed: int) -> Plan:
    """Every track to store, with labels and split, in path order, plus what did not match."""
    scan = scan_audio(audio_root)
    audio = scan.paths
    report: dict = {"audio_files": len(audio), "hidden_files_skipped": scan.hidden,
                    "other_files_by_extension": scan.other,
                    "walk_problems": [{"path": w.path, "reason": w.reason, "inputs_missed": w.failed}
                                      for w in scan.problems]}
    problems: list[LabelProblem] = []
    if labels:
        table = read_label_files(labels, vocabulary, top_k)
        matching = match_audio(table.rows, audio)
        problems = table.problems + matching.problems
        vocab = table.vocabulary
        paths = [a for a, _ in matching.pairs]
        rows = [r for _, r in matching.pairs]
        index_of = {t: i for i, t in enumerate(vocab)}
        label_idx = [sorted({index_of[t] for t in r.tags if t in index_of}) for r in rows]
        track_ids, artists, given = [r.track_id for r in rows], [r.artist for r in rows], [r.split for r in rows]
        report.update({"label_format": table.format, "label_files": table.files, "label_rows": len(table.rows),
                       "label_rows_without_audio": matching.without_audio,
                       "audio_without_labels": matching.audio_without_labels,
                       "malformed_label_rows": sum(p.kind == "malformed_row" for p in problems),
                       "conflicting_label_rows": sum(p.kind == "conflicting_rows" for p in problems),
                       "unknown_tags": dict(sorted(table.unknown_tags.items()))})
    else:
        vocab = list(vocabulary or [])
        paths, label_idx = audio, [[] for _ in audio]
        track_ids, artists, given = list(audio), [""] * len(audio), [""] * len(audio)
        report.update({"label_format": "none"})
    splits = assign_splits(paths, artists, given, split_by, val_fraction, test_fraction, seed)
    n_given = sum(bool(s) for s in given)
    drawn = {"artist": f"artist-disjoint draw (seed {seed})", "none": f"draw by track (seed {seed})",
             "mtt-directory": "MagnaTagATune directory rule"}[split_by]
    report["split_source"] = ("label files" if paths and n_given == len(paths) else
                              drawn if n_given == 0 else f"label files ({n_given} tracks), {drawn} (rest)")
    report["tracks_without_artist"] = sum(not a for a in artists)
    report["tracks"] = len(paths)
    report["tracks_without_tags"] = sum(not x for x in label_idx)
    report["tracks_per_split"] = {s: splits.count(s) for s in SPLITS}
    arrow = pa.table({"plan_row": pa.array(range(len(paths)), pa.int64()), "track_id": track_ids, "path": paths,
                      "split": splits, "artist": artists, "labels": pa.array(label_idx, pa.list_(pa.int32()))},
                     schema=PLAN_SCHEMA)
    source_of = dict(zip(scan.paths, scan.sources))
    arrow = arrow.append_column(SOURCE, pa.array([source_of[p] for p in paths], pa.binary()))
    walk_errors = [[WALK_ROW, w.path, "walk", w.reason] for w in scan.problems if w.failed]
    return Plan(arrow, vocab, report, problems, walk_errors)


def plan_sha256(table: pa.Table, vocabulary: list[str]) -> str:
    """A digest of the plan's content (not of its parquet bytes), to tell parts of one plan apart."""
    h = hashlib.sha256(json.dumps(vocabulary).encode())
    for batch in table.select(["path", "track_id", "split", "artist", "labels"]).to_batches(65536):
        for row in zip(*(c.to_pylist() for c in batch.columns)):
            h.update(json.dumps(row).encode() + b"\n")
    return h.hexdigest()


# ------------------------------------------------------------------ decoding (runs in workers)

def decode_track(path: str, crop: Crop) -> tuple:
    """('ok', float16 [frames, 96], source duration s, crop start s) or ('err', stage, reason).

    The crop is decoded alone where the format seeks; where the header has no length or the
    file cannot seek, the file is decoded from its start instead (_decode_without_seeking),
    giving the same frames. Never raises for a bad file: one track must not stop a catalogue run.
    """
    try:
        info = audio_info(path)
        if info.duration_s > 0:
            start, length = crop_window(crop, info.duration_s, info.sample_rate)
            try:
                return _checked(file_mel(path, start, length), info.duration_s, start)
            except AudioError as e:
                if "seek" not in e.reason:
                    raise
        return _decode_without_seeking(path, crop, info.sample_rate)
    except AudioError as e:
        return ("err", e.stage, e.reason)
    except MemoryError:
        return ("err", "decode", "out of memory")
    except Exception as e:  # noqa: BLE001 - reported in errors.tsv, the run goes on
        return ("err", "internal", f"{type(e).__name__}: {e}")


def crop_window(crop: Crop, duration_s: float, sample_rate: int) -> tuple[float, float | None]:
    """Crop.window with the start snapped to the grid on which audio.iter_audio can start an
    excerpt exactly (1/gcd(rate, 16000) s: 10 ms at 44.1 kHz), so the recorded start_s is where
    the stored frames really begin, and both decoding paths cut the same samples."""
    start, length = crop.window(duration_s)
    if length is not None:
        grid = math.gcd(int(sample_rate), SAMPLE_RATE)
        start = round(start * grid) / grid
    return start, length


def _checked(mel: np.ndarray, duration: float, start: float) -> tuple:
    if len(mel) == 0:
        return ("err", "mel", "no frames")
    half = mel.astype(np.float16)
    if not np.isfinite(half).all():
        return ("err", "mel", "NaN or infinite log-mel values")
    return ("ok", half, float(duration), float(start))


def _decode_without_seeking(path: str, crop: Crop, sample_rate: int) -> tuple:
    """For a file whose header has no length, or that cannot seek: decode it from the start,
    once to count its samples (the crop is central, so the length must be known first), once
    to keep the crop's samples. The frames are those the seeking path makes: the mel of the
    crop's samples alone, zero-padded at its edges (not the whole track's frames cut at the crop,
    whose edge frames would see audio outside it). Memory stays flat; the cost is two decodes,
    for files that are rare."""
    if crop.mode == "full":
        mel, n = _excerpt_mel(path, 0, None)
        return _checked(mel, n / SAMPLE_RATE, 0.0)
    duration = sum(len(block) for block in iter_audio(path)) / SAMPLE_RATE
    start, length = crop_window(crop, duration, sample_rate)
    first = round(start * SAMPLE_RATE)
    mel, _ = _excerpt_mel(path, first, None if length is None else round(length * SAMPLE_RATE))
    return _checked(mel, duration, start)


def _excerpt_mel(path: str, first: int, count: int | None) -> tuple[np.ndarray, int]:
    """Log-mel of samples [first, first + count) (count None: to the end) of the file decoded
    from its start, and the number of samples decoded."""
    stream, parts, pos = StreamingMel(), [], 0
    end = None if count is None else first + count
    for block in iter_audio(path):
        lo, hi = max(first - pos, 0), len(block) if end is None else min(end - pos, len(block))
        pos += len(block)
        if lo < hi:
            parts.append(stream.feed(block[lo:hi]))
        if end is not None and pos >= end:
            break
    parts.append(stream.finish())
    return np.concatenate(parts), pos


def _set_up_decoder() -> None:
    """A decoder process's start: the mel on one torch thread, so the bytes cannot depend on --workers."""
    import torch

    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


DECODER_IDLE_S = 300  # idle decoder processes exit after this
_decoders: WorkerPool | None = None


def decoder_pool(workers: int) -> WorkerPool:
    """The decoder processes, kept between calls (idle ones exit after DECODER_IDLE_S): the same
    worker count finds the same running processes, so _start_decoders, _decode_all and the mels
    bench share them. A pool the crash policy stopped is replaced."""
    global _decoders
    if _decoders is None or _decoders.broken or _decoders.workers != workers:
        if _decoders is not None:
            _decoders.shutdown(wait=False)
        _decoders = WorkerPool(workers, role="decoder", doing="while decoding this file",
                               initializer=_set_up_decoder, idle_timeout=DECODER_IDLE_S)
    return _decoders


def _start_decoders(workers: int) -> None:
    """Start the decoder processes now (each imports the frontend, torch: about 1.5 s), so that
    this happens while the main process plans rather than before the first track."""
    decoder_pool(workers)


def _decode_all(paths: list[str], crop: Crop, workers: int) -> Callable[[int], Iterator[tuple]]:
    """The decode results of plan items `start`... (full paths), in plan order.

    Decoding always runs in `workers` child processes, even for --workers 1: a decoder that
    segfaults or is killed for memory then takes down its process, not the run, and the death
    is seen at its cause. (Journalling an "attempting" marker before decoding in the main process
    cannot tell such a crash from the user killing the run, which must resume without losing
    the track.) A death costs what the crash policy of every pool says (io/workers.py): the
    track is decoded again, a track that keeps killing its decoder is failed, and decoders
    dying track after track stop the run (WorkersDied) with what came before journalled, so a
    rerun goes on.
    """
    def produce(start: int) -> Iterator[tuple]:
        task = decode_track  # looked up per run (a test swaps in one that crashes)
        pool = decoder_pool(workers)
        n, k = len(paths), start
        window: deque = deque()  # futures of items k, k + 1, ... in order
        try:
            while k < n:
                while len(window) < 2 * workers and k + len(window) < n:
                    path = paths[k + len(window)]
                    window.append(pool.submit_task(task, (path, crop), label=path))
                try:
                    result = window[0].result()
                except TaskDied as e:
                    result = ("err", "decode", e.reason)
                window.popleft()
                yield result
                k += 1
        finally:
            for f in window:
                f.cancel()
    return produce


# ------------------------------------------------------------------ the API

def _check_options(crop, split_by, val_fraction, test_fraction, workers, top_k) -> Crop:
    if split_by not in SPLIT_BY:
        raise UsageError(f"--split-by {split_by!r}: expected one of {', '.join(SPLIT_BY)}")
    for name, v in (("--val-fraction", val_fraction), ("--test-fraction", test_fraction)):
        if not 0.0 <= v < 1.0:
            raise UsageError(f"{name} {v}: expected a fraction in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise UsageError("--val-fraction + --test-fraction must leave some training data (sum < 1)")
    if workers < 1:
        raise UsageError(f"--workers {workers}: expected 1 or more")
    if top_k < 1:
        raise UsageError(f"--top-k {top_k}: expected 1 or more")
    return crop if isinstance(crop, Crop) else Crop.parse(crop)


def prepare_mels(
    audio_root: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | list | None = None,
    vocabulary: str | list[str] | None = None,
    top_k: int = 50,
    crop: str | Crop = "center:30",
    shard_size: str | int = "2GB",
    workers: int = 1,
    split_by: str = "artist",
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    shard: str | tuple[int, int] | None = None,
    seed: int = 0,
    progress: bool = True,
    commit_every: int = 64,
    commit_seconds: float = 5.0,
) -> dict:
    """Build (or finish, after a kill) a mel dataset in `out` from the audio under `audio_root`.

    `labels`: one or more label files (TSV, MTG-Jamendo split files, MagnaTagATune CSV);
    `vocabulary`: a label list name or path (or list) fixing the label order; `shard`: 'I/N'
    to do part I of N of the input (join with merge_datasets). Returns the counts of
    report.json plus run facts; `failed` > 0 means some audio could not be decoded (errors.tsv).
    """
    crop = _check_options(crop, split_by, val_fraction, test_fraction, workers, top_k)
    root, out = Path(audio_root), Path(out)
    if not root.is_dir():
        raise UsageError(f"{root}: not a directory of audio files")
    label_files = [labels] if isinstance(labels, (str, os.PathLike)) else list(labels or [])
    vocab_list = None
    if vocabulary is not None:

        vocab_list = list(vocabulary) if isinstance(vocabulary, (list, tuple)) else read_labels(str(vocabulary))
    part = parse_part(shard)
    options = {"audio_root": str(root.resolve()), "labels": [str(Path(p).resolve()) for p in label_files],
               "labels_sha256": [sha256_file(p) if Path(p).is_file() else None for p in label_files],
               "vocabulary_sha256": hashlib.sha256(json.dumps(vocab_list).encode()).hexdigest()
               if vocab_list is not None else None,
               "top_k": top_k, "crop": str(crop), "shard_size": parse_size(shard_size), "split_by": split_by,
               "val_fraction": val_fraction, "test_fraction": test_fraction, "seed": seed}

    state = dir_state(out)
    if state == "foreign":
        raise UsageError(f"--out {out}: not empty and not a prepare-mels dataset; choose a new directory")
    if state == "finished":
        discard_work(out)  # what a kill at the very end of finalisation left
        manifest = json.loads((out / MANIFEST).read_text())
        old = {**manifest.get("options", {}), "part": manifest.get("part")}
        new = {**options, "part": list(part) if part else None}
        if old != new:
            raise UsageError(f"--out {out}: holds a dataset made with other options ({_differences(old, new)}); "
                             f"choose a new directory")
        return {**json.loads((out / REPORT).read_text()), "out": str(out), "already_complete": True}
    _start_decoders(workers)  # their imports (torch) overlap the planning below
    if state == "unfinished":
        info = json.loads((out / WORK_DIR / "plan.json").read_text())
        old, new = {**info["options"], "part": info.get("part")}, {**options, "part": list(part) if part else None}
        if old != new:
            raise UsageError(f"--out {out}: holds an unfinished run with other options ({_differences(old, new)});"
                             f" rerun it with the same options to finish it, or choose a new directory")
        items = pq.read_table(out / WORK_DIR / "plan.parquet")
        if progress:
            print(f"prepare-mels: resuming the unfinished run in {out}", file=sys.stderr)
    else:
        start_fresh(out)
        plan = build_plan(root, label_files, vocab_list, top_k, split_by, val_fraction, test_fraction, seed)
        items = plan.table
        if part:
            rows = np.asarray(items["plan_row"].to_pylist(), np.int64)
            items = items.filter(pa.array(rows % part[1] == part[0] - 1))
        info = {"options": options, "part": list(part) if part else None,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "plan_sha256": plan_sha256(plan.table, plan.vocabulary), "vocabulary": plan.vocabulary,
                "report": {**plan.report, "tracks_in_part": items.num_rows}, "carried_errors": plan.walk_errors}
        write_tsv(out / LABEL_PROBLEMS, ["kind", "path", "detail", "where"],
                  [(p.kind, p.path, p.detail, p.where) for p in plan.problems])
        if not plan.table.num_rows:
            r = plan.report
            raise UsageError(f"{root}: no tracks to store ({r['audio_files']} audio files"
                             + (f", {r['label_rows']} label rows, none matched; see {out / LABEL_PROBLEMS}"
                                if label_files else "") + ")")
        write_parquet(out / WORK_DIR / "plan.parquet", items)
        write_json(out / WORK_DIR / "plan.json", info)  # last: its presence means "planned"
        if progress:
            _print_plan(plan.report, out, items.num_rows)
    names = (items[SOURCE].to_pylist() if SOURCE in items.column_names
             else [p.encode() for p in items["path"].to_pylist()])
    produce = _decode_all([os.path.join(root, os.fsdecode(b)) for b in names], crop, workers)
    return run_plan(out, info, items, produce, progress, commit_every, commit_seconds)


# Options that say where the inputs were on the machine that made a part: recorded, but parts
# made from the same audio and labels mounted elsewhere (other machines) still merge.
PATH_OPTIONS = ("audio_root", "labels")


def _comparable(options: dict) -> dict:
    """The options that shape the data: labels by content (sha256), crop, top_k, splits, seed."""
    return {k: v for k, v in options.items() if k not in PATH_OPTIONS}


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in keys)


def _print_plan(report: dict, out: Path, n: int) -> None:
    notes = [f"{report['tracks']} tracks ({', '.join(f'{k} {v}' for k, v in report['tracks_per_split'].items())};"
             f" splits from {report['split_source']})"]
    for key, what in (("label_rows_without_audio", "label rows without audio"),
                      ("audio_without_labels", "audio files without labels"),
                      ("malformed_label_rows", "malformed label rows"),
                      ("conflicting_label_rows", "conflicting label rows")):
        if report.get(key):
            notes.append(f"{report[key]} {what}")
    if report.get("unknown_tags"):
        notes.append(f"{len(report['unknown_tags'])} tags outside the vocabulary")
    if report.get("tracks_without_tags"):
        notes.append(f"{report['tracks_without_tags']} tracks without tags")
    if report.get("other_files_by_extension"):
        notes.append("skipped non-audio files: " + ", ".join(f"{n} {ext}" for ext, n in
                                                             report["other_files_by_extension"].items()))
    print(f"prepare-mels: {'; '.join(notes)} (details: {out / LABEL_PROBLEMS}); this run: {n} tracks",
          file=sys.stderr)
    for w in report.get("walk_problems", []):  # also in report.json; unreadable ones in errors.tsv
        print(f"maest: {w['path']}: {w['reason']} (stage: walk)", file=sys.stderr)


def merge_datasets(parts: list[str | os.PathLike], out: str | os.PathLike, *, progress: bool = True,
                   commit_every: int = 64, commit_seconds: float = 5.0) -> dict:
    """Join the --shard parts of one plan into one dataset, as one run would have made it.

    Frames are copied (each track checked against its crc32) in plan order into new shards;
    stats are recomputed from the union's training split and the result is verified. Resumable
    like prepare_mels. Returns the report plus `verify_problems` (empty when sound).
    """
    out = Path(out)
    if not parts:
        raise UsageError("--merge: give the part directories to join")
    try:
        sets = [MelDataset(p) for p in parts]
    except DatasetError as e:
        raise UsageError(f"--merge: {e}") from None
    first = sets[0].manifest
    for ds in sets:
        m = ds.manifest
        if m.get("part") is None:
            raise UsageError(f"--merge: {ds.root} is not a --shard part (it is a whole dataset)")
        if m["plan_sha256"] != first["plan_sha256"]:
            raise UsageError(f"--merge: {ds.root} comes from another input than {sets[0].root} (the plans differ: "
                             f"other audio files, labels or splits)")
        old, new = _comparable(first["options"]), _comparable(m["options"])
        if old != new:
            raise UsageError(f"--merge: {ds.root} was made with other options than {sets[0].root} "
                             f"({_differences(old, new)})")
    got = sorted(ds.manifest["part"][0] for ds in sets)
    n_parts = first["part"][1]
    if got != list(range(1, n_parts + 1)):
        raise UsageError(f"--merge: need parts 1..{n_parts} once each, got {got}")
    sets.sort(key=lambda ds: ds.manifest["part"][0])

    run_key = {"merge": [str(ds.root.resolve()) for ds in sets],
               "manifests": [sha256_file(ds.root / MANIFEST) for ds in sets],
               "inputs": [{k: ds.manifest["options"].get(k) for k in PATH_OPTIONS} for ds in sets]}
    state = dir_state(out)
    if state == "foreign":
        raise UsageError(f"--out {out}: not empty and not a prepare-mels dataset; choose a new directory")
    if state == "finished":
        discard_work(out)
        manifest = json.loads((out / MANIFEST).read_text())
        if manifest.get("merged_from") != run_key:
            raise UsageError(f"--out {out}: holds another dataset; choose a new directory")
        return {**json.loads((out / REPORT).read_text()), "out": str(out), "already_complete": True,
                "verify_problems": verify_dataset(out)}

    cols = [f.name for f in PLAN_SCHEMA]
    tables = [ds.index.select(cols).append_column("part", pa.array(np.full(len(ds), p, np.int32)))
              .append_column("part_row", pa.array(np.arange(len(ds), dtype=np.int64)))
              for p, ds in enumerate(sets)]
    merged = pa.concat_tables(tables).sort_by("plan_row")
    if len(set(merged["plan_row"].to_pylist())) != merged.num_rows:
        raise UsageError("--merge: the parts share tracks; were they made with different --shard N?")
    carried = []
    for ds in sets:
        with open(ds.root / ERRORS, encoding="utf-8") as f:
            next(f, None)
            for line in f:
                row, path, stage, reason = line.rstrip("\n").split("\t", 3)
                carried.append((int(row), path, stage, reason))
    carried = sorted(set(carried))  # every part walked the whole tree: its directory errors once

    if state == "unfinished":
        info = json.loads((out / WORK_DIR / "plan.json").read_text())
        if info.get("merged_from") != run_key:
            raise UsageError(f"--out {out}: holds an unfinished run of something else; choose a new directory")
    else:
        start_fresh(out)
        reports = [json.loads((ds.root / REPORT).read_text()) for ds in sets]
        report = {k: v for k, v in reports[0].items() if k not in
                  ("written", "written_per_split", "failed", "shards", "bytes", "frames", "tracks_in_part")}
        report["tracks_in_part"] = sum(r["tracks_in_part"] for r in reports)
        info = {"options": first["options"], "part": None, "created":
                datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "plan_sha256": first["plan_sha256"], "vocabulary": sets[0].labels, "report": report,
                "merged_from": run_key}
        shutil.copyfile(sets[0].root / LABEL_PROBLEMS, out / LABEL_PROBLEMS)
        write_parquet(out / WORK_DIR / "plan.parquet", merged.select(cols))
        write_json(out / WORK_DIR / "plan.json", info)
    info = {**info, "carried_errors": carried}
    part_of = merged["part"].to_numpy()
    row_in = merged["part_row"].to_numpy()
    facts = [{c: ds.index[c].to_numpy() for c in ("crc32", "duration_s", "start_s")} for ds in sets]

    def produce(start: int) -> Iterator[tuple]:
        for p, r in zip(part_of[start:], row_in[start:]):
            ds, f, r = sets[int(p)], facts[int(p)], int(r)
            try:
                first_frame = int(ds._frame0[r])
                raw = np.array(ds._shard_array(int(ds._shard[r]))[first_frame: first_frame + ds.n_frames(r)])
            except DatasetError as e:
                yield ("err", "merge", str(e))
                continue
            if len(raw) != ds.n_frames(r) or zlib.crc32(raw) != int(f["crc32"][r]):
                yield ("err", "merge", f"frames in {ds.root} do not match their crc32 (run --verify on the part)")
                continue
            yield ("ok", raw, float(f["duration_s"][r]), float(f["start_s"][r]))

    items = pq.read_table(out / WORK_DIR / "plan.parquet")
    summary = run_plan(out, info, items, produce, progress, commit_every, commit_seconds)
    return {**summary, "verify_problems": verify_dataset(out)}
