"""Inference engines: what runs an EmbeddingGraph on a batch of unnormalised log-mel frames.

`torch` runs the module itself (autocast; int8: dynamic quantisation of its Linear layers).
`openvino` converts it once (`openvino.convert_model`, dynamic batch and frames axes), keeps the
converted model in the user cache, and compiles it for the CPU, where its fused attention is
much faster than torch's. Both take [B, frames, 96] float32 and give float32 numpy arrays.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from maest_cli.errors import UsageError
from maest_cli.io.artefacts import atomic_path, sha256_file, write_atomic
from maest_cli.io.download import cache_dir
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.precision import QUANTISED, autocast, cpu_flags, for_inference

ENGINES = ("auto", "torch", "openvino")
CACHE_FORMAT = 1  # bump when what the cache holds changes


@dataclass(frozen=True)
class EngineChoice:
    """The engine a run uses, its version, and the one line that says why when it is not what was asked."""

    engine: str
    version: str
    note: str | None = None


def no_telemetry() -> None:
    """OpenVINO's converter sends usage events unless its consent file says no; with the
    telemetry package unimportable it falls back to its own no-op stub (and writes nothing
    under ~/intel). Must run before openvino is first imported."""
    sys.modules.setdefault("openvino_telemetry", None)


@functools.cache
def openvino_version() -> str | None:
    """The importable OpenVINO's full version, or None."""
    no_telemetry()
    try:
        import openvino
    except Exception:  # noqa: BLE001 - ImportError, or a broken install (missing shared libraries)
        return None
    return str(openvino.get_version())


def short_version(version: str) -> str:
    return version.split("-")[0]


def choose_engine(requested: str, device: torch.device, dtype: str) -> EngineChoice:
    """The one engine rule: auto = OpenVINO on CPU, torch on CUDA, for int8 (torch's dynamic int8
    is the faster int8 path here) and where openvino cannot be imported."""
    if requested not in ENGINES:
        raise UsageError(f"--engine {requested!r}: choose auto, torch or openvino")
    torch_choice = EngineChoice("torch", torch.__version__)
    if requested == "torch":
        return torch_choice
    explicit = requested == "openvino"
    if device.type != "cpu":
        if explicit:
            raise UsageError(f"--engine openvino runs on CPU; on {device} use --engine torch or auto")
        return torch_choice
    if dtype in QUANTISED:
        if explicit:
            raise UsageError(f"--engine openvino: dtype {dtype} runs on the torch engine (dynamic int8); "
                             "use --engine auto or torch, or a preset without int8")
        return torch_choice
    version = openvino_version()
    if version is None:
        if explicit:
            raise UsageError("--engine openvino: openvino cannot be imported (pip install 'openvino>=2026')")
        return EngineChoice("torch", torch.__version__, "engine auto gives torch: openvino cannot be imported")
    return EngineChoice("openvino", short_version(version))


# ------------------------------------------------------------------ torch


class TorchEngine:
    """The module in torch: autocast for bf16/fp16, a dynamically quantised copy for int8."""

    name = "torch"

    def __init__(self, graph: EmbeddingGraph, device: torch.device, dtype: str):
        self.graph = for_inference(graph.eval(), dtype)
        self.device, self.dtype, self.scores = device, dtype, graph.scores

    def __call__(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = torch.from_numpy(np.ascontiguousarray(mel, dtype=np.float32)).to(self.device)
        with torch.inference_mode(), autocast(self.device, self.dtype):
            out = self.graph(x)
        emb, logits = out if self.scores else (out, None)
        return emb.float().cpu().numpy(), None if logits is None else logits.float().cpu().numpy()


# ------------------------------------------------------------------ OpenVINO


def cpu_flags_digest() -> str:
    """The CPU's instruction-set flags, hashed: a cached model is for the CPU it was made on."""
    return hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]


