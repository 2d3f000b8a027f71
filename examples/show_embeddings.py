"""Summarise a `maest extract` output: what was embedded, how, and what the model heard.

    python examples/show_embeddings.py DIR
"""

import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds


def main(out: str) -> None:
    table = ds.dataset(out, format="parquet").to_table()
    meta = json.loads(table.schema.metadata[b"maest"])
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    paths = table.column("path").to_pylist()
    print(f"\n{len(paths)} files embedded into {Path(out).resolve()} (a Parquet dataset)")
    print(f"model {meta['model']['name']} (sha256 {meta['model']['sha256'][:12]}...), "
          f"preset {meta['preset']['name']}, block {meta['block']}, tokens {'+'.join(meta['tokens'])}: "
          f"{emb.shape[1]}-d embeddings, {meta['segment']['seconds']:.1f} s segments every "
          f"{meta['hop']['seconds']:.1f} s")
    labels = (meta.get("scores") or {}).get("labels")
    scores = np.stack(table.column("scores").to_numpy(zero_copy_only=False)) if labels else None
    for i, path in enumerate(paths):
        line = f"  {path}: {table.column('duration_s')[i].as_py():.1f} s, {table.column('n_segments')[i].as_py()} segments"
        if scores is not None:
            top = np.argsort(-scores[i])[:4]
            line += "; heard: " + ", ".join(f"{labels[j]} {scores[i][j]:.2f}" for j in top)
        print(line)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -1)
    i, j = np.unravel_index(np.argmax(sim), sim.shape)
    print(f"most similar pair: {paths[i]} ~ {paths[j]} (cosine {sim[i, j]:.3f})")
    print(f"read it with: pandas.read_parquet({str(out)!r})\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "demo-embeddings")
