"""Speed and fidelity of the extraction presets, measured on synthetic music (`synth.py`).

For each preset, in one process:
- model-only throughput: the model alone on the corpus's own segments, decoded beforehand;
- end-to-end throughput: `extract` on the MP3/OGG corpus (decoder processes in parallel with
  the model), in its steady state (first decoded segment to last file written);
- their ratio: the share of model speed that survives decoding;
- fidelity: cosine similarity of each file's track embedding to that of preset `none`, which
  always runs in fp32 (the exact model); every other preset runs at its own dtype.
Throughput is in audio-minutes per second. This is a measurement, not a test: run it on a quiet
machine (`maest bench fidelity --help`); `maest bench --audio` calls `evaluate_presets`.

Threads: the model (main process) and the decoder processes share the cores. `--threads`
lists the model thread counts to compare, e.g. `2,1` on 2 cores with 1 worker (all cores, or
cores - workers). OpenMP's idle threads spin for a while after each parallel region and take
cycles from the decoders; `OMP_WAIT_POLICY=PASSIVE` in the environment (it must be set before
the process starts) makes them sleep instead: compare runs with and without it. The report
records both variables.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maest_cli.audio.segments import DecodeStats, iter_file_segments
from maest_cli.audio.synth import write_corpus
from maest_cli.audio.walk import find_audio_files
from maest_cli.embed.extraction import ModelRunner, extract
from maest_cli.embed.spec import InferenceSpec
from maest_cli.errors import MaestError, UsageError
from maest_cli.io.artefacts import check_out_file, write_json
from maest_cli.models.checkpoints import save_checkpoint
from maest_cli.models.maest import MAEST, VARIANTS
from maest_cli.models.precision import (
    machine_info,
    set_threads,
    torch_threads,
)

DEFAULT_PRESETS = ("none", "fast", "faster", "fastest")


def corpus_segments(paths: list[str], segment_frames: int, hop: int) -> tuple[list[np.ndarray], float]:
    """All log-mel segments of the corpus, in file order, and its audio seconds."""

    segments, seconds = [], 0.0
    for p in paths:
        stats = DecodeStats()
        segments += [s.frames for s in iter_file_segments(p, segment_frames, hop, stats)]
        seconds += stats.duration_s
    return segments, seconds


def model_only_seconds(runner, segments: list[np.ndarray], batch_size: int = 1, repeats: int = 1) -> float:
    """Seconds for the model to embed these segments (median of `repeats`), batched like extract
    (equal-length segments only)."""
    runner(segments[:1])  # warm-up: first-call allocations and kernel choices
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        batch: list[np.ndarray] = []
        for seg in segments:
            if batch and (len(batch) >= batch_size or batch[0].shape != seg.shape):
                runner(batch)
                batch = []
            batch.append(seg)
        if batch:
            runner(batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def track_embeddings(out: str | Path) -> tuple[list[tuple[str, str]], np.ndarray]:
    import pyarrow.dataset as ds

    t = ds.dataset(str(out)).to_table(columns=["root", "path", "embedding"]).sort_by(
        [("root", "ascending"), ("path", "ascending")])
    keys = list(zip(t.column("root").to_pylist(), t.column("path").to_pylist()))
    emb = t.column("embedding").combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)
    return keys, emb


def cosine_to_reference(reference: str | Path, other: str | Path) -> np.ndarray:
    """Per-file cosine similarity of two extractions' track embeddings (files in both)."""
    k_ref, e_ref = track_embeddings(reference)
    k_oth, e_oth = track_embeddings(other)
    index = {k: i for i, k in enumerate(k_oth)}
    pairs = [(i, index[k]) for i, k in enumerate(k_ref) if k in index]
    a = e_ref[[i for i, _ in pairs]].astype(np.float64)
    b = e_oth[[j for _, j in pairs]].astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)


def preset_spec(spec: InferenceSpec, name: str) -> InferenceSpec:
    """`spec` at preset `name`; `none` is the exact reference of fidelity, so always fp32."""
    return spec.replace(preset=name, dtype="fp32") if name == "none" else spec.replace(preset=name)


