"""`maest bench`: throughput of the presets against EfficientNet-B0 (no subcommand), and
`maest bench fidelity|mels|train|probe`: the preset evaluation and the other measurements."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note, stderr_console

bench_app = typer.Typer(
    help="Speed measurements. Without a subcommand: audio-minutes per second of each preset against "
         "EfficientNet-B0, FLOPs and efficiency.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@bench_app.callback()
def throughput_command(
    ctx: typer.Context,
    presets: str = typer.Option("all", help="Comma-separated presets of configs/presets.toml, or all."),
    baseline: str = typer.Option("effnet-b0", help="effnet-b0 (EfficientNet-B0, Discogs-EffNet input) or none."),
    model: Optional[str] = typer.Option(None, help="Model name or path; default: random weights of --variant "
                                        "(the same time as real ones; fidelity then means little)."),
    variant: str = typer.Option("30s", help="Segment length of the random-weight model: 5s, 10s, 20s, 30s."),
    block: Optional[int] = typer.Option(None, help="Stop after this block (default: the model's, 7 for the "
                                        "official models; 0: all blocks and the classifier head)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (each preset's own: bf16 only where native, else fp32), fp32, "
                                           "bf16 or int8 for every preset."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's, all cores)."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="Also end to end from the audio files in DIR, and "
                                         "fidelity (cosine to preset none) of each preset."),
    workers: int = typer.Option(1, help="With --audio: decoder processes."),
    hop: str = typer.Option("half", help="With --audio: segment hop of extract (half, full or seconds)."),
    repeats: int = typer.Option(5, help="Timed rounds; every contender runs once per round (median, min, max)."),
    warmup: int = typer.Option(1, help="Untimed calls of each contender first."),
    probe: list[str] = typer.Option(None, "--probe", help="A `maest probe` results.json ([NAME=]FILE; NAME: a "
                                    "preset or effnet-b0, default the file's preset): mAP in the table and plot."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of throughput vs fidelity (and vs probe "
                                        "mAP), like the paper's Figure 3 (needs --audio or --probe)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    out: Optional[Path] = typer.Option(None, help="Write the report as JSON here."),
    engine: str = typer.Option("torch", "--engine", help="Engines to time each preset and the baseline on, e.g. "
                               "torch,openvino (auto: what extract would use)."),
    model_only: bool = typer.Option(False, "--model-only", help="Model-only timing even when --audio is given."),
    compile_baseline: bool = typer.Option(False, "--compile", help="torch.compile the baseline (about 1.7x faster "
                                          "on CPU; MAEST is GEMM-bound and gains nothing, so it stays eager)."),
) -> None:
    """Audio-minutes per second of each preset against EfficientNet-B0, FLOPs and efficiency."""
    if ctx.invoked_subcommand is not None:
        return
    from maest_cli.bench.throughput import print_report, run_bench
    from maest_cli.embed.spec import InferenceSpec
    from maest_cli.io.artefacts import check_out_file, write_json

    check_out_file(out)
    console = stderr_console()
    spec = InferenceSpec(model=model, block=block or None, hop=hop, device=device, dtype=dtype)
    report = run_bench(spec, presets=presets, variant=variant, full_model=block == 0, baseline=baseline,
                       threads=threads, audio=None if model_only else audio, workers=workers, repeats=repeats,
                       warmup=warmup, probe_results=probe, plot=plot, compile_baseline=compile_baseline,
                       console=console, engines=engine)
    print_report(report, console)
    if out:
        write_json(out, report)
    if plot:
        note(f"maest: plot written to {plot}")
    if as_json:
        print(json.dumps(report, indent=2))


@bench_app.command("fidelity")
def fidelity_command(
    corpus: Path = typer.Option(..., "--corpus", help="Directory of audio; synthetic songs are added up to --songs."),
    songs: int = typer.Option(16, "--songs", help="Synthetic songs to have in --corpus (0: use it as is)."),
    min_s: float = typer.Option(30.0, "--min-s", help="Shortest synthetic song, in seconds."),
    max_s: float = typer.Option(180.0, "--max-s", help="Longest synthetic song, in seconds."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name or weights file (default: the registry "
                                        "default)."),
    random_weights: Optional[str] = typer.Option(None, "--random-weights", metavar="VARIANT",
                                                 help="Instead of --model: a MAEST of this variant (5s/10s/20s/30s) "
                                                      "with random weights, for speed where the official weights "
                                                      "are missing (fidelity figures then mean little)."),
    presets: str = typer.Option("none,fast,faster,fastest", "--presets", help="Comma-separated presets; none (the "
                                "fp32 reference of fidelity) always runs first."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (each preset's own), fp32, bf16 or int8 for every "
                              "preset but none."),
    block: Optional[int] = typer.Option(None, "--block", help="Embedding block (default: the model's, 7 for the "
                                        "official models)."),
    workers: int = typer.Option(1, "--workers", help="Decoder processes of extract."),
    batch_size: int = typer.Option(1, "--batch-size", help="Segments per forward."),
    hop: str = typer.Option("half", "--hop", help="Segment hop of extract: half, full or seconds."),
    threads: str = typer.Option("default", "--threads", help="Model thread counts to compare, e.g. 2,1 "
                                "('default': torch's, all cores)."),
    repeats: int = typer.Option(1, "--repeats", help="Model-only timing repeats (median)."),
    engine: str = typer.Option("auto", "--engine", help="auto (OpenVINO on CPU, torch on GPUs, for int8 and without openvino), torch or openvino."),
    no_timing: bool = typer.Option(False, "--no-timing", help="Fidelity only."),
    work_dir: Optional[Path] = typer.Option(None, "--work-dir", help="Where the extractions go (default: a temp "
                                            "dir)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Speed and fidelity of the extraction presets on synthetic music (the preset evaluation).

    Model-only and end-to-end audio-minutes per second of each preset, and the cosine similarity
    of its track embeddings to those of preset none (fp32, the exact model)."""
    from maest_cli.bench.fidelity import run_fidelity
    from maest_cli.embed.spec import InferenceSpec
    from maest_cli.errors import UsageError

    try:
        thread_counts = [None if t.strip() == "default" else int(t) for t in threads.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"--threads {threads!r}: expected counts or 'default', e.g. 2,1") from None
    if not thread_counts:
        raise UsageError(f"--threads {threads!r}: give counts or 'default', e.g. 2,1")
    spec = InferenceSpec(model=model, block=block, hop=hop, dtype=dtype, device="cpu", engine=engine)
    run_fidelity(corpus, spec, [p.strip() for p in presets.split(",") if p.strip()], songs=songs, min_s=min_s,
                 max_s=max_s, random_weights=random_weights, workers=workers, batch_size=batch_size,
                 work_dir=work_dir, timing=not no_timing, repeats=repeats, threads=thread_counts, out=out,
                 progress=not quiet)


