"""Speed and fidelity of the extraction presets, measured on synthetic music (`synth.py`).

For each preset, in one process:
- model-only throughput: the model alone on the corpus's own segments, decoded beforehand;
- end-to-end throughput: `extract` on the MP3/OGG corpus (decoder processes in parallel with
  the model), in its steady state (first decoded segment to last file written);
- their ratio: the share of model speed that survives decoding (target >= 0.85);
- fidelity: cosine similarity of each file's track embedding to that of preset `none`, which
  always runs in fp32 (the exact model); every other preset runs at its own dtype.
Throughput is in audio-minutes per second. This is a measurement, not a test: run it on a quiet
machine (`python -m maest_cli.bench.fidelity --help`); `maest bench` can call `evaluate_presets`.

Threads: the model (main process) and the decoder processes share the cores. `--threads`
lists the model thread counts to compare, e.g. `2,1` on 2 cores with 1 worker (all cores, or
cores - workers). OpenMP's idle threads spin for a while after each parallel region and take
cycles from the decoders; `OMP_WAIT_POLICY=PASSIVE` in the environment (it must be set before
the process starts) makes them sleep instead: compare runs with and without it. The report
records both variables.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maest_cli.audio.segments import DecodeStats, hop_frames, iter_file_segments
from maest_cli.audio.synth import write_corpus
from maest_cli.audio.walk import find_audio_files
from maest_cli.embed.extraction import ModelRunner, extract
from maest_cli.models.checkpoints import save_checkpoint
from maest_cli.models.maest import MAEST, VARIANTS
from maest_cli.models.precision import (
    for_inference,
    machine_info,
    resolve_device,
    resolve_dtype,
    set_threads,
    torch_threads,
)
from maest_cli.models.presets import get_preset
from maest_cli.models.registry import load_model

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


def preset_dtype(name: str, preset_dtype: str, dtype: str, device) -> str:
    """`none` is the exact reference: always fp32. Others: `dtype` if given, else the preset's own."""

    if name == "none":
        return "fp32"
    return resolve_dtype(preset_dtype if dtype == "auto" else dtype, device)


def evaluate_presets(corpus: str | Path, model: str | None = None, presets=DEFAULT_PRESETS, dtype: str = "auto",
                     block: int = 7, workers: int = 1, batch_size: int = 1, work_dir: str | Path | None = None,
                     timing: bool = True, repeats: int = 1, progress: bool = True,
                     threads: list[int | None] | None = None, hop: str = "half") -> dict:
    """Throughput (model-only and end-to-end) and fidelity to `none` of each preset, for each
    model thread count in `threads` (None: torch's default, all cores). `hop`: the segment hop of
    extract (half: every second of audio is analysed twice, as in the paper).

    `timing=False` skips the model-only runs (fidelity alone). The `none` preset always runs
    first, in fp32: it is the reference for fidelity.
    """
    from rich.console import Console


    console = Console(stderr=True, quiet=not progress)
    presets = ["none", *[p for p in presets if p != "none"]]
    files, _ = find_audio_files([corpus], ["mp3", "ogg", "opus", "flac", "wav"])
    if not files:
        raise FileNotFoundError(f"{corpus}: no audio files")
    paths = [f.full_path for f in files]
    work = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="maest-preset-eval-"))
    device = resolve_device("cpu")
    lm = load_model(model, device="cpu", progress=progress)
    cfg = lm.config
    segments, audio_s = corpus_segments(paths, cfg.frames, hop_frames(hop, cfg.frames)) if timing else ([], 0.0)
    variants = list(dict.fromkeys(threads or [None]))
    cores = os.cpu_count() or 1
    default_threads = torch_threads()

    results = []
    try:
        for name in presets:
            preset = get_preset(name)
            dt = preset_dtype(name, preset.dtype, dtype, device)
            best_model_only = None  # the model alone at its fastest thread count: what e2e is held to
            rows = []
            for n_threads in variants:
                set_threads(n_threads or default_threads)
                tag = f"{name}-t{n_threads or 'default'}"
                row: dict = {"preset": name, "dtype": dt, "threads": n_threads or default_threads,
                             "time_keep_every": preset.time_keep_every, "drop_freq_rows": list(preset.drop_freq_rows)}
                if timing:
                    runner = ModelRunner(for_inference(lm.model, dt), device, dt, block, ("cls", "dist", "avg"),
                                         preset.patchout, False, lm.input_norm)
                    secs = model_only_seconds(runner, segments, batch_size, repeats)
                    row["model_only_audio_min_per_s"] = audio_s / 60 / secs
                    best_model_only = max(best_model_only or 0.0, row["model_only_audio_min_per_s"])
                console.print(f"preset {name} ({dt}, {row['threads']} threads): extracting {len(paths)} files "
                              "end to end ...")
                s = extract(paths, work / tag, model=model, preset=name, dtype=dt, block=block, workers=workers,
                            batch_size=batch_size, threads=n_threads or default_threads, device="cpu", hop=hop,
                            overwrite=True, progress=False)
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


    report = {"machine": machine_info(), "model": lm.name, "model_sha256": lm.sha256, "block": block, "hop": hop,
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
        raise SystemExit(f"--random-weights {variant!r}: choose one of {', '.join(VARIANTS)}")
    path = where / f"maest-{variant}-random-seed0.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        where.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, MAEST(VARIANTS[variant]), labels=None, extra={"name": f"maest-{variant}-random"})
    return str(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maest_cli.bench.fidelity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="Directory of audio; synthetic songs are added up to --songs.")
    ap.add_argument("--songs", type=int, default=16, help="Synthetic songs to have in --corpus (0: use it as is).")
    ap.add_argument("--min-s", type=float, default=30.0)
    ap.add_argument("--max-s", type=float, default=180.0)
    ap.add_argument("--model", default=None, help="Model name or weights file (default: the registry default).")
    ap.add_argument("--random-weights", default=None, metavar="VARIANT",
                    help="Instead of --model: a MAEST of this variant (5s/10s/20s/30s) with random weights, for "
                         "speed where the official weights are missing (fidelity figures then mean little).")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--hop", default="half", help="Segment hop of extract: half, full or seconds.")
    ap.add_argument("--threads", default="default",
                    help="Model thread counts to compare, e.g. 2,1 ('default': torch's, all cores).")
    ap.add_argument("--repeats", type=int, default=1, help="Model-only timing repeats (median).")
    ap.add_argument("--no-timing", action="store_true", help="Fidelity only.")
    ap.add_argument("--work-dir", default=None, help="Where the extractions go (default: a temp dir).")
    ap.add_argument("--out", default=None, help="Write the report as JSON here.")
    a = ap.parse_args(argv)
    try:
        threads = [None if t.strip() == "default" else int(t) for t in a.threads.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--threads {a.threads!r}: expected numbers or 'default', e.g. 2,1")
    if any(t is not None and t < 1 for t in threads):
        ap.error("--threads: counts must be >= 1")
    model = a.model
    if a.random_weights:
        model = random_weights_model(a.random_weights, Path(a.work_dir or tempfile.gettempdir()))
    if a.songs:

        print(f"writing {a.songs} synthetic songs to {a.corpus} (kept for later runs) ...", file=sys.stderr)
        write_corpus(a.corpus, a.songs, min_s=a.min_s, max_s=a.max_s)
    report = evaluate_presets(a.corpus, model, [p for p in a.presets.split(",") if p], a.dtype, a.block,
                              a.workers, a.batch_size, a.work_dir, timing=not a.no_timing, repeats=a.repeats,
                              threads=threads, hop=a.hop)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
