"""`maest extract`: directories of audio -> a Parquet dataset of embeddings."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note


def extract_command(
    paths: list[Path] = typer.Argument(..., help="Audio files or directories (walked recursively, sorted).",
                                       show_default=False),
    out: Path = typer.Option(Path("embeddings"), "--out", "-o", help="Output Parquet dataset directory "
                             "(resumable; relative to the working directory)."),
    model: Optional[str] = typer.Option(None, help="Model name, alias or weights file; default: the registry "
                                        "default (MAEST-30s)."),
    patchout: str = typer.Option("none", "--patchout", help="Speed preset: none (exact), fast, faster, fastest, "
                                 "none-int8, fast-int8 (CPU int8 Linear layers; configs/presets.toml)."),
    time_keep_every: Optional[int] = typer.Option(None, "--time-keep-every", help="Expert: keep every Nth time "
                                                  "column (overrides the preset)."),
    drop_freq_rows: Optional[str] = typer.Option(None, "--drop-freq-rows", help="Expert: frequency rows to drop, "
                                                 "e.g. 0,8 ('none': drop none; overrides the preset)."),
    block: Optional[int] = typer.Option(None, help="Embedding after this many transformer blocks (default: the "
                                        "model's, 7 for the official models: the paper's best)."),
    tokens: str = typer.Option("cls,dist,avg", help="Tokens to concatenate: cls, dist, avg (mean of patches)."),
    pool: str = typer.Option("track", help="track: one row per file (mean over segments); segment: one per segment."),
    hop: str = typer.Option("half", help="Segment hop: half, full or seconds."),
    scores: bool = typer.Option(False, "--scores", help="Add the sigmoid Discogs style activations."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (the preset's: bf16 where native, else fp32; int8 for the -int8 "
                              "presets), fp32, bf16, fp16 (GPU), int8 (CPU)."),
    engine: str = typer.Option("auto", "--engine", help="auto (OpenVINO on CPU, torch on GPUs, for int8 and without openvino), torch or openvino."),
    workers: int = typer.Option(1, help="Decoder processes (0: decode in the main process)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Segments per forward (CPU: 1 is fastest)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Model threads in the main process (default: "
                                          "torch's, all cores). Decoders use one each."),
    ext: Optional[str] = typer.Option(None, "--ext", help="Extensions to take from directories, e.g. mp3,wav "
                                      "(default: every decodable format)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard what DIR holds and start again."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process part I of N of the files (torchrun: "
                                        "RANK/WORLD_SIZE)."),
    files_per_part: int = typer.Option(512, "--files-per-part", hidden=True, help="Audio files per Parquet part."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no per-file error lines."),
    as_json: bool = typer.Option(False, "--json", help="Print a one-line JSON summary on stdout."),
) -> None:
    """Embed directories of audio into a Parquet dataset (resumable, shardable)."""
    from maest_cli.embed.extraction import extract
    from maest_cli.embed.spec import InferenceSpec

    spec = InferenceSpec(model=model, preset=patchout, time_keep_every=time_keep_every,
                         drop_freq_rows=drop_freq_rows, block=block, tokens=tokens, pool=pool, hop=hop,
                         scores=scores, device=device, dtype=dtype, engine=engine)
    summary = extract([str(p) for p in paths], out, spec, workers=workers, batch_size=batch_size, threads=threads,
                      extensions=ext.split(",") if ext else None, overwrite=overwrite, shard=shard,
                      progress=not quiet, files_per_part=files_per_part)
    if as_json:
        print(summary.to_json())
    if not quiet:
        note(f"maest: {summary.n_done} files embedded ({summary.audio_seconds / 60:.1f} audio-min, "
             f"{summary.audio_min_per_s:.2f} audio-min/s), {summary.n_skipped} already there, "
             f"{summary.n_failed} failed")
    if summary.n_failed:
        note(f"maest: {summary.n_failed} failed; see {summary.errors_file}")
    if not quiet:  # last, as --out may have been left to its default
        note(f"maest: output: {out}/ (Parquet dataset)")
    if summary.n_failed:
        raise typer.Exit(1)
