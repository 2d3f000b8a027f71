"""What the training loop eats: the weighted epoch draw, its split across processes, and
augmented batches (random crop, normalisation, SpecAugment, mixup).

Every random choice is keyed, not drawn from a running generator: the epoch's draw from
(seed, epoch), an example's crop and masks from (seed, epoch, its position in the draw), a
micro-batch's mixup partners from (seed, epoch, micro-batch, rank). So a run resumed at any
step sees exactly the batches the uninterrupted run saw, DataLoader workers need no state, and
N processes with batch b see the same examples, with the same crops and masks, as one process
with batch N*b (mixup pairs within a process's own micro-batch, so it is the one exception).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from maest_cli.mels.dataset import DatasetError

if TYPE_CHECKING:
    from maest_cli.audio.frontend import InputNorm

# Stream tags, so the keyed generators of different uses never coincide.
SAMPLER, CROP, SPECAUG, MIXUP, MIXUP_PAIRS, PATCHOUT, BN_CALIBRATION = 1, 2, 3, 4, 5, 6, 7


def keyed_rng(*key: int) -> np.random.Generator:
    """A generator determined by a tuple of non-negative ints (numpy SeedSequence). Keys are
    (seed, TAG, ...) with a fixed length per tag (SeedSequence ignores trailing zeros)."""
    return np.random.default_rng([int(k) for k in key])


# ------------------------------------------------------------------ the epoch draw

def class_weights(counts: np.ndarray, scale: float = 1000.0, offset: float = 100.0) -> np.ndarray:
    """[C] weight per class, scale / (count + offset): rare styles are drawn more often
    (PaSST / MAEST: 1000 / (count + 100))."""
    return scale / (np.asarray(counts, np.float64) + offset)


def track_weights(targets: np.ndarray, weights_per_class: np.ndarray) -> np.ndarray:
    """[N] weight per track: the sum of its labels' class weights (0 for a track without labels)."""
    return np.asarray(targets, np.float64) @ np.asarray(weights_per_class, np.float64)


