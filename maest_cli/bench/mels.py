"""How close `maest prepare-mels` comes to the machine's decode limit, as ratios
measured in the same rounds.

For each format (MP3, OGG) and worker count (1, 2), interleaved over --repeats rounds:
- decode limit: the same files decoded, downmixed and resampled to 16 kHz mono (audio.iter_audio:
  soundfile + soxr) by `workers` processes that are already running, no mel, nothing written;
- prepare-mels, cold: `maest_cli.prepare_mels(..., crop="full")` into a new directory, its
  decoder processes started by the call, as a user's run (without the interpreter's start-up
  and imports, about 2 s, which the command adds once);
- prepare-mels, warm: the same with the decoder processes already running, which is what a
  catalogue-sized run approaches (start-up paid once for thousands of files).
Audio-minutes per second, median and min-max, and each as a share of the round's decode limit.
The files are 44.1 kHz stereo songs from synth.py (3 minutes each by default), written once to --work.
Not a test: run it on a quiet machine.

    maest bench mels --files 20 --repeats 3 --out bench-mels.json
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from maest_cli.audio.decode import SAMPLE_RATE, iter_audio
from maest_cli.audio.synth import write_corpus
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import check_out_file, check_work_dir, tool_versions, write_json
from maest_cli.mels.prepare import decoder_pool, prepare_mels
from maest_cli.mels.writer import SECONDS_PER_FRAME

FORMATS = ("mp3", "ogg")


def decode_only(path: str) -> int:
    """What prepare-mels must do before its mel, for one whole file: 16 kHz samples made."""

    return sum(len(block) for block in iter_audio(path))


def stop_decoders(workers: int) -> None:

    decoder_pool(workers).shutdown(wait=True, kill_workers=True)


def time_decode(paths: list[str], workers: int) -> tuple[float, float]:
    """(seconds, audio minutes) for decoding `paths` on prepare-mels' own decoder processes, warm."""

    pool = decoder_pool(workers)
    list(pool.map(decode_only, paths[:workers]))  # started and imported, not timed
    t0 = time.perf_counter()
    samples = sum(pool.map(decode_only, paths))
    return time.perf_counter() - t0, samples / SAMPLE_RATE / 60


def time_prepare(root: Path, out: Path, workers: int, cold: bool) -> tuple[float, float]:
    """(seconds, audio minutes) of one prepare_mels call on `root` into a new `out`."""

    if cold:
        stop_decoders(workers)  # warm: time_decode left them running
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    report = prepare_mels(root, out, crop="full", workers=workers, split_by="none", progress=False)
    seconds = time.perf_counter() - t0
    if report["failed"]:
        raise RuntimeError(f"{out}: {report['failed']} tracks failed; see {out / 'errors.tsv'}")
    shutil.rmtree(out)
    return seconds, report["frames"] * SECONDS_PER_FRAME / 60


def run(work: Path, files: int, repeats: int, workers: list[int], formats: list[str], seconds: float = 180) -> dict:

    roots = {}
    for i, fmt in enumerate(formats):
        roots[fmt] = work / fmt
        write_corpus(roots[fmt], files, formats=(fmt,), min_s=seconds, max_s=seconds, seed=i + 1)
    rates: dict[str, list[float]] = {}
    load_before = os.getloadavg()
    for r in range(repeats):
        for fmt in formats:
            paths = sorted(str(p) for p in roots[fmt].iterdir() if p.suffix == f".{fmt}")
            for w in workers:
                for kind in ("decode", "cold", "warm"):
                    if kind == "decode":
                        took, minutes = time_decode(paths, w)
                    else:
                        took, minutes = time_prepare(roots[fmt], work / "out", w, cold=kind == "cold")
                    rates.setdefault(f"{fmt}/{w}/{kind}", []).append(minutes / took)
                    print(f"round {r + 1}: {fmt}, {w} worker(s), {kind}: {minutes / took:.2f} audio-min/s",
                          file=sys.stderr)
        for w in workers:
            stop_decoders(w)
    rows = []
    for fmt in formats:
        for w in workers:
            limit = rates[f"{fmt}/{w}/decode"]
            row = {"format": fmt, "workers": w}
            for kind in ("decode", "cold", "warm"):
                xs = rates[f"{fmt}/{w}/{kind}"]
                row[kind] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}
                if kind != "decode":
                    shares = [x / d for x, d in zip(xs, limit)]
                    row[f"{kind}_share"] = {"median": statistics.median(shares), "min": min(shares),
                                            "max": max(shares)}
            rows.append(row)
    return {"what": "prepare-mels (crop full) vs decode+resample only, audio-minutes per second",
            "files_per_format": files, "seconds_per_file": seconds, "source": "44.1 kHz stereo, maest_cli.audio.synth",
            "repeats": repeats, "cpu_count": os.cpu_count(), "load_average_before": load_before,
            "load_average_after": os.getloadavg(), "versions": tool_versions(), "rows": rows}


def table(result: dict) -> str:
    lines = ["| format | workers | decode limit | prepare-mels cold | share | prepare-mels warm | share |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def fmt(s: dict, pct: bool = False) -> str:
        k = 100 if pct else 1
        unit = "%" if pct else ""
        return f"{k * s['median']:.{0 if pct else 2}f}{unit} ({k * s['min']:.{0 if pct else 2}f}-{k * s['max']:.{0 if pct else 2}f})"

    for r in result["rows"]:
        lines.append(f"| {r['format'].upper()} | {r['workers']} | {fmt(r['decode'])} | {fmt(r['cold'])} | "
                     f"{fmt(r['cold_share'], True)} | {fmt(r['warm'])} | {fmt(r['warm_share'], True)} |")
    return "\n".join(lines)


def run_mels_bench(work: str | Path = "bench-mels-data", files: int = 20, repeats: int = 3,
                   workers: Sequence[int] = (1, 2), formats: Sequence[str] = FORMATS, seconds: float = 180,
                   out: str | Path | None = None) -> dict:
    """`run` with its options checked first (a UsageError naming the option), the figures also
    written as JSON to `out` when given: what `maest bench mels` calls."""
    formats = [f.strip().lower() for f in formats if f.strip()]
    if files < 2:
        raise UsageError(f"--files {files}: at least 2 files per format")
    if repeats < 1:
        raise UsageError(f"--repeats {repeats}: at least 1 round")
    if seconds <= 0:
        raise UsageError(f"--seconds {seconds}: a file lasts more than 0 seconds")
    if not workers or any(w < 1 for w in workers):
        raise UsageError(f"--workers {','.join(map(str, workers))}: decoder process counts of 1 or more")
    if not formats or not set(formats) <= set(FORMATS):
        raise UsageError(f"--formats {','.join(formats)}: choose from {', '.join(FORMATS)}")
    work = Path(work)
    check_work_dir(work)
    check_out_file(out)
    result = run(work, files, repeats, list(workers), formats, seconds)
    if out:
        write_json(out, result)
    return result
