"""Package a trained run as a bundled model: fp16 weights plus its training record, into
maest_cli/weights/, where the registry finds models that need no download (`maest-tiny`).

    maest models bundle RUN_DIR maest_cli/weights/maest-tiny [--weights swa|best|last]
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file, write_json
from maest_cli.models.checkpoints import build_model, load_checkpoint, save_checkpoint


def bundle_run(run_dir: str | Path, dest_stem: str | Path, weights: str = "swa", name: str | None = None) -> dict:
    """Write DEST.safetensors (fp16), DEST.train.json (the resolved recipe) and DEST.metrics.jsonl.

    The SWA weights are the default, as the published MAEST models; the metadata keeps the
    input normalisation the model was trained with, so extract scales its input the same way.
    """
    check_run(run_dir, weights)
    run, dest = Path(run_dir), Path(dest_stem)
    src = run / f"{weights}.safetensors"
    ckpt = load_checkpoint(src)
    model = build_model(ckpt)
    extra = {k: v for k, v in ckpt.metadata.items() if k != "format"}
    extra.update(name=name or dest.name, bundled_from=f"{run.name}/{src.name}", bundled_sha256=ckpt.sha256,
                 stored_dtype="float16")
    out = save_checkpoint(dest.with_suffix(".safetensors"), model, ckpt.labels, extra, dtype=torch.float16)
    shutil.copyfile(run / "config.resolved.json", dest.with_suffix(".train.json"))
    shutil.copyfile(run / "metrics.jsonl", dest.with_suffix(".metrics.jsonl"))
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
              if line.strip() and json.loads(line).get("kind") == "epoch"]
    record = {"weights": out.name, "sha256": sha256_file(out), "source": str(src), "epochs": len(epochs),
              "last_epoch": epochs[-1] if epochs else None}
    write_json(dest.with_suffix(".json"), record)
    return record


WEIGHTS = ("swa", "best", "last")


def check_run(run_dir: str | Path, weights: str = "swa") -> None:
    """Refuse, in one UsageError naming the file, a RUN_DIR that `bundle_run` cannot package:
    before anything is written, rather than a traceback halfway through."""
    if weights not in WEIGHTS:
        raise UsageError(f"--weights {weights!r}: choose one of {', '.join(WEIGHTS)}")
    run = Path(run_dir)
    if not run.is_dir():
        raise UsageError(f"{run}: not a run directory of `maest train`"
                         + ("" if run.exists() else " (it does not exist)"))
    for name in (f"{weights}.safetensors", "config.resolved.json", "metrics.jsonl"):
        if not (run / name).is_file():
            raise UsageError(f"{run}: no {name} here; not a finished run of `maest train`"
                             + (" (--weights chooses swa, best or last)" if name.endswith(".safetensors") else ""))