def draw_epoch(weights: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """n distinct indices drawn one after another with probability proportional to `weights`
    among those not yet drawn (successive sampling without replacement), in draw order.

    Efraimidis-Spirakis: index i gets the key E_i / w_i with E_i ~ Exp(1); sorting the keys is
    the same race as drawing one by one, in O(N log N) for millions of tracks. Zero-weight
    indices are never drawn; n is at most the number of positive weights.
    """
    w = np.asarray(weights, np.float64)
    eligible = np.flatnonzero(w > 0)
    if n > len(eligible):
        raise ValueError(f"cannot draw {n} distinct tracks from {len(eligible)} with positive weight")
    keys = keyed_rng(seed, SAMPLER, epoch).exponential(size=len(w))[eligible] / w[eligible]
    first = np.argpartition(keys, n - 1)[:n] if n < len(keys) else np.arange(len(keys))
    return eligible[first[np.argsort(keys[first], kind="stable")]]


@dataclass(frozen=True)
class BatchLayout:
    """How an epoch's draw is cut: a global batch per optimiser step, made of `accum` micro-
    batches per process, each process taking its own consecutive `batch` examples. Every
    process thus sees a disjoint part of the epoch, and the union over processes of step k is
    the same set of examples whatever the number of processes."""

    batch: int  # per process per micro-batch
    world: int
    accum: int
    epoch_len: int

    @property
    def global_batch(self) -> int:
        return self.batch * self.world * self.accum

    @property
    def steps(self) -> int:
        """Optimiser steps per epoch (an incomplete last global batch is dropped)."""
        return self.epoch_len // self.global_batch

    @property
    def micro_batches(self) -> int:
        """Micro-batches per epoch of one process."""
        return self.steps * self.accum

    def positions(self, micro: int, rank: int) -> np.ndarray:
        """Positions in the epoch draw of one process's micro-batch number `micro`."""
        step, m = divmod(micro, self.accum)
        start = step * self.global_batch + m * self.batch * self.world + rank * self.batch
        return np.arange(start, start + self.batch)


# ------------------------------------------------------------------ augmentations

def mixup_lambda(rng: np.random.Generator, alpha: float, size: int | None = None) -> np.ndarray | float:
    """Beta(alpha, alpha) folded to max(lambda, 1 - lambda): each mixed example stays closer to
    its own spectrogram and labels than to its partner's."""
    lam = rng.beta(alpha, alpha, size)
    return np.maximum(lam, 1.0 - lam)


def mixup(x: np.ndarray, y: np.ndarray, lam: np.ndarray, partner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x[i] <- lam_i x[i] + (1 - lam_i) x[partner[i]], labels alike (x [B,T,M], y [B,C], lam [B])."""
    lam = np.asarray(lam, np.float32)
    xm = lam[:, None, None] * x + (1 - lam[:, None, None]) * x[partner]
    ym = lam[:, None] * y + (1 - lam[:, None]) * y[partner]
    return xm.astype(np.float32), ym.astype(np.float32)


# The authors' time masks are at most this share of the segment long (torchaudio's p = 0.2).
TIME_MASK_MAX_SHARE = 0.2


def spec_augment(x: np.ndarray, rng: np.random.Generator, time_masks: int, time_width: int,
                 freq_masks: int, freq_width: int, value: float = 0.0) -> np.ndarray:
    """SpecAugment on one normalised [T, M] spectrogram, in place, as the authors configure it
    (torchaudio's TimeMasking / FrequencyMasking applied time_masks / freq_masks times): each
    mask is floor(v) wide with v ~ U[0, width) (so 0 to width - 1 frames or bands; time masks
    also under TIME_MASK_MAX_SHARE of T), starts at floor(U[0, length - v)), and is filled with
    `value` (0 after normalisation: the training mean). Masks may overlap or be empty."""
    t, m = x.shape
    time_cap = min(time_width, int(t * TIME_MASK_MAX_SHARE))
    for count, width, length, axis in ((time_masks, time_cap, t, 0), (freq_masks, min(freq_width, m), m, 1)):
        if count <= 0 or width < 1:
            continue
        for _ in range(count):
            v = rng.random() * width
            start = int(rng.random() * (length - v))
            stop = start + int(v)
            if axis == 0:
                x[start:stop] = value
            else:
                x[:, start:stop] = value
    return x


@dataclass(frozen=True)
class Augment:
    mixup_alpha: float = 0.0
    time_masks: int = 0
    time_width: int = 0
    freq_masks: int = 0
    freq_width: int = 0


class TrainBatches:
    """Micro-batch number i of one process in one epoch -> (x [b, frames, 96] float32 normalised
    and augmented, y [b, C] float32). A map-style dataset of whole batches for a DataLoader with
    batch_size=None, so workers prefetch batches and the order stays the loop's.

    The authors' order: crop, normalise, SpecAugment (per example), mixup (per micro-batch).
    A damaged dataset gives {"error": message} instead of a batch, for the loop to raise: an
    exception raised in a worker would arrive with the worker's traceback in its message."""

    def __init__(self, data, order: np.ndarray, layout: BatchLayout, rank: int, epoch: int, seed: int,
                 frames: int, norm: InputNorm, augment: Augment):
        self.data, self.order, self.layout, self.rank = data, order, layout, rank
        self.epoch, self.seed, self.frames, self.norm, self.augment = epoch, seed, frames, norm, augment

    def __len__(self) -> int:
        return self.layout.micro_batches

    def __getitem__(self, micro: int):
        try:
            return self._batch(micro)
        except DatasetError as e:
            return {"error": str(e)}

    def _batch(self, micro: int):
        import torch

        a, s, e = self.augment, self.seed, self.epoch
        pos = self.layout.positions(micro, self.rank)
        rows = self.order[pos]
        x = np.stack([self.norm.apply(self.data.crop(int(r), self.frames, rng=keyed_rng(s, CROP, e, p)))
                      for r, p in zip(rows, pos)])
        y = self.data.targets(rows)
        if a.time_masks or a.freq_masks:
            for i, p in enumerate(pos):
                spec_augment(x[i], keyed_rng(s, SPECAUG, e, p), a.time_masks, a.time_width,
                             a.freq_masks, a.freq_width)
        if a.mixup_alpha > 0 and len(rows) > 1:
            lam = np.array([mixup_lambda(keyed_rng(s, MIXUP, e, p), a.mixup_alpha) for p in pos])
            partner = keyed_rng(s, MIXUP_PAIRS, e, micro, self.rank).permutation(len(rows))
            x, y = mixup(x, y, lam, partner)
        return torch.from_numpy(x), torch.from_numpy(y)


def patchout_generator(seed: int, step: int, micro: int):
    """The torch generator of one micro-batch's training patchout: the same on every process
    (patchout is per batch, and all processes' slices form one global batch)."""
    import torch

    g = torch.Generator()
    g.manual_seed(int(keyed_rng(seed, PATCHOUT, step, micro).integers(0, 2**63 - 1)))
    return g


def bn_calibration_batches(data, rows: np.ndarray, frames: int, norm: InputNorm, seed: int, epoch: int,
                           n: int, batch_size: int, device=None):
    """`n` normalised random training crops (no augmentation) in batches, for re-estimating
    BatchNorm statistics: tracks drawn with replacement, all keyed by (seed, epoch), so a
    resumed run and every process see the same crops."""
    import torch

    rng = keyed_rng(seed, BN_CALIBRATION, epoch)
    picks = rng.choice(np.asarray(rows), size=n, replace=True)
    for start in range(0, n, batch_size):
        part = picks[start:start + batch_size]
        x = np.stack([norm.apply(data.crop(int(r), frames, rng=rng)) for r in part])
        yield torch.from_numpy(x).to(device) if device is not None else torch.from_numpy(x)


def eval_crops(data, row: int, frames: int, segments: int) -> np.ndarray:
    """[k, frames, 96] unnormalised crops of a validation track: the centre one (segments=1),
    or `segments` evenly spaced ones (a track shorter than the segment gives one padded crop)."""
    n = data.n_frames(row)
    if segments == 1 or n <= frames:
        return data.crop(row, frames)[None]
    starts = np.linspace(0, n - frames, segments).round().astype(int)
    return np.stack([data.crop(row, frames, start=int(s)) for s in starts])


__all__ = ["class_weights", "track_weights", "draw_epoch", "BatchLayout", "mixup_lambda", "mixup",
           "spec_augment", "TIME_MASK_MAX_SHARE", "Augment", "TrainBatches", "patchout_generator", "eval_crops",
           "bn_calibration_batches", "keyed_rng"]
