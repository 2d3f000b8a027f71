"""Training the probe: the paper's MLP and learning-rate schedule on in-memory embeddings.

An MLP Linear(D, 512)-ReLU-Dropout-Linear(512, tags) is trained with binary cross-entropy
and AdamW on embeddings standardised with training-split statistics. The learning rate rises
exponentially for 10 epochs, is held, then falls linearly over the last 10; each run keeps the
weights of its epoch with the best validation macro ROC-AUC. Everything runs on one tensor
per split: batches are rows picked by a random permutation (no DataLoader), evaluation is one
forward over the whole split, so a CPU is enough.

Runs that differ only in their number of epochs share everything up to the start of their
decay (same seed, same batches, same learning rates), so `train_runs` trains them as one
trunk forked at each decay start: the paper grid costs 130 epochs per setting instead of 330,
with the same results as separate runs (tested). Dropout and batch order draw from the run's
own generator, so a run is reproducible and a fork is an exact copy.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, read_toml
from .probe_data import SPLITS, Annotations, EmbeddingSet, Join
from .probe_metrics import evaluable, fast_macro_roc_auc
from .runtime import UsageError

EVAL_CHUNK = 16384  # rows per forward when scoring a whole split


# ---------------------------------------------------------------- protocol and grids

@dataclass(frozen=True)
class Protocol:
    """What every run of a grid shares (configs/probe.toml [protocol])."""

    hidden: int = 512
    weight_decay: float = 1e-3
    warmup_epochs: int = 10
    decay_epochs: int = 10
    lr_start_factor: float = 0.01
    lr_end_factor: float = 0.01

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.decay_epochs < 0:
            raise ConfigError(f"probe protocol {self}: hidden >= 1, weight_decay, warmup_epochs, decay_epochs >= 0")
        if not (0 < self.lr_start_factor <= 1 and 0 <= self.lr_end_factor <= 1):
            raise ConfigError(f"probe protocol {self}: 0 < lr_start_factor <= 1 and 0 <= lr_end_factor <= 1")

    def phases(self, epochs: int) -> tuple[int, int]:
        """(warm-up, decay) epochs of a run; short runs give each phase a third."""
        return min(self.warmup_epochs, epochs // 3), min(self.decay_epochs, epochs // 3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProbeConfig:
    """One point of a grid."""

    batch_size: int
    epochs: int
    dropout: float
    lr: float  # the maximum learning rate

    def key(self) -> str:
        return f"b{self.batch_size}-e{self.epochs}-d{self.dropout:g}-lr{self.lr:g}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_at(t: float, max_lr: float, warm: int, decay_start: float | None, end: float,
          protocol: Protocol) -> float:
    """Learning rate at fractional epoch t: exponential warm-up, hold, then (from decay_start,
    if any) linear decay to max_lr * lr_end_factor at `end`."""
    if t < warm:
        return max_lr * protocol.lr_start_factor ** (1.0 - t / warm)
    if decay_start is None or t < decay_start:
        return max_lr
    frac = min(1.0, (t - decay_start) / max(end - decay_start, 1e-12))
    return max_lr * (1.0 - (1.0 - protocol.lr_end_factor) * frac)


def load_grid(name_or_path: str) -> tuple[str, Protocol, list[ProbeConfig]]:
    """A grid by name (configs/probe.toml) or from a TOML file with the same keys."""
    base = read_toml("probe.toml")
    if Path(name_or_path).is_file():
        data = read_toml(name_or_path)
        table = data.get("grid", data)
        proto = {**base.get("protocol", {}), **data.get("protocol", {})}
        source = str(name_or_path)
    else:
        grids = base.get("grids", {})
        if name_or_path not in grids:
            raise UsageError(f"--grid {name_or_path!r}: expected one of {', '.join(grids)} or a TOML file")
        table, proto, source = grids[name_or_path], base.get("protocol", {}), "probe.toml"
    try:
        protocol = Protocol(**proto)
        axes = [list(table[k]) for k in ("batch_size", "epochs", "dropout", "lr")]
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{source}: grid {name_or_path!r} needs lists batch_size, epochs, dropout, lr "
                          f"and a valid [protocol] ({e})") from None
    configs = [ProbeConfig(int(b), int(e), float(d), float(lr))
               for b in axes[0] for e in axes[1] for d in axes[2] for lr in axes[3]]
    for c in configs:
        if c.batch_size < 1 or c.epochs < 1 or not 0 <= c.dropout < 1 or not c.lr > 0:
            raise ConfigError(f"{source}: invalid grid point {c} (batch and epochs >= 1, 0 <= dropout < 1, lr > 0)")
    if not configs:
        raise ConfigError(f"{source}: grid {name_or_path!r} is empty")
    return Path(name_or_path).stem if source != "probe.toml" else name_or_path, protocol, configs


# ---------------------------------------------------------------- data in memory

@dataclass
class SplitData:
    x: torch.Tensor  # [n, D] standardised float32, on the run's device
    y: torch.Tensor  # [n, C] float32, on the run's device
    y_np: np.ndarray  # [n, C] uint8
    paths: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ProbeData:
    tags: list[str]
    splits: dict[str, SplitData]
    mean: np.ndarray  # [D] training-split statistics used to standardise
    std: np.ndarray
    notes: list[str] = field(default_factory=list)

    @property
    def dim(self) -> int:
        return len(self.mean)


def prepare_data(ann: Annotations, emb: EmbeddingSet, join: Join, device: torch.device) -> ProbeData:
    """Read the matched embeddings once, standardise them with train statistics, move them to device."""
    has = join.track_of_label >= 0
    # rows ordered by split, so that each split is a slice of one matrix (no copies)
    labelled = np.concatenate([np.flatnonzero(has & (ann.splits == s)) for s in SPLITS])
    x = emb.matrix(join.track_of_label[labelled])
    notes = []
    finite = np.isfinite(x).all(1)
    if not finite.all():
        bad = labelled[~finite]
        notes.append(f"{len(bad)} tracks with non-finite embeddings left out (e.g. {ann.paths[bad[0]]!r})")
        labelled, x = labelled[finite], x[finite]
    split_of = ann.splits[labelled]
    n_train = int((split_of == "train").sum())  # the first rows
    if not n_train:
        raise UsageError(f"{ann.dataset}: no training track with a usable embedding")
    mean, std = column_stats(x[:n_train])
    flat = std < 1e-8
    if flat.any():
        notes.append(f"{int(flat.sum())} embedding dimensions constant over the train split (kept unscaled)")
    std[flat] = 1.0
    x -= mean.astype(np.float32)
    x /= std.astype(np.float32)
    splits = {}
    for s in SPLITS:
        rows = np.flatnonzero(split_of == s)
        part = slice(rows[0], rows[-1] + 1) if len(rows) else slice(0, 0)
        idx = labelled[part]
        y = ann.labels[idx]
        splits[s] = SplitData(torch.from_numpy(x[part]).to(device), torch.from_numpy(y.astype(np.float32)).to(device),
                              y, [ann.paths[i] for i in idx])
    for s in ("validation", "test"):
        if not evaluable(splits[s].y_np).any():
            raise UsageError(f"{ann.dataset}: no tag has both positive and negative tracks in the {s} split "
                             f"({len(splits[s])} tracks with embeddings); it cannot be scored")
    return ProbeData(list(ann.tags), splits, mean, std, notes)


def column_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (population) std of each column in float64, a block of rows at a time, so a
    large float32 matrix never gets a float64 copy."""
    total = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk].sum(0, dtype=np.float64)
    mean = total / len(x)
    sq = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        sq += np.square(x[i:i + chunk] - mean).sum(0)
    return mean, np.sqrt(sq / len(x))


