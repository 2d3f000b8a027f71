"""MAEST: a ViT-Base over mel patches (AST / DeiT / PaSST), as in the published checkpoints.

Input: normalised log-mel [B, frames, 96]. A 16x16 conv with stride 10 cuts it into a grid of
F=9 frequency by T time patches; time and frequency positional encodings are added (PaSST's
separable form, or one full grid as in the Hugging Face port), inference patchout may then
drop time columns / frequency rows, and the grid is flattened frequency-major behind the cls
and dist tokens. `forward` stops after the last block it is asked for.

Block numbers are 1-based "after k blocks": block 7 = HF hidden_states[7] = Essentia
Identity_7 = the paper's default embedding. Block 0 is the embedding layer's output.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from maest_cli.audio.frontend import N_MELS

TOKENS = ("cls", "dist", "avg")


@dataclass(frozen=True)
class MaestConfig:
    """Shape of a MAEST model. `frames` is the longest input (the segment length)."""

    frames: int = 1876
    n_mels: int = N_MELS
    patch: int = 16
    stride: int = 10
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    n_classes: int = 400
    norm_eps: float = 1e-6
    head_norm_eps: float = 1e-5  # the official head LayerNorm; the HF port uses 1e-6
    pos_embed: str = "separable"  # "separable" (PaSST, official) or "grid" (HF form)

    def __post_init__(self) -> None:
        if self.pos_embed not in ("separable", "grid"):
            raise ValueError(f"pos_embed must be 'separable' or 'grid', not {self.pos_embed!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.frames < self.patch or self.n_mels < self.patch:
            raise ValueError(f"input {self.frames}x{self.n_mels} is smaller than one patch")

    @property
    def f_patches(self) -> int:
        return (self.n_mels - self.patch) // self.stride + 1

    @property
    def t_patches(self) -> int:
        return (self.frames - self.patch) // self.stride + 1

    @property
    def min_frames(self) -> int:
        return self.patch

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MaestConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown MaestConfig fields: {sorted(unknown)}")
        return cls(**d)


# The four published segment lengths, as fed by Essentia and the HF port.
VARIANTS = {
    "5s": MaestConfig(frames=316),
    "10s": MaestConfig(frames=626),
    "20s": MaestConfig(frames=1256),
    "30s": MaestConfig(frames=1876),
}


def tiny_config(frames: int = 316, n_classes: int = 10, **kw) -> MaestConfig:
    """A few-hundred-kB model with the real layout, for tests and CPU demos."""
    return MaestConfig(frames=frames, width=64, depth=4, heads=4, mlp_dim=128, n_classes=n_classes, **kw)


@dataclass(frozen=True)
class Patchout:
    """Which patches enter the transformer. Inference: keep every `time_keep_every`-th time
    column and drop the listed frequency rows. Training: explicit column / row indices to keep."""

    time_keep_every: int = 1
    drop_freq_rows: tuple[int, ...] = ()
    keep_time: tuple[int, ...] | None = None
    keep_freq: tuple[int, ...] | None = None

    @property
    def is_identity(self) -> bool:
        return (self.time_keep_every == 1 and not self.drop_freq_rows
                and self.keep_time is None and self.keep_freq is None)

    def time_index(self, t: int) -> list[int]:
        cols = list(range(0, t, self.time_keep_every))
        if self.keep_time is not None:
            keep = set(self.keep_time)
            cols = [c for c in cols if c in keep]
        if not cols:
            raise ValueError(f"patchout keeps no time column of {t}")
        return cols

    def freq_index(self, f: int) -> list[int]:
        bad = [r for r in self.drop_freq_rows if not 0 <= r < f]
        if bad:
            raise ValueError(f"frequency rows {bad} do not exist (rows are 0..{f - 1})")
        rows = [r for r in range(f) if r not in set(self.drop_freq_rows)]
        if self.keep_freq is not None:
            rows = [r for r in rows if r in set(self.keep_freq)]
        if not rows:
            raise ValueError(f"patchout keeps no frequency row of {f}")
        return rows


def random_patchout(f: int, t: int, drop_time: int, drop_freq: int, generator: torch.Generator | None = None) -> Patchout:
    """Training patchout (PaSST structured): drop `drop_time` random whole time columns and
    `drop_freq` random frequency rows, the same for the whole batch, so the sequence shrinks."""
    drop_time = min(max(drop_time, 0), t - 1)
    drop_freq = min(max(drop_freq, 0), f - 1)
    keep_t = torch.randperm(t, generator=generator)[: t - drop_time].sort().values.tolist()
    keep_f = torch.randperm(f, generator=generator)[: f - drop_freq].sort().values.tolist()
    return Patchout(keep_time=tuple(keep_t), keep_freq=tuple(keep_f))


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: MaestConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.attn = Attention(cfg.width, cfg.heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: MaestConfig):
        super().__init__()
        self.proj = nn.Conv2d(1, cfg.width, cfg.patch, stride=cfg.stride)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, frames, mels] -> [B, width, F, T]."""
        return self.proj(mel.transpose(1, 2).unsqueeze(1))


