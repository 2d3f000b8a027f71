"""How long `maest probe` takes on a dataset of catalogue size: 25,000 tracks x 2304-d (MAEST's
cls+dist+avg), 50 tags, MagnaTagATune-like sizes and tag rates, with the `quick` grid.

The embeddings and tags are synthetic (tags a noisy linear function of the embeddings, so the
probe has something to learn and runs its full schedule), written in `maest extract`'s format
and read back by `maest probe custom` like any other. Not a test: run it on a quiet machine.

    maest bench probe --tracks 25000 --dim 2304 --grid quick --seeds 3 --out bench-probe.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from maest_cli.errors import UsageError
from maest_cli.io.artefacts import check_out_file, check_work_dir, write_atomic, write_json
from maest_cli.probing.fit import load_grid
from maest_cli.probing.run import probe


def write_dataset(root: Path, tracks: int, dim: int, tags: int, seed: int = 0) -> tuple[Path, Path]:
    """ROOT/emb (an extract-shaped Parquet dataset) and ROOT/labels.tsv (path, split, tags);
    70/10/20 train/validation/test; each tag positive for about 5% of the tracks."""
    import pyarrow as pa
    import pyarrow.parquet as pq


    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tracks, dim), dtype=np.float32)
    k = min(dim, 64)  # the tags depend on a few dimensions, as tags depend on a few directions of real embeddings
    z = x[:, :k] @ rng.standard_normal((k, tags)).astype(np.float32) + 4 * rng.standard_normal((tracks, tags))
    y = z > np.quantile(z, 0.95, axis=0)
    paths = [f"{i % 100:02d}/{i}.mp3" for i in range(tracks)]
    split = np.where(np.arange(tracks) % 10 < 7, "train", np.where(np.arange(tracks) % 10 < 8, "validation", "test"))
    emb = root / "emb"
    emb.mkdir(parents=True, exist_ok=True)
    meta = {"model": {"name": "synthetic"}, "block": 7, "tokens": ["cls", "dist", "avg"], "preset": {"name": "none"},
            "made_by": "maest_cli.bench.probing (synthetic embeddings)"}
    table = pa.table({"path": paths, "root": ["/synthetic"] * tracks, "duration_s": np.full(tracks, 30.0),
                      "n_segments": np.ones(tracks, np.int32),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)})
    pq.write_table(table.replace_schema_metadata({b"maest": json.dumps(meta).encode()}), emb / "part-00000.parquet")
    lines = ["path\tsplit\ttags"] + [f"{p}\t{s}\t{'|'.join(f'tag{c:02d}' for c in np.flatnonzero(r))}"
                                      for p, s, r in zip(paths, split, y)]
    labels = root / "labels.tsv"
    write_atomic(labels, ("\n".join(lines) + "\n").encode())
    return emb, labels


def run_probe_bench(work: str | Path = "bench-probe-data", tracks: int = 25_000, dim: int = 2304, tags: int = 50,
                    grid: str = "quick", seeds: int = 3, threads: int | None = None,
                    out: str | Path | None = None) -> dict:
    """Write the synthetic dataset to WORK, probe it, and return (and write to `out`, as JSON)
    the timing report: what `maest bench probe` calls."""
    for option, value, least in (("--tracks", tracks, 20), ("--dim", dim, 1), ("--tags", tags, 1),
                                 ("--seeds", seeds, 1)):
        if value < least:
            raise UsageError(f"{option} {value}: at least {least}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: at least 1")
    work = Path(work)
    check_work_dir(work)
    check_out_file(out)
    load_grid(grid)  # a bad --grid fails before the dataset is written
    t0 = time.perf_counter()
    emb, labels = write_dataset(work, tracks, dim, tags)
    made = time.perf_counter() - t0
    res = probe("custom", dataset_root=labels, embeddings=emb, grid=grid, seeds=seeds, device="cpu",
                threads=threads, out=work / "results", resume=False, overwrite=True, log=None)
    report = {"tracks": tracks, "dim": dim, "tags": tags, "grid": grid, "grid_points": res["grid"]["n_points"],
              "seeds": seeds, "threads": res["environment"]["threads"], "timing_s": res["timing_s"],
              "data_seconds": round(made, 1), "test_map": res["test"]["pr_auc"], "test_roc_auc": res["test"]["roc_auc"]}
    if out:
        write_json(out, report)
    return report
