"""`maest models list|download|info|bundle`: the registry of models, its cache, and bundling a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import print_error

models_app = typer.Typer(help="MAEST models: list, download, inspect, and bundle a trained run.",
                         no_args_is_help=True)


@models_app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The registry of official models and whether each is in the cache."""
    from maest_cli.cli.output import stdout_console
    from maest_cli.cli.tables import print_models
    from maest_cli.io.download import cache_dir
    from maest_cli.models.registry import cached_weights, load_registry

    reg = load_registry()
    rows = [{"name": m.name, "aliases": list(m.aliases), "variant": m.variant, "labels": m.labels,
             "default": m.name == reg.default, "cached": str(cached_weights(m) or ""),
             "description": m.description} for m in reg.models.values()]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print_models(rows, str(cache_dir()), stdout_console())


@models_app.command("download")
def download_command(
    names: list[str] = typer.Argument(None, help="Model names or aliases (default: the default model)."),
    all_models: bool = typer.Option(False, "--all", help="Download every model of the registry."),
) -> None:
    """Fetch weights into the cache (resumable, verified, atomic)."""
    from maest_cli.errors import MaestError
    from maest_cli.models.registry import fetch_model, load_registry, read_record

    reg = load_registry()
    entries = list(reg.models.values()) if all_models else [reg.get(n) for n in (names or [reg.default])]
    failed = 0
    for entry in entries:  # each model on its own: one that cannot be had does not stop the others
        try:
            path = fetch_model(entry)
        except (MaestError, OSError) as e:
            print_error(e)
            failed += 1
            continue
        rec = read_record(path)
        if rec.get("pinned") is False:  # the fallback: later loads are checked against the hash recorded now
            print(f"{entry.name}: {path} (unpinned: no published hash; sha256 {rec['sha256']} recorded)", flush=True)
        else:
            print(f"{entry.name}: {path}", flush=True)
    if failed:
        raise typer.Exit(1)


@models_app.command("info")
def info_command(
    model: str = typer.Argument(..., help="Model name, alias, or path to a weights file."),
    download: bool = typer.Option(False, "--download", help="Download the weights if missing."),
) -> None:
    """Config, parameter count, labels, checksum and provenance (pinned or recorded hash) of a model."""
    from maest_cli.models.registry import model_info

    print(json.dumps(model_info(model, download=download), indent=2))


@models_app.command("bundle")
def bundle_command(
    run_dir: Path = typer.Argument(..., metavar="RUN_DIR", help="A finished `maest train` run directory."),
    dest: Path = typer.Argument(..., metavar="DEST", help="Path stem of the bundle, e.g. maest_cli/weights/maest-tiny: writes "
                                "DEST.safetensors (fp16), DEST.json, DEST.train.json, DEST.metrics.jsonl."),
    weights: str = typer.Option("swa", "--weights", help="Which weights of the run: swa, best (on validation) "
                                "or last."),
    name: Optional[str] = typer.Option(None, "--name", help="Model name recorded in the weights (default: DEST's "
                                       "file name)."),
) -> None:
    """Package a trained run as a bundled model (fp16 weights and its training record)."""
    from maest_cli.models.bundle import bundle_run

    print(json.dumps(bundle_run(run_dir, dest, weights, name=name), indent=2))
