"""Where training starts: random weights, a MAEST checkpoint, PaSST (AudioSet) or DeiT (ImageNet).

The kind of a weights file is told from its keys, never from its name:
- ours (safetensors with maest-cli metadata), the official .ckpt, the Hugging Face port: MAEST;
- PaSST layout (freq_new_pos_embed / time_new_pos_embed) on another mel grid (PaSST-S: 128
  bands, a 12 x 99 grid): PaSST; its encodings are interpolated (bicubic) to the new grid;
- timm ViT/DeiT (one `pos_embed` [1, tokens + 24*24, d], RGB patch weights): DeiT; the 24x24
  grid is interpolated to (F, T), then frequency = its mean over time, time = its mean over
  frequency, and the patch weights are summed over RGB (REFERENCE 6).
Heads trained on other labels (AudioSet 527, ImageNet 1000, another vocabulary) are dropped:
the classifier is new. Only local files are read; a registry name is accepted only when its
weights are already in the cache (`maest models download NAME` fetches them, on request).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from maest_cli.io.config import read_labels
from maest_cli.models.checkpoints import (
    FORMAT,
    CheckpointError,
    _strip_prefix,
    load_checkpoint,
    official_to_maest,
    read_tensors,
    sha256_file,
)
from maest_cli.models.maest import (
    MAEST,
    MaestConfig,
    interpolate_pos_grid,
    resize_pos_embed,
)
from maest_cli.models.registry import ModelNotFound, load_registry, resolve_weights

# Frontend buffers some checkpoints carry (PaSST's AugmentMelSTFT, the authors' later MAEST).
FRONTEND_PREFIXES = ("mel.", "melspectrogram.", "spectrogram.")
HEAD_KEYS = ("head.1.weight", "head.1.bias")


@dataclass
class InitInfo:
    """What a run started from, recorded in its checkpoints and config.resolved.json."""

    kind: str  # random, maest, passt, deit
    source: str | None = None  # file path (or registry name)
    sha256: str | None = None
    head: str = "new"  # "kept" when the source's classifier already had this vocabulary
    input_norm: dict | None = None  # the source's input normalisation, when it has one
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ grid conversions

def separate_pos_grid(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full [1, d, F, T] grid -> (freq [1, d, F, 1], time [1, d, 1, T]) whose sum is its best
    separable fit; exact for grids that were freq + time (the Hugging Face MAEST port)."""
    freq = grid.mean(dim=3, keepdim=True)
    time = grid.mean(dim=2, keepdim=True) - grid.mean(dim=(2, 3), keepdim=True)
    return freq.contiguous(), time.contiguous()


def passt_to_maest(state: dict[str, torch.Tensor], cfg: MaestConfig) -> dict[str, torch.Tensor]:
    """PaSST weights (any mel grid, e.g. PaSST-S: freq [1,768,12,1], time [1,768,1,99]) on cfg's
    grid: both encodings interpolated (bicubic), the AudioSet head's Linear dropped."""
    out = {k: v for k, v in state.items() if not k.startswith(("head_dist.", *FRONTEND_PREFIXES))
           and k not in HEAD_KEYS}
    out["freq_new_pos_embed"] = interpolate_pos_grid(state["freq_new_pos_embed"], cfg.f_patches, 1)
    out["time_new_pos_embed"] = interpolate_pos_grid(state["time_new_pos_embed"], 1, cfg.t_patches)
    return _fit_pos_layout(out, cfg)


