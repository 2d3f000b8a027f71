"""Engines: OpenVINO matches torch (fp32 to 1e-5 relative, bf16 to cosine 0.9999), through extract
too; the converted-model cache survives corruption; nothing reaches the network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import write_audio

from maest_cli.embed.extraction import extract
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import read_metadata
from maest_cli.errors import UsageError
from maest_cli.models import engines
from maest_cli.models.engines import ModelCache, choose_engine, make_engine
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.maest import MAEST, VARIANTS, Patchout, tiny_config
from maest_cli.models.precision import cpu_has_native_bf16

CPU = torch.device("cpu")


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max|a - b| / max|b|"""
    return float(np.abs(a - b).max() / np.abs(b).max())


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def mel(batch: int, frames: int, seed: int = 0) -> np.ndarray:
    """Unnormalised log-mel-like input (the graph scales it)."""
    return (np.random.default_rng(seed).standard_normal((batch, frames, 96)) * 2 - 3).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    return MAEST(tiny_config(frames=316, n_classes=10)).eval()


# ---------------------------------------------------------------- the rule


def test_engine_rule():
    assert choose_engine("auto", CPU, "fp32").engine == "openvino"
    assert choose_engine("auto", CPU, "bf16").engine == "openvino"
    assert choose_engine("auto", torch.device("cuda"), "bf16").engine == "torch"
    assert choose_engine("auto", CPU, "int8").engine == "torch"
    assert choose_engine("torch", CPU, "fp32") == engines.EngineChoice("torch", torch.__version__)
    for bad in [("openvino", torch.device("cuda"), "bf16"), ("openvino", CPU, "int8"), ("onnx", CPU, "fp32")]:
        with pytest.raises(UsageError):
            choose_engine(*bad)
    with pytest.raises(UsageError, match="--engine"):
        InferenceSpec(engine="tensorrt")


def test_auto_falls_back_to_torch_with_a_note_without_openvino(monkeypatch):
    monkeypatch.setattr(engines, "openvino_version", lambda: None)
    choice = choose_engine("auto", CPU, "fp32")
    assert choice.engine == "torch" and "openvino cannot be imported" in choice.note
    with pytest.raises(UsageError, match="cannot be imported"):
        choose_engine("openvino", CPU, "fp32")


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("patchout", [None, Patchout(time_keep_every=2, drop_freq_rows=(0, 8))],
                         ids=["none", "fast"])
def test_tiny_openvino_fp32_matches_torch_fp32_with_short_inputs(tiny_net, patchout):
    """Embeddings and logits within 1e-5; a full segment, a shorter one and a one-patch one run
    through the same compiled model (its dynamic frames axis)."""
    g = EmbeddingGraph(tiny_net, 3, patchout=patchout, scores=True)
    ref, ov = make_engine("torch", g, CPU, "fp32", 1), make_engine("openvino", g, CPU, "fp32", 1)
    for batch, frames in [(2, 316), (1, 201), (1, 16)]:
        x = mel(batch, frames, seed=frames)
        (e_ref, l_ref), (e_ov, l_ov) = ref(x), ov(x)
        assert e_ov.shape == e_ref.shape == (batch, 3 * 64) and l_ov.shape == (batch, 10)
        assert rel(e_ov, e_ref) < 1e-5 and rel(l_ov, l_ref) < 1e-5


def test_full_size_30s_model_fp32_and_bf16(capsys):
    """MAEST-30s with random weights: fp32 within 1e-5 of torch fp32 (block 7 and logits); bf16
    (where the CPU has it natively) at cosine >= 0.9999 to fp32. The second engine comes from
    the converted-model cache."""
    torch.manual_seed(0)
    g = EmbeddingGraph(MAEST(VARIANTS["30s"]).eval(), 7, scores=True)
    x = mel(1, 1876)
    key = {"model_sha256": "random-30s-test"}
    e_ref, l_ref = make_engine("torch", g, CPU, "fp32", 2)(x)
    e32, l32 = make_engine("openvino", g, CPU, "fp32", 2, key)(x)
    assert rel(e32, e_ref) < 1e-5 and rel(l32, l_ref) < 1e-5
    low = "bf16" if cpu_has_native_bf16() else "fp32"
    with capsys.disabled():
        print(f"\n[engines] reduced precision ran in {low}" + ("" if low == "bf16" else ": no native bf16 here"))
    said = []
    e16, l16 = make_engine("openvino", g, CPU, low, 2, key, said.append)(x)
    assert said == []  # from the cache: fp32 and bf16 compile the same converted model
    assert cosine(e16, e_ref).min() >= 0.9999 and cosine(l16, l_ref).min() >= 0.9999


