"""`maest extract`: directories of audio to a Parquet dataset of MAEST embeddings.

Decoder processes (`decoders.py`) turn files into log-mel segments (`segments.py`:
the segmentation rule) and send them, a few segments ahead, to the main process, which
batches segments, runs the model, pools per file and hands rows to the EmbeddingStore
(`embedding_store.py`: atomic part files, resume, shards). Decoding thus overlaps the model,
memory stays bounded whatever the file length, and a bad file costs that file only.

Track rows are the mean of the segment embeddings; with --scores, the mean of per-segment
sigmoid activations. --pool segment keeps one row per segment instead. A file whose
embedding or scores come out non-finite fails (stage "model") rather than poisoning the
dataset with NaN rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from maest_cli.audio.decoders import DecoderPool, InlineDecoder, start_early
from maest_cli.audio.frontend import HOP_SIZE, SAMPLE_RATE
from maest_cli.audio.walk import FoundFile, find_audio_files
from maest_cli.embed.spec import InferenceSpec, Resolved
from maest_cli.embed.store import FORMAT, EmbeddingStore, Shard
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import tool_versions
from maest_cli.models.precision import set_threads, torch_threads

# ------------------------------------------------------------------ options

def parse_shard(shard: str | Sequence[int] | None) -> Shard | None:
    """'I/N' or (I, N); None: RANK/WORLD_SIZE when launched by torchrun, else unsharded."""
    if shard is None:
        world = os.environ.get("WORLD_SIZE")
        if world and world.isdigit() and int(world) > 1:
            rank = os.environ.get("RANK", "")
            if not rank.isdigit():
                raise UsageError(f"WORLD_SIZE={world} but RANK={rank!r} is not a number")
            shard = (int(rank), int(world))
        else:
            return None
    if isinstance(shard, str):
        parts = shard.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise UsageError(f"--shard {shard!r}: expected I/N, e.g. 0/4")
        shard = (int(parts[0]), int(parts[1]))
    index, count = (int(x) for x in shard)
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: need 0 <= I < N")
    return None if count == 1 else Shard(index, count)


def shard_of(f: FoundFile, count: int) -> int:
    """Which shard processes a file: a hash of its relative path, so every worker agrees
    without talking to the others, even where the catalogue is mounted elsewhere."""
    return int(hashlib.sha1(f.path.encode()).hexdigest()[:12], 16) % count




# ------------------------------------------------------------------ model side

class ModelRunner:
    """Batches of log-mel segments -> the run's engine (Resolved.build_engine) -> embeddings (and
    sigmoid scores), timing the engine."""

    def __init__(self, engine):
        self.engine = engine
        self.seconds = 0.0

    def __call__(self, frames: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        import torch

        t0 = time.perf_counter()
        emb, logits = self.engine(np.stack(frames))
        sc = None if logits is None else torch.sigmoid(torch.from_numpy(logits)).numpy()
        self.seconds += time.perf_counter() - t0
        return emb, sc


@dataclass
class FileRows:
    """One audio file's embeddings while its segments come in: sums (--pool track) or rows."""

    n_segments: int | None = None  # known once the decoder is done
    n_samples: int = 0
    n_computed: int = 0
    emb_sum: np.ndarray | None = None  # float64 sums, --pool track
    score_sum: np.ndarray | None = None
    rows: list = field(default_factory=list)  # (index, start, length, emb, scores), --pool segment


def output_schema(pool: str, dim: int, n_classes: int | None):
    import pyarrow as pa

    cols = [("path", pa.string()), ("root", pa.string()), ("duration_s", pa.float64()), ("n_segments", pa.int32())]
    if pool == "segment":
        cols += [("segment", pa.int32()), ("start_s", pa.float64()), ("end_s", pa.float64())]
    cols.append(("embedding", pa.list_(pa.float32(), dim)))
    if n_classes:
        cols.append(("scores", pa.list_(pa.float32(), n_classes)))
    return pa.schema(cols)


def rows_table(schema, f: FoundFile, st: FileRows, pool: str):
    import pyarrow as pa

    duration = st.n_samples / SAMPLE_RATE
    frame_s = HOP_SIZE / SAMPLE_RATE
    if pool == "track":
        embs = (st.emb_sum / st.n_segments).astype(np.float32)[None]
        scores = None if st.score_sum is None else (st.score_sum / st.n_segments).astype(np.float32)[None]
        cols = {}
    else:
        rows = sorted(st.rows, key=lambda r: r[0])
        embs = np.stack([r[3] for r in rows])
        scores = np.stack([r[4] for r in rows]) if rows[0][4] is not None else None
        cols = {"segment": [r[0] for r in rows], "start_s": [r[1] * frame_s for r in rows],
                "end_s": [min((r[1] + r[2] - 1) * frame_s, duration) for r in rows]}
    n = len(embs)
    data = {"path": [f.path] * n, "root": [f.root] * n, "duration_s": [duration] * n,
            "n_segments": [st.n_segments] * n}
    if pool == "segment":
        data.update(cols)
    data["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(embs.reshape(-1), pa.float32()), embs.shape[1])
    if scores is not None:
        data["scores"] = pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1), pa.float32()),
                                                           scores.shape[1])
    return pa.table(data, schema=schema)