@dataclass
class MaestOutput:
    """`tokens[k]`: [B, 3, width] = (cls, dist, mean of patch tokens) after k blocks.
    `hidden[k]`: the whole sequence [B, 2 + n_patches, width], only when asked for.
    `logits`: [B, n_classes], only when asked for."""

    tokens: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None

    def embedding(self, block: int, tokens: Sequence[str] = TOKENS) -> torch.Tensor:
        """[B, len(tokens) * width]: the chosen tokens of one block, concatenated in order."""
        idx = [TOKENS.index(t) for t in tokens]
        return self.tokens[block][:, idx].flatten(1)


class MAEST(nn.Module):
    def __init__(self, cfg: MaestConfig):
        super().__init__()
        self.cfg = cfg
        d, f, t = cfg.width, cfg.f_patches, cfg.t_patches
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d))
        self.new_pos_embed = nn.Parameter(torch.zeros(1, 2, d))
        if cfg.pos_embed == "separable":
            self.freq_new_pos_embed = nn.Parameter(torch.zeros(1, d, f, 1))
            self.time_new_pos_embed = nn.Parameter(torch.zeros(1, d, 1, t))
        else:
            self.grid_pos_embed = nn.Parameter(torch.zeros(1, d, f, t))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Sequential(nn.LayerNorm(d, eps=cfg.head_norm_eps), nn.Linear(d, cfg.n_classes))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init as in timm's ViT: truncated normal 0.02 for tokens, encodings and linears."""
        for p in (self.cls_token, self.dist_token, self.new_pos_embed, *self._pos_params()):
            nn.init.trunc_normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _pos_params(self) -> list[nn.Parameter]:
        if self.cfg.pos_embed == "separable":
            return [self.freq_new_pos_embed, self.time_new_pos_embed]
        return [self.grid_pos_embed]

    def pos_grid(self, t: int | None = None) -> torch.Tensor:
        """[1, width, F, t] positional encodings of the first t time patches."""
        t = self.cfg.t_patches if t is None else t
        if self.cfg.pos_embed == "separable":
            return self.freq_new_pos_embed + self.time_new_pos_embed[..., :t]
        return self.grid_pos_embed[..., :t]

    def embed(self, mel: torch.Tensor, patchout: Patchout | None = None) -> torch.Tensor:
        """Normalised log-mel [B, frames, mels] -> token sequence [B, 2 + kept patches, width]."""
        cfg = self.cfg
        if mel.dim() != 3 or mel.shape[-1] != cfg.n_mels:
            raise ValueError(f"expected mel of shape [batch, frames, {cfg.n_mels}], got {list(mel.shape)}")
        if not cfg.min_frames <= mel.shape[1] <= cfg.frames:
            raise ValueError(f"input has {mel.shape[1]} frames; this model takes {cfg.min_frames} to "
                             f"{cfg.frames} (split longer audio into segments)")
        x = self.patch_embed(mel)
        b, d, f, t = x.shape
        if self.cfg.pos_embed == "separable":  # broadcast adds, no [d, f, t] grid materialised
            x = x + self.freq_new_pos_embed + self.time_new_pos_embed[..., :t]
        else:
            x = x + self.grid_pos_embed[..., :t]
        if patchout is not None and not patchout.is_identity:
            x = x[:, :, patchout.freq_index(f)]
            # a strided slice, not an index list, so a traced graph keeps a dynamic frames axis
            x = x[..., ::patchout.time_keep_every] if patchout.keep_time is None else x[..., patchout.time_index(t)]
        x = x.flatten(2).transpose(1, 2)  # frequency-major: token f * T + t
        cls = (self.cls_token + self.new_pos_embed[:, :1]).expand(b, -1, -1)
        dist = (self.dist_token + self.new_pos_embed[:, 1:]).expand(b, -1, -1)
        return torch.cat([cls, dist, x], dim=1)

    def forward(
        self,
        mel: torch.Tensor,
        blocks: Sequence[int] = (),
        logits: bool = False,
        patchout: Patchout | None = None,
        hidden: bool = False,
    ) -> MaestOutput:
        """Run up to the deepest requested block (all blocks when logits are asked for).

        `blocks`: 0..depth, the blocks whose (cls, dist, avg) tokens to return; with
        `hidden=True` their whole sequences too.
        """
        wanted = sorted(set(blocks))
        for k in wanted:
            if not 0 <= k <= self.cfg.depth:
                raise ValueError(f"block {k} does not exist (this model has blocks 0..{self.cfg.depth})")
        last = self.cfg.depth if logits else (wanted[-1] if wanted else 0)
        out = MaestOutput()
        x = self.embed(mel, patchout)
        for k in range(last + 1):
            if k > 0:
                x = self.blocks[k - 1](x)
            if k in wanted:
                out.tokens[k] = torch.stack([x[:, 0], x[:, 1], x[:, 2:].mean(1)], dim=1)
                if hidden:
                    out.hidden[k] = x
        if logits:
            x = self.norm(x)
            out.logits = self.head((x[:, 0] + x[:, 1]) / 2)
        return out


