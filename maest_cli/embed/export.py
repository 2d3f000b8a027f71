"""`maest export`: one block's EmbeddingGraph as an ONNX file or an OpenVINO IR, usable without this package.

The graph takes the unnormalised log-mel [batch, frames, 96] exactly as Essentia computes it
(the input scaling is inside), with dynamic batch and frames axes, and gives the block's stacked
tokens ("embedding") and, with scores, the raw logits ("logits"). Everything a user needs to feed
it and read it (frontend constants, input scaling, labels, block, tokens, patchout, provenance)
goes into the file's own metadata. Before anything is renamed into place the written graph is run
at two frame counts and compared with torch: the patchout's kept time columns depend on the
frame count, and a graph that baked them would be wrong for every other length.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from maest_cli.audio.frontend import FRONTEND, N_MELS
from maest_cli.embed.spec import InferenceSpec
from maest_cli.errors import MaestError, UsageError
from maest_cli.io.artefacts import atomic_path, tool_versions
from maest_cli.models.engines import convert_module, no_telemetry, openvino_version, save_ir, short_version
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.presets import load_presets

FORMATS = ("onnx", "openvino")
EXPORT_FORMAT = "maest-cli-export/1"
OPSET = 17  # LayerNormalization is native from 17
CHECK_RTOL = 1e-4  # max|exported - torch| / max|torch| at which a written graph is refused


def export_model(spec: InferenceSpec, out: str | os.PathLike, format: str = "onnx", check: bool = True,
                 progress: bool = True) -> dict:
    """Write the spec's embedding graph (fp32) as `format`; return what was written and its metadata.

    ONNX: `out` is the file. OpenVINO: `out` names the .xml/.bin pair (`m` or `m.xml` -> m.xml, m.bin).
    `check`: run the written graph (ONNX Runtime, if installed; OpenVINO) against torch first."""
    if format not in FORMATS:
        raise UsageError(f"--format {format!r}: choose onnx or openvino")
    paths = output_paths(out, format)
    need = "onnx" if format == "onnx" else "openvino"
    if importlib.util.find_spec(need) is None:  # checked before the model is loaded
        raise UsageError(f"--format {format} needs the {need} package: pip install {need}")
    spec = spec.replace(device="cpu")
    if spec.dtype not in ("auto", "fp32") or spec.patchout_preset.dtype == "int8":
        which = f"--dtype {spec.dtype}" if spec.dtype not in ("auto", "fp32") else f"--patchout {spec.preset} (int8)"
        raise UsageError(f"{which}: the export is fp32; {fp32_hint(spec.patchout_preset.patchout)}")
    lm, res = spec.load(progress=progress)
    graph = EmbeddingGraph(lm.model.float(), res.block, res.tokens, res.patchout, spec.scores,
                           res.input_norm).eval()
    meta = export_metadata(lm, res, format)
    example = torch.zeros(1, res.segment_frames, N_MELS)
    with warnings.catch_warnings():  # the tracer's warnings are about the Python shape checks, not the graph
        warnings.simplefilter("ignore")
        if format == "onnx":
            report = _write_onnx(graph, example, meta, paths[0], check)
        else:
            report = _write_openvino(graph, example, meta, paths, check)
    return {"format": format, "files": [str(p) for p in paths], "bytes": sum(p.stat().st_size for p in paths),
            "inputs": {"mel": ["batch", "frames", N_MELS]},
            "outputs": {"embedding": ["batch", res.embedding_dim],
                        **({"logits": ["batch", res.config.n_classes]} if spec.scores else {})},
            "check": report, "metadata": meta}


def fp32_hint(patchout) -> str:
    """The fp32 preset with the same patchout, to name in the refusal of an int8 one."""
    table = load_presets()
    same = [name for name, p in table.items() if p.dtype != "int8" and p.patchout == patchout]
    if same:
        return f"use --patchout {same[0]} (the same patchout)"
    return f"choose --patchout {', '.join(name for name, p in table.items() if p.dtype != 'int8')}"


def output_paths(out: str | os.PathLike, format: str) -> list[Path]:
    """The files `out` names (ONNX: itself; OpenVINO: the .xml and .bin), checked before any work."""
    p = Path(out).expanduser()
    if p.is_dir():
        raise UsageError(f"--out {p}: a directory; give the name of the file to write (e.g. {p / 'maest'}."
                         f"{'onnx' if format == 'onnx' else 'xml'})")
    if not p.parent.is_dir():
        why = "does not exist" if not p.parent.exists() else "is not a directory"
        raise UsageError(f"--out {p}: its folder {p.parent} {why}")
    if format == "onnx":
        return [p]
    xml = p if p.suffix == ".xml" else p.with_name(p.name + ".xml")
    paths = [xml, xml.with_suffix(".bin")]
    for q in paths:
        if q.is_dir():
            raise UsageError(f"--out {p}: {q} is a directory")
    return paths


def export_metadata(lm, res, format: str) -> dict:
    """What a user of the exported file needs, and where it came from (one JSON value per key)."""
    cfg = res.config
    versions = tool_versions()
    for pkg in ("onnx", "onnxruntime", "openvino"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "format": EXPORT_FORMAT,
        "model": {"name": lm.name, "sha256": lm.sha256, "source_format": lm.source_format, "config": cfg.to_dict()},
        "input": {"name": "mel", "shape": ["batch", "frames", N_MELS], "dtype": "float32",
                  "frames": {"min": cfg.min_frames, "max": cfg.frames},
                  "what": "unnormalised log-mel exactly as the frontend below computes it (Essentia's "
                          "TensorflowInputMusiCNN); the input scaling is inside the graph; longer audio: "
                          "segments of at most frames.max frames, embeddings averaged"},
        "outputs": {"embedding": {"shape": ["batch", res.embedding_dim], "tokens": list(res.tokens),
                                  "what": f"tokens {','.join(res.tokens)} after block {res.block}, concatenated"},
                    **({"logits": {"shape": ["batch", cfg.n_classes],
                                   "what": "raw scores; apply a sigmoid for the activations of `labels`"}}
                       if res.spec.scores else {})},
        "block": res.block, "tokens": list(res.tokens), "embedding_dim": res.embedding_dim,
        "preset": res.preset.to_dict(),
        "patchout": {"time_keep_every": res.preset.time_keep_every, "drop_freq_rows": list(res.preset.drop_freq_rows)},
        "dtype": "fp32", "input_norm": res.input_norm.to_dict(), "frontend": FRONTEND.to_dict(),
        "labels": lm.labels, "exported_as": format, "tool_versions": versions,
    }


def _check_frames(cfg) -> list[tuple[int, int]]:
    """(batch, frames) pairs a written graph is run at: the full segment and a shorter one whose
    time patches differ in parity from the segment's (different kept columns under patchout)."""
    patches = lambda frames: (frames - cfg.patch) // cfg.stride + 1  # noqa: E731
    segment, short = cfg.frames, max(cfg.min_frames, cfg.frames // 3)
    if patches(short) % 2 == patches(segment) % 2 and short + cfg.stride < segment:
        short += cfg.stride
    return [(1, segment), (2, short)]


def _compare(graph: EmbeddingGraph, run) -> dict:
    """Run `run` (mel numpy -> list of outputs) against the torch graph; refuse a mismatch."""
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    checks = _check_frames(graph.model.cfg)
    for batch, frames in checks:
        mel = torch.rand(batch, frames, N_MELS, generator=gen) * 4.0
        with torch.no_grad():
            want = graph(mel)
        want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
        try:
            got = run(mel.numpy())
        except Exception as e:  # noqa: BLE001 - whatever the runtime raises, the graph is not written
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise MaestError(f"the exported graph fails on {frames} frames ({first[:200]}): nothing written") from e
        for w, g in zip(want, got):
            if g.shape != w.shape:
                raise MaestError(f"the exported graph gives shape {list(g.shape)} for {frames} frames, torch "
                                 f"{list(w.shape)}: nothing written")
            worst = max(worst, float(np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)))
    if not worst <= CHECK_RTOL:
        raise MaestError(f"the exported graph differs from torch (max relative error {worst:.2g} > {CHECK_RTOL}): "
                         "nothing written")
    return {"frames": [f for _, f in checks], "max_rel_err": worst}


