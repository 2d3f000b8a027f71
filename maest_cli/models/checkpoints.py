"""Weights in, weights out: the official .ckpt, the Hugging Face AST port, and our own format.

Our state dict uses the official (timm/PaSST) key names, so the official checkpoints load
almost as they are; the Hugging Face form is converted both ways (REFERENCE 5). Our own
format is one safetensors file whose metadata holds the model config and label names, so a
file is enough to rebuild the model. Nothing here unpickles arbitrary objects: torch.load
runs with weights_only=True and safetensors has no code path at all.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maest_cli.audio.frontend import InputNorm
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import atomic_path, sha256_file
from maest_cli.models.maest import MAEST, MaestConfig

FORMAT = "maest-cli/1"
HF_PREFIX = "audio_spectrogram_transformer."
# Official checkpoints may carry the authors' frontend buffers and the unused distillation head.
IGNORED_OFFICIAL = ("melspectrogram.", "head_dist.")


class CheckpointError(UsageError):
    """A weights file that cannot become a MAEST model; the message names the file and why."""


@dataclass
class Checkpoint:
    """A state dict in our key layout, with what is needed to build and describe the model."""

    state: dict[str, torch.Tensor]
    config: MaestConfig
    labels: list[str] | None
    source_format: str  # "official", "hf" or "maest-cli"
    path: str | None = None
    sha256: str | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def input_norm(self) -> InputNorm:
        return InputNorm.from_metadata(self.metadata)

    @property
    def default_block(self) -> int:
        return default_block(self.metadata, self.config.depth, self.path or "checkpoint")


PAPER_BLOCK = 7  # the paper's best block for downstream tasks (its section 5.1)


def default_block(metadata: dict, depth: int, where: str = "checkpoint") -> int:
    """The block embeddings come from unless one is asked for: the checkpoint's own
    `default_block` (which `maest train` records), else the paper's 7, never deeper than the model."""
    raw = metadata.get("default_block")
    if raw is None:
        return min(PAPER_BLOCK, depth)
    try:
        block = int(json.loads(raw) if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: default_block {raw!r} in its metadata is not a number") from None
    if not 1 <= block <= depth:
        raise CheckpointError(f"{where}: default_block {block} in its metadata, but the model has blocks 1..{depth}")
    return block


# ---------------------------------------------------------------- reading files safely

def read_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a .safetensors / .ckpt / .pt / .bin file, plus safetensors metadata.

    Pickles are read with weights_only=True: a file that would run code or build Python
    objects other than tensors and plain containers is refused.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such file")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                meta = dict(f.metadata() or {})
                return {k: f.get_tensor(k) for k in f.keys()}, meta
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{p}: not a readable safetensors file ({e})") from None
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{p}: refused to load: the pickle holds objects other than tensors "
                              f"(weights_only=True). {first}".strip()) from None
    except Exception as e:  # noqa: BLE001 - garbage bytes raise anything from KeyError to EOFError
        raise CheckpointError(f"{p}: not a readable torch checkpoint ({' '.join(str(e).split())[:200]})") from None
    return _find_state_dict(obj, p), {}


