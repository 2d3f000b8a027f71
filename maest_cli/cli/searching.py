"""`maest similar` (nearest tracks of a dataset, near-duplicates) and `maest index build`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note, print_error, shown_path

index_app = typer.Typer(help="The search index of an extract dataset (for `maest similar`).", no_args_is_help=True)


def similar_command(
    queries: Optional[list[Path]] = typer.Argument(None, help="Audio files (embedded as the dataset was) or paths "
                                                   "already in the dataset.", show_default=False),
    dataset: Path = typer.Option(..., "--dataset", "-d", help="The extract dataset (folder) to search.",
                                 show_default=False),
    k: int = typer.Option(10, "-k", "--top", help="Tracks per query, most similar first."),
    exact: bool = typer.Option(False, "--exact", help="Exact search even when `maest index build` made an index."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv or json."),
    duplicates: bool = typer.Option(False, "--duplicates", help="List pairs of tracks that are the same recording "
                                    "(re-encodes, trims, other containers) instead of answering queries."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="--duplicates: the cosine from which a pair "
                                              "is the same recording (default: measured for the index's "
                                              "normalisation; see the README)."),
    device: str = typer.Option("auto", help="Embedding audio queries: auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="Embedding audio queries: auto, fp32, bf16, fp16 (GPU), int8 (CPU)."),
    engine: str = typer.Option("auto", "--engine", help="Embedding audio queries: auto, torch or openvino."),
) -> None:
    """The tracks of a dataset most similar to each query (cosine after the index's normalisation)."""
    from maest_cli.catalogue import similarity
    from maest_cli.catalogue.tables import FORMATS
    from maest_cli.errors import UsageError

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: choose table, csv or json")
    if duplicates:
        if queries:
            raise UsageError("--duplicates looks at the whole dataset: give no QUERY with it")
        table = similarity.find_duplicates(dataset, threshold=threshold, exact=exact, log=note)
    else:
        if threshold is not None:
            raise UsageError("--threshold goes with --duplicates")
        table = similarity.similar([str(q) for q in queries or []], dataset, k=k, exact=exact, device=device,
                                   dtype=dtype, engine=engine, log=note)
        for f in table.failures:
            print_error(f)
    for n in table.notes:
        note(f"maest: warning: {n}")
    if fmt == "json":
        print(table.to_json())
    elif fmt == "csv":
        print(table.to_csv(), end="")
    elif duplicates:
        print_duplicates(table)
    else:
        print_similar(table)
    if table.exit_code:
        raise typer.Exit(table.exit_code)


def print_similar(table) -> None:
    """Per query: rank, cosine and path of its nearest tracks (paths whole, never cut)."""
    for r in table.results:
        print(f"{shown_path(r.query)}  ({'in the dataset' if r.source == 'dataset' else 'embedded'}; "
              f"{table.search} search over {table.tracks} tracks, {table.normalisation} cosine)")
        for n in r.neighbours:
            print(f"  {n.rank:>3}  {n.similarity:7.4f}  {shown_path(n.path)}")
        print()


def print_duplicates(table) -> None:
    print(f"{len(table.pairs)} pairs at cosine >= {table.threshold} ({table.normalisation}) among {table.tracks} "
          f"tracks, {table.search} search")
    for p in table.pairs:
        print(f"  {p.similarity:7.4f}  {shown_path(p.a)}  =  {shown_path(p.b)}")


@index_app.command("build")
def index_build_command(
    dataset: Path = typer.Argument(..., help="The extract dataset (folder); the index goes to DATASET/_index/.",
                                   show_default=False),
    normalisation: Optional[str] = typer.Option(None, "--normalisation", help="raw, centred or whitened (default: "
                                                "the stored choice, else whitened; see the README)."),
    dims: Optional[int] = typer.Option(None, "--dims", help="whitened: principal dimensions kept (default: 32, at "
                                       "most one per 4 tracks)."),
    connectivity: int = typer.Option(16, "--connectivity", help="Graph degree of the ANN index."),
    expansion_add: int = typer.Option(128, "--expansion-add", help="Candidates considered when adding a vector."),
    expansion_search: int = typer.Option(64, "--expansion-search", help="Candidates considered per query."),
    as_json: bool = typer.Option(False, "--json", help="Print a one-line JSON summary on stdout."),
) -> None:
    """Build the approximate index of a dataset; `maest similar` uses it from then on (rebuilt when the
    dataset changes)."""
    from maest_cli.catalogue.similarity import build_index
    from maest_cli.errors import UsageError

    for name, value in (("--connectivity", connectivity), ("--expansion-add", expansion_add),
                        ("--expansion-search", expansion_search)):
        if value < 1:
            raise UsageError(f"{name} must be >= 1")
    s = build_index(dataset, normalisation=normalisation, dims=dims, log=note, connectivity=connectivity,
                    expansion_add=expansion_add, expansion_search=expansion_search)
    for n in s.notes:
        note(f"maest: warning: {n}")
    if as_json:
        print(s.to_json())
    note(f"maest: indexed {s.tracks} tracks ({s.dim} dims, {s.normalisation}) with {s.library} {s.version} in "
         f"{s.build_seconds:.1f} s: {s.index}/")
