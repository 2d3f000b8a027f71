"""`maest prepare-mels`: audio -> a sharded log-mel dataset for training (and --verify, --merge)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer


def prepare_mels_command(
    paths: list[Path] = typer.Argument(None, help="AUDIO_ROOT; with --verify: DATASET_DIR; with --merge: the PARTs.",
                                       show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset directory to write (or finish)."),
    labels: list[Path] = typer.Option(None, "--labels", help="Label file: TSV path<TAB>tags[,...], MTG-Jamendo "
                                      "split TSVs, or MagnaTagATune annotations_final.csv. Repeatable."),
    vocabulary: Optional[str] = typer.Option(None, help="Fix the label list (name in configs/labels or a file); "
                                             "other tags are reported as unknown."),
    top_k: int = typer.Option(50, "--top-k", help="MagnaTagATune: keep the K most frequent tags."),
    crop: str = typer.Option("center:30", help="center:SECONDS (the paper: the central 30 s) or full."),
    shard_size: str = typer.Option("2GB", help="Largest shard file, e.g. 2GB, 512MB."),
    workers: int = typer.Option(1, help="Decoding processes."),
    split_by: str = typer.Option("artist", help="artist (artist-disjoint), none (by track) or mtt-directory "
                                 "(MagnaTagATune 12:1:3); label files with splits win."),
    val_fraction: float = typer.Option(0.1, help="Share of tracks for validation (when splits are drawn)."),
    test_fraction: float = typer.Option(0.1, help="Share of tracks for test (when splits are drawn)."),
    seed: int = typer.Option(0, help="Seed of the split draw."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: do part I of N of the input (join with --merge)."),
    verify: bool = typer.Option(False, "--verify", help="Check DATASET_DIR against its shards; exit 1 on a problem."),
    merge: bool = typer.Option(False, "--merge", help="Join the PART directories of a --shard run into --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Audio files -> sharded float16 log-mel memmaps with an index, for training (resumable)."""
    from maest_cli.errors import UsageError
    from maest_cli.mels.prepare import merge_datasets, prepare_mels, verify_dataset

    paths = list(paths or [])
    if verify and merge:
        raise UsageError("--verify and --merge do not go together")
    if verify:
        if len(paths) != 1:
            raise UsageError("--verify takes one DATASET_DIR")
        problems = verify_dataset(paths[0])
        for line in problems:
            print(line)
        if problems:
            print(f"maest: {paths[0]}: {len(problems)} problems", file=sys.stderr)
            raise typer.Exit(1)
        print(f"maest: {paths[0]}: ok", file=sys.stderr)
        return
    if out is None:
        raise UsageError("--out DATASET_DIR is required")
    if merge:
        summary = merge_datasets(paths, out, progress=not quiet)
    else:
        if len(paths) != 1:
            raise UsageError("give one AUDIO_ROOT (or --verify DATASET_DIR, or --merge PART... --out DIR)")
        summary = prepare_mels(paths[0], out, labels=labels or None, vocabulary=vocabulary, top_k=top_k, crop=crop,
                               shard_size=shard_size, workers=workers, split_by=split_by, val_fraction=val_fraction,
                               test_fraction=test_fraction, shard=shard, seed=seed, progress=not quiet)
    problems = summary.get("verify_problems") or []
    for line in problems:
        print(line)
    splits = ", ".join(f"{k} {v}" for k, v in summary.get("written_per_split", {}).items())
    rate = summary.get("audio_minutes_per_s")
    print(f"maest: {out}: {summary['written']} tracks in {summary['shards']} shards ({splits})"
          + (f", {rate} audio-min/s" if rate else "")
          + (" (already complete)" if summary.get("already_complete") else ""), file=sys.stderr)
    if summary["failed"]:
        print(f"maest: {summary['failed']} files failed, see {out / 'errors.tsv'}", file=sys.stderr)
    if summary["failed"] or problems:
        raise typer.Exit(1)
