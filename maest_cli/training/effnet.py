"""EfficientNet-B0 as an architecture of `maest train` (recipe key `[model] architecture = "effnet-b0"`).

The paper's CNN baseline, trained by the same loop as MAEST (weighted sampler, mixup,
SpecAugment, schedule, validation, SWA, resume), so that the two differ only in the network.
What differs, and lives here:
- input: crops of 128 frames x 96 bands, one channel (Discogs-EffNet's patches), no patchout;
- `EffNetTagger`: EfficientNetB0 behind the interface the loop calls on MAEST
  (`.cfg.frames`, `.cfg.n_classes`, `forward(mel, logits=True).logits`);
- SWA: averaged weights need BatchNorm statistics of their own, so they are re-estimated on
  training crops (effnet.recalibrate_batchnorm) before the SWA model is scored or saved;
- checkpoints: `save_effnet_checkpoint` writes safetensors with `format = maest-cli-effnet/1`
  and `architecture = effnet-b0` in the metadata (labels, input scaling, recipe), the state
  dict of a plain EfficientNetB0; `load_effnet` reads it back. MAEST loaders refuse these
  files (not MAEST keys), so an EfficientNet is never mistaken for a MAEST.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from maest_cli.audio.frontend import InputNorm
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file
from maest_cli.models.checkpoints import check_state_dict, write_checkpoint
from maest_cli.models.effnet import (
    PATCH_FRAMES,
    EfficientNetB0,
    EffNetConfig,
    recalibrate_batchnorm,
)

ARCHITECTURE = "effnet-b0"
FORMAT = "maest-cli-effnet/1"


class EffNetError(UsageError):
    """A file that is not an EfficientNet-B0 checkpoint of ours; the message names it."""


@dataclass(frozen=True)
class EffNetTaggerConfig:
    """The shape `maest train` trains: crops of `frames` mel frames, `n_classes` outputs."""

    n_classes: int
    frames: int = PATCH_FRAMES
    n_mels: int = 96
    dropout: float = 0.2
    stochastic_depth: float = 0.2
    architecture: str = ARCHITECTURE

    def effnet(self) -> EffNetConfig:
        return EffNetConfig(in_channels=1, n_classes=self.n_classes, dropout=self.dropout,
                            stochastic_depth=self.stochastic_depth)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EffNetTaggerConfig:
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown EffNetTaggerConfig fields: {sorted(unknown)}")
        return cls(**d)


@dataclass
class TaggerOutput:
    logits: torch.Tensor | None = None
    embedding: torch.Tensor | None = None


class EffNetTagger(nn.Module):
    """EfficientNet-B0 on normalised log-mel crops [B, frames, 96], as the training loop calls MAEST."""

    def __init__(self, cfg: EffNetTaggerConfig):
        super().__init__()
        self.cfg = cfg
        self.net = EfficientNetB0(cfg.effnet())

    def forward(self, mel: torch.Tensor, blocks=(), logits: bool = False, patchout=None,
                hidden: bool = False) -> TaggerOutput:
        if patchout is not None:
            raise ValueError("EfficientNet-B0 has no patchout")
        if blocks or hidden:
            raise ValueError("EfficientNet-B0 has no transformer blocks; its embedding is the penultimate layer")
        if mel.dim() != 3 or mel.shape[-1] != self.cfg.n_mels:
            raise ValueError(f"expected mel of shape [batch, frames, {self.cfg.n_mels}], got {list(mel.shape)}")
        emb, out = self.net(mel.unsqueeze(1))
        return TaggerOutput(logits=out if logits else None, embedding=emb)


def build_tagger(n_classes: int) -> EffNetTagger:
    return EffNetTagger(EffNetTaggerConfig(n_classes=n_classes))


# ------------------------------------------------------------------ checkpoints

def save_effnet_checkpoint(path: str | os.PathLike, model: EffNetTagger, labels: list[str] | None = None,
                           extra: dict | None = None) -> Path:
    """A plain EfficientNetB0 state dict + config, labels and `extra` as safetensors metadata
    (the one checkpoint writer, models/checkpoints.write_checkpoint)."""
    head = {"format": FORMAT, "architecture": model.cfg.architecture, "config": model.cfg.to_dict()}
    return write_checkpoint(path, model.net.state_dict(), head, labels, extra)


@dataclass
class LoadedEffNet:
    model: EfficientNetB0  # eval mode
    cfg: EffNetTaggerConfig
    name: str
    path: str
    sha256: str
    labels: list[str] | None
    input_norm: InputNorm
    metadata: dict = field(default_factory=dict)


def is_effnet_checkpoint(path: str | os.PathLike) -> bool:
    """True when `path` is a safetensors file written by save_effnet_checkpoint."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - not safetensors at all
        return False


def load_effnet(path: str | os.PathLike, device: str = "cpu") -> LoadedEffNet:
    """An EfficientNet-B0 trained by `maest train` (architecture effnet-b0), ready for inference."""
    from safetensors import safe_open


    p = Path(path)
    if not p.is_file():
        raise EffNetError(f"{p}: no such file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds
        raise EffNetError(f"{p}: not a readable safetensors file ({' '.join(str(e).split())[:200]})") from None
    if meta.get("format") != FORMAT:
        raise EffNetError(f"{p}: not an EfficientNet-B0 checkpoint of `maest train` (format "
                          f"{meta.get('format')!r}, expected {FORMAT})")
    try:
        cfg = EffNetTaggerConfig.from_dict(json.loads(meta["config"]))
        labels = json.loads(meta.get("labels") or "null")
    except (KeyError, ValueError, TypeError) as e:
        raise EffNetError(f"{p}: unreadable config in its metadata ({e})") from None
    model = EfficientNetB0(cfg.effnet())
    try:
        check_state_dict(model, state, str(p))
    except Exception as e:  # noqa: BLE001 - CheckpointError: re-raised as ours
        raise EffNetError(str(e)) from None
    model.load_state_dict(state, strict=True)
    extras = {k: v for k, v in meta.items() if k not in ("config", "labels")}
    return LoadedEffNet(model.to(device).eval(), cfg, meta.get("name") or p.stem, str(p), sha256_file(p), labels,
                        InputNorm.from_metadata(meta), extras)


__all__ = ["ARCHITECTURE", "FORMAT", "EffNetTaggerConfig", "EffNetTagger", "TaggerOutput", "build_tagger",
           "recalibrate_batchnorm", "save_effnet_checkpoint", "load_effnet", "LoadedEffNet", "EffNetError",
           "is_effnet_checkpoint"]
