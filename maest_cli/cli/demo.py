"""`maest corpus build|info` (the demo corpus) and `maest findings` (the paper's findings on it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import names, note, print_error, stdout_console

corpus_app = typer.Typer(help="The demo corpus: tagged music rendered offline from the music21 scores.",
                         no_args_is_help=True)


@corpus_app.command("build")
def build_command(
    out: Path = typer.Argument(..., help="Folder of the corpus (new, or an unfinished build to resume)."),
    clips: Optional[int] = typer.Option(None, help="Clips in total, pre-training + downstream (default: "
                                                    "configs/corpus.toml, 3600)."),
    seed: int = typer.Option(0, help="Decides pieces, splits, instruments, tempi, excerpts: same seed, same corpus."),
    workers: int = typer.Option(1, help="Processes reading scores and rendering clips."),
    sample_rate: Optional[int] = typer.Option(None, help="Hz of the FLAC files (default 22050)."),
    collections: Optional[str] = typer.Option(None, help="Comma-separated collection ids (default: all of the "
                                                          "config)."),
    config: Optional[Path] = typer.Option(None, help="A corpus TOML instead of configs/corpus.toml."),
    soundfont: Optional[Path] = typer.Option(None, help="SoundFont file (default: FluidR3_GM of the Debian package "
                                                         "fluid-soundfont-gm)."),
) -> None:
    """Render the scores of music21 to labelled 30 s clips (FluidSynth): resumable, deterministic."""
    from maest_cli.demo.corpus import build_corpus

    summary = build_corpus(out, clips=clips, seed=seed, workers=workers, sample_rate=sample_rate,
                           collections=collections.split(",") if collections else None, config=config,
                           soundfont=soundfont)
    print(json.dumps(summary, indent=2))
    if summary.get("failed"):
        raise typer.Exit(1)


@corpus_app.command("info")
def info_command(
    out: Path = typer.Argument(..., help="Folder of a finished corpus."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest."),
) -> None:
    """What a corpus holds: clips per split and collection, tags, versions, licences."""
    from maest_cli.cli.tables import print_corpus
    from maest_cli.demo.corpus import corpus_info

    m = corpus_info(out)
    if as_json:
        print(json.dumps(m, indent=2))
        return
    print_corpus(m, str(out), stdout_console(160))


def findings_command(
    out: Path = typer.Argument(..., help="Folder for findings.json, findings.md and the PNGs."),
    corpus: Path = typer.Option(..., "--corpus", help="A `maest corpus build` folder (built there when absent)."),
    model: str = typer.Option("maest-tiny", help="The trained MAEST: registry name or weights file."),
    work: Optional[Path] = typer.Option(None, help="Cache of every step (default OUT/work); rerun to resume."),
    mels: Optional[Path] = typer.Option(None, help="prepare-mels dataset of the pre-training clips for "
                                        "EfficientNet-B0 (default: the model's own, else prepared in WORK)."),
    effnet: Optional[Path] = typer.Option(None, help="A trained EfficientNet-B0 (`maest train --config effnet-b0`) "
                                          "instead of training one."),
    effnet_epochs: Optional[int] = typer.Option(None, help="EfficientNet-B0 training budget in epochs (default: "
                                                "configs/train/effnet-b0.toml, 10); the schedule is stretched."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated downstream tasks (default: all of the corpus)."),
    presets: Optional[str] = typer.Option(None, help="Comma-separated presets (default: all of configs/presets.toml)."),
    preset_block: Optional[int] = typer.Option(None, help="Block of the preset comparison (default: the best on "
                                               "validation)."),
    grid: str = typer.Option("quick", help="Probe grid of configs/probe.toml (each probe's setting chosen on validation)."),
    seeds: int = typer.Option(3, help="Probe seeds of the headline comparisons."),
    sweep_seeds: int = typer.Option(1, help="Probe seeds of the block x token sweep."),
    jobs: int = typer.Option(2, help="Probes run at once (one thread each)."),
    batch_size: int = typer.Option(8, help="Segments per forward."),
    repeats: int = typer.Option(5, help="Timing rounds of the throughput comparison."),
    clips: Optional[int] = typer.Option(None, help="Clips of the corpus, when it has to be built."),
    corpus_workers: int = typer.Option(2, help="Render processes, when the corpus has to be built."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    engine: str = typer.Option("auto", help="Engine of the preset timing: auto (OpenVINO on CPU), torch or openvino."),
) -> None:
    """Reproduce the paper's findings on the demo corpus: best blocks, presets vs EfficientNet-B0, training helps."""
    from maest_cli.demo.findings import FindingsOptions, run_findings

    opts = FindingsOptions(model=model, tasks=names(tasks), grid=grid, seeds=seeds, sweep_seeds=sweep_seeds,
                           presets=names(presets), preset_block=preset_block,
                           effnet=str(effnet) if effnet else None, effnet_epochs=effnet_epochs,
                           mels=str(mels) if mels else None, corpus_clips=clips, corpus_workers=corpus_workers,
                           batch_size=batch_size, device=device, engine=engine, jobs=jobs, repeats=repeats)
    f = run_findings(corpus, out, work=work, options=opts)
    for line in f["observations"]:
        note(f"- {line}")
    note(f"maest: findings in {out}/findings.md (tables), findings.json, blocks.png, presets.png, baselines.png")
    failed = sum(v.get("failed", 0) for v in f["sweeps"].values())
    if failed:
        print_error(f"{failed} clip embeddings failed (see the _errors folders under {f['work']}/emb)")
        raise typer.Exit(1)
