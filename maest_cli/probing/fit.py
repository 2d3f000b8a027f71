"""Training the probe: the authors' MLP and learning-rate schedule on in-memory embeddings.

An MLP Linear(D, 512)-ReLU-Dropout-Linear(512, tags) is trained with binary cross-entropy
and AdamW(lr=max_lr, weight_decay=1e-3) on embeddings standardised with training-split
statistics. The learning rate follows the authors' probe code (MAEST ex_tl.py, PaSST's
exp_warmup_linear_down), set once per epoch: an exponential warm-up over 10 epochs, then a
linear decay to 1e-7 x max_lr over the rest of the run; `hold_epochs` (default 0, as their
code) keeps the maximum for that many epochs before the decay. Each run keeps the weights of
its epoch with the best validation macro ROC-AUC. Everything runs on one tensor per split:
batches are rows picked by a random permutation (no DataLoader), evaluation is one forward
over the whole split, so a CPU is enough. Dropout and batch order draw from the run's own
generator, so a run is reproducible on its own (grid points are independent runs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maest_cli.embed.reading import EmbeddingSet
from maest_cli.errors import UsageError
from maest_cli.io.config import ConfigError, read_toml
from maest_cli.mels.labels import SPLITS
from maest_cli.probing.data import Annotations, Join
from maest_cli.probing.metrics import evaluable, fast_macro_roc_auc

EVAL_CHUNK = 16384  # rows per forward when scoring a whole split
GRID_AXES = ("batch_size", "epochs", "dropout", "lr")


# ---------------------------------------------------------------- protocol and grids

@dataclass(frozen=True)
class Protocol:
    """What every run of a grid shares (configs/probe.toml [protocol])."""

    hidden: int = 512
    weight_decay: float = 1e-3
    warmup_epochs: int = 10
    hold_epochs: int = 0
    lr_last_factor: float = 1e-7  # the decay ends at max_lr * lr_last_factor

    def __post_init__(self) -> None:
        ints = (self.hidden, self.warmup_epochs, self.hold_epochs)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints) or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                        for v in (self.weight_decay, self.lr_last_factor)):
            raise ConfigError(f"probe protocol {self}: hidden, warmup_epochs, hold_epochs are integers, "
                              f"weight_decay and lr_last_factor numbers")
        if self.hidden < 1 or self.weight_decay < 0 or self.warmup_epochs < 0 or self.hold_epochs < 0:
            raise ConfigError(f"probe protocol {self}: hidden >= 1, weight_decay, warmup_epochs, hold_epochs >= 0")
        if not 0 <= self.lr_last_factor <= 1:
            raise ConfigError(f"probe protocol {self}: 0 <= lr_last_factor <= 1")

    def decay_start(self) -> int:
        return self.warmup_epochs + self.hold_epochs

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lr_factor(epoch: int, epochs: int, protocol: Protocol) -> float:
    """The multiplier of max_lr during 0-based `epoch` of a run of `epochs` (LambdaLR's lambda).

    Warm-up (epoch < W): exp(-5 (1 - e/W)^2) with e at least 0.5, i.e. about 0.011 at epoch 0.
    Then 1 until the decay starts at S = W + hold, then linear over L = epochs - S epochs:
    last + (1 - last) (L - (e - S)) / L, so epoch S is still 1 and the last epoch is
    last + (1 - last) / L. With hold 0 this is PaSST's exp_warmup_linear_down(W, E - W, W, last)
    as the authors call it."""
    w, start = protocol.warmup_epochs, protocol.decay_start()
    up = 1.0
    if epoch < w:
        phase = 1.0 - max(epoch, 0.5) / w
        up = math.exp(-5.0 * phase * phase)
    length, last = epochs - start, protocol.lr_last_factor
    if epoch <= start:
        down = 1.0
    elif epoch - start < length:
        down = last + (1.0 - last) * (length - epoch + start) / length
    else:
        down = last
    return up * down


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


def _axis(table: dict, name: str, source: str, grid: str) -> list:
    if name not in table:
        raise ConfigError(f"{source}: grid {grid!r} needs lists {', '.join(GRID_AXES)} (no {name})")
    values = table[name]
    if not isinstance(values, list) or not values or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ConfigError(f"{source}: grid {grid!r}: {name} must be a non-empty list of numbers (got {values!r})")
    if name in ("batch_size", "epochs") and not all(float(v).is_integer() for v in values):
        raise ConfigError(f"{source}: grid {grid!r}: {name} must be whole numbers (got {values!r})")
    return values


def load_grid(name_or_path: str) -> tuple[str, Protocol, list[ProbeConfig]]:
    """A grid by name (configs/probe.toml) or from a TOML file with the same keys."""
    base = read_toml("probe.toml")
    if Path(name_or_path).is_file():
        try:
            data = read_toml(name_or_path)
        except UnicodeDecodeError as e:
            raise ConfigError(f"{name_or_path}: not UTF-8 text ({e.reason})") from None
        table = data.get("grid", data)
        proto = {**base.get("protocol", {}), **data.get("protocol", {})}
        source = str(name_or_path)
    else:
        grids = base.get("grids", {})
        if name_or_path not in grids:
            raise UsageError(f"--grid {name_or_path!r}: expected one of {', '.join(grids)} or a TOML file")
        table, proto, source = grids[name_or_path], base.get("protocol", {}), "probe.toml"
    if not isinstance(table, dict) or not isinstance(proto, dict):
        raise ConfigError(f"{source}: [grid] and [protocol] must be tables")
    try:
        protocol = Protocol(**proto)
    except TypeError as e:
        raise ConfigError(f"{source}: invalid [protocol] ({e}); keys: "
                          f"{', '.join(f.name for f in dataclasses.fields(Protocol))}") from None
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    axes = [_axis(table, k, source, name_or_path) for k in GRID_AXES]
    configs = [ProbeConfig(int(b), int(e), float(d), float(lr))
               for b in axes[0] for e in axes[1] for d in axes[2] for lr in axes[3]]
    for c in configs:
        if c.batch_size < 1 or c.epochs < 1 or not 0 <= c.dropout < 1 or not (0 < c.lr < math.inf):
            raise ConfigError(f"{source}: invalid grid point {c} (batch and epochs >= 1, 0 <= dropout < 1, lr > 0)")
        if c.epochs <= protocol.decay_start():
            raise ConfigError(f"{source}: {c.epochs} epochs leave no decay after {protocol.warmup_epochs} warm-up "
                              f"and {protocol.hold_epochs} hold epochs; use more epochs or a shorter [protocol]")
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
    """Linear(D, hidden) - ReLU - Dropout - Linear(hidden, tags). Initialisation and dropout
    draw from the run's own generators, so a run is reproducible whatever ran before it."""

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
class RunResult:
    config: ProbeConfig
    seed: int
    best_epoch: int  # 1-based; 0 if no epoch gave a finite validation score
    val_roc_auc: float
    val_history: list[float]
    loss_history: list[float]
    lr_history: list[float]
    diverged: bool
    state: dict | None  # the best epoch's weights (cpu)

    def point(self) -> dict:
        return {**self.config.to_dict(), "key": self.config.key(), "seed": self.seed,
                "val_roc_auc": self.val_roc_auc, "best_epoch": self.best_epoch, "diverged": self.diverged,
                "val_roc_auc_per_epoch": self.val_history, "train_loss_per_epoch": self.loss_history,
                "lr_per_epoch": self.lr_history}


def _adamw(model: nn.Module, lr: float, protocol: Protocol) -> torch.optim.Optimizer:
    """AdamW, fused where torch has it: one pass over the weights per step instead of one per
    operation, which matters when the step is as large as the batch's matmuls (1.2 M weights)."""
    try:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=protocol.weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=protocol.weight_decay)