def _write_onnx(graph: EmbeddingGraph, example: torch.Tensor, meta: dict, path: Path, check: bool) -> dict:
    import io

    import onnx  # the ONNX exporter's own dependency; `pip install onnx`

    outputs = ["embedding", "logits"] if graph.scores else ["embedding"]
    buf = io.BytesIO()
    torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=OPSET, input_names=["mel"],
                      output_names=outputs, do_constant_folding=True,
                      dynamic_axes={"mel": {0: "batch", 1: "frames"}, **{o: {0: "batch"} for o in outputs}})
    proto = onnx.load_from_string(buf.getvalue())
    proto.producer_name, proto.doc_string = "maest-cli", meta["input"]["what"]
    onnx.helper.set_model_props(proto, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    data = proto.SerializeToString()
    report = {"engine": None}
    if check:
        try:
            import onnxruntime as ort
        except ImportError:
            report = {"engine": None, "skipped": "onnxruntime is not installed"}
        else:
            options = ort.SessionOptions()
            options.log_severity_level = 4  # a failing run is reported once, as the export's error
            sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            report = {"engine": f"onnxruntime {ort.__version__}",
                      **_compare(graph, lambda m: sess.run(outputs, {"mel": m}))}
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return report


def _write_openvino(graph: EmbeddingGraph, example: torch.Tensor, meta: dict, paths: list[Path], check: bool) -> dict:
    no_telemetry()
    import openvino as ov

    xml = paths[0]  # its .bin beside it (save_ir)
    model = convert_module(graph, example, dynamic=(0, 1))
    model.inputs[0].get_tensor().set_names({"mel"})
    names = ["embedding", "logits"] if graph.scores else ["embedding"]
    for out, name in zip(model.outputs, names):
        out.get_tensor().set_names({name})
    for key, value in meta.items():
        model.set_rt_info(value if isinstance(value, str) else json.dumps(value), ["maest", key])
    if not check:
        save_ir(model, xml)
        return {"engine": None}

    def compare(saved_xml: Path) -> dict:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(str(saved_xml)), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})

        def run(mel):
            res = compiled({"mel": mel})
            return [res[name] for name in names]

        return {"engine": f"openvino {short_version(openvino_version())}", **_compare(graph, run)}

    return save_ir(model, xml, check=compare)


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The metadata export_model wrote into an ONNX file, JSON values decoded."""
    import onnx

    props = onnx.load(str(path), load_external_data=False).metadata_props
    return {p.key: _decode(p.value) for p in props}


def read_openvino_metadata(xml: str | os.PathLike) -> dict:
    """The metadata export_model wrote into an OpenVINO IR's rt_info, JSON values decoded."""
    no_telemetry()
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    info = model.get_rt_info()["maest"]
    return {key: _decode(info[key].astype(str)) for key in info}


def _decode(value: str):
    try:
        return json.loads(value)
    except ValueError:
        return value