def interpolate_pos_grid(grid: torch.Tensor, f: int, t: int, mode: str = "bicubic") -> torch.Tensor:
    """Resize a [1, d, F, T] encoding grid to [1, d, f, t] (init from other segment lengths)."""
    if grid.shape[-2:] == (f, t):
        return grid.clone()
    return F.interpolate(grid.float(), size=(f, t), mode=mode, align_corners=False).to(grid.dtype)


def resize_pos_embed(state: dict[str, torch.Tensor], cfg: MaestConfig) -> dict[str, torch.Tensor]:
    """Fit a state dict's positional encodings to cfg's grid: time encodings truncated when
    longer (as at inference), interpolated when shorter; frequency encodings interpolated."""
    state = dict(state)
    f, t = cfg.f_patches, cfg.t_patches
    if "freq_new_pos_embed" in state:
        fr, tm = state["freq_new_pos_embed"], state["time_new_pos_embed"]
        if fr.shape[2] != f:
            fr = interpolate_pos_grid(fr, f, 1)
        if tm.shape[3] >= t:
            tm = tm[..., :t].clone()
        else:
            tm = interpolate_pos_grid(tm, 1, t)
        state["freq_new_pos_embed"], state["time_new_pos_embed"] = fr, tm
        if cfg.pos_embed == "grid":
            state["grid_pos_embed"] = fr + tm
            del state["freq_new_pos_embed"], state["time_new_pos_embed"]
    elif "grid_pos_embed" in state:
        g = state["grid_pos_embed"]
        if g.shape[2] == f and g.shape[3] >= t:
            g = g[..., :t].clone()
        else:
            g = interpolate_pos_grid(g, f, t)
        if cfg.pos_embed == "separable":
            raise ValueError("cannot turn a full positional grid into separable encodings; "
                             "use pos_embed='grid'")
        state["grid_pos_embed"] = g
    return state


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "MAEST", "MaestConfig", "MaestOutput", "Patchout", "VARIANTS", "TOKENS", "tiny_config",
    "random_patchout", "interpolate_pos_grid", "resize_pos_embed", "count_parameters",
]
