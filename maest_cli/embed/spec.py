"""InferenceSpec: everything that decides an embedding, in one frozen options object.

As whisper's DecodingOptions: `extract`, `probe --audio-root`, `bench`, `findings` and the preset
evaluation take an InferenceSpec, check it once (`InferenceSpec.__post_init__`: what needs
nothing loaded) and resolve it once against a model (`resolve`: the preset's patchout and dtype,
the device, the model's default block), and `Resolved.metadata` is what every output records.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from maest_cli.audio.frontend import FRONTEND, HOP_SIZE, SAMPLE_RATE, InputNorm
from maest_cli.audio.segments import hop_frames
from maest_cli.errors import UsageError
from maest_cli.models.engines import ENGINES, choose_engine, make_engine
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.maest import TOKENS, MaestConfig, Patchout
from maest_cli.models.precision import choose_dtype, resolve_device
from maest_cli.models.presets import PatchoutPreset, get_preset
from maest_cli.models.registry import LoadedModel, load_model

POOLS = ("track", "segment")
# Resolved.settings() that change the rows but not the converted model an engine caches
GRAPH_INDEPENDENT_SETTINGS = ("pool", "segment_frames", "hop_frames", "dtype", "frontend")
SEGMENTATION = ("segments of segment.frames mel frames every hop.frames; a track shorter than a segment is one "
                "shorter segment (truncated time encodings, no padding); a longer track ends with a segment "
                "aligned to its end; track rows are the mean over segments")


def parse_tokens(tokens: str | Sequence[str]) -> tuple[str, ...]:
    """'cls,avg' or ('cls', 'avg') -> ('cls', 'avg'), checked against the model's tokens."""
    items = tokens.split(",") if isinstance(tokens, str) else list(tokens)
    items = [t.strip() for t in items if t.strip()]
    bad = [t for t in items if t not in TOKENS]
    if not items or bad or len(set(items)) != len(items):
        raise UsageError(f"--tokens {','.join(items)!r}: choose one or more of {','.join(TOKENS)}, no repeats")
    return tuple(items)