def _find_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: plain, or under 'state_dict' / 'model' / 'module'."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {str(k): v for k, v in obj.items()}
        if isinstance(obj, dict):
            inner = next((obj[k] for k in ("state_dict", "model", "module", "model_state_dict") if k in obj), None)
            if inner is not None:
                obj = inner
                continue
            # Lightning-style files mix tensors with other entries: keep the tensors.
            tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError(f"{path}: no state dict of tensors found")


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix ('module.', 'net.', 'model.') that every key shares."""
    for prefix in ("module.", "net.", "model.", "encoder."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def detect_format(state: dict[str, torch.Tensor]) -> str:
    if any(k.startswith(HF_PREFIX) for k in state):
        return "hf"
    if "patch_embed.proj.weight" in state and "cls_token" in state:
        return "official"
    raise CheckpointError("not a MAEST checkpoint: neither official keys (patch_embed.proj.weight, "
                          f"cls_token) nor Hugging Face AST keys; first keys: {sorted(state)[:5]}")


# ---------------------------------------------------------------- official <-> ours

def infer_config(state: dict[str, torch.Tensor], heads: int | None = None, **overrides) -> MaestConfig:
    """Model shape from the tensors; heads are not visible in weights (ViT: 64 dims per head)."""
    try:
        width = state["cls_token"].shape[-1]
        patch = state["patch_embed.proj.weight"].shape[-1]
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
        mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
        n_classes = state["head.1.weight"].shape[0]
        if "freq_new_pos_embed" in state:
            f, t = state["freq_new_pos_embed"].shape[2], state["time_new_pos_embed"].shape[3]
            pos = "separable"
        else:
            f, t = state["grid_pos_embed"].shape[2:]
            pos = "grid"
    except (KeyError, ValueError, IndexError) as e:
        raise CheckpointError(f"cannot infer the model shape: missing or malformed key {e}") from None
    stride = overrides.pop("stride", 10)
    cfg = dict(frames=(t - 1) * stride + patch, n_mels=(f - 1) * stride + patch, patch=patch,
               stride=stride, width=width, depth=depth, heads=heads or max(width // 64, 1),
               mlp_dim=mlp_dim, n_classes=n_classes, pos_embed=pos)
    cfg.update(overrides)
    return MaestConfig(**cfg)


def official_to_maest(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = _strip_prefix(state)
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_OFFICIAL)}


# ---------------------------------------------------------------- Hugging Face <-> ours

# (ours, HF hub name, HF in-memory name of transformers>=5); {i} is the block index.
_HF_BLOCK_KEYS = [
    ("norm1", "layernorm_before", "layernorm_before"),
    ("norm2", "layernorm_after", "layernorm_after"),
    ("attn.proj", "attention.output.dense", "attention.o_proj"),
    ("mlp.fc1", "intermediate.dense", "mlp.fc1"),
    ("mlp.fc2", "output.dense", "mlp.fc2"),
]
_HF_QKV = [("attention.attention.query", "attention.attention.key", "attention.attention.value"),
           ("attention.q_proj", "attention.k_proj", "attention.v_proj")]
_HF_TOP = [
    ("patch_embed.proj", HF_PREFIX + "embeddings.patch_embeddings.projection"),
    ("norm", HF_PREFIX + "layernorm"),
    ("head.0", "classifier.layernorm"),
    ("head.1", "classifier.dense"),
]


def hf_to_maest(state: dict[str, torch.Tensor], hf_config: dict | None = None) -> tuple[dict[str, torch.Tensor], MaestConfig]:
    """Convert ASTForAudioClassification weights (hub or transformers>=5 names) to ours.

    The HF form keeps one positional grid (freq + time summed), so the result uses
    pos_embed='grid'. `hf_config` (the config.json) supplies heads and epsilons.
    """
    hf = dict(state)
    out: dict[str, torch.Tensor] = {}
    e = HF_PREFIX + "embeddings."

    def take(key: str) -> torch.Tensor:
        try:
            return hf.pop(key)
        except KeyError:
            raise CheckpointError(f"Hugging Face weights lack {key!r}") from None

    layer_ids = sorted({int(m.group(2)) for k in hf
                        if (m := re.match(re.escape(HF_PREFIX) + r"(encoder\.layer|layers)\.(\d+)\.", k))})
    if not layer_ids:
        raise CheckpointError("Hugging Face weights have no encoder layers")
    base = HF_PREFIX + ("encoder.layer." if any(k.startswith(HF_PREFIX + "encoder.layer.") for k in hf) else "layers.")
    naming = 0 if base.endswith("encoder.layer.") else 1
    for i in layer_ids:
        for ours, *theirs in _HF_BLOCK_KEYS:
            for p in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{p}"] = take(f"{base}{i}.{theirs[naming]}.{p}")
        q, k, v = _HF_QKV[naming]
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat(
                [take(f"{base}{i}.{q}.{p}"), take(f"{base}{i}.{k}.{p}"), take(f"{base}{i}.{v}.{p}")], 0)
    for ours, theirs in _HF_TOP:
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = take(f"{theirs}.{p}")
    out["cls_token"] = take(e + "cls_token")
    out["dist_token"] = take(e + "distillation_token")
    pos = take(e + "position_embeddings")  # [1, 2 + F*T, d]
    out["new_pos_embed"] = pos[:, :2].clone()

    hc = hf_config or {}
    width = out["cls_token"].shape[-1]
    patch = out["patch_embed.proj.weight"].shape[-1]
    stride_f, stride_t = hc.get("frequency_stride", 10), hc.get("time_stride", 10)
    if stride_f != stride_t:
        raise CheckpointError(f"frequency_stride {stride_f} != time_stride {stride_t} is not supported")
    n_mels = hc.get("num_mel_bins", 96)
    f = (n_mels - patch) // stride_f + 1
    n_patch = pos.shape[1] - 2
    if n_patch % f:
        raise CheckpointError(f"position_embeddings has {n_patch} patches, not a multiple of {f} "
                              f"frequency patches ({n_mels} mel bins)")
    t = n_patch // f
    out["grid_pos_embed"] = pos[:, 2:].transpose(1, 2).reshape(1, width, f, t).clone()
    leftover = [k for k in hf if not k.endswith("num_batches_tracked")]
    if leftover:
        raise CheckpointError(f"unexpected Hugging Face keys: {leftover[:5]}")
    eps = hc.get("layer_norm_eps", 1e-12 if hf_config else 1e-6)
    cfg = infer_config(out, heads=hc.get("num_attention_heads"), stride=stride_f,
                       norm_eps=eps, head_norm_eps=eps)
    return out, cfg


def maest_to_hf(state: dict[str, torch.Tensor], cfg: MaestConfig) -> dict[str, torch.Tensor]:
    """Our weights in the Hugging Face hub layout (position grid = freq + time)."""
    out: dict[str, torch.Tensor] = {}
    base = HF_PREFIX + "encoder.layer."
    e = HF_PREFIX + "embeddings."
    for i in range(cfg.depth):
        for ours, theirs, _ in _HF_BLOCK_KEYS:
            for p in ("weight", "bias"):
                out[f"{base}{i}.{theirs}.{p}"] = state[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            for name, part in zip(_HF_QKV[0], state[f"blocks.{i}.attn.qkv.{p}"].chunk(3, 0)):
                out[f"{base}{i}.{name}.{p}"] = part.clone()
    for ours, theirs in _HF_TOP:
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    out[e + "cls_token"] = state["cls_token"]
    out[e + "distillation_token"] = state["dist_token"]
    if "grid_pos_embed" in state:
        grid = state["grid_pos_embed"]
    else:
        grid = state["freq_new_pos_embed"] + state["time_new_pos_embed"]
    out[e + "position_embeddings"] = torch.cat([state["new_pos_embed"], grid.flatten(2).transpose(1, 2)], 1)
    return out


def hf_config_dict(cfg: MaestConfig, labels: list[str] | None = None) -> dict:
    """A config.json for transformers.ASTConfig describing cfg."""
    d = dict(model_type="audio-spectrogram-transformer", architectures=["ASTForAudioClassification"],
             hidden_size=cfg.width, num_hidden_layers=cfg.depth, num_attention_heads=cfg.heads,
             intermediate_size=cfg.mlp_dim, hidden_act="gelu", qkv_bias=True,
             layer_norm_eps=cfg.norm_eps, patch_size=cfg.patch, frequency_stride=cfg.stride,
             time_stride=cfg.stride, max_length=cfg.frames, num_mel_bins=cfg.n_mels,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if labels:
        d["id2label"] = {str(i): n for i, n in enumerate(labels)}
        d["label2id"] = {n: i for i, n in enumerate(labels)}
    return d


# ---------------------------------------------------------------- our format

def write_checkpoint(path: str | os.PathLike, state: dict[str, torch.Tensor], head: dict,
                     labels: list[str] | None = None, extra: dict | None = None,
                     dtype: torch.dtype | None = None) -> Path:
    """The one checkpoint writer (MAEST: save_checkpoint; EfficientNet-B0: training/effnet.py):
    the tensors as one safetensors file, atomically, whose metadata is `head` (what the file is:
    format, config, ...), the label names and `extra` (name, recipe, input scaling, ...), each
    value a string or JSON; `extra` never overrides `head` or the labels.

    `dtype` (e.g. torch.float16) stores the floating-point tensors smaller; loading casts
    them back to the model's float32 parameters."""
    from safetensors.torch import save_file

    meta = {**(extra or {}), **head, "labels": list(labels) if labels else None}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    tensors = {k: v.detach().to("cpu", dtype=dtype if dtype and v.is_floating_point() else v.dtype).contiguous()
               for k, v in state.items()}
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return p