def train_run(data: ProbeData, config: ProbeConfig, seed: int, protocol: Protocol,
              device: torch.device) -> RunResult:
    """One run of `config`: `config.epochs` passes over the training split in a random order,
    the learning rate set by `lr_factor` at the start of each epoch, the validation split
    scored after each; the weights of the best validation epoch are kept. Stops early only if
    the loss stops being finite (diverged)."""
    train, val = data.splits["train"], data.splits["validation"]
    val_mask = evaluable(val.y_np)
    model = ProbeMLP(data.dim, len(data.tags), protocol.hidden, config.dropout,
                     generator=torch.Generator().manual_seed(seed)).to(device)
    opt = _adamw(model, config.lr, protocol)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: lr_factor(e, config.epochs, protocol))
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    n = len(train)
    best_auc, best_epoch, best_state, diverged = -math.inf, 0, None, False
    val_history, loss_history, lr_history = [], [], []
    for epoch in range(config.epochs):
        lr_history.append(opt.param_groups[0]["lr"])
        perm = torch.randperm(n, generator=gen, device=train.x.device)
        model.train()
        total = torch.zeros((), device=train.x.device)
        for start in range(0, n, config.batch_size):
            idx = perm[start:start + config.batch_size]
            loss = F.binary_cross_entropy_with_logits(model(train.x[idx], gen), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
        schedule.step()
        mean_loss = float(total) / n
        loss_history.append(mean_loss)
        model.eval()
        state = {k: v.detach() for k, v in model.state_dict().items()}
        auc = fast_macro_roc_auc(val.y_np, logits_of(state, val.x), val_mask)
        val_history.append(auc)
        if math.isfinite(auc) and auc > best_auc:
            best_auc, best_epoch = auc, epoch + 1
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        if not math.isfinite(mean_loss):
            diverged = True
            break
    return RunResult(config, seed, best_epoch, best_auc if best_state is not None else float("nan"),
                     val_history, loss_history, lr_history, diverged, best_state)