def parse_rows(rows: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """--drop-freq-rows '0,8' -> (0, 8); 'none' or '' -> () (drop nothing); None: the preset's."""
    if rows is None:
        return None
    if isinstance(rows, str):
        text = rows.strip().lower()
        if text in ("", "none"):
            return ()
        try:
            return tuple(int(r) for r in text.split(","))
        except ValueError:
            raise UsageError(f"--drop-freq-rows {rows!r}: expected comma-separated row numbers, e.g. 0,8") from None
    return tuple(int(r) for r in rows)


@dataclass(frozen=True)
class InferenceSpec:
    """What the user asks of the model. `model` None: the registry default; `block` None: the
    model's default block (its checkpoint's `default_block`, 7 for the official models)."""

    model: str | None = None
    preset: str = "none"
    time_keep_every: int | None = None  # expert override of the preset
    drop_freq_rows: tuple[int, ...] | None = None  # expert override of the preset
    block: int | None = None
    tokens: tuple[str, ...] = TOKENS
    pool: str = "track"
    hop: str = "half"
    scores: bool = False
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "auto"  # auto, torch or openvino (models.engines.choose_engine)

    def __post_init__(self) -> None:
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise once
        if self.model is not None:
            fix("model", os.fspath(self.model))
        fix("tokens", parse_tokens(self.tokens))
        fix("drop_freq_rows", parse_rows(self.drop_freq_rows))
        fix("hop", str(self.hop))
        fix("scores", bool(self.scores))
        if self.engine not in ENGINES:
            raise UsageError(f"--engine {self.engine!r}: choose auto, torch or openvino")
        if self.pool not in POOLS:
            raise UsageError(f"--pool {self.pool!r}: choose track or segment")
        if self.time_keep_every is not None:
            if int(self.time_keep_every) < 1:
                raise UsageError("--time-keep-every must be >= 1")
            fix("time_keep_every", int(self.time_keep_every))
        if self.block is not None:
            if int(self.block) < 0:
                raise UsageError(f"--block {self.block}: expected 0 (the patch tokens) .. the model's depth")
            fix("block", int(self.block))
        hop_frames(self.hop, 1 << 30)  # the syntax only; the range needs the model's segment length
        self.patchout_preset  # an unknown preset name fails here, before anything is loaded

    @property
    def patchout_preset(self) -> PatchoutPreset:
        """The preset with the expert overrides applied."""
        return get_preset(self.preset, self.time_keep_every, self.drop_freq_rows)

    def replace(self, **changes) -> InferenceSpec:
        return dataclasses.replace(self, **changes)

    def load(self, registry=None, progress: bool = True) -> tuple[LoadedModel, Resolved]:
        """Load the model on the spec's device and resolve the spec against it."""
        device = choose_device(self.device)
        lm = load_model(self.model, device=str(device), registry=registry, progress=progress)
        return lm, self.resolve(lm.config, lm.default_block, device, model=lm)

    def resolve(self, config: MaestConfig, default_block: int, device=None,
                model: LoadedModel | None = None) -> Resolved:
        """The concrete settings for a model of shape `config`: every choice made, every check done."""
        device = device if device is not None else choose_device(self.device)
        block = self.block if self.block is not None else min(default_block, config.depth)
        if not 0 <= block <= config.depth:
            raise UsageError(f"--block {block}: this model has blocks 0..{config.depth}")
        preset = self.patchout_preset
        try:
            preset.patchout.freq_index(config.f_patches)
        except ValueError as e:
            raise UsageError(f"--patchout {preset.name}: {e}") from None
        precision = choose_dtype(self.dtype, device, default=preset.dtype)
        engine = choose_engine(self.engine, device, precision.dtype)
        return Resolved(spec=self, preset=preset, device=device, dtype=precision.dtype, dtype_note=precision.note,
                        engine=engine.engine, engine_version=engine.version, engine_note=engine.note,
                        block=block, segment_frames=config.frames, hop_frames=hop_frames(self.hop, config.frames),
                        embedding_dim=len(self.tokens) * config.width, config=config, model=model)


def choose_device(device: str) -> torch.device:
    """--device, with 'auto' giving each torchrun worker its own GPU (LOCAL_RANK)."""
    local = os.environ.get("LOCAL_RANK", "")
    if device == "auto" and torch.cuda.is_available() and local.isdigit():
        return torch.device(f"cuda:{int(local) % torch.cuda.device_count()}")
    return resolve_device(device)


@dataclass(frozen=True)
class Resolved:
    """An InferenceSpec made concrete for one model: what runs, and what outputs record."""

    spec: InferenceSpec
    preset: PatchoutPreset
    device: torch.device
    dtype: str  # fp32, bf16, fp16 or int8: the precision rule's choice (models.precision.choose_dtype)
    dtype_note: str | None  # one line saying why dtype differs from what was asked, if it does
    block: int
    segment_frames: int
    hop_frames: int
    embedding_dim: int
    config: MaestConfig
    model: LoadedModel | None = None
    engine: str = "torch"  # torch or openvino: the engine rule's choice (models.engines.choose_engine)
    engine_version: str = ""
    engine_note: str | None = None  # one line saying why the engine differs from what was asked

    @property
    def notes(self) -> list[str]:
        """The lines saying where the run differs from what was asked."""
        return [n for n in (self.dtype_note, self.engine_note) if n]

    def build_engine(self, threads: int, say=None):
        """The loaded model as a callable: unnormalised mel [B, frames, 96] -> (embedding, logits or None)."""
        graph = EmbeddingGraph(self.model.model, self.block, self.tokens, self.patchout, self.spec.scores,
                               self.input_norm)
        # the settings that shape the graph (precision is chosen when it is compiled)
        key = None if self.model.sha256 is None else {
            k: v for k, v in self.settings().items() if k not in GRAPH_INDEPENDENT_SETTINGS}
        return make_engine(self.engine, graph, self.device, self.dtype, threads, key, say)

    @property
    def patchout(self) -> Patchout | None:
        """None when every patch enters the model."""
        p = self.preset.patchout
        return None if p.is_identity else p

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.spec.tokens

    @property
    def input_norm(self) -> InputNorm:
        return self.model.input_norm if self.model is not None else InputNorm()

    def settings(self) -> dict:
        """What makes rows comparable: a rerun into the same dataset must match these exactly. The
        engine is not among them: engines agree within the parity tests' bounds (metadata names it)."""
        p = self.preset.patchout
        return {"model_sha256": self.model.sha256 if self.model else None, "model_config": self.config.to_dict(),
                "block": self.block, "tokens": list(self.tokens), "pool": self.spec.pool,
                "segment_frames": self.segment_frames, "hop_frames": self.hop_frames,
                "time_keep_every": p.time_keep_every, "drop_freq_rows": list(p.drop_freq_rows),
                "scores": self.spec.scores, "dtype": self.dtype, "frontend": FRONTEND.to_dict(),
                "input_norm": self.input_norm.to_dict()}

    def metadata(self) -> dict:
        """How the embeddings were made, for the dataset's metadata (self-describing outputs)."""
        frame_s = HOP_SIZE / SAMPLE_RATE
        lm = self.model
        return {
            "model": {"name": lm.name, "sha256": lm.sha256, "path": lm.path, "source_format": lm.source_format,
                      "config": self.config.to_dict()} if lm else {"config": self.config.to_dict()},
            "preset": self.preset.to_dict(), "block": self.block, "tokens": list(self.tokens), "pool": self.spec.pool,
            "segment": {"frames": self.segment_frames, "seconds": (self.segment_frames - 1) * frame_s},
            "hop": {"spec": self.spec.hop, "frames": self.hop_frames, "seconds": self.hop_frames * frame_s},
            "segmentation": SEGMENTATION,
            "embedding_dim": self.embedding_dim,
            "scores": ({"activation": "sigmoid", "track_pooling": "mean over segments",
                        "labels": lm.labels if lm else None} if self.spec.scores else None),
            "frontend": FRONTEND.to_dict(), "input_norm": self.input_norm.to_dict(),
            "dtype": self.dtype, "dtype_note": self.dtype_note, "device": str(self.device),
            "engine": {"name": self.engine, "version": self.engine_version, "note": self.engine_note},
        }
