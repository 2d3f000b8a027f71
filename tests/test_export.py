"""`maest export`: the ONNX file and the OpenVINO IR give torch's fp32 embedding (and logits) on the
unnormalised log-mel, at several batch sizes and frame counts (patchout's kept columns depend on
the frame count), and carry what a user needs in their metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_audio
from typer.testing import CliRunner

from maest_cli.audio.frontend import FRONTEND, file_mel, normalize
from maest_cli.cli.app import app
from maest_cli.embed.export import export_model, read_onnx_metadata, read_openvino_metadata
from maest_cli.embed.spec import InferenceSpec
from maest_cli.models.registry import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def mels(tmp_path_factory):
    """Unnormalised log-mel of generated audio, cut at two frame counts (odd and even time-patch
    counts: different kept columns under patchout `fast`), each at batch sizes 1 and 3."""
    d = tmp_path_factory.mktemp("audio")
    mel = np.stack([file_mel(write_audio(d / f"clip{i}.wav", 3.5, seed=i)) for i in range(3)])  # [3, 220, 96]
    assert mel.shape[1] >= 200
    return [mel[:b, :frames] for frames in (200, 113) for b in (1, 3)]


def torch_reference(model_file: str, mel: np.ndarray, block: int, preset: str, scores: bool):
    """The embedding (and logits) straight from the model, input scaled here: independent of the graph."""
    lm = load_model(model_file, progress=False)
    res = InferenceSpec(model=model_file, preset=preset, block=block).resolve(lm.config, lm.default_block, model=lm)
    with torch.no_grad():
        out = lm.model(normalize(torch.from_numpy(mel), lm.input_norm), blocks=[block], logits=scores,
                       patchout=res.patchout)
    return [out.embedding(block).numpy(), *([out.logits.numpy()] if scores else [])]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("scores, preset, block", [(False, "none", None), (True, "fast", 2)])
def test_onnx_runs_in_onnx_runtime_and_matches_torch(tiny_model_file, tmp_path, mels, scores, preset, block):
    import onnxruntime as ort

    out = tmp_path / "tiny.onnx"
    report = export_model(InferenceSpec(model=tiny_model_file, preset=preset, block=block, scores=scores), out,
                          "onnx", check=False, progress=False)
    assert report["files"] == [str(out)] and report["check"]["engine"] is None
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["mel"]
    assert sess.get_inputs()[0].shape[2] == 96 and all(isinstance(s, str) for s in sess.get_inputs()[0].shape[:2])
    assert [o.name for o in sess.get_outputs()] == (["embedding", "logits"] if scores else ["embedding"])
    want_block = 4 if block is None else block  # the tiny model's own default: min(7, depth 4)
    for mel in mels:
        got = sess.run(None, {"mel": mel})
        want = torch_reference(tiny_model_file, mel, want_block, preset, scores)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape and rel_err(g, w) <= 1e-4, (mel.shape, rel_err(g, w))

    meta = read_onnx_metadata(out)
    lm = load_model(tiny_model_file, progress=False)
    assert meta["block"] == want_block and meta["tokens"] == ["cls", "dist", "avg"]
    assert meta["labels"] == [f"tag{i}" for i in range(10)] and meta["frontend"] == FRONTEND.to_dict()
    assert meta["input_norm"]["mean"] == lm.input_norm.mean and meta["input_norm"]["std"] == lm.input_norm.std
    assert meta["preset"]["name"] == preset and meta["dtype"] == "fp32"
    assert meta["model"]["name"] == "tiny-test" and meta["model"]["sha256"] == lm.sha256
    assert {"maest-cli", "torch", "onnx"} <= set(meta["tool_versions"])
    assert ("logits" in meta["outputs"]) == scores
    # what a user of ONNX Runtime sees, without this package
    assert json.loads(sess.get_modelmeta().custom_metadata_map["block"]) == want_block


def test_openvino_ir_loads_and_matches_torch(tiny_model_file, tmp_path, mels):
    import openvino as ov

    d = tmp_path / "ir"
    d.mkdir()
    report = export_model(InferenceSpec(model=tiny_model_file, preset="fast", scores=True), d / "tiny",
                          "openvino", progress=False)  # PATH without .xml names the pair
    xml, bin_ = d / "tiny.xml", d / "tiny.bin"
    assert report["files"] == [str(xml), str(bin_)] and xml.is_file() and bin_.is_file()
    assert report["check"]["max_rel_err"] <= 1e-4  # the export's own check ran, at two frame counts
    assert sorted(p.name for p in d.iterdir()) == ["tiny.bin", "tiny.xml"]  # no temporary left over
    core = ov.Core()
    model = core.read_model(str(xml))
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    for mel in mels:
        res = compiled({"mel": mel})
        want = torch_reference(tiny_model_file, mel, 4, "fast", True)
        for name, w in zip(("embedding", "logits"), want):
            assert rel_err(res[name], w) <= 1e-4, (name, mel.shape)
    meta = read_openvino_metadata(xml)
    assert meta["block"] == 4 and meta["labels"][0] == "tag0" and meta["patchout"]["time_keep_every"] == 2
    assert meta["frontend"] == FRONTEND.to_dict() and meta["exported_as"] == "openvino"


def test_cli_export_writes_a_checked_onnx_file(tiny_model_file, tmp_path):
    out = tmp_path / "m.onnx"
    r = runner.invoke(app, ["export", tiny_model_file, "--out", str(out), "--tokens", "cls,avg", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["outputs"] == {"embedding": ["batch", 128]} and out.is_file()
    assert report["check"]["engine"].startswith("onnxruntime") and report["check"]["max_rel_err"] <= 1e-4
    assert len(set(report["check"]["frames"])) == 2


def test_int8_presets_are_refused_in_one_line(tiny_model_file, tmp_path):
    r = runner.invoke(app, ["export", tiny_model_file, "--out", str(tmp_path / "m.onnx"), "--patchout", "none-int8"])
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and "none-int8" in errors[0], r.output
    assert not (tmp_path / "m.onnx").exists()


def test_a_missing_exporter_package_is_one_line(tiny_model_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a))
    r = runner.invoke(app, ["export", tiny_model_file, "--out", str(tmp_path / "m.onnx")])
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error: ")]
    assert r.exit_code == 2 and len(errors) == 1 and "pip install onnx" in errors[0], r.output


@pytest.mark.parametrize("format", ["onnx", "openvino"])
def test_a_graph_with_baked_time_columns_is_refused(tiny_model_file, tmp_path, monkeypatch, format):
    """Patchout as an index list (what a tracer bakes for one frame count) fails the export's own
    check at the second frame count: nothing is written."""
    import dataclasses

    import maest_cli.embed.export as export
    from maest_cli.errors import MaestError
    from maest_cli.models.graph import EmbeddingGraph

    class Baked(EmbeddingGraph):
        def __init__(self, model, block, tokens, patchout, *args):
            super().__init__(model, block, tokens, dataclasses.replace(patchout, keep_time=tuple(range(10_000))),
                             *args)

    monkeypatch.setattr(export, "EmbeddingGraph", Baked)
    with pytest.raises(MaestError, match="nothing written"):
        export_model(InferenceSpec(model=tiny_model_file, preset="fast"), tmp_path / "m", format, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.safetensors"]


@pytest.mark.slow
def test_full_size_onnx_matches_torch(tmp_path):
    """MAEST-30s with random weights, block 7, a 30 s clip: ONNX Runtime vs torch fp32 (about 30 s)."""
    import onnxruntime as ort

    from maest_cli.models.checkpoints import save_checkpoint
    from maest_cli.models.maest import MAEST, VARIANTS

    torch.manual_seed(0)
    model = MAEST(VARIANTS["30s"]).eval()
    weights = save_checkpoint(tmp_path / "m30.safetensors", model, extra={"name": "maest-30s-random"})
    export_model(InferenceSpec(model=str(weights), block=7), tmp_path / "m.onnx", "onnx", check=False, progress=False)
    mel = file_mel(write_audio(tmp_path / "clip.wav", 30.0))[None, :1876]
    (got,) = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"mel": mel})
    with torch.no_grad():
        want = model(normalize(torch.from_numpy(mel)), blocks=[7]).embedding(7).numpy()
    cos = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cos >= 0.99999 and rel_err(got, want) <= 1e-4, (cos, rel_err(got, want))