def evaluate_presets(corpus: str | Path, spec: InferenceSpec | None = None, presets=DEFAULT_PRESETS, *,
                     workers: int = 1, batch_size: int = 1, work_dir: str | Path | None = None, timing: bool = True,
                     repeats: int = 1, progress: bool = True, threads: list[int | None] | None = None) -> dict:
    """Throughput (model-only and end-to-end) and fidelity to `none` of each preset of `spec`'s
    model (its block, dtype, device and extract's hop: half analyses every second twice, as in the
    paper), for each model thread count in `threads` (None: torch's default, all cores).

    `timing=False` skips the model-only runs (fidelity alone). The `none` preset always runs
    first, in fp32: it is the reference for fidelity.
    """
    from rich.console import Console


    spec = spec or InferenceSpec(device="cpu")
    console = Console(stderr=True, quiet=not progress)
    presets = ["none", *[p for p in presets if p != "none"]]
    if not Path(corpus).is_dir():
        raise UsageError(f"{corpus}: not a directory of audio files")
    files, _ = find_audio_files([corpus], ["mp3", "ogg", "opus", "flac", "wav"])
    if not files:
        raise UsageError(f"{corpus}: no audio files (mp3, ogg, opus, flac, wav)")
    paths = [f.full_path for f in files]
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="maest-preset-eval-"))
    lm, reference = preset_spec(spec, "none").load(progress=progress)
    device, block = reference.device, reference.block
    segments, audio_s = corpus_segments(paths, reference.segment_frames, reference.hop_frames) if timing else ([], 0.0)
    variants = list(dict.fromkeys(threads or [None]))
    cores = os.cpu_count() or 1
    default_threads = torch_threads()

    results = []
    try:
        for name in presets:
            run_spec = preset_spec(spec, name)
            run = run_spec.resolve(lm.config, lm.default_block, device, model=lm)
            preset, dt = run.preset, run.dtype
            best_model_only = None  # the model alone at its fastest thread count: what e2e is held to
            rows = []
            for n_threads in variants:
                set_threads(n_threads or default_threads)
                tag = f"{name}-t{n_threads or 'default'}"
                row: dict = {"preset": name, "dtype": dt, "engine": run.engine, "threads": n_threads or default_threads,
                             "time_keep_every": preset.time_keep_every, "drop_freq_rows": list(preset.drop_freq_rows)}
                if timing:
                    runner = ModelRunner(dataclasses.replace(run, spec=run_spec.replace(scores=False))
                                         .build_engine(n_threads or default_threads))
                    secs = model_only_seconds(runner, segments, batch_size, repeats)
                    row["model_only_audio_min_per_s"] = audio_s / 60 / secs
                    best_model_only = max(best_model_only or 0.0, row["model_only_audio_min_per_s"])
                console.print(f"preset {name} ({dt}, {row['threads']} threads): extracting {len(paths)} files "
                              "end to end ...")
                s = extract(paths, work / tag, run_spec, workers=workers, batch_size=batch_size,
                            threads=n_threads or default_threads, overwrite=True, progress=False)
                if not s.n_done:
                    raise MaestError(f"{corpus}: none of its {len(paths)} audio files could be embedded "
                                     f"(reasons in {work / tag / '_errors'})")
                row.update(n_files=s.n_done, n_failed=s.n_failed, audio_minutes=s.audio_seconds / 60,
                           e2e_audio_min_per_s=s.audio_seconds / 60 / s.pipeline_seconds if s.pipeline_seconds
                           else None, e2e_wall_audio_min_per_s=s.audio_min_per_s, e2e_model_seconds=s.model_seconds,
                           e2e_pipeline_seconds=s.pipeline_seconds, decoder_peak_rss_mb=s.decoder_peak_rss_mb,
                           peak_rss_mb=s.peak_rss_mb)
                cos = cosine_to_reference(work / f"none-t{variants[0] or 'default'}", work / tag)
                row.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                           cosine_p05=float(np.percentile(cos, 5)))
                rows.append(row)
            for row in rows:
                if timing and row["e2e_audio_min_per_s"]:
                    row["e2e_over_model_only"] = row["e2e_audio_min_per_s"] / best_model_only
                console.print(json.dumps(row))
            results += rows
    finally:
        set_threads(default_threads)


    report = {"machine": machine_info(), "model": lm.name, "model_sha256": lm.sha256, "block": block, "hop": spec.hop,
              "workers": workers, "batch_size": batch_size, "cores": cores, "thread_variants": variants,
              "environment": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")},
              "corpus": str(corpus), "n_files": len(paths),
              "corpus_audio_minutes": results[0]["audio_minutes"], "results": results}
    _print_table(report, console)
    return report


