"""Many embedding datasets of one audio folder in one pass, each in `maest extract`'s format.

`maest extract` writes one Parquet dataset per (model, block, tokens, preset). A study of where
the good features are needs dozens over the same clips: every block of a model with several
token stacks, the same architecture with random weights, every preset, a CNN baseline, a
mel-statistics baseline. Running extract for each would decode every clip and run every
segment through the model dozens of times. Here:
- each clip is decoded once into its unnormalised log-mel (`MelCache`, optionally kept on
  disk as float32: the exact streamed frames extract cuts its segments from);
- each MAEST segment goes through the model once: `forward(blocks=[1..depth])` returns the
  (cls, dist, avg) tokens of every block, and every (block, tokens) dataset gets its row;
- segmentation (segment length of the model, hop, end-aligned last segment), pooling (mean of
  the segment embeddings, summed in float64 in segment order), the row format, the schema
  metadata and the settings checked on resume are extract's own (segments.segment_starts,
  extraction.output_schema, rows_table and dataset_records, store.EmbeddingStore), so `maest probe
  custom` reads these folders as extract's, the embeddings equal `maest extract --block k`'s,
  and extract run with the same options into one of them finds nothing left to do.
A kill loses the clips in flight only (EmbeddingStore stages every finished clip); a bad clip
is recorded in each dataset's _errors/ and the run goes on.

EfficientNet-B0 (`effnet_output`: the 1280-d penultimate layer, mean over 128-frame patches with
hop 62, as Discogs-EffNet) and mel statistics (`mel_stats_output`: mean and standard deviation of
each of the 96 log-mel bands over the clip, 192-d) are written the same way.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.audio.decode import AudioError
from maest_cli.audio.frontend import (
    FRONTEND,
    HOP_SIZE,
    SAMPLE_RATE,
    StreamingMel,
    iter_file_mel,
)
from maest_cli.audio.segments import segment_starts, too_short
from maest_cli.audio.walk import FoundFile, find_audio_files
from maest_cli.embed.extraction import FileRows, dataset_records, output_schema, rows_table
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import FORMAT, EmbeddingStore
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import atomic_path, tool_versions
from maest_cli.models import effnet
from maest_cli.models.effnet import (
    PATCH_FRAMES,
    PATCH_HOP,
    mel_patches,
    to_channels_last,
)
from maest_cli.models.precision import (
    autocast,
    for_inference,
    resolve_device,
    torch_threads,
)

# Token stacks: each one dataset per block (cls, dist, avg alone, and the paper's concatenation).
TOKEN_STACKS = (("cls",), ("dist",), ("avg",), ("cls", "dist", "avg"))
MADE_BY = "maest_cli.embed.sweep: one forward per segment for every block; extract's segmentation, pooling and format"
Log = Callable[[str], None]


def stack_name(tokens: Sequence[str]) -> str:
    """('cls', 'dist', 'avg') -> 'cls+dist+avg' (a folder name and a table label)."""
    return "+".join(tokens)


def block_dir(root: str | os.PathLike, block: int, tokens: Sequence[str]) -> Path:
    """Where a sweep writes one (block, tokens) dataset: ROOT/block07-cls+dist+avg."""
    return Path(root) / f"block{block:02d}-{stack_name(tokens)}"


# ------------------------------------------------------------------ the clips' mel-spectrograms

class MelCache:
    """Whole-clip unnormalised log-mel [frames, 96] float32 and the decoded sample count, computed
    once by the streaming frontend (the frames extract's segments are cut from) and, when `root`
    is given, kept there as one .npz per clip (atomic; stale once the audio file's size or
    modification time changes). About 0.7 MB per 30 s."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.computed = 0

    def _file(self, f: FoundFile) -> Path:
        return self.root / (hashlib.sha1(f"{f.root}\0{f.path}".encode()).hexdigest()[:32] + ".npz")

    def get(self, f: FoundFile) -> tuple[np.ndarray, int]:
        """(mel, n_samples); raises AudioError for a file that cannot be decoded."""
        try:
            st = os.stat(f.full_path)
        except OSError as e:
            raise AudioError(f.full_path, f"cannot open ({e.strerror})", stage="open") from None
        stamp = np.array([st.st_size, st.st_mtime_ns], np.int64)
        if self.root is not None:
            cached = self._file(f)
            if cached.is_file():
                try:
                    with np.load(cached) as z:
                        if np.array_equal(z["stamp"], stamp):
                            self.hits += 1
                            return z["mel"], int(z["n_samples"])
                except (OSError, ValueError, KeyError):
                    pass  # unreadable (a kill mid-write is impossible: atomic; a damaged disk): recompute
        mel, n_samples = compute_mel(f.full_path)
        self.computed += 1
        if self.root is not None:
            with atomic_path(cached) as tmp, open(tmp, "wb") as out:
                np.savez(out, mel=mel, n_samples=np.int64(n_samples), stamp=stamp)
        return mel, n_samples


def compute_mel(path: str) -> tuple[np.ndarray, int]:
    """The streamed log-mel of a whole file and its sample count at 16 kHz (AudioError if bad)."""
    stream = StreamingMel()
    try:
        parts = list(iter_file_mel(path, stream=stream))
    except AudioError:
        raise  # already says which file and why
    except MemoryError:
        raise AudioError(path, "out of memory while decoding", stage="decode") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is this file's, as in extract's decoders
        raise AudioError(path, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", stage="decode") from None
    mel = np.concatenate(parts) if parts else np.zeros((0, 96), np.float32)
    return np.ascontiguousarray(mel, np.float32), stream.samples_in


# ------------------------------------------------------------------ outputs and their records

@dataclass
class Output:
    """One dataset a sweep writes: its folder, embedding size, the settings that made its rows
    (checked on resume, as extract's) and the provenance in its schema metadata."""

    out: Path
    dim: int
    settings: dict
    metadata: dict
    label: str = ""


def _plain_records(model: dict, settings_extra: dict, dim: int, embedding: str, segment: dict, hop: dict,
                   input_norm: dict | None, device: str, threads: int) -> tuple[dict, dict]:
    """Settings and metadata of a non-MAEST dataset, with extract's keys where they apply."""
    settings = {"format": FORMAT, "model_sha256": model.get("sha256"), "model_config": model.get("config"),
                "block": None, "tokens": None, "pool": "track", **settings_extra, "scores": False, "dtype": "fp32",
                "frontend": FRONTEND.to_dict(), "input_norm": input_norm}
    metadata = {
        "format": FORMAT, "model": model, "preset": None, "block": None, "tokens": None, "pool": "track",
        "embedding": embedding, "segment": segment, "hop": hop, "embedding_dim": dim, "scores": None,
        "columns": {"path": "relative to root, '/'-separated", "root": "absolute directory the file was found under"},
        "frontend": FRONTEND.to_dict(), "input_norm": input_norm, "dtype": "fp32", "device": str(device),
        "versions": tool_versions(), "runtime": {"threads": threads, "decoder_workers": 0}, "made_by": MADE_BY,
    }
    return settings, metadata


# ------------------------------------------------------------------ what computes the rows

class MaestSweep:
    """One MAEST (one preset, one dtype): every requested (block, tokens) dataset from one forward
    per segment. `__call__(mel, n_samples)` -> [(float64 sum over segments, n_segments)] in the
    order of `outputs`; the sum is accumulated exactly as extract does (segment order, float64)."""

    def __init__(self, lm, out_root: str | os.PathLike, spec: InferenceSpec | None = None, *,
                 blocks: Sequence[int] | None = None, token_stacks: Sequence[Sequence[str]] = TOKEN_STACKS,
                 batch_size: int = 8, threads: int | None = None):
        """`spec`: preset, hop, device and dtype (its block and tokens are this sweep's `blocks`
        and `token_stacks`; rows are pooled per track, without scores)."""
        import torch

        if batch_size < 1:
            raise UsageError("batch_size must be >= 1")
        spec = (spec or InferenceSpec(device="cpu")).replace(pool="track", scores=False, engine="torch")
        cfg = lm.config
        self.lm, self.cfg = lm, cfg
        blocks = list(range(1, cfg.depth + 1)) if blocks is None else sorted(set(int(b) for b in blocks))
        bad = [b for b in blocks if not 1 <= b <= cfg.depth]
        if bad or not blocks:
            raise UsageError(f"blocks {bad or blocks}: this model has blocks 1..{cfg.depth}")
        self.stacks = [tuple(t) for t in token_stacks]
        runs = [spec.replace(block=b, tokens=tokens).resolve(cfg, lm.default_block, model=lm)
                for b in blocks for tokens in self.stacks]
        run = runs[0]  # block and tokens aside, every dataset of the sweep is made alike
        self.preset, self.device, self.dtype = run.preset, run.device, run.dtype
        self.blocks = blocks
        self.patchout = run.patchout
        self.segment, self.hop = run.segment_frames, run.hop_frames
        self.batch_size = batch_size
        self.norm = lm.input_norm
        lm.model.eval()
        self.net = for_inference(lm.model, self.dtype)
        threads = threads or torch_threads()
        self.outputs: list[Output] = []
        self._which: list[tuple[int, tuple[str, ...]]] = []
        for r in runs:
            settings, metadata = dataset_records(r, threads, 0)
            metadata["made_by"] = MADE_BY
            self.outputs.append(Output(block_dir(out_root, r.block, r.tokens), r.embedding_dim, settings, metadata,
                                       f"{lm.name} {self.preset.name} block {r.block} {stack_name(r.tokens)}"))
            self._which.append((r.block, r.tokens))
        self._torch = torch

    def __call__(self, f: FoundFile, mel: np.ndarray, n_samples: int) -> list[tuple[np.ndarray, int]]:
        torch = self._torch

        if len(mel) < self.cfg.min_frames:
            raise too_short(f.full_path, n_samples, self.cfg.min_frames)
        starts = segment_starts(len(mel), self.segment, self.hop)
        sums: list[np.ndarray | None] = [None] * len(self.outputs)
        for i in range(0, len(starts), self.batch_size):
            segs = [mel[s:s + self.segment] for s in starts[i:i + self.batch_size]]
            x = self.norm.apply(torch.from_numpy(np.stack(segs)).to(self.device))
            with torch.inference_mode(), autocast(self.device, self.dtype):
                out = self.net(x, blocks=self.blocks, patchout=self.patchout)
            for j, (b, tokens) in enumerate(self._which):
                emb = out.embedding(b, tokens).float().cpu().numpy()
                for row in emb:  # extract's accumulation: one segment at a time, in order, in float64
                    e64 = row.astype(np.float64)
                    sums[j] = e64 if sums[j] is None else sums[j] + e64
        return [(s, len(starts)) for s in sums]


class EffNetEmbedder:
    """A trained EfficientNet-B0 (effnet_train.load_effnet): the 1280-d penultimate layer, mean over
    the clip's 128-frame patches with hop 62 (Discogs-EffNet's input)."""

    def __init__(self, loaded, out: str | os.PathLike, device: str = "cpu", threads: int | None = None):


        self.loaded = loaded
        self.device = resolve_device(device)
        # BatchNorm folded into the convolutions, channels_last: the same outputs up to float
        # rounding, at the speed `maest bench` times the baseline with
        self.model = effnet.for_inference(loaded.model.eval()).to(self.device)
        self.batch = 64
        frame_s = HOP_SIZE / SAMPLE_RATE
        model = {"name": loaded.name, "sha256": loaded.sha256, "path": loaded.path, "source_format": "maest-cli-effnet",
                 "architecture": "effnet-b0", "config": loaded.cfg.to_dict()}
        settings, metadata = _plain_records(
            model, {"patch_frames": PATCH_FRAMES, "patch_hop_frames": PATCH_HOP}, 1280,
            "EfficientNet-B0 penultimate layer (1280-d), mean over the clip's 128-frame patches with hop 62",
            {"frames": PATCH_FRAMES, "seconds": (PATCH_FRAMES - 1) * frame_s},
            {"spec": "patches", "frames": PATCH_HOP, "seconds": PATCH_HOP * frame_s},
            loaded.input_norm.to_dict(), str(self.device), threads or torch_threads())
        metadata["inference"] = "BatchNorm folded into the convolutions (eval statistics), channels_last"
        self.outputs = [Output(Path(out), 1280, settings, metadata, f"{loaded.name} (EfficientNet-B0)")]

    def __call__(self, f: FoundFile, mel: np.ndarray, n_samples: int) -> list[tuple[np.ndarray, int]]:
        import torch


        if len(mel) < 16:
            raise AudioError(f.full_path, f"too short: {n_samples / SAMPLE_RATE:.3f} s", stage="segment")
        # (a clip under 128 frames is zero-padded at its end, log-mel 0, before scaling)
        x = self.loaded.input_norm.apply(mel_patches(torch.from_numpy(mel))).to(self.device)
        with torch.inference_mode():
            emb = torch.cat([self.model(to_channels_last(x[i:i + self.batch]))[0]
                             for i in range(0, len(x), self.batch)])
        e = emb.float().cpu().numpy().astype(np.float64)
        return [(e.sum(0), len(e))]


class MelStatsEmbedder:
    """The mel-statistics baseline: mean and standard deviation of each of the 96 unnormalised
    log-mel bands over the whole clip (192-d; a row's n_segments is 1)."""

    def __init__(self, out: str | os.PathLike, threads: int | None = None):

        model = {"name": "mel-stats", "sha256": None, "path": None, "source_format": "none",
                 "config": {"features": "mean and std of each log-mel band over the clip", "bands": 96}}
        settings, metadata = _plain_records(
            model, {"statistics": ["mean", "std"]}, 192,
            "mean (96) then standard deviation (96) of each log-mel band over the whole clip",
            {"frames": None, "seconds": None, "note": "the whole clip"},
            {"spec": None, "frames": None, "seconds": None},
            None, "cpu", threads or torch_threads())
        self.outputs = [Output(Path(out), 192, settings, metadata, "mel statistics")]

    def __call__(self, f: FoundFile, mel: np.ndarray, n_samples: int) -> list[tuple[np.ndarray, int]]:
        if len(mel) < 2:
            raise AudioError(f.full_path, f"too short: {len(mel)} mel frames", stage="segment")
        m = mel.astype(np.float64)
        return [(np.concatenate([m.mean(0), m.std(0)]), 1)]


# ------------------------------------------------------------------ the run

@dataclass
class SweepSummary:
    outputs: list[str]
    n_files: int = 0
    n_done: int = 0  # clips computed by this run (for at least one output)
    n_skipped: int = 0  # clips already in every output
    n_failed: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    mel_seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.n_failed == 0


def run_sweep(paths, embedder, mels: MelCache | None = None, extensions=None, files_per_part: int = 512,
              log: Log | None = None, log_every: float = 30.0) -> SweepSummary:
    """Every audio file under `paths` through `embedder` (MaestSweep, EffNetEmbedder,
    MelStatsEmbedder) into each of its outputs; files already in every output are skipped."""

    t0 = time.perf_counter()
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files, problems = find_audio_files(paths, extensions)
    mels = mels or MelCache(None)
    outputs = embedder.outputs
    summary = SweepSummary([str(o.out) for o in outputs], n_files=len(files))
    schemas = [output_schema("track", o.dim, None) for o in outputs]
    stores: list[EmbeddingStore] = []
    try:
        for o, schema in zip(outputs, schemas):
            stores.append(EmbeddingStore(o.out, schema, o.settings, o.metadata, None, False, files_per_part).open())
        done = [s.done_keys() for s in stores]
        for p in problems:
            if p.failed:
                summary.n_failed += 1
                for s in stores:
                    s.record_error(p.root, p.path, "walk", p.reason)
            else:
                summary.warnings.append(f"{p.root}/{p.path}: {p.reason}")
        last = time.perf_counter()
        for n, f in enumerate(files, 1):
            missing = [i for i, d in enumerate(done) if f.key not in d]
            if not missing:
                summary.n_skipped += 1
                continue
            try:
                t = time.perf_counter()
                mel, n_samples = mels.get(f)
                t2 = time.perf_counter()
                rows = embedder(f, mel, n_samples)
                summary.mel_seconds += t2 - t
                summary.model_seconds += time.perf_counter() - t2
            except AudioError as e:
                _fail(stores, missing, f, e.stage, e.reason, summary, log)
                continue
            except (RuntimeError, ValueError) as e:  # e.g. out of memory in the model: this file fails
                _fail(stores, missing, f, "model", f"{type(e).__name__}: {' '.join(str(e).split())[:300]}", summary,
                      log)
                continue
            bad = [i for i in missing if not np.isfinite(rows[i][0]).all()]
            if bad:
                _fail(stores, missing, f, "model", "the model's output is not finite (NaN or infinity)", summary, log)
                continue
            for i in missing:
                total, count = rows[i]
                st = FileRows(n_segments=count, n_samples=n_samples, n_computed=count, emb_sum=total)
                stores[i].add(f.key, rows_table(schemas[i], f, st, "track"))
            summary.n_done += 1
            if log and time.perf_counter() - last > log_every:
                last = time.perf_counter()
                rate = summary.n_done / max(last - t0, 1e-9)
                left = len(files) - n
                log(f"{outputs[0].label.split(' block ')[0]}: {n}/{len(files)} clips ({rate:.2f}/s"
                    + (f", about {left / rate / 60:.0f} min left)" if rate > 0 and left else ")"))
    finally:
        for s in stores:
            s.close()
            summary.warnings += s.warnings
    summary.seconds = time.perf_counter() - t0
    return summary


def _fail(stores, missing, f: FoundFile, stage: str, reason: str, summary: SweepSummary, log: Log | None) -> None:
    summary.n_failed += 1
    for i in missing:
        stores[i].record_error(f.root, f.path, stage, reason)
    if log:
        log(f"error: {f.full_path}: {reason} (stage: {stage})")


__all__ = ["TOKEN_STACKS", "stack_name", "block_dir", "MelCache", "compute_mel", "Output",
           "MaestSweep", "EffNetEmbedder", "MelStatsEmbedder", "SweepSummary", "run_sweep"]
