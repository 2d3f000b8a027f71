"""`maest probe`: the paper's downstream evaluation (an MLP probe on embeddings), and --compare."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note, print_error, stdout_console


def probe_command(
    args: list[str] = typer.Argument(None, metavar="DATASET | RESULTS.json...",
                                     help="mtt, mtg-jamendo-{genre,instrument,moodtheme,top50} or custom; "
                                          "with --compare: results.json files."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", "-e",
                                              help="`maest extract` output folder (the cache with --audio-root)."),
    dataset_root: Optional[Path] = typer.Option(None, "--dataset-root",
                                                help="mtt: folder of annotations_final.csv; MTG-Jamendo: clone of "
                                                     "mtg-jamendo-dataset; custom: the TSV/CSV file."),
    audio_root: Optional[Path] = typer.Option(None, "--audio-root", help="Extract from this audio folder first."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Without --dataset-root, --embeddings and "
                                             "--audio-root: where `maest datasets download --root` put the "
                                             "datasets (default: $MAEST_DATA, else the user cache)."),
    split: Optional[int] = typer.Option(None, "--split", help="MTG-Jamendo split number (default 0)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="paper, quick, none, or a grid TOML file (default: paper "
                                       "for a downloaded dataset, else quick)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds of the selected setting (mean and std)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: probe-DATASET-EMBEDDINGSNAME)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    min_match: float = typer.Option(0.5, "--min-match", help="Least share of labelled tracks that must have "
                                                            "an embedding."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the state of an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of other inputs in --out."),
    compare: bool = typer.Option(False, "--compare", help="Print results.json files side by side."),
    model: Optional[str] = typer.Option(None, "--model", help="With --audio-root or a downloaded dataset: model "
                                        "name or weights file (default: the registry's)."),
    patchout: str = typer.Option("none", "--patchout", help="When embedding: speed preset (as extract)."),
    block: Optional[int] = typer.Option(None, "--block", help="When embedding: embeddings after this many "
                                        "blocks (default: the model's, 7 for the official models)."),
    tokens: str = typer.Option("cls,dist,avg", "--tokens", help="When embedding: tokens to stack."),
    dtype: str = typer.Option("auto", "--dtype", help="When embedding: auto, fp32, bf16."),
    engine: str = typer.Option("auto", "--engine", help="When embedding: auto (OpenVINO on CPU), torch or "
                               "openvino."),
    workers: int = typer.Option(1, "--workers", help="When embedding: decoding workers."),
    extract_batch_size: int = typer.Option(1, "--extract-batch-size", help="When embedding: model batch."),
) -> None:
    """The paper's downstream evaluation: an MLP probe on embeddings, scored on the test split."""
    from maest_cli.errors import UsageError

    if compare:
        from maest_cli.probing.report import compare_table, read_results

        if not args:
            raise UsageError("--compare needs results.json files")
        stdout_console().print(compare_table([(a, read_results(a)) for a in args]))
        return
    if not args or len(args) != 1:
        raise UsageError("give one DATASET (or --compare A.json B.json)")
    from maest_cli.embed.spec import InferenceSpec
    from maest_cli.probing.report import paper_lines, results_table
    from maest_cli.probing.run import default_out, downloaded_out, probe

    downloaded = dataset_root is None and embeddings is None and audio_root is None
    spec = None
    if audio_root is not None or downloaded:
        spec = InferenceSpec(model=model, preset=patchout, block=block, tokens=tokens, dtype=dtype, device=device,
                             engine=engine)
    if out is None:
        out = downloaded_out(args[0], data_root, spec) if downloaded else default_out(args[0], embeddings, audio_root)
    results = probe(args[0], dataset_root=dataset_root, embeddings=embeddings, audio_root=audio_root,
                    data_root=data_root, spec=spec, split=split, grid=grid, seeds=seeds, device=device, out=out,
                    threads=threads, min_match=min_match, resume=not fresh, overwrite=overwrite,
                    extract_options={"workers": workers, "batch_size": extract_batch_size} if spec else None,
                    log=note)
    console = stdout_console()
    console.print(results_table(results))
    for line in paper_lines(results):
        console.print(line, highlight=False, markup=False)
    if results.get("extract_failed"):
        print_error(f"{results['extract_failed']} audio files could not be embedded (see "
                    f"{results['embeddings']['dir']}); the probe used the others")
        raise typer.Exit(1)