def _print_table(report: dict, console) -> None:
    from rich.table import Table

    env = ", ".join(f"{k}={v}" for k, v in report["environment"].items() if v) or "no OMP_* variables"
    t = Table(title=f"presets of {report['model']} (block {report['block']}, {report['n_files']} files, "
                    f"{report['corpus_audio_minutes']:.1f} audio-min, workers {report['workers']}, "
                    f"{report['cores']} cores, {env})")
    for col in ("preset", "dtype", "threads", "model-only a-min/s", "end-to-end a-min/s", "e2e / best model",
                "cos mean", "cos min"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        def fmt(key: str, f: str = ".2f") -> str:
            return format(r[key], f) if r.get(key) is not None else "-"
        t.add_row(r["preset"], r["dtype"], str(r["threads"]), fmt("model_only_audio_min_per_s"),
                  fmt("e2e_audio_min_per_s"), fmt("e2e_over_model_only"), fmt("cosine_mean", ".4f"),
                  fmt("cosine_min", ".4f"))
    console.print(t)


def random_weights_model(variant: str, where: Path) -> str:
    """A full-size MAEST with seeded random weights: the speed of a variant without its weights."""
    import torch


    if variant not in VARIANTS:
        raise UsageError(f"--random-weights {variant!r}: choose one of {', '.join(VARIANTS)}")
    path = where / f"maest-{variant}-random-seed0.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        where.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, MAEST(VARIANTS[variant]), labels=None, extra={"name": f"maest-{variant}-random"})
    return str(path)


def run_fidelity(corpus: str | Path, spec: InferenceSpec | None = None, presets=DEFAULT_PRESETS, *,
                 songs: int = 16, min_s: float = 30.0, max_s: float = 180.0, random_weights: str | None = None,
                 workers: int = 1, batch_size: int = 1, work_dir: str | Path | None = None, timing: bool = True,
                 repeats: int = 1, threads: list[int | None] | None = None, out: str | Path | None = None,
                 progress: bool = True) -> dict:
    """`maest bench fidelity`: evaluate_presets on CORPUS, after topping it up with `songs`
    synthetic songs (kept for later runs); `random_weights` VARIANT replaces spec's model by a
    seeded random MAEST of that variant (for speed where the weights are missing)."""
    spec = spec or InferenceSpec(device="cpu")
    check_out_file(out)
    if songs < 0 or not 0 < min_s <= max_s:
        raise UsageError("--songs must be >= 0 and 0 < --min-s <= --max-s")
    if Path(corpus).exists() and not Path(corpus).is_dir():
        raise UsageError(f"--corpus {corpus}: not a directory")
    if any(n is not None and n < 1 for n in threads or []):
        raise UsageError("--threads: counts must be >= 1")
    if random_weights:
        spec = spec.replace(model=random_weights_model(random_weights, Path(work_dir or tempfile.gettempdir())))
    if songs:
        if progress:
            print(f"writing {songs} synthetic songs to {corpus} (kept for later runs) ...", file=sys.stderr)
        write_corpus(corpus, songs, min_s=min_s, max_s=max_s)
    report = evaluate_presets(corpus, spec, presets, workers=workers, batch_size=batch_size, work_dir=work_dir,
                              timing=timing, repeats=repeats, progress=progress, threads=threads)
    if out:
        write_json(out, report)
    return report
