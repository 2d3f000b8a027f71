"""Speed and fidelity of the extraction presets, measured on synthetic music (`synth.py`).

For each preset, in one process:
- model-only throughput: the model alone on the corpus's own segments, decoded beforehand;
- end-to-end throughput: `extract` on the MP3/OGG corpus (decoder processes in parallel with
  the model), in its steady state (first decoded segment to last file written);
- their ratio: the share of model speed that survives decoding (target >= 0.85);
- fidelity: cosine similarity of each file's track embedding to that of preset `none`.
Throughput is in audio-minutes per second. This is a measurement, not a test: run it on a quiet
machine (`python -m maest_cli.preset_eval --help`); `maest bench` can call `evaluate_presets`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_PRESETS = ("none", "fast", "faster", "fastest")


def corpus_segments(paths: list[str], segment_frames: int, hop: int) -> tuple[list[np.ndarray], float]:
    """All log-mel segments of the corpus, in file order, and its audio seconds."""
    from .segments import DecodeStats, iter_file_segments

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


def evaluate_presets(corpus: str | Path, model: str | None = None, presets=DEFAULT_PRESETS, dtype: str = "auto",
                     block: int = 7, workers: int = 1, batch_size: int = 1, work_dir: str | Path | None = None,
                     timing: bool = True, repeats: int = 1, progress: bool = True) -> dict:
    """Throughput (model-only and end-to-end) and fidelity to `none` of each preset.

    `timing=False` skips the model-only runs (fidelity alone). The `none` preset always runs
    first: it is the reference for fidelity.
    """
    from rich.console import Console

    from .extract import ModelRunner, extract
    from .presets import get_preset
    from .registry import load_model
    from .runtime import resolve_device, resolve_dtype
    from .segments import hop_frames
    from .walk import find_audio_files

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
    hop = hop_frames("half", cfg.frames)
    segments, audio_s = corpus_segments(paths, cfg.frames, hop) if timing else ([], 0.0)

    results = []
    for name in presets:
        preset = get_preset(name)
        dt = resolve_dtype(preset.dtype if dtype == "auto" else dtype, device)
        row: dict = {"preset": name, "dtype": dt, "time_keep_every": preset.time_keep_every,
                     "drop_freq_rows": list(preset.drop_freq_rows)}
        if timing:
            runner = ModelRunner(lm.model, device, dt, block, ("cls", "dist", "avg"), preset.patchout, False,
                                 lm.input_norm)
            secs = model_only_seconds(runner, segments, batch_size, repeats)
            row["model_only_audio_min_per_s"] = audio_s / 60 / secs
        console.print(f"preset {name}: extracting {len(paths)} files end to end ...")
        s = extract(paths, work / name, model=model, preset=name, dtype=dtype, block=block, workers=workers,
                    batch_size=batch_size, device="cpu", overwrite=True, progress=False)
        row.update(n_files=s.n_done, n_failed=s.n_failed, audio_minutes=s.audio_seconds / 60,
                   e2e_audio_min_per_s=s.audio_seconds / 60 / s.pipeline_seconds if s.pipeline_seconds else None,
                   e2e_wall_audio_min_per_s=s.audio_min_per_s, e2e_model_seconds=s.model_seconds,
                   e2e_pipeline_seconds=s.pipeline_seconds, decoder_peak_rss_mb=s.decoder_peak_rss_mb,
                   peak_rss_mb=s.peak_rss_mb)
        if timing and row["e2e_audio_min_per_s"]:
            row["e2e_over_model_only"] = row["e2e_audio_min_per_s"] / row["model_only_audio_min_per_s"]
        cos = cosine_to_reference(work / "none", work / name)
        row.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()),
                   cosine_p05=float(np.percentile(cos, 5)))
        results.append(row)
        console.print(json.dumps(row))

    from .bench import machine_info

    report = {"machine": machine_info(), "model": lm.name, "model_sha256": lm.sha256, "block": block,
              "workers": workers, "batch_size": batch_size, "corpus": str(corpus), "n_files": len(paths),
              "corpus_audio_minutes": results[0]["audio_minutes"], "results": results}
    _print_table(report, console)
    return report


def _print_table(report: dict, console) -> None:
    from rich.table import Table

    t = Table(title=f"presets of {report['model']} (block {report['block']}, {report['n_files']} files, "
                    f"{report['corpus_audio_minutes']:.1f} audio-min, workers {report['workers']})")
    for col in ("preset", "dtype", "model-only a-min/s", "end-to-end a-min/s", "e2e / model", "cos mean",
                "cos min"):
        t.add_column(col, justify="right")
    for r in report["results"]:
        def fmt(key: str, f: str = ".2f") -> str:
            return format(r[key], f) if r.get(key) is not None else "-"
        t.add_row(r["preset"], r["dtype"], fmt("model_only_audio_min_per_s"), fmt("e2e_audio_min_per_s"),
                  fmt("e2e_over_model_only"), fmt("cosine_mean", ".4f"), fmt("cosine_min", ".4f"))
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maest_cli.preset_eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="Directory of audio; synthetic songs are added up to --songs.")
    ap.add_argument("--songs", type=int, default=16, help="Synthetic songs to have in --corpus (0: use it as is).")
    ap.add_argument("--min-s", type=float, default=30.0)
    ap.add_argument("--max-s", type=float, default=180.0)
    ap.add_argument("--model", default=None, help="Model name or weights file (default: the registry default).")
    ap.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--block", type=int, default=7)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="Model-only timing repeats (median).")
    ap.add_argument("--no-timing", action="store_true", help="Fidelity only.")
    ap.add_argument("--work-dir", default=None, help="Where the extractions go (default: a temp dir).")
    ap.add_argument("--out", default=None, help="Write the report as JSON here.")
    a = ap.parse_args(argv)
    if a.songs:
        from .synth import write_corpus

        print(f"writing {a.songs} synthetic songs to {a.corpus} (kept for later runs) ...", file=sys.stderr)
        write_corpus(a.corpus, a.songs, min_s=a.min_s, max_s=a.max_s)
    report = evaluate_presets(a.corpus, a.model, [p for p in a.presets.split(",") if p], a.dtype, a.block,
                              a.workers, a.batch_size, a.work_dir, timing=not a.no_timing, repeats=a.repeats)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
