"""`maest tag`: the strongest labels of a model, by name, per track (table, CSV or JSON on stdout)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note, print_error, shown_path, stdout_console


def tag_command(
    paths: Optional[list[Path]] = typer.Argument(None, help="Audio files or directories (walked recursively).",
                                                 show_default=False),
    model: Optional[str] = typer.Option(None, help="Model name, alias or weights file with label names; default: "
                                        "the registry default (MAEST-30s, Discogs styles)."),
    top: int = typer.Option(5, "--top", "-k", help="Labels per track (and groups in the summary)."),
    threshold: float = typer.Option(0.0, "--threshold", "-t", help="Drop labels whose activation (0..1) is below."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    from_dataset: Optional[Path] = typer.Option(None, "--from", help="Read an extract dataset made with --scores "
                                                "instead of audio."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Extract dataset to embed into (resumable; "
                                       "default: a folder of the user cache named by the inputs and settings)."),
    patchout: str = typer.Option("none", "--patchout", help="Speed preset: none (exact), fast, faster, fastest, "
                                 "none-int8, fast-int8."),
    hop: str = typer.Option("half", help="Segment hop: half, full or seconds (activations are averaged over "
                            "segments)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (the preset's), fp32, bf16, fp16 (GPU), int8 (CPU)."),
    engine: str = typer.Option("auto", "--engine", help="auto (OpenVINO on CPU, torch on GPUs), torch or openvino."),
    workers: int = typer.Option(1, help="Decoder processes (0: decode in the main process)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Segments per forward (CPU: 1 is fastest)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Model threads (default: all cores)."),
    ext: Optional[str] = typer.Option(None, "--ext", help="Extensions to take from directories, e.g. mp3,wav."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (failed files are still listed)."),
) -> None:
    """Tag audio by name: each track's strongest labels (Discogs: style and genre, and a genre summary)."""
    from maest_cli.catalogue.tables import FORMATS
    from maest_cli.catalogue.tags import tag
    from maest_cli.embed.spec import InferenceSpec
    from maest_cli.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose table, csv or json")
    if from_dataset is not None:
        given = [name for name, value, default in (("--patchout", patchout, "none"), ("--hop", hop, "half"),
                                                   ("--device", device, "auto"), ("--dtype", dtype, "auto"),
                                                   ("--engine", engine, "auto"), ("--ext", ext, None))
                 if value != default]
        if given:
            raise UsageError(f"{', '.join(given)}: --from reads the activations a dataset holds; nothing is embedded")
        table = tag(paths, top=top, threshold=threshold, from_dataset=from_dataset, model=model,
                    out=out, progress=not quiet)
    else:
        spec = InferenceSpec(model=model, preset=patchout, hop=hop, scores=True, device=device, dtype=dtype,
                             engine=engine)
        table = tag([str(p) for p in paths or []], top=top, threshold=threshold, out=out, spec=spec,
                    progress=not quiet, workers=workers, batch_size=batch_size, threads=threads,
                    extensions=ext.split(",") if ext else None)
    for w in table.warnings:
        note(f"maest: warning: {w}")
    for f in table.failures[table.failures_shown:]:
        print_error(f)
    if fmt == "json":
        print(table.to_json())
    elif fmt == "csv":
        print(table.to_csv(), end="")
    else:
        print_tags(table)
    if not quiet:
        s = table.summary
        done = f" ({s.n_done} embedded now, {s.n_skipped} already there)" if s else ""
        note(f"maest: {len(table.tracks)} tracks tagged{done}, {len(table.failures)} failed; activations of "
             f"{table.model} in {table.dataset}/")
    if table.failures:
        raise typer.Exit(1)


def print_tags(table) -> None:
    """One small table per track: its top labels and, for grouped labels, the group summary beside them."""
    from rich.table import Table
    from rich.text import Text

    console = stdout_console()
    for t in table.tracks:
        grid = Table(title=Text(shown_path(t.path)), title_justify="left", box=None, pad_edge=False, padding=(0, 2, 0, 0))
        grid.add_column(table.name_title)
        if table.group_title:
            grid.add_column(table.group_title)
        grid.add_column("activation", justify="right")
        if table.group_title:
            grid.add_column("│")
            grid.add_column(f"{table.group_title} summary")
            grid.add_column(f"best {table.name_title}")
            grid.add_column("activation", justify="right")
        for i in range(max(len(t.labels), len(t.groups))):
            cells = []
            if i < len(t.labels):
                g = t.labels[i]
                cells += [Text(g.name)] + ([Text(g.group)] if table.group_title else []) + [f"{g.activation:.3f}"]
            else:
                cells += [""] * (3 if table.group_title else 2)
            if table.group_title:
                cells.append("│")
                cells += [Text(t.groups[i].group), Text(t.groups[i].name), f"{t.groups[i].activation:.3f}"] \
                    if i < len(t.groups) else ["", "", ""]
            grid.add_row(*cells)
        if not t.labels:
            grid.add_row(*([Text(f"(no label at or above {table.threshold})")] + [""] * (len(grid.columns) - 1)))
        console.print(grid)
        console.print()
