"""`maest export`: a model's embedding graph as ONNX or OpenVINO IR, for use without this package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from maest_cli.cli.output import note


def export_command(
    model: str = typer.Argument(..., help="Model name, alias or weights file (e.g. maest-30s)."),
    out: Path = typer.Option(..., "--out", "-o", help="File to write: ONNX, e.g. maest.onnx; OpenVINO: PATH or "
                             "PATH.xml names the pair PATH.xml + PATH.bin.", show_default=False),
    format: str = typer.Option("onnx", "--format", help="onnx or openvino (IR)."),
    block: Optional[int] = typer.Option(None, help="Embedding after this many transformer blocks (default: the "
                                        "model's, 7 for the official models)."),
    patchout: str = typer.Option("none", "--patchout", help="Speed preset: none (exact), fast, faster, fastest "
                                 "(fp32 only: the -int8 presets are refused)."),
    tokens: str = typer.Option("cls,dist,avg", help="Tokens to concatenate: cls, dist, avg (mean of patches)."),
    scores: bool = typer.Option(False, "--scores", help="A second output, `logits`: the raw Discogs style scores "
                                "(apply a sigmoid)."),
    as_json: bool = typer.Option(False, "--json", help="Print what was written, with its metadata, as JSON."),
) -> None:
    """Export the mel -> embedding graph in fp32 (input: Essentia's unnormalised log-mel, batch x frames x 96)."""
    from maest_cli.embed.export import export_model
    from maest_cli.embed.spec import InferenceSpec

    spec = InferenceSpec(model=model, preset=patchout, block=block, tokens=tokens, scores=scores, device="cpu",
                         dtype="fp32")
    report = export_model(spec, out, format)
    if as_json:
        print(json.dumps(report, indent=2))
    meta, check = report["metadata"], report["check"]
    checked = (f"checked with {check['engine']} at {check['frames']} frames: max relative error "
               f"{check['max_rel_err']:.1e}" if check.get("engine") else f"not checked ({check.get('skipped', 'off')})")
    note(f"maest: {meta['model']['name']} block {meta['block']} ({','.join(meta['tokens'])}, "
         f"{meta['embedding_dim']} dims{', + logits' if spec.scores else ''}, patchout {meta['preset']['name']}) -> "
         f"{', '.join(report['files'])} ({report['bytes'] / 1e6:.1f} MB); {checked}")