def deit_to_maest(state: dict[str, torch.Tensor], cfg: MaestConfig) -> dict[str, torch.Tensor]:
    """timm DeiT/ViT weights (e.g. DeiT-B 384: patch_embed.proj.weight [768,3,16,16], pos_embed
    [1, 2 + 24*24, 768]) as MAEST weights: RGB summed to one channel, the square grid
    interpolated to (F, T) and split into frequency (mean over time) and time (mean over
    frequency) encodings; ImageNet heads dropped. A ViT without a distillation token gives its
    cls token (and position) to both tokens."""
    out = {k: v for k, v in state.items()
           if not k.startswith(("head.", "head_dist.", "pos_embed", "fc_norm.", *FRONTEND_PREFIXES))}
    out["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].sum(dim=1, keepdim=True)
    pos = state["pos_embed"]
    n, d = pos.shape[1], pos.shape[2]
    n_tokens = 2 if "dist_token" in state else 1
    side = math.isqrt(n - n_tokens)
    if side * side != n - n_tokens:
        raise CheckpointError(f"pos_embed has {n} positions: not {n_tokens} tokens + a square grid")
    grid = pos[:, n_tokens:].reshape(1, side, side, d).permute(0, 3, 1, 2)
    grid = interpolate_pos_grid(grid, cfg.f_patches, cfg.t_patches)
    out["freq_new_pos_embed"] = grid.mean(dim=3, keepdim=True).contiguous()
    out["time_new_pos_embed"] = grid.mean(dim=2, keepdim=True).contiguous()
    out["new_pos_embed"] = (pos[:, :2] if n_tokens == 2 else pos[:, :1].expand(1, 2, d)).clone()
    if n_tokens == 1:
        out["dist_token"] = state["cls_token"].clone()
    return _fit_pos_layout(out, cfg)


def maest_to_maest(state: dict[str, torch.Tensor], cfg: MaestConfig) -> dict[str, torch.Tensor]:
    """MAEST weights of any segment length on cfg's: time encodings truncated when longer (as
    at inference) or interpolated when shorter; a full grid split when cfg is separable."""
    if "grid_pos_embed" in state and cfg.pos_embed == "separable":
        state = dict(state)
        state["freq_new_pos_embed"], state["time_new_pos_embed"] = separate_pos_grid(state.pop("grid_pos_embed"))
    return resize_pos_embed(state, cfg)


def _fit_pos_layout(state: dict[str, torch.Tensor], cfg: MaestConfig) -> dict[str, torch.Tensor]:
    if cfg.pos_embed == "grid":
        state["grid_pos_embed"] = state.pop("freq_new_pos_embed") + state.pop("time_new_pos_embed")
    return state


# ------------------------------------------------------------------ files

def detect_init_kind(state: dict[str, torch.Tensor], meta: dict, n_mels_grid: int) -> str:
    """maest, passt or deit, from the keys (and the frequency grid: MAEST's is 9 rows)."""
    if meta.get("format") == FORMAT or any(k.startswith("audio_spectrogram_transformer.") for k in state):
        return "maest"
    if "pos_embed" in state and "patch_embed.proj.weight" in state:
        return "deit"
    if "freq_new_pos_embed" in state and "patch_embed.proj.weight" in state:
        return "maest" if state["freq_new_pos_embed"].shape[2] == n_mels_grid else "passt"
    raise CheckpointError("not MAEST, PaSST or DeiT weights: found neither freq_new_pos_embed nor pos_embed "
                          f"(first keys: {sorted(state)[:5]})")


def _resolve_init(init: str) -> tuple[Path, list[str] | None, str]:
    """--init as a local file, or a registry name whose weights are already cached."""

    p = Path(init).expanduser()
    if p.exists():
        return p, None, str(p)
    reg = load_registry()
    if not reg.has(init):
        raise CheckpointError(f"--init {init}: no such file (and not a model name; `maest models list`)")
    try:
        path, entry = resolve_weights(init, registry=reg, download=False)
    except ModelNotFound as e:
        raise ModelNotFound(f"--init {init}: weights not in the cache; `maest train` never downloads. "
                            f"Run `maest models download {init}` first.\n{e}") from None

    return path, read_labels(entry.labels) if entry.labels else None, entry.name


def init_model(model: MAEST, init: str, labels: list[str]) -> InitInfo:
    """Fill `model` (already randomly initialised) from `init`; return what was done."""
    if init == "random":
        return InitInfo("random")
    cfg = model.cfg
    path, registry_labels, source = _resolve_init(init)
    info = InitInfo("maest", source=source, sha256=None)
    raw, meta = read_tensors(path if path.is_file() else _weights_in_dir(path))
    raw = _strip_prefix(raw)
    kind = detect_init_kind(raw, meta, cfg.f_patches)
    info.kind = kind
    src_labels = None
    if kind == "maest":
        ckpt = load_checkpoint(path, labels=registry_labels)
        info.sha256 = ckpt.sha256
        src_labels = ckpt.labels
        if src_labels is None and ckpt.source_format == "official" and ckpt.config.n_classes in (400, 519):

            src_labels = read_labels(f"discogs{ckpt.config.n_classes}")
        state = maest_to_maest(ckpt.state, cfg)
        info.input_norm = ckpt.input_norm.to_dict()  # a run of ours: its own; official models: the constants
        info.notes.append(f"MAEST {ckpt.source_format} weights, {ckpt.config.t_patches} time patches -> "
                          f"{cfg.t_patches}")
    elif kind == "passt":
        info.sha256 = sha256_file(path)
        state = passt_to_maest(official_to_maest(raw), cfg)
        info.notes.append(f"PaSST grid {raw['freq_new_pos_embed'].shape[2]}x{raw['time_new_pos_embed'].shape[3]} "
                          f"interpolated to {cfg.f_patches}x{cfg.t_patches}")
    else:
        info.sha256 = sha256_file(path)
        state = deit_to_maest(raw, cfg)
        info.notes.append(f"DeiT/ViT grid of {raw['pos_embed'].shape[1]} positions interpolated to "
                          f"{cfg.f_patches}x{cfg.t_patches}; RGB patch weights summed")
    head = state.get("head.1.weight")
    keep_head = (kind == "maest" and head is not None and head.shape[0] == len(labels)
                 and src_labels is not None and list(src_labels) == list(labels))
    if keep_head and all(k in state for k in HEAD_KEYS):
        info.head = "kept"
    else:
        for k in HEAD_KEYS:
            state.pop(k, None)
        info.notes.append(f"new classifier for the dataset's {len(labels)} labels")
    _load_into(model, state, str(path), allowed_missing=() if info.head == "kept" else HEAD_KEYS,
               maybe_missing=("head.0.weight", "head.0.bias") if kind == "deit" else ())
    return info


def _weights_in_dir(p: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (p / name).is_file():
            return p / name
    raise CheckpointError(f"{p}: directory holds neither model.safetensors nor pytorch_model.bin")


def _load_into(model: MAEST, state: dict[str, torch.Tensor], where: str, allowed_missing=(),
               maybe_missing=()) -> None:
    """Copy state into model; every model tensor must be provided (except a new head) with
    its exact shape, and every provided tensor must be used."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - set(allowed_missing) - set(maybe_missing))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(v.shape)} != {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    problems = [f"{what} {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                for what, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes))
                if items]
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model of this recipe "
                              f"(width {model.cfg.width}, depth {model.cfg.depth}): {'; '.join(problems)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))


__all__ = ["InitInfo", "init_model", "detect_init_kind", "passt_to_maest", "deit_to_maest", "maest_to_maest",
           "separate_pos_grid"]