@bench_app.command("mels")
def mels_command(
    files: int = typer.Option(20, "--files", help="Synthetic files per format."),
    seconds: float = typer.Option(180.0, "--seconds", help="Length of each file."),
    repeats: int = typer.Option(3, "--repeats", help="Interleaved rounds."),
    workers: str = typer.Option("1,2", "--workers", help="Decoder process counts to compare."),
    formats: str = typer.Option("mp3,ogg", "--formats", help="Formats to compare: mp3, ogg."),
    work: Path = typer.Option(Path("bench-mels-data"), "--work", help="Where the files are written (kept)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures as JSON here."),
) -> None:
    """prepare-mels against the machine's decode limit, measured in the same rounds.

    Audio-minutes per second of decoding alone and of prepare-mels (cold and warm decoders), for
    each format and worker count, and each as a share of the round's decode limit."""
    from maest_cli.bench.mels import run_mels_bench, table

    result = run_mels_bench(work, files=files, repeats=repeats, workers=_counts("--workers", workers),
                            formats=formats.split(","), seconds=seconds, out=out)
    print(table(result))


@bench_app.command("train")
def train_command(
    variant: str = typer.Option("30s", "--variant", help="MAEST variant: 5s, 10s, 20s or 30s."),
    batch_size: int = typer.Option(4, "--batch-size", help="Examples per step."),
    drop_time: Optional[int] = typer.Option(None, "--drop-time", help="Time columns dropped (default: the "
                                            "paper's)."),
    drop_freq: int = typer.Option(3, "--drop-freq", help="Frequency rows of the second patchout row (0: no row)."),
    dtype: str = typer.Option("auto", "--dtype", help="auto (fp32 unless the CPU has native bf16), fp32, bf16."),
    repeats: int = typer.Option(5, "--repeats", help="Timed steps of each setting."),
    warmup: int = typer.Option(1, "--warmup", help="Untimed steps first."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON here."),
) -> None:
    """Training throughput with and without training patchout, measured in one run."""
    from maest_cli.bench.training import print_train_bench, run_train_bench

    result = run_train_bench(variant=variant, batch_size=batch_size, drop_time=drop_time, drop_freq=drop_freq,
                             dtype=dtype, repeats=repeats, warmup=warmup, threads=threads, out=out)
    print_train_bench(result, stderr_console())


@bench_app.command("probe")
def probe_command(
    tracks: int = typer.Option(25_000, "--tracks", help="Synthetic tracks."),
    dim: int = typer.Option(2304, "--dim", help="Embedding size (2304: MAEST's cls+dist+avg)."),
    tags: int = typer.Option(50, "--tags", help="Tags."),
    grid: str = typer.Option("quick", "--grid", help="paper, quick, none, or a grid TOML file."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds of the selected setting."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    work: Path = typer.Option(Path("bench-probe-data"), "--work", help="Where the dataset and results go."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the report as JSON here."),
) -> None:
    """How long `maest probe` takes on a catalogue-sized synthetic dataset."""
    from maest_cli.bench.probing import run_probe_bench

    report = run_probe_bench(work, tracks=tracks, dim=dim, tags=tags, grid=grid, seeds=seeds, threads=threads,
                             out=out)
    print(json.dumps(report, indent=2))


def _counts(option: str, text: str) -> list[int]:
    """'1,2' -> [1, 2]; anything else is a usage error naming the option."""
    from maest_cli.errors import UsageError

    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: expected comma-separated counts, e.g. 1,2") from None
