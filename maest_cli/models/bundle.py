"""Package a trained run as a bundled model: fp16 weights plus its training record, into
maest_cli/weights/, where the registry finds models that need no download (`maest-tiny`).

    python -m maest_cli.models.bundle RUN_DIR maest_cli/weights/maest-tiny [--weights swa|best|last]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from maest_cli.io.artefacts import sha256_file, write_json
from maest_cli.models.checkpoints import build_model, load_checkpoint, save_checkpoint


def bundle_run(run_dir: str | Path, dest_stem: str | Path, weights: str = "swa", name: str | None = None) -> dict:
    """Write DEST.safetensors (fp16), DEST.train.json (the resolved recipe) and DEST.metrics.jsonl.

    The SWA weights are the default, as the published MAEST models; the metadata keeps the
    input normalisation the model was trained with, so extract scales its input the same way.
    """
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("dest_stem")
    ap.add_argument("--weights", default="swa", choices=("swa", "best", "last"))
    args = ap.parse_args()
    print(json.dumps(bundle_run(args.run_dir, args.dest_stem, args.weights), indent=2))


if __name__ == "__main__":
    main()
