"""EfficientNet-B0, the CNN baseline of the paper (Discogs-EffNet), for speed comparisons.

The architecture of Tan & Le (2019) as torchvision builds it (same layer sizes, same 5,288,548
parameters at 3 input channels and 1000 classes), written here because torchvision cannot load
beside the CPU torch build. Discogs-EffNet feeds it 128-frame x 96-band mel patches (one channel),
hop 62 frames, and takes the 1280-d penultimate layer as the embedding, 400 sigmoid outputs.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

PATCH_FRAMES = 128
PATCH_HOP = 62

# (expand ratio, kernel, stride, out channels, repeats) of the seven MBConv stages.
B0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


@dataclass(frozen=True)
class EffNetConfig:
    in_channels: int = 1
    n_classes: int = 400
    width: int = 1280  # the embedding size
    dropout: float = 0.2
    stochastic_depth: float = 0.2


def conv_bn_act(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
              nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)]
    if act:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(s))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, depthwise kxk, squeeze-excite, 1x1 project."""

    def __init__(self, cin: int, cout: int, expand: int, k: int, stride: int, drop: float):
        super().__init__()
        mid = cin * expand
        layers = [] if expand == 1 else [conv_bn_act(cin, mid, 1)]
        layers += [conv_bn_act(mid, mid, k, stride, groups=mid), SqueezeExcite(mid, max(1, cin // 4)),
                   conv_bn_act(mid, cout, 1, act=False)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if not self.residual:
            return y
        if self.training and self.drop > 0:  # stochastic depth, per sample
            keep = torch.rand(x.shape[0], 1, 1, 1, device=x.device) >= self.drop
            y = y * keep / (1 - self.drop)
        return x + y


class EfficientNetB0(nn.Module):
    def __init__(self, cfg: EffNetConfig = EffNetConfig()):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [conv_bn_act(cfg.in_channels, 32, 3, 2)]
        total = sum(s[4] for s in B0_STAGES)
        cin, i = 32, 0
        for expand, k, stride, cout, repeats in B0_STAGES:
            for r in range(repeats):
                layers.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1,
                                     cfg.stochastic_depth * i / total))
                cin, i = cout, i + 1
        layers.append(conv_bn_act(cin, cfg.width, 1))
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.width, cfg.n_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the 1280-d embeddings (penultimate layer) alone: the classifier is skipped."""
        return self.features(x).mean((2, 3))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, H, W] -> (embedding [B, 1280], logits [B, n_classes])."""
        emb = self.embed(x)
        return emb, self.classifier(self.dropout(emb))


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor],
                          forward: Callable[[torch.Tensor], object] | None = None) -> nn.Module:
    """Re-estimate every BatchNorm's running mean and variance as the plain average over
    `batches` (inputs of `forward`, default the model itself), in place: the statistics that
    belong to averaged (SWA) weights, which the average of the snapshots' statistics is not.
    Only the BatchNorm layers run in training mode (no dropout, no stochastic depth); their
    momentum is restored and the model comes back in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model.eval()
    momenta = [m.momentum for m in norms]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: equal weight to every batch
        m.train()
    seen = 0
    for x in batches:
        (forward or model)(x)
        seen += 1
    for m, mom in zip(norms, momenta):
        m.momentum = mom
        m.eval()
    if not seen:
        raise ValueError("recalibrate_batchnorm: no batches")
    return model


def calibrate_batchnorm(model: EfficientNetB0, x: torch.Tensor) -> EfficientNetB0:
    """Set every BatchNorm's running statistics from one batch, in place: a random-weight model
    then keeps activations near unit scale, as a trained one does (with the default statistics
    they shrink by ~1e-14 over the network, far from how real weights behave)."""
    was_training = model.training
    recalibrate_batchnorm(model, [x], forward=model.embed)
    return model.train(was_training)


def fold_batchnorm(model: EfficientNetB0) -> EfficientNetB0:
    """An inference copy with every BatchNorm folded into the convolution before it (eval-mode
    statistics): one pass over the activations fewer per convolution, the same outputs up to
    float rounding. What an inference compiler does for the CNN, so the baseline gets it too."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    for seq in folded.modules():
        if isinstance(seq, nn.Sequential) and len(seq) >= 2 and isinstance(seq[0], nn.Conv2d) \
                and isinstance(seq[1], nn.BatchNorm2d):
            seq[0] = fuse_conv_bn_eval(seq[0], seq[1])
            seq[1] = nn.Identity()
    return folded


def for_inference(model: EfficientNetB0, fold_bn: bool = True, channels_last: bool = True) -> EfficientNetB0:
    """The baseline at its fastest on CPU: BatchNorm folded, weights in channels_last (NHWC)
    layout, which oneDNN's convolutions prefer (feed it `to_channels_last(patches)`)."""
    model = fold_batchnorm(model) if fold_bn else model.eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def n_patches(frames: int) -> int:
    """Patches of a `frames`-long mel: a 30 s segment (1876 frames) gives 29."""
    return max(frames - PATCH_FRAMES, 0) // PATCH_HOP + 1


def patch_grid_hop(segment_frames: int) -> int:
    """A segment hop (in frames) that keeps consecutive segments' patches on one hop-62 grid, so
    cutting a track into segments gives the patches Discogs-EffNet takes from the whole track."""
    return n_patches(segment_frames) * PATCH_HOP


def mel_patches(mel: torch.Tensor) -> torch.Tensor:
    """[frames, 96] log-mel -> [n, 1, 128, 96] patches with hop 62 (Discogs-EffNet's input)."""
    if mel.shape[0] < PATCH_FRAMES:
        mel = nn.functional.pad(mel, (0, 0, 0, PATCH_FRAMES - mel.shape[0]))
    return mel.unfold(0, PATCH_FRAMES, PATCH_HOP).transpose(1, 2).unsqueeze(1)