# ------------------------------------------------------------------ progress

def display_path(root: str, path: str) -> str:
    """A file of a dataset as a path: its root joined with its path (the root alone for a file given by name)."""
    return root if path == "." else os.path.join(root, path)


class _Display:
    """Rich progress on stderr: files done/total, audio minutes, audio-min/s, errors."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.audio_s = 0.0
        self.errors = 0
        self.t0 = time.perf_counter()
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.console = Console(stderr=True, highlight=False)
            self._bar = Progress(TextColumn("extract"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("files  {task.fields[audio]}  {task.fields[rate]}  {task.fields[errs]}"),
                                 TimeRemainingColumn(), console=self.console, transient=False)
            self._task = self._bar.add_task("extract", total=total, **self._fields())
            self._bar.start()

    def _fields(self) -> dict:
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        return {"audio": f"{self.audio_s / 60:.1f} audio-min", "rate": f"{self.audio_s / 60 / elapsed:.2f} audio-min/s",
                "errs": f"{self.errors} errors"}

    def file_done(self, audio_s: float) -> None:
        self.audio_s += audio_s
        if self._bar:
            self._bar.update(self._task, advance=1, **self._fields())

    def file_failed(self, path: str, stage: str, reason: str) -> None:
        self.errors += 1
        if self._bar:
            self.console.print(f"maest: error: {path}: {reason} (stage: {stage})", markup=False, soft_wrap=True)
            self._bar.update(self._task, advance=1, **self._fields())

    def say(self, text: str) -> None:
        if self._bar:
            self.console.print(text, markup=False, soft_wrap=True)

    def stop(self) -> None:
        if self._bar:
            self._bar.update(self._task, **self._fields())
            self._bar.stop()


# ------------------------------------------------------------------ the API

@dataclass
class ExtractSummary:
    out: str
    n_files: int = 0  # audio files this run is responsible for (its shard), done before or not
    n_done: int = 0  # embedded by this run
    n_skipped: int = 0  # already in DIR from earlier runs
    n_failed: int = 0  # failed files and unreadable directories (see errors_file)
    n_segments: int = 0
    audio_seconds: float = 0.0  # audio embedded by this run
    wall_seconds: float = 0.0
    model_seconds: float = 0.0  # time inside the model's forward
    pipeline_seconds: float = 0.0  # first decoded segment to last file written: the steady state
    errors_file: str | None = None
    model: str = ""
    model_sha256: str | None = None
    preset: str = ""
    dtype: str = ""
    device: str = ""
    engine: str = ""  # torch or openvino
    engine_version: str = ""
    threads: int = 0  # torch intra-op threads of the model (main process)
    workers: int = 0  # decoder processes
    shard: str | None = None
    parts_written: int = 0
    peak_rss_mb: float = 0.0  # main process
    decoder_peak_rss_mb: float = 0.0  # largest decoder process
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.n_failed else 0

    @property
    def audio_min_per_s(self) -> float:
        return self.audio_seconds / 60 / self.wall_seconds if self.wall_seconds else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["audio_min_per_s"] = self.audio_min_per_s
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


def dataset_records(run: Resolved, threads: int, workers: int) -> tuple[dict, dict]:
    """(settings, metadata) of an extract dataset: the settings a rerun must match, and how the
    rows were made. Every writer of extract's format (extract, embed.sweep) records these."""
    settings = {"format": FORMAT, **run.settings()}
    metadata = {"format": FORMAT, **run.metadata(),
                "columns": {"path": "relative to root, '/'-separated",
                            "root": "absolute directory the file was found under"},
                "versions": tool_versions(), "runtime": {"threads": threads, "decoder_workers": workers}}
    return settings, metadata