# ---------------------------------------------------------------- the MLP

class ProbeMLP(nn.Module):
    """Linear(D, hidden) - ReLU - Dropout - Linear(hidden, tags). Dropout draws from the run's
    own generator so that runs are reproducible and forks equal separate runs."""

    def __init__(self, dim: int, n_tags: int, hidden: int = 512, dropout: float = 0.5,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, n_tags)
        self.dropout = dropout
        for layer in (self.hidden, self.out):  # nn.Linear's own init, drawn from `generator`
            nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(layer.in_features)
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h = torch.relu(self.hidden(x))
        if self.training and self.dropout > 0:
            keep = torch.empty_like(h).bernoulli_(1 - self.dropout, generator=generator)
            h = h * keep * (1 / (1 - self.dropout))
        return self.out(h)


@torch.no_grad()
def logits_of(state: dict[str, torch.Tensor], x: torch.Tensor) -> np.ndarray:
    """[n, C] logits of the MLP with weights `state`, full-split, in chunks."""
    w1, b1, w2, b2 = (state[k].to(x.device) for k in ("hidden.weight", "hidden.bias", "out.weight", "out.bias"))
    parts = [torch.addmm(b2, torch.relu(torch.addmm(b1, x[i:i + EVAL_CHUNK], w1.T)), w2.T)
             for i in range(0, len(x), EVAL_CHUNK)]
    return torch.cat(parts).float().cpu().numpy() if parts else np.zeros((0, len(b2)), np.float32)


# ---------------------------------------------------------------- training runs

@dataclass
class _Run:
    """The mutable state of one training run (forkable)."""

    model: ProbeMLP
    opt: torch.optim.Optimizer
    gen: torch.Generator
    epoch: int = 0
    best_auc: float = -math.inf
    best_epoch: int = 0
    best_state: dict | None = None
    val_history: list = field(default_factory=list)
    loss_history: list = field(default_factory=list)
    diverged: bool = False

    def fork(self, protocol: Protocol) -> "_Run":
        model = copy.deepcopy(self.model)
        opt = _adamw(model, 0.0, protocol)
        opt.load_state_dict(copy.deepcopy(self.opt.state_dict()))
        gen = torch.Generator(device=self.gen.device)
        gen.set_state(self.gen.get_state())
        return _Run(model, opt, gen, self.epoch, self.best_auc, self.best_epoch, self.best_state,
                    list(self.val_history), list(self.loss_history), self.diverged)