def convert_module(module: torch.nn.Module, example: torch.Tensor, dynamic: tuple[int, ...] = ()):
    """A torch module as an openvino.Model, traced on `example`; the `dynamic` axes of its input
    take any size."""
    no_telemetry()
    import openvino as ov

    shape = [-1 if i in dynamic else n for i, n in enumerate(example.shape)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing's notes on Python-side shape checks
        return ov.convert_model(module.eval(), example_input=example, input=[ov.PartialShape(shape)])


def convert(graph: EmbeddingGraph, frames: int):
    """The graph as an openvino.Model with dynamic batch and frames axes."""
    return convert_module(graph, torch.zeros(1, frames, graph.model.cfg.n_mels), dynamic=(0, 1))


def openvino_compile(model, dtype: str, threads: int):
    """Compiled for CPU: bf16 where `dtype` is bf16, else f32 (the CPU plugin would pick bf16 by
    itself where the CPU has it), `threads` threads, latency mode."""
    import openvino as ov

    config = {ov.properties.hint.inference_precision: ov.Type.bf16 if dtype == "bf16" else ov.Type.f32,
              ov.properties.inference_num_threads: int(threads),
              ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY}
    return ov.Core().compile_model(model, "CPU", config)


def save_ir(model, xml: Path, check: Callable[[Path], object] | None = None):
    """Write an openvino.Model as XML and its .bin beside it, atomically: both are saved in a hidden
    folder beside `xml` (same file system), `check(saved_xml)` runs on them (its result is returned),
    then they are renamed, the .bin first, so a new .xml never pairs with an old .bin."""
    import openvino as ov

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{xml.name}.tmp", dir=xml.parent))
    try:
        tmp_xml = tmp_dir / "model.xml"
        ov.save_model(model, str(tmp_xml), compress_to_fp16=False)
        result = check(tmp_xml) if check is not None else None
        with atomic_path(xml) as tx, atomic_path(xml.with_suffix(".bin")) as tb:  # the inner one is renamed first
            os.replace(tmp_xml.with_suffix(".bin"), tb)
            os.replace(tmp_xml, tx)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return result


class ModelCache:
    """Converted models in the user cache (cache_dir()/openvino/KEY/): model.xml and model.bin,
    then manifest.json with their sha256, written last. An entry whose manifest, files or
    hashes do not match is rebuilt."""

    def __init__(self, key: dict, root: Path | None = None):
        self.key = {"format": CACHE_FORMAT, **key}
        digest = hashlib.sha256(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:32]
        self.dir = (root or cache_dir() / "openvino") / digest

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.json"

    def load(self):
        """The cached openvino.Model, or None (absent, corrupt or stale)."""
        import openvino as ov

        try:
            m = json.loads(self.manifest.read_text())
            if m.get("key") != self.key:
                return None
            for name in ("model.xml", "model.bin"):
                if sha256_file(self.dir / name) != m["sha256"][name]:
                    return None
            return ov.Core().read_model(str(self.dir / "model.xml"))
        except Exception:  # noqa: BLE001 - missing, truncated, unparsable: rebuilt by the caller
            return None

    def save(self, model) -> None:
        """Atomically, file by file, the manifest last; a cache that cannot be written is skipped."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.manifest.unlink(missing_ok=True)
            save_ir(model, self.dir / "model.xml")
            hashes = {name: sha256_file(self.dir / name) for name in ("model.bin", "model.xml")}
            write_atomic(self.manifest, json.dumps({"key": self.key, "sha256": hashes}, indent=1))
        except (OSError, RuntimeError):  # disk full, read-only cache: the run goes on uncached
            shutil.rmtree(self.dir, ignore_errors=True)


class OpenVINOEngine:
    """The graph converted for OpenVINO (cached) and compiled for CPU (openvino_compile)."""

    name = "openvino"

    def __init__(self, graph: EmbeddingGraph, dtype: str, threads: int, cache_key: dict | None = None,
                 say: Callable[[str], None] | None = None):
        no_telemetry()
        if dtype not in ("fp32", "bf16"):
            raise UsageError(f"--engine openvino: dtype {dtype} is not supported; use fp32 or bf16")
        self.scores, self.dtype = graph.scores, dtype
        # fp32 and bf16 share the converted (fp32) model: the precision is a compile-time hint
        cache = ModelCache({**cache_key, "dtype": "fp32", "openvino": openvino_version(),
                            "cpu_flags": cpu_flags_digest()}) if cache_key is not None else None
        model = cache.load() if cache is not None else None
        t0, converted = time.perf_counter(), model is None
        if converted:
            if say:
                say("maest: converting the model for OpenVINO (once for these settings; cached)")
            model = convert(graph, graph.model.cfg.frames)
            if cache is not None:  # compiled from the saved files, as every later run will be: bf16 kernels
                cache.save(model)  # may differ slightly between an in-memory and a read-back model
                model = cache.load() or model
        self.compiled = openvino_compile(model, dtype, threads)
        self.request = self.compiled.create_infer_request()
        self.compile_seconds = time.perf_counter() - t0
        if say and converted:
            say(f"maest: OpenVINO model ready in {self.compile_seconds:.1f} s")

    def __call__(self, mel: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        res = self.request.infer([np.ascontiguousarray(mel, dtype=np.float32)])
        emb = np.array(res[0], dtype=np.float32, copy=True)  # the request's buffers are reused
        return emb, np.array(res[1], dtype=np.float32, copy=True) if self.scores else None


def make_engine(engine: str, graph: EmbeddingGraph, device: torch.device, dtype: str, threads: int,
                cache_key: dict | None = None, say: Callable[[str], None] | None = None):
    """A resolved engine name ('torch' or 'openvino') -> a callable mel -> (embedding, logits).
    `cache_key` (what decides the converted model, including the weights' sha256) enables the
    converted-model cache; None (e.g. random weights) converts every time."""
    if engine == "torch":
        return TorchEngine(graph, device, dtype)
    if engine == "openvino":
        return OpenVINOEngine(graph, dtype, threads, cache_key, say)
    raise ValueError(f"unknown engine {engine!r}")