def save_checkpoint(path: str | os.PathLike, model: MAEST, labels: list[str] | None = None,
                    extra: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write MAEST weights + config + labels as one safetensors file (write_checkpoint)."""
    return write_checkpoint(path, model.state_dict(), {"format": FORMAT, "config": model.cfg.to_dict()},
                            labels, extra, dtype)


def load_checkpoint(path: str | os.PathLike, labels: list[str] | None = None,
                    config: MaestConfig | None = None) -> Checkpoint:
    """Read any supported weights file into our layout, with its config and labels.

    A Hugging Face file uses the config.json beside it when there is one.
    """
    p = Path(path)
    if p.is_dir():
        cand = [p / "model.safetensors", p / "pytorch_model.bin"]
        found = next((c for c in cand if c.is_file()), None)
        if found is None:
            raise CheckpointError(f"{p}: directory holds neither model.safetensors nor pytorch_model.bin")
        p = found
    state, meta = read_tensors(p)
    digest = sha256_file(p)
    if meta.get("format") == FORMAT:
        cfg = config or MaestConfig.from_dict(json.loads(meta["config"]))
        file_labels = json.loads(meta.get("labels") or "null")
        return Checkpoint(state, cfg, labels or file_labels, "maest-cli", str(p), digest,
                          {k: v for k, v in meta.items() if k not in ("config", "labels")})
    state = _strip_prefix(state)
    fmt = detect_format(state)
    if fmt == "hf":
        hf_cfg = None
        cfg_file = p.parent / "config.json"
        if cfg_file.is_file():
            try:
                hf_cfg = json.loads(cfg_file.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{cfg_file}: unreadable config ({e})") from None
        state, cfg = hf_to_maest(state, hf_cfg)
        if labels is None and hf_cfg and hf_cfg.get("id2label"):
            id2 = hf_cfg["id2label"]
            labels = [id2[str(i)] for i in range(len(id2))] if all(str(i) in id2 for i in range(len(id2))) else None
    else:
        state = official_to_maest(state)
        cfg = infer_config(state)
    return Checkpoint(state, config or cfg, labels, fmt, str(p), digest)


def build_model(ckpt: Checkpoint) -> MAEST:
    """Instantiate and fill a MAEST; key or shape mismatches name the offending keys."""
    model = MAEST(ckpt.config)
    check_state_dict(model, ckpt.state, ckpt.path or "checkpoint")
    model.load_state_dict(ckpt.state, strict=True)
    if ckpt.labels is not None and len(ckpt.labels) != ckpt.config.n_classes:
        raise CheckpointError(f"{ckpt.path}: {len(ckpt.labels)} label names for {ckpt.config.n_classes} outputs")
    return model.eval()


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch {_few(shapes)}")
    if problems:
        raise CheckpointError(f"{where}: weights do not fit the model: " + "; ".join(problems))


def _few(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")