def test_extract_openvino_equals_extract_torch(tiny_model_file, tmp_path):
    """Generated audio, one file shorter than a segment (the dynamic frames axis), scores too;
    the dataset's metadata and the summary name the engine."""
    import pyarrow.parquet as pq

    root = tmp_path / "music"
    root.mkdir()
    write_audio(root / "long.wav", 9.0)
    write_audio(root / "short.wav", 1.5, seed=1)  # fewer frames than the 316-frame segment
    out = {}
    for engine in ("torch", "openvino"):
        s = extract([str(root)], tmp_path / engine, model=tiny_model_file, engine=engine, dtype="fp32",
                    scores=True, pool="segment", workers=0, progress=False)
        assert (s.n_done, s.n_failed, s.engine) == (2, 0, engine)
        meta = read_metadata(tmp_path / engine)
        assert meta["engine"]["name"] == engine and meta["engine"]["version"] == s.engine_version
        t = pq.read_table(tmp_path / engine).sort_by([("path", "ascending"), ("segment", "ascending")])
        out[engine] = [np.stack(t[c].to_numpy(zero_copy_only=False)) for c in ("embedding", "scores")]
    assert len(out["torch"][0]) >= 3
    assert rel(out["openvino"][0], out["torch"][0]) < 1e-5
    assert rel(out["openvino"][1], out["torch"][1]) < 1e-5


# ---------------------------------------------------------------- the cache


def test_corrupt_or_stale_cache_entries_are_rebuilt(tiny_net):
    g = EmbeddingGraph(tiny_net, 2)
    key = {"model_sha256": "tiny-cache-test", "block": 2}
    x = mel(1, 316)
    said = []
    first = make_engine("openvino", g, CPU, "fp32", 1, key, said.append)(x)[0]
    assert any("converting" in s for s in said) and any("ready in" in s for s in said)
    entry = next(d for d in (engines.cache_dir() / "openvino").iterdir())
    assert {p.name for p in entry.iterdir()} == {"model.xml", "model.bin", "manifest.json"}
    said.clear()
    make_engine("openvino", g, CPU, "fp32", 1, key, said.append)
    assert said == []  # a cache hit says nothing
    for damage in ("bin", "xml", "manifest", "stale"):
        if damage == "bin":
            data = bytearray((entry / "model.bin").read_bytes())
            data[len(data) // 2] ^= 0xFF
            (entry / "model.bin").write_bytes(bytes(data))
        elif damage == "xml":
            (entry / "model.xml").write_text("<net")
        elif damage == "manifest":
            (entry / "manifest.json").write_text("{")
        else:
            m = json.loads((entry / "manifest.json").read_text())
            m["key"]["openvino"] = "0.0"
            (entry / "manifest.json").write_text(json.dumps(m))
        said.clear()
        again = make_engine("openvino", g, CPU, "fp32", 1, key, said.append)(x)[0]
        assert any("converting" in s for s in said), damage
        np.testing.assert_array_equal(again, first)
    assert ModelCache({**key, "dtype": "fp32", "openvino": engines.openvino_version(),
                       "cpu_flags": engines.cpu_flags_digest()}).load() is not None


# ---------------------------------------------------------------- no network


def test_nothing_reaches_the_network_or_home(tmp_path):
    """A fresh process with sockets blocked (every attempt recorded) and HOME empty: converting,
    compiling and running make no connection and leave no telemetry files."""
    script = textwrap.dedent("""
        import os, socket, sys, time
        def refuse(*a, **k):  # recorded in a file, so attempts from threads or at exit count too
            with open(os.environ["ATTEMPTS"], "a") as f:
                f.write(repr(a) + "\\n")
            raise OSError("network blocked by the test")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.getaddrinfo = refuse
        socket.create_connection = refuse
        import numpy as np, torch
        from maest_cli.models.engines import make_engine
        from maest_cli.models.graph import EmbeddingGraph
        from maest_cli.models.maest import MAEST, tiny_config
        g = EmbeddingGraph(MAEST(tiny_config(frames=316)).eval(), 2)
        e = make_engine("openvino", g, torch.device("cpu"), "fp32", 1, {"model_sha256": "net-test"})
        e(np.zeros((1, 316, 96), np.float32))
        time.sleep(1.0)  # telemetry would send from a thread
    """)
    home = tmp_path / "home"
    home.mkdir()
    attempts = tmp_path / "attempts.txt"
    env = {**os.environ, "HOME": str(home), "MAEST_CACHE": str(tmp_path / "cache"), "ATTEMPTS": str(attempts)}
    env.pop("CI", None)  # OpenVINO's telemetry keeps quiet in CI by itself; prove ours without that
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not attempts.exists(), attempts.read_text()
    assert list(home.iterdir()) == []  # no ~/intel/openvino_telemetry, client id or stats