def extract(paths, out, spec: InferenceSpec | None = None, *, workers=1, batch_size=1, threads=None,
            extensions=None, overwrite=False, shard=None, progress=True, registry=None, files_per_part=512,
            **spec_fields) -> ExtractSummary:
    """Embed every audio file under `paths` into the Parquet dataset directory `out`.

    What the embeddings are is `spec` (an InferenceSpec), or its fields given as keywords
    (`extract(paths, out, preset="fast", scores=True)`, as whisper's transcribe takes its decoding
    options); the other arguments decide only how the run goes.

    Files already in `out` (same settings) are skipped; failures are recorded in
    out/_errors/ (`embed.store.read_errors(out)`) and counted, never raised. Raises a UsageError
    (exit code 2) for bad options, a busy or mismatched `out`, or weights that cannot be had; a
    MaestError or OSError (exit code 1) when `out` cannot be written (disk full: the message names
    the file) or decoder processes cannot run. See the module docstring for segmentation and pooling.

    `threads`: torch intra-op threads for the model (None: torch's default, all cores); set for
    this call only. With `workers` > 0, decoders are processes started through a forkserver,
    which imports the caller's main module: a script calling this must guard its entry point
    with `if __name__ == "__main__":`, as for any multiprocessing code.
    """
    t_start = time.perf_counter()
    # -- options that need nothing loaded: fail fast, before the model and before DIR exists
    spec = (spec or InferenceSpec()).replace(**spec_fields) if spec_fields else (spec or InferenceSpec())
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if int(workers) < 0:
        raise UsageError("--workers must be >= 0 (0: decode in the main process)")
    if int(batch_size) < 1:
        raise UsageError("--batch-size must be >= 1")
    if threads is not None and int(threads) < 1:
        raise UsageError("--threads must be >= 1")
    the_shard = parse_shard(shard)
    if overwrite and the_shard is not None:
        raise UsageError("--overwrite cannot be combined with sharding (each shard would delete the others' "
                         "results): delete DIR first, or use another --out")
    skipped: Counter = Counter()
    files, problems = find_audio_files(paths, extensions, skipped)
    if int(workers) > 0 and files:
        start_early()

    # -- the model, and the spec resolved against it
    lm, run = spec.load(registry=registry, progress=progress)
    early_warnings = list(run.notes)
    if not files:
        what = ", ".join(f"{n} {k}" for k, n in skipped.most_common(5))
        early_warnings.append(f"no audio files found under {', '.join(os.fspath(p) for p in paths)}"
                              + (f" (skipped: {what}; --ext chooses the extensions)" if what else ""))
    lm.model.eval()
    n_threads = int(threads) if threads else torch_threads()
    settings, metadata = dataset_records(run, n_threads, int(workers))
    schema = output_schema(spec.pool, run.embedding_dim, run.config.n_classes if spec.scores else None)

    summary = ExtractSummary(out=str(out), model=lm.name, model_sha256=lm.sha256, preset=run.preset.name,
                             dtype=run.dtype, device=str(run.device), engine=run.engine,
                             engine_version=run.engine_version, threads=n_threads, workers=int(workers),
                             shard=f"{the_shard.index}/{the_shard.count}" if the_shard else None)
    store = EmbeddingStore(out, schema, settings, metadata, the_shard, overwrite, files_per_part).open()
    source = None
    display = None
    threads_before = torch_threads()
    try:
        set_threads(n_threads)
        mine = files if the_shard is None else [f for f in files if shard_of(f, the_shard.count) == the_shard.index]
        done = store.done_keys()
        todo = [f for f in mine if f.key not in done]
        summary.n_files, summary.n_skipped = len(mine), len(mine) - len(todo)
        display = _Display(progress, len(todo))
        summary.warnings += early_warnings
        for w in [*early_warnings, *store.warnings]:
            display.say(f"maest: warning: {w}")
        for p in problems:
            if p.failed:
                store.record_error(p.root, p.path, "walk", p.reason)
                summary.n_failed += 1
                display.say(f"maest: error: {display_path(p.root, p.path)}: {p.reason} (stage: walk)")
            else:
                summary.warnings.append(f"{display_path(p.root, p.path)}: {p.reason}")
                display.say(f"maest: warning: {display_path(p.root, p.path)}: {p.reason}")
        if todo:
            tasks = [(i, f.full_path) for i, f in enumerate(todo)]
            if int(workers) == 0:
                source = InlineDecoder(tasks, run.segment_frames, run.hop_frames)
            else:
                source = DecoderPool(tasks, int(workers), run.segment_frames, run.hop_frames)
            runner = ModelRunner(run.build_engine(n_threads, say=display.say))
            _run(todo, source, runner, store, schema, spec.pool, int(batch_size), display, summary)
            summary.model_seconds = runner.seconds
            source.close()
            summary.decoder_peak_rss_mb = source.peak_rss_mb
            source = None
    finally:
        if source is not None:
            source.close(abort=True)
        if display is not None:
            display.stop()
        set_threads(threads_before)
        store.close()  # commits the staged files, unless a write already failed
    summary.parts_written = len(store.parts_written)
    summary.warnings += store.warnings
    summary.errors_file = str(store.errors_path) if store.n_errors else None
    summary.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    summary.wall_seconds = time.perf_counter() - t_start
    return summary


