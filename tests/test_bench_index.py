"""examples/bench_index.py: the exact top-10 it scores recall against (merged across read blocks) and the recall
arithmetic, on 1 k generated vectors; numpy only, no index library needed."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "bench_index.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_index", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_exact_topk_and_recall(tmp_path, monkeypatch):
    bench = load_bench()
    monkeypatch.setattr(bench, "CHUNK", 64)  # blocks of 320 rows: the top-k merge across blocks is exercised
    model = bench.mixture(48, seed=3, clusters=8, latent=12)
    raw = np.concatenate([bench.sample(model, 0, i, 250) for i in range(4)])
    centre = raw.mean(axis=0)
    base = bench.normalise(raw, centre)
    assert np.allclose(np.linalg.norm(base, axis=1), 1, atol=1e-5)
    base.tofile(tmp_path / "base.f32")
    q = bench.normalise(bench.sample(model, 1, 0, 50), centre)

    truth = bench.exact_topk(q, tmp_path / "base.f32", len(base), 48, "float32")
    expected = np.argsort(-(q @ base.T), axis=1, kind="stable")[:, : bench.K]
    assert np.array_equal(truth, expected)

    assert bench.recall_at_k(truth, truth) == 1.0
    assert bench.recall_at_k(truth[:, ::-1], truth) == 1.0  # order within the top k does not count
    wrong = truth.copy()
    wrong[:, -3:] = -1  # three misses per query (e.g. an index that returned fewer than k)
    assert np.isclose(bench.recall_at_k(wrong, truth), 0.7)
    wrong[:25] = -1
    assert np.isclose(bench.recall_at_k(wrong, truth), 0.35)


def test_mixture_is_far_from_zero_mean():
    """The structure the benchmark relies on: raw cosines of unrelated vectors are high, centred ones are not."""
    bench = load_bench()
    model = bench.mixture(96, seed=0)
    x = bench.sample(model, 0, 0, 400)
    raw = bench.normalise(x, np.zeros(96, np.float32))
    centred = bench.normalise(x, x.mean(axis=0))
    assert np.mean(raw[:200] @ raw[200:].T) > 0.5
    assert abs(np.mean(centred[:200] @ centred[200:].T)) < 0.05
