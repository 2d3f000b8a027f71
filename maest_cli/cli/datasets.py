"""`maest datasets list|download|info`: the research datasets the tool fetches, verifies and finds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import print_error

datasets_app = typer.Typer(help="Research datasets (MagnaTagATune, MTG-Jamendo): list, download, inspect.",
                           no_args_is_help=True)

ROOT_HELP = "Data root holding one folder per dataset (default: $MAEST_DATA, else the user cache's datasets/)."


@datasets_app.command("list")
def list_command(
    root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The datasets, where they go, and how much of each is downloaded."""
    from rich.table import Table

    from maest_cli.cli.output import stdout_console
    from maest_cli.datasets.fetch import list_datasets

    rows = list_datasets(root)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(show_edge=False)
    for col in ("name", "title", "state", "coverage", "size", "folder"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["title"], r["state"], r["coverage"], r["size"], r["folder"])
    stdout_console().print(table)


@datasets_app.command("download")
def download_command(
    name: str = typer.Argument(..., help="mtt or mtg-jamendo (the probe's mtg-jamendo-* names also work)."),
    root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP),
    tars: Optional[str] = typer.Option(None, "--tars", help="MTG-Jamendo: which of the 100 audio tars, e.g. 0-9 or "
                                       "3,5,7-9 (default: all)."),
    quality: str = typer.Option("low", "--quality", help="MTG-Jamendo audio: low (mono MP3, ~156 GB in all) or "
                                "high (320 kbps, ~508 GB)."),
    keep_archives: bool = typer.Option(False, "--keep-archives", help="Keep the zip parts / tars after unpacking "
                                       "(default: deleted once every member is checked)."),
) -> None:
    """Fetch, verify and unpack a dataset (resumable; a finished one is left alone)."""
    from maest_cli.cli.output import note
    from maest_cli.datasets.fetch import download_dataset

    s = download_dataset(name, root, tars=tars, quality=quality, keep_archives=keep_archives, log=note)
    if s.already_complete:
        print(f"{s.name}: already downloaded under {s.root} ({s.coverage}); nothing to do", flush=True)
    else:
        done = f"fetched {len(s.fetched)} file(s), unpacked {len(s.unpacked)} archive(s)"
        print(f"{s.name}: {'complete' if s.complete else 'partial'} under {s.root} ({s.coverage}); {done}; "
              f"manifest {s.manifest}", flush=True)
    print(f"licence: {s.licence}", flush=True)
    for line in s.failed:
        print_error(line)
    if s.failed:
        raise typer.Exit(1)


@datasets_app.command("info")
def info_command(
    name: str = typer.Argument(..., help="mtt or mtg-jamendo (the probe's mtg-jamendo-* names also work)."),
    root: Optional[Path] = typer.Option(None, "--root", help=ROOT_HELP),
    manifest: bool = typer.Option(False, "--manifest", help="Include the whole manifest (every file's sha256)."),
) -> None:
    """Sources, licence, folder, and what of the dataset is downloaded (JSON)."""
    from maest_cli.datasets.fetch import dataset_info

    info = dataset_info(name, root)
    if not manifest and "manifest" in info:
        m = info.pop("manifest")
        info["manifest_summary"] = {k: m[k] for k in ("updated", "quality", "tars_total") if k in m}
    print(json.dumps(info, indent=2, ensure_ascii=False))