@dataclass
class RunResult:
    config: ProbeConfig
    seed: int
    best_epoch: int  # 1-based; 0 if no epoch gave a finite validation score
    val_roc_auc: float
    val_history: list[float]
    loss_history: list[float]
    diverged: bool
    state: dict | None  # the best epoch's weights (cpu)

    def point(self) -> dict:
        return {**self.config.to_dict(), "key": self.config.key(), "seed": self.seed,
                "val_roc_auc": self.val_roc_auc, "best_epoch": self.best_epoch, "diverged": self.diverged,
                "val_roc_auc_per_epoch": self.val_history, "train_loss_per_epoch": self.loss_history}


def _adamw(model: nn.Module, lr: float, protocol: Protocol) -> torch.optim.Optimizer:
    """AdamW, fused where torch has it: one pass over the weights per step instead of one per
    operation, which matters when the step is as large as the batch's matmuls (1.2 M weights)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=protocol.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=protocol.weight_decay)


def _new_run(data: ProbeData, dropout: float, lr: float, seed: int, protocol: Protocol,
             device: torch.device) -> _Run:
    init = torch.Generator().manual_seed(seed)
    model = ProbeMLP(data.dim, len(data.tags), protocol.hidden, dropout, generator=init).to(device)
    opt = _adamw(model, lr, protocol)
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    return _Run(model, opt, gen)


def _train_epoch(run: _Run, data: ProbeData, batch_size: int, lr_of: Callable[[float], float],
                 val_mask: np.ndarray) -> None:
    """One pass over the training split in a random order, then score the validation split."""
    train, val = data.splits["train"], data.splits["validation"]
    n = len(train)
    steps = math.ceil(n / batch_size)
    perm = torch.randperm(n, generator=run.gen, device=train.x.device)
    run.model.train()
    total = torch.zeros((), device=train.x.device)
    for s in range(steps):
        idx = perm[s * batch_size:(s + 1) * batch_size]
        lr = lr_of(run.epoch + s / steps)
        for group in run.opt.param_groups:
            group["lr"] = lr
        loss = F.binary_cross_entropy_with_logits(run.model(train.x[idx], run.gen), train.y[idx])
        run.opt.zero_grad(set_to_none=True)
        loss.backward()
        run.opt.step()
        total += loss.detach() * len(idx)
    run.epoch += 1
    mean_loss = float(total) / n
    run.loss_history.append(mean_loss)
    run.model.eval()
    state = {k: v.detach() for k, v in run.model.state_dict().items()}
    auc = fast_macro_roc_auc(val.y_np, logits_of(state, val.x), val_mask)
    run.val_history.append(auc)
    if not math.isfinite(mean_loss):
        run.diverged = True
    if math.isfinite(auc) and auc > run.best_auc:
        run.best_auc, run.best_epoch = auc, run.epoch
        run.best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def train_runs(data: ProbeData, batch_size: int, dropout: float, lr: float, epochs: list[int], seed: int,
               protocol: Protocol, device: torch.device) -> list[RunResult]:
    """One run per number of epochs (same other settings and seed), sharing the common trunk.

    A run of E epochs with phases (warm, decay) follows the same learning rates as any longer
    run with the same phases until epoch E - decay; the trunk is trained with warm-up and hold
    only, and forked there into the run's decay.
    """
    val_mask = evaluable(data.splits["validation"].y_np)
    groups: dict[tuple[int, int], list[int]] = {}
    for e in sorted(set(epochs)):
        groups.setdefault(protocol.phases(e), []).append(e)
    results: dict[int, RunResult] = {}
    for (warm, decay), group in groups.items():
        trunk = _new_run(data, dropout, lr, seed, protocol, device)
        hold = lambda t, warm=warm: lr_at(t, lr, warm, None, 0.0, protocol)  # noqa: E731
        for k, e in enumerate(group):
            while trunk.epoch < e - decay and not trunk.diverged:
                _train_epoch(trunk, data, batch_size, hold, val_mask)
            run = trunk if k == len(group) - 1 else trunk.fork(protocol)
            fall = lambda t, e=e, warm=warm, decay=decay: lr_at(t, lr, warm, e - decay, e, protocol)  # noqa: E731
            while run.epoch < e and not run.diverged:
                _train_epoch(run, data, batch_size, fall, val_mask)
            results[e] = RunResult(ProbeConfig(batch_size, e, dropout, lr), seed, run.best_epoch,
                                   run.best_auc if run.best_state is not None else float("nan"),
                                   run.val_history, run.loss_history, run.diverged, run.best_state)
    return [results[e] for e in epochs]
