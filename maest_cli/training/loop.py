"""`maest train`: MAEST on a prepare-mels dataset, with patchout, on one CPU or many GPUs.

`[model] architecture = "effnet-b0"` trains the paper's CNN baseline, EfficientNet-B0, through
the same loop (effnet_train.py: 128-frame crops, no patchout, BatchNorm statistics
re-estimated for the SWA weights, its own checkpoint format), so the two differ only in the
network.

The recipe is REFERENCE 6 (configs/train/maest-*.toml): weighted epochs of tracks drawn without
replacement, random crops of the segment length, mixup + SpecAugment, random structured
patchout (whole time columns and frequency rows, so the sequence really shrinks), BCE on the
dataset's labels, AdamW with the authors' exponential warm-up / flat / linear decay (a factor
per epoch), SWA of the weights every K epochs from epoch S, validation (macro ROC-AUC and mAP)
after every epoch.

One process per device. `torchrun` (or `maest train --nproc N`) starts N of them: DDP over
gloo on CPU, NCCL on CUDA; each takes its own slice of every global batch (train_data.py);
only rank 0 writes. RUN_DIR gets:
  last.safetensors, best.safetensors, swa.safetensors   our checkpoint format (+ labels, recipe)
  state.pt            everything needed to resume (torch.load(weights_only=True)), atomic;
                      written first (at step 0), then every save_every steps and every epoch
  metrics.jsonl       one line every log_every steps and one per epoch
  config.resolved.json  the recipe and what was decided from it (device, dtype, init, norm)
A run killed at any point resumes from state.pt and continues exactly as if never stopped; one
killed before its first state.pt starts again with the same --out.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from maest_cli.audio.frontend import OFFICIAL_NORM, InputNorm
from maest_cli.errors import MaestError, UsageError
from maest_cli.io.artefacts import tool_versions, write_atomic, write_json
from maest_cli.mels.dataset import DatasetError, MelDataset
from maest_cli.models.checkpoints import default_block, save_checkpoint
from maest_cli.models.maest import MAEST, random_patchout
from maest_cli.models.precision import autocast, choose_dtype, resolve_device
from maest_cli.training.config import RESUMABLE_CHANGES, TrainConfig, load_train_config
from maest_cli.training.data import (
    Augment,
    BatchLayout,
    TrainBatches,
    bn_calibration_batches,
    class_weights,
    draw_epoch,
    eval_crops,
    patchout_generator,
    track_weights,
)
from maest_cli.training.effnet import (
    build_tagger,
    recalibrate_batchnorm,
    save_effnet_checkpoint,
)
from maest_cli.training.warmstart import InitInfo, init_model

STATE, METRICS, RESOLVED = "state.pt", "metrics.jsonl", "config.resolved.json"
CHECKPOINTS = ("last", "best", "swa")
STATE_FORMAT = "maest-cli-train-state/1"
SWA_BN_CROPS = 512  # training crops that re-estimate BatchNorm statistics of SWA weights (EfficientNet-B0)


class TrainError(MaestError, RuntimeError):
    """The run cannot go on (e.g. the loss diverged); the message says where the last good state is."""


# ------------------------------------------------------------------ schedule and SWA

def lr_factor(epoch: float, cfg: TrainConfig) -> float:
    """Multiplier of cfg.lr in (0-based) epoch `epoch`: PaSST/MAEST's exp_warmup_linear_down, the
    product of an exponential warm-up, exp(-5 (1 - e / warmup)^2) with e clipped to [0.5, warmup]
    while e < warmup, else 1, and a linear decay, 1 until decay_start_epoch, then
    last + (1 - last) (length - (e - start)) / length while e - start < length, then last.
    The authors step a LambdaLR once per epoch: epoch e trains at factor(e) throughout (0.0174
    for epoch 0 of the paper's recipe, 1 from epoch 5 to 50, 0.505 at 75, 0.01 from 100)."""
    f = 1.0
    w = cfg.warmup_epochs
    if epoch < w:
        e = min(max(epoch, 0.5), w)
        f = math.exp(-5.0 * (1.0 - e / w) ** 2)
    start, length, last = cfg.decay_start_epoch, cfg.decay_epochs, cfg.final_lr_factor
    if epoch > start:
        f *= last + (1.0 - last) * (length - epoch + start) / length if epoch - start < length else last
    return f


def lr_at(epoch: int, step_in_epoch: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The learning rate of one optimiser step: constant within an epoch (lr_update = "epoch", the
    authors'), or the same curve at the fractional epoch (lr_update = "step")."""
    e = epoch if cfg.lr_update == "epoch" else epoch + step_in_epoch / steps_per_epoch
    return cfg.lr * lr_factor(e, cfg)


def swa_due(epoch: int, cfg: TrainConfig) -> bool:
    """SWA takes the weights at the end of (1-based) epochs swa_start, +swa_every, ..."""
    return cfg.swa_start > 0 and epoch >= cfg.swa_start and (epoch - cfg.swa_start) % cfg.swa_every == 0


class SwaAverage:
    """Running mean of a model's weights (float32), one snapshot at a time."""

    def __init__(self) -> None:
        self.n = 0
        self.state: dict[str, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        current = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
        if self.state is None:
            self.state = {k: v.clone() for k, v in current.items()}
        else:
            for k, v in current.items():
                self.state[k] += (v - self.state[k]) / (self.n + 1)
        self.n += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> nn.Module:
        own = model.state_dict()
        for k, v in self.state.items():
            own[k].copy_(v.to(own[k].dtype))
        return model

    def state_dict(self) -> dict:
        return {"n": self.n, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.n, self.state = int(d["n"]), d["state"]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on every parameter; the fused kernel where torch has it (on CPU ~15x faster than
    the loop over tensors, which costs seconds per step for ViT-Base)."""
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
    try:
        return torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(model.parameters(), **kw)


# ------------------------------------------------------------------ processes

@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    local_world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def setup_distributed(device: str) -> Dist:
    """This process's place in a torchrun job (WORLD_SIZE/RANK/LOCAL_RANK), or a job of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if world > 1 else (dev.index or 0))
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             timeout=timedelta(minutes=30))
    return Dist(rank, world, local_world, dev)


def launch(nproc: int, args: list[str]) -> int:
    """Run `python -m maest_cli train ARGS` in nproc local processes through torchrun."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "maest_cli", "train", *args]
    return subprocess.call(cmd)


def in_launched_worker() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


@torch.no_grad()
def params_in_sync(model: nn.Module, d: Dist) -> bool:
    """True when every process holds bit-identical weights (elementwise max == min)."""
    if d.world == 1:
        return True
    vec = torch.nn.utils.parameters_to_vector(model.parameters()).detach().float()
    hi, lo = vec.clone(), vec.clone()
    torch.distributed.all_reduce(hi, op=torch.distributed.ReduceOp.MAX)
    torch.distributed.all_reduce(lo, op=torch.distributed.ReduceOp.MIN)
    return bool(torch.equal(hi, lo))


def _gather(obj, d: Dist) -> list:
    if d.world == 1:
        return [obj]
    out = [None] * d.world
    torch.distributed.all_gather_object(out, obj)
    return out


def _mean_over_ranks(x: float, d: Dist) -> float:
    if d.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    torch.distributed.all_reduce(t)
    return float(t.item()) / d.world


# ------------------------------------------------------------------ validation

def tagging_scores(y: np.ndarray, p: np.ndarray, labels: list[str]) -> dict:
    """Macro ROC-AUC and mAP (scikit-learn) over the classes with positives and negatives in
    the split; the others are skipped and named."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    pos = y.sum(0)
    ok = (pos > 0) & (pos < len(y))
    skipped = [labels[i] for i in np.flatnonzero(~ok)]
    reason = ("the model's outputs are not finite" if not np.isfinite(p).all() else
              f"no class has both positive and negative tracks among the {len(y)} validation tracks"
              if not ok.any() else None)
    if reason:
        return {"roc_auc": None, "map": None, "classes": int(ok.sum()), "skipped_classes": len(skipped),
                "skipped": skipped[:20], "reason": reason}
    return {"roc_auc": float(roc_auc_score(y[:, ok], p[:, ok], average="macro")),
            "map": float(average_precision_score(y[:, ok], p[:, ok], average="macro")),
            "classes": int(ok.sum()), "skipped_classes": len(skipped), "skipped": skipped[:20]}


@torch.no_grad()
def predict(model: MAEST, data: MelDataset, rows: np.ndarray, norm: InputNorm, segments: int,
            batch_size: int, device: torch.device, dtype: str) -> np.ndarray:
    """[len(rows), C] sigmoid outputs, no patchout; with several segments per track, their mean."""
    was_training = model.training
    model.eval()
    frames = model.cfg.frames
    probs = np.zeros((len(rows), model.cfg.n_classes), np.float64)
    counts = np.zeros(len(rows), np.int64)
    buf, owner = [], []

    def flush() -> None:
        x = torch.from_numpy(norm.apply(np.concatenate(buf))).to(device)
        with autocast(device, dtype):
            logits = model(x, logits=True).logits
        p = torch.sigmoid(logits.float()).cpu().numpy()
        np.add.at(probs, owner, p)
        np.add.at(counts, owner, 1)
        buf.clear()
        owner.clear()

    for i, r in enumerate(rows):
        crops = eval_crops(data, int(r), frames, segments)
        buf.append(crops)
        owner.extend([i] * len(crops))
        if len(owner) >= batch_size:
            flush()
    if buf:
        flush()
    model.train(was_training)
    return (probs / np.maximum(counts, 1)[:, None]).astype(np.float32)


def evaluate(model: MAEST, data: MelDataset, rows: np.ndarray, norm: InputNorm, cfg: TrainConfig,
             d: Dist, dtype: str) -> dict | None:
    """Validation scores of `model`, every process scoring its share of the tracks."""
    if len(rows) == 0:
        return None
    mine = np.arange(d.rank, len(rows), d.world)
    p = predict(model, data, rows[mine], norm, cfg.val_segments, cfg.val_batch_size, d.device, dtype)
    parts = _gather((mine, p), d)
    scores = None
    if d.main:
        probs = np.zeros((len(rows), model.cfg.n_classes), np.float32)
        for idx, part in parts:
            probs[idx] = part
        scores = tagging_scores(data.targets(rows), probs, data.labels)
    return _gather(scores, d)[0] if d.world > 1 else scores


# ------------------------------------------------------------------ state

def rng_state() -> dict:
    """This process's global RNG states as tensors and plain types (weights_only loadable)."""
    np_state = np.random.get_state()
    py = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
           "python": {"version": py[0], "state": list(py[1]), "gauss": py[2]}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    n = s["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate((s["python"]["version"], tuple(s["python"]["state"]), s["python"]["gauss"]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_state(path: Path, state: dict) -> None:
    """torch.save, written atomically (temporary file, fsync, rename): a kill never leaves a
    half-written state."""
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(path, buf.getbuffer())


_TEMP_OF_OURS = re.compile(r"\.(state\.pt|config\.resolved\.json|metrics\.jsonl)\.tmp\d+")  # write_atomic's names


def never_started(run_dir: Path) -> list[Path] | None:
    """The files of a run stopped before its first state.pt (its resolved config, metrics, a
    half-written temporary file), or None when run_dir holds anything else. A run directory
    with only these can be started again in place."""
    if not run_dir.is_dir() or (run_dir / STATE).exists():
        return None
    found = list(run_dir.iterdir())
    ours = [p for p in found if p.name in (RESOLVED, METRICS) or _TEMP_OF_OURS.fullmatch(p.name)]
    return ours if len(ours) == len(found) and all(p.is_file() for p in ours) else None


def recorded_processes(run_dir: str | os.PathLike) -> int:
    """How many processes the run at run_dir trained with: `--resume` without `--nproc` takes it."""
    return int(load_state(Path(run_dir), mmap=True)["world_size"])


def load_state(run_dir: Path, mmap: bool = False) -> dict:
    """The resumable state; `mmap` maps the tensors instead of reading them (to read the facts only)."""
    path = run_dir / STATE
    if not path.is_file():
        if never_started(run_dir):
            raise UsageError(f"--resume {run_dir}: the run was stopped before it saved its first {STATE}; "
                             f"start it again with the same --data, --config and --out {run_dir}")
        raise UsageError(f"--resume {run_dir}: no {STATE} there (not a maest train run, or it never saved)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise UsageError(f"{path}: unreadable training state ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UsageError(f"{path}: not a {STATE_FORMAT} file")
    return state


def trim_metrics(path: Path, global_step: int, epochs_done: int) -> None:
    """Drop the lines a killed run wrote after its last saved state (and any torn last line),
    so the resumed run's metrics.jsonl reads as one uninterrupted run."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("kind") == "step" and rec["step"] > global_step:
            continue
        if rec.get("kind") in ("epoch", "warning") and rec["epoch"] > epochs_done:
            continue
        keep.append(line)
    write_atomic(path, "".join(k + "\n" for k in keep))


class MetricsLog:
    """metrics.jsonl, appended and flushed line by line (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a") if enabled else None

    def write(self, **rec) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


# ------------------------------------------------------------------ the network

def build_network(cfg: TrainConfig, n_classes: int) -> nn.Module:
    """The network of a recipe: MAEST, or EfficientNet-B0 behind the interface the loop calls on
    MAEST (`.cfg.frames`, `.cfg.n_classes`, `forward(x, logits=True, patchout=None).logits`)."""
    if cfg.is_maest:
        return MAEST(cfg.model_config(n_classes))

    return build_tagger(n_classes)


def save_network(path: Path, model: nn.Module, labels: list[str], extra: dict) -> None:
    """Our MAEST checkpoint format, or the EfficientNet-B0 one (effnet_train), by architecture."""
    if isinstance(model, MAEST):
        save_checkpoint(path, model, labels, extra=extra)
    else:

        save_effnet_checkpoint(path, model, labels, extra=extra)


# ------------------------------------------------------------------ setup

class Tagger(nn.Module):
    """MAEST -> logits: the one tensor DDP has to follow."""

    def __init__(self, model: MAEST):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, patchout=None) -> torch.Tensor:
        return self.model(x, logits=True, patchout=patchout).logits


def check_run(data, out, config, overrides: dict, resume) -> None:
    """Everything `train` checks before it trains (options, recipe, run directory, dataset), for a
    launcher to run once before N processes start and fail alike."""
    _, data_dir, _, _ = resolve_run(data, out, config, overrides, resume, mmap=True)
    _open_dataset(data_dir)


def _open_dataset(path) -> MelDataset:
    try:
        return MelDataset(path)
    except DatasetError as e:
        raise UsageError(f"--data: {e}") from None


def choose_normalization(cfg: TrainConfig, data: MelDataset, init: InitInfo) -> InputNorm:
    """auto: the source model's own input scaling when fine-tuning a MAEST, else the dataset's."""
    mode = cfg.normalization
    if mode == "auto":
        mode = "init" if init.kind == "maest" and init.input_norm else "dataset"
    if mode == "init":  # the scaling the source model learned with (official, or its own run's dataset)
        n = InputNorm.from_metadata({"input_norm": init.input_norm})
        return n if n.source == "official" else InputNorm(n.mean, n.std, "init model")
    if mode == "official":
        return OFFICIAL_NORM
    mean, std = data.stats.get("mean"), data.stats.get("std")
    if mean is None or not std:
        raise UsageError(f"{data.root}/stats.json has no training mean/std (empty train split?); "
                         f"set normalization = \"official\"")
    return InputNorm(float(mean), float(std), "dataset")


def resolve_run(data, out, config, overrides: dict, resume,
                mmap: bool = False) -> tuple[TrainConfig, Path, Path, dict | None]:
    """(config, dataset dir, run dir, saved state or None) from the command line; `mmap`: map the
    state's tensors instead of reading them (for callers that only check)."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if resume is not None:
        run_dir = Path(resume)
        state = load_state(run_dir, mmap=mmap)
        cfg = TrainConfig.from_dict(state["config"], f"{run_dir / STATE}")
        changed = {k: v for k, v in overrides.items() if getattr(cfg, k) != v}
        refused = sorted(set(changed) - set(RESUMABLE_CHANGES))
        if refused:
            raise UsageError(f"--resume: cannot change {', '.join(refused)} of a run in progress "
                             f"(only {', '.join(RESUMABLE_CHANGES)}); start a new --out instead")
        if out is not None and Path(out).resolve() != run_dir.resolve():
            raise UsageError(f"--resume {run_dir} writes into {run_dir}; drop --out or give the same directory")
        if config is not None:
            raise UsageError("--resume uses the run's own recipe; drop --config (use --epochs to extend it)")
        cfg = cfg.replace("command line", **changed)
        return cfg, Path(data or state["dataset"]["path"]), run_dir, state
    if data is None or out is None:
        raise UsageError("--data DATASET_DIR and --out RUN_DIR are required (or --resume RUN_DIR)")
    cfg = load_train_config(config or "maest-30s", overrides)
    run_dir = Path(out)
    if (run_dir / STATE).exists():
        raise UsageError(f"--out {run_dir}: holds a training run; continue it with --resume {run_dir}, "
                         f"or choose a new directory")
    if run_dir.exists() and (not run_dir.is_dir() or (any(run_dir.iterdir()) and never_started(run_dir) is None)):
        raise UsageError(f"--out {run_dir}: exists and is not an empty directory")
    return cfg, Path(data), run_dir, None


def _dataset_info(data: MelDataset) -> dict:
    m = data.manifest
    return {"path": str(data.root.resolve()), "tracks": len(data), "labels": len(data.labels),
            "created": m.get("created"), "plan_sha256": m.get("plan_sha256"), "crop": m.get("crop")}


def _log(d: Dist, msg: str) -> None:
    if d.main:
        print(msg, file=sys.stderr, flush=True)


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=Console(stderr=True), disable=not enabled)


# ------------------------------------------------------------------ the run

def train(data: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
          config: str | os.PathLike | None = None, overrides: dict | None = None,
          resume: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Train (or resume) a run; returns a summary (run dir, epochs, best/last/SWA scores).

    `config`: a recipe name in configs/train (tiny, maest-30s, ...) or a TOML file; `overrides`:
    TrainConfig fields (e.g. {"epochs": 3, "batch_size": 8}) taking precedence over it.
    Call it once per process; under torchrun every process calls it with the same arguments.
    """
    cfg, data_dir, run_dir, state = resolve_run(data, out, config, overrides or {}, resume)
    d = setup_distributed(cfg.device)
    threads = torch.get_num_threads()
    try:
        return {**_train(cfg, data_dir, run_dir, state, d, progress), "rank": d.rank}
    except DatasetError as e:  # a damaged shard met while training: the saved state is still good
        raise DatasetError(f"{e}; the run stopped; once the dataset is repaired, `maest train --resume "
                           f"{run_dir}` continues from its last saved state") from None
    finally:
        torch.set_num_threads(threads)
        if d.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, data_dir: Path, run_dir: Path, state: dict | None, d: Dist, progress: bool) -> dict:
    # ---- threads, data, sampler weights
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif d.device.type == "cpu" and d.local_world > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // d.local_world))
    data = _open_dataset(data_dir)
    labels = list(data.labels)
    if state is not None:
        was = state["dataset"]
        if was["labels"] != labels or (was.get("plan_sha256"), was.get("tracks")) != (
                data.manifest.get("plan_sha256"), len(data)):
            raise UsageError(f"--data {data_dir}: not the dataset of the run being resumed ({was['path']}); "
                             f"its tracks or labels differ")
    train_rows, val_rows = data.split_rows("train"), data.split_rows("validation")
    weights = track_weights(data.targets(train_rows),
                            class_weights(data.label_counts("train"), cfg.class_weight_scale, cfg.class_weight_offset))
    drawable = int((weights > 0).sum())
    if drawable == 0:
        raise UsageError(f"--data {data_dir}: no labelled tracks in the train split")
    epoch_len = min(cfg.epoch_len, drawable)
    layout = BatchLayout(cfg.batch_size, d.world, cfg.accum_steps, epoch_len)
    if layout.steps == 0:
        raise UsageError(f"global batch {layout.global_batch} (batch_size x processes x accum_steps) is larger "
                         f"than an epoch of {epoch_len} tracks")
    if state is not None and state["world_size"] != d.world:
        raise UsageError(f"--resume: the run used {state['world_size']} processes; resume it with as many "
                         f"(now {d.world})")

    # ---- model, init, normalisation, precision
    torch.manual_seed(cfg.seed)
    model = build_network(cfg, len(labels))
    mcfg = model.cfg
    if state is None:
        init = init_model(model, cfg.init, labels) if cfg.is_maest else InitInfo("random")
    else:
        init = InitInfo(**state["init"])
        model.load_state_dict(state["model"])
    norm = choose_normalization(cfg, data, init) if state is None else InputNorm(**{
        k: state["normalization"][k] for k in ("mean", "std", "source")})
    precision = choose_dtype(cfg.dtype, d.device)
    dtype = precision.dtype
    if precision.note:
        _log(d, f"train: {precision.note}")
    model.to(d.device).train()
    net = Tagger(model)
    if d.world > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    opt = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    swa = SwaAverage()
    best = {"metric": cfg.best_metric, "value": None, "epoch": None}
    epoch, step_in_epoch, global_step = 0, 0, 0
    # Loss sums of the epoch and of the current logging window: in the state, so that a run
    # resumed mid-epoch logs the same averages as an uninterrupted one.
    sums = {"epoch_loss": 0.0, "epoch_steps": 0, "window_loss": 0.0, "window_steps": 0}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        swa.load_state_dict(state["swa"])
        best = dict(state["best"])
        epoch, step_in_epoch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
        sums.update(state["loss_sums"])
        set_rng_state(state["rng"][d.rank])

    # ---- run directory (every process has checked it above; only rank 0 writes). state.pt is
    # written first, so a directory without one holds at most a run that never started.
    dataset_info = _dataset_info(data)
    resolved = {"config": cfg.to_sections(), "model": mcfg.to_dict(), "device": str(d.device), "dtype": dtype,
                "processes": d.world, "global_batch": layout.global_batch, "epoch_len": epoch_len,
                "epoch_len_requested": cfg.epoch_len, "steps_per_epoch": layout.steps,
                "patchout": {"drop_time": cfg.drop_time(mcfg.t_patches), "drop_freq": cfg.patchout_freq,
                             "grid": [mcfg.f_patches, mcfg.t_patches]} if cfg.is_maest else None,
                "validation": {"tracks": len(val_rows), "crops": "centre" if cfg.val_segments == 1
                               else f"{cfg.val_segments} evenly spaced segments, sigmoid outputs averaged",
                               "best_by": cfg.best_metric},
                "normalization": norm.to_dict(), "init": init.to_dict(), "dataset": dataset_info,
                "versions": tool_versions()}
    warned: set[str] = set(state.get("warned", ())) if state is not None else set()

    def snapshot(at_epoch: int, at_step: int, finished: bool = False) -> None:
        """The resumable state: gathered from every process (RNG), written by rank 0."""
        rngs = _gather(rng_state(), d)
        if not d.main:
            return
        save_state(run_dir / STATE, {
            "format": STATE_FORMAT, "config": cfg.to_dict(), "world_size": d.world,
            "dataset": {"path": str(data.root.resolve()), "labels": labels, "tracks": len(data),
                        "plan_sha256": data.manifest.get("plan_sha256")},
            "epoch": at_epoch, "step_in_epoch": at_step, "global_step": global_step, "finished": finished,
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "swa": swa.state_dict(),
            "best": best, "loss_sums": dict(sums), "rng": rngs, "init": init.to_dict(),
            "normalization": norm.to_dict(), "dtype": dtype, "warned": sorted(warned)})

    def save_weights(kind: str, m: MAEST, ep: int, val: dict | None) -> None:
        save_network(run_dir / f"{kind}.safetensors", m, labels, extra={
            "name": f"{run_dir.name}-{kind}", "kind": kind, "epoch": ep, "global_step": global_step,
            "dataset": dataset_info, "train_config": cfg.to_dict(), "input_norm": norm.to_dict(),
            "init": init.to_dict(), "validation": val, "swa_snapshots": swa.n if kind == "swa" else None,
            "versions": tool_versions(),
            **({"default_block": cfg.default_block or default_block({}, mcfg.depth)} if cfg.is_maest else {})})

    d.barrier()
    if d.main:
        if state is None:  # the leftovers of a run stopped before its first state (resolve_run checked)
            for leftover in never_started(run_dir) or ():
                leftover.unlink()
        run_dir.mkdir(parents=True, exist_ok=True)
    if state is None:
        snapshot(0, 0)
    if d.main:
        write_json(run_dir / RESOLVED, resolved)
        if state is not None:
            trim_metrics(run_dir / METRICS, global_step, epoch)
    metrics = MetricsLog(run_dir / METRICS, d.main)
    if state is not None:
        metrics.write(kind="resume", step=global_step, epoch=epoch, time=time.time())
        _log(d, f"train: resuming {run_dir} at epoch {epoch + 1}, step {global_step}")
    if epoch_len < cfg.epoch_len:
        _log(d, f"train: epoch_len {cfg.epoch_len} > {drawable} drawable tracks; epochs of {epoch_len}")
    what = f"MAEST {mcfg.width}x{mcfg.depth}" if cfg.is_maest else "EfficientNet-B0"
    _log(d, f"train: {what}, {mcfg.frames} frames, {len(labels)} labels; "
            f"{d.world} process(es) on {d.device}, {dtype}; global batch {layout.global_batch}, "
            f"{layout.steps} steps/epoch; init {init.kind}; input norm from {norm.source}")

    drop_t, drop_f = (cfg.drop_time(mcfg.t_patches), cfg.patchout_freq) if cfg.is_maest else (0, 0)
    augment = Augment(cfg.mixup_alpha, cfg.specaug_time_masks, cfg.specaug_time_width, cfg.specaug_freq_masks,
                      cfg.specaug_freq_width)
    scratch: nn.Module | None = None  # holds the SWA weights for validation and saving
    last_val = swa_val = None

    if state is not None and state.get("finished") and epoch >= cfg.epochs:
        _log(d, f"train: {run_dir} is complete ({epoch} epochs); nothing to do (--epochs N extends it)")
        metrics.close()
        return {"run_dir": str(run_dir), "epochs": epoch, "global_step": global_step, "best": best,
                "already_complete": True}

    bar = _progress(progress and d.main)
    task = bar.add_task("train", total=cfg.epochs * layout.steps, completed=epoch * layout.steps + step_in_epoch,
                        epoch=f"{epoch + 1}/{cfg.epochs}", loss="-", rate="-")
    bad_steps = 0
    with bar:
        while epoch < cfg.epochs:
            order = train_rows[draw_epoch(weights, epoch_len, cfg.seed, epoch)]
            batches = TrainBatches(data, order, layout, d.rank, epoch, cfg.seed, mcfg.frames, norm, augment)
            # workers start from a forkserver, never forked from this process: a fork copies one thread
            # of a process whose other libraries (OpenMP, OpenVINO) may hold locks in theirs
            loader = torch.utils.data.DataLoader(
                batches, batch_size=None, sampler=range(step_in_epoch * layout.accum, layout.micro_batches),
                num_workers=cfg.workers, pin_memory=d.device.type == "cuda",
                multiprocessing_context="forkserver" if cfg.workers > 0 else None)
            batch_iter = iter(loader)
            window_t, timed_steps = time.perf_counter(), 0
            bar.update(task, epoch=f"{epoch + 1}/{cfg.epochs}")
            while step_in_epoch < layout.steps:
                lr = lr_at(epoch, step_in_epoch, layout.steps, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr
                step_loss = 0.0
                for micro in range(layout.accum):
                    batch = next(batch_iter)
                    if isinstance(batch, dict):  # TrainBatches met a damaged track
                        raise DatasetError(batch["error"])
                    x, y = batch
                    x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
                    po = random_patchout(mcfg.f_patches, mcfg.t_patches, drop_t, drop_f,
                                         generator=patchout_generator(cfg.seed, global_step, micro)) \
                        if cfg.is_maest else None
                    sync = micro == layout.accum - 1 or d.world == 1
                    with (contextlib.nullcontext() if sync else net.no_sync()):
                        with autocast(d.device, dtype):
                            logits = net(x, po)
                        loss = F.binary_cross_entropy_with_logits(logits.float(), y) / layout.accum
                        (scaler.scale(loss) if scaler is not None else loss).backward()
                    step_loss += float(loss.detach())
                if scaler is not None:
                    scaler.unscale_(opt)
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                opt.zero_grad(set_to_none=True)
                global_step += 1
                step_in_epoch += 1

                if not math.isfinite(step_loss):
                    bad_steps += 1
                    if scaler is None or bad_steps >= 20:
                        raise TrainError(f"the loss became {step_loss} at step {global_step} (epoch {epoch + 1}); "
                                         f"the last good state is {run_dir / STATE} (lower lr or set grad_clip)")
                else:
                    bad_steps = 0
                sums["epoch_loss"] += step_loss
                sums["epoch_steps"] += 1
                sums["window_loss"] += step_loss
                sums["window_steps"] += 1
                timed_steps += 1
                if global_step % cfg.log_every == 0 or step_in_epoch == layout.steps:
                    rate = timed_steps * layout.global_batch / max(time.perf_counter() - window_t, 1e-9)
                    mean_loss = _mean_over_ranks(sums["window_loss"] / sums["window_steps"], d)
                    metrics.write(kind="step", epoch=epoch + 1, step=global_step, loss=mean_loss, lr=lr,
                                  samples_per_s=rate, time=time.time())
                    bar.update(task, loss=f"{mean_loss:.4f}", rate=f"{rate:.1f}")
                    window_t, timed_steps = time.perf_counter(), 0
                    sums.update(window_loss=0.0, window_steps=0)
                bar.update(task, completed=epoch * layout.steps + step_in_epoch)
                if global_step % cfg.save_every == 0 and step_in_epoch < layout.steps:
                    snapshot(epoch, step_in_epoch)
            del batch_iter, loader

            # ---- end of epoch: validate, average, save
            done = epoch + 1
            train_loss = _mean_over_ranks(sums["epoch_loss"] / sums["epoch_steps"], d) if sums["epoch_steps"] else None
            sums.update(epoch_loss=0.0, epoch_steps=0)
            last_val = evaluate(model, data, val_rows, norm, cfg, d, dtype)
            swa_updated = swa_due(done, cfg)
            if swa_updated:
                swa.update(model)
            if swa.n and (swa_updated or swa_val is None):
                if scratch is None:
                    scratch = type(model)(mcfg).to(d.device)
                swa.copy_to(scratch)
                if not cfg.is_maest:  # averaged weights need BatchNorm statistics of their own

                    recalibrate_batchnorm(scratch, bn_calibration_batches(
                        data, train_rows, mcfg.frames, norm, cfg.seed, done, SWA_BN_CROPS, cfg.val_batch_size,
                        d.device))
                swa_val = evaluate(scratch, data, val_rows, norm, cfg, d, dtype)
            in_sync = params_in_sync(model, d)
            value = last_val.get(cfg.best_metric) if last_val else None
            if value is None:  # no validation split, or no scores: best follows last until an epoch is scored
                improved = best["value"] is None
                if last_val is not None and "unscored" not in warned:
                    warned.add("unscored")
                    note = (f"epoch {done}: validation gave no {cfg.best_metric} ({last_val.get('reason')}); "
                            f"best.safetensors follows last.safetensors until an epoch is scored")
                    metrics.write(kind="warning", epoch=done, step=global_step, message=note, time=time.time())
                    _log(d, f"train: WARNING: {note}")
            else:
                improved = best["value"] is None or value > best["value"]
            if improved:
                best = {"metric": cfg.best_metric, "value": value, "epoch": done}
            if d.main:
                save_weights("last", model, done, last_val)
                if improved:
                    save_weights("best", model, done, last_val)
                if swa_updated:
                    save_weights("swa", scratch, done, swa_val)
            rec = {"kind": "epoch", "epoch": done, "step": global_step, "train_loss": train_loss,
                   "lr": lr_at(epoch, layout.steps - 1, layout.steps, cfg), "val": last_val, "swa": swa_val if swa.n else None,
                   "swa_snapshots": swa.n, "best_epoch": best["epoch"], "time": time.time()}
            if d.world > 1:
                rec["ranks_in_sync"] = in_sync
            metrics.write(**rec)
            _log(d, _epoch_line(done, cfg.epochs, train_loss, last_val, swa_val if swa.n else None, improved))
            if not in_sync:
                _log(d, "train: WARNING: the processes' weights differ (nondeterministic kernels?)")
            epoch, step_in_epoch = done, 0
            snapshot(epoch, 0, finished=epoch >= cfg.epochs)
            d.barrier()
    metrics.close()
    return {"run_dir": str(run_dir), "epochs": epoch, "global_step": global_step, "best": best,
            "last": last_val, "swa": swa_val, "checkpoints": {k: str(run_dir / f"{k}.safetensors")
                                                             for k in CHECKPOINTS
                                                             if (run_dir / f"{k}.safetensors").exists()}}


def _epoch_line(done: int, total: int, loss: float | None, val: dict | None, swa: dict | None, improved: bool) -> str:
    def scores(v: dict | None) -> str:
        if not v or v.get("map") is None:
            return "n/a"
        return f"mAP {v['map']:.4f} ROC-AUC {v['roc_auc']:.4f}"

    parts = [f"train: epoch {done}/{total}", f"loss {loss:.4f}" if loss is not None else "loss n/a",
             f"val {scores(val)}{' (best)' if improved and val else ''}"]
    if swa:
        parts.append(f"swa {scores(swa)}")
    return ", ".join(parts)


def worker_argv(command_line: list[str]) -> list[str]:
    """The arguments of the processes `--nproc N` launches: this process's own `train` arguments
    exactly as given (any order, `--opt value` or `--opt=value`, options added in the future),
    minus `--nproc N` / `--nproc=N`. command_line: sys.argv (program, ..., "train", args)."""
    try:
        args = command_line[command_line.index("train", 1) + 1:]
    except ValueError:
        raise ValueError(f"not a `maest train` command line: {command_line!r}") from None
    out: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":  # the rest is positional
            out += args[i:]
            break
        if a == "--nproc":
            i += 2
            continue
        if not a.startswith("--nproc="):
            out.append(a)
        i += 1
    return out


__all__ = ["train", "launch", "in_launched_worker", "worker_argv", "lr_factor", "lr_at", "swa_due",
           "SwaAverage", "tagging_scores", "predict", "evaluate", "TrainError", "load_state", "never_started",
           "STATE", "METRICS", "RESOLVED"]
