"""`maest train`: MAEST (or EfficientNet-B0) on a `maest prepare-mels` dataset; --nproc N through torchrun."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note


def train_command(
    data: Optional[Path] = typer.Option(None, "--data", help="A `maest prepare-mels` dataset directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to create (checkpoints, metrics, state)."),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe: tiny, maest-5s/10s/20s/30s (configs/train) "
                                         "or a TOML file. Default: maest-30s."),
    init: Optional[str] = typer.Option(None, "--init", help="random, or a local weights file: MAEST (.ckpt, "
                                       "safetensors, HF), PaSST or DeiT; a model name only if already cached."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (overrides the recipe)."),
    epoch_len: Optional[int] = typer.Option(None, "--epoch-len", help="Tracks drawn per epoch."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per process per step."),
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Local processes (torchrun): GPUs, or CPU processes "
                                        "over gloo. Default: 1, or with --resume the run's own count.",
                                        show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its "
                                          "last saved state."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the init, the epoch draws and augmentations."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, fp32, bf16, fp16 (GPU)."),
    sets: list[str] = typer.Option(None, "--set", help="Any recipe key, e.g. --set lr=1e-4 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (epoch lines still print)."),
) -> None:
    """Train MAEST with patchout on a mel dataset (resumable; --nproc N for DDP)."""
    from maest_cli.errors import UsageError
    from maest_cli.training.config import parse_set
    from maest_cli.training.loop import check_run, in_launched_worker, launch, recorded_processes, train, worker_argv

    if nproc is not None and nproc < 1:
        raise UsageError("--nproc must be 1 or more")
    if resume is not None and not in_launched_worker():
        recorded = recorded_processes(resume)
        if nproc is not None and nproc != recorded:  # refused here, before N processes start and fail alike
            raise UsageError(f"--resume {resume}: the run used {recorded} processes; resume it with as many "
                             f"(--nproc {nproc} given; leave --nproc out to take the run's)")
        nproc = recorded
    nproc = nproc or 1
    overrides = {**parse_set(sets), **{k: v for k, v in dict(
        init=init, epochs=epochs, epoch_len=epoch_len, batch_size=batch_size, device=device, seed=seed,
        dtype=dtype).items() if v is not None}}
    if nproc > 1 and not in_launched_worker():
        check_run(data, out, config, overrides, resume)  # once, before N processes start and fail alike
        raise typer.Exit(launch(nproc, worker_argv(sys.argv)))
    summary = train(data, out, config, overrides, resume=resume, progress=not quiet)
    if "already_complete" not in summary and summary["rank"] == 0:
        b = summary["best"]
        best = f"best {b['metric']} {b['value']:.4f} at epoch {b['epoch']}" if b.get("value") is not None else ""
        note(f"maest: {summary['run_dir']}: {summary['epochs']} epochs, {summary['global_step']} steps"
             + (f"; {best}" if best else ""))