def _run(todo: list[FoundFile], source, runner: ModelRunner, store: EmbeddingStore, schema, pool: str,
         batch_size: int, display: _Display, summary: ExtractSummary) -> None:
    """The main loop: messages from the decoders -> batches -> model -> pooled rows -> store."""
    states: dict[int, FileRows] = {}
    closed: set[int] = set()
    batch: list[tuple[int, int, int, np.ndarray]] = []  # (fid, index, start, frames)

    def fail(fid: int, stage: str, reason: str) -> None:
        if fid in closed:
            return
        closed.add(fid)
        states.pop(fid, None)
        batch[:] = [b for b in batch if b[0] != fid]
        f = todo[fid]
        store.record_error(f.root, f.path, stage, reason)
        summary.n_failed += 1
        display.file_failed(os.path.join(f.root, f.path), stage, reason)

    def maybe_finish(fid: int) -> None:
        st = states.get(fid)
        if st is None or st.n_segments is None or st.n_computed < st.n_segments:
            return
        f = todo[fid]
        store.add(f.key, rows_table(schema, f, st, pool))  # OSError (disk full): the run stops, staged files stay
        closed.add(fid)
        del states[fid]
        summary.n_done += 1
        summary.n_segments += st.n_segments
        summary.audio_seconds += st.n_samples / SAMPLE_RATE
        display.file_done(st.n_samples / SAMPLE_RATE)

    def flush() -> None:
        if not batch:
            return
        items = list(batch)
        batch.clear()
        try:
            embs, scores = runner([b[3] for b in items])
        except (RuntimeError, ValueError) as e:  # e.g. out of GPU memory: those files fail, the run goes on
            for fid in {b[0] for b in items}:
                fail(fid, "model", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}")
            return
        finite = np.isfinite(embs).all(axis=1)
        if scores is not None:
            finite &= np.isfinite(scores).all(axis=1)
        touched = []
        for k, (fid, index, start, frames) in enumerate(items):
            if not finite[k]:  # a second guard behind the frontend's: never a NaN row in the dataset
                fail(fid, "model", f"the model's output is not finite (NaN or infinity) for segment {index} "
                                   f"(from {start * HOP_SIZE / SAMPLE_RATE:.2f} s)")
            st = states.get(fid)
            if st is None:
                continue
            if pool == "track":
                e64 = embs[k].astype(np.float64)
                st.emb_sum = e64 if st.emb_sum is None else st.emb_sum + e64
                if scores is not None:
                    s64 = scores[k].astype(np.float64)
                    st.score_sum = s64 if st.score_sum is None else st.score_sum + s64
            else:
                st.rows.append((index, start, len(frames), embs[k].copy(),
                                None if scores is None else scores[k].copy()))
            st.n_computed += 1
            touched.append(fid)
        for fid in dict.fromkeys(touched):
            maybe_finish(fid)

    n_todo = len(todo)
    t_first = None
    while len(closed) < n_todo:
        msg = source.get(block=not batch)
        if t_first is None and msg is not None:
            t_first = time.perf_counter()
        if msg is None:
            if batch:
                flush()
            elif source.exhausted:  # a bug, not a bad file: never spin on a source that has nothing more
                raise RuntimeError(f"the decoders stopped with {n_todo - len(closed)} files unaccounted for")
            continue
        kind, fid = msg[0], msg[1]
        if fid in closed:
            continue  # late news of a file already failed
        if kind == "seg":
            _, _, index, start, frames = msg
            states.setdefault(fid, FileRows())
            if batch and batch[0][3].shape[0] != frames.shape[0]:
                flush()  # segments of one batch share a length
            batch.append((fid, index, start, frames))
            if len(batch) >= batch_size:
                flush()
        elif kind == "done":
            st = states.setdefault(fid, FileRows())
            st.n_segments, st.n_samples = msg[2], msg[3]
            maybe_finish(fid)  # else its last segments wait for the batch to fill or the queue to run dry
        elif kind == "error":
            fail(fid, msg[2], msg[3])
        elif kind == "retry":  # its decoder died: the file comes again from its first segment
            states.pop(fid, None)
            batch[:] = [b for b in batch if b[0] != fid]
    flush()
    summary.pipeline_seconds = time.perf_counter() - t_first if t_first is not None else 0.0
