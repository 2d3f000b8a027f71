"""The training recipe as data: configs/train/NAME.toml, validated once into a TrainConfig.

A recipe file groups its keys in tables ([model], [data], [optim], [schedule], [augment],
[swa], [run]) for reading; the keys are unique, so they land in one flat dataclass.
Command-line flags (`--epochs`, `--set lr=1e-4`, ...) override the file. Unknown keys, wrong
types and impossible values are refused with the file and the key named, before any work.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from maest_cli.io.config import ConfigError, config_dir, read_toml
from maest_cli.models.effnet import PATCH_FRAMES
from maest_cli.models.maest import VARIANTS, MaestConfig, tiny_config

# Paper (section 3.2 and 4.3): time columns dropped per segment length; 3 frequency rows always.
PAPER_PATCHOUT_TIME = {"5s": 15, "10s": 30, "20s": 60, "30s": 90}
SECTIONS = {
    "model": ("architecture", "variant", "frames", "width", "depth", "heads", "mlp_dim", "pos_embed", "init",
              "normalization", "default_block"),
    "data": ("epoch_len", "batch_size", "accum_steps", "workers", "class_weight_scale", "class_weight_offset"),
    "optim": ("lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "grad_clip"),
    "schedule": ("epochs", "warmup_epochs", "decay_start_epoch", "decay_epochs", "final_lr_factor", "lr_update"),
    "augment": ("patchout_time", "patchout_freq", "mixup_alpha", "specaug_time_masks", "specaug_time_width",
                "specaug_freq_masks", "specaug_freq_width"),
    "swa": ("swa_start", "swa_every"),
    "run": ("seed", "device", "dtype", "threads", "log_every", "save_every", "val_batch_size", "val_segments",
            "best_metric"),
}
ARCHITECTURES = ("maest", "effnet-b0")
# What `--resume` may change: everything else must match the run it continues.
RESUMABLE_CHANGES = ("epochs", "device", "workers", "threads", "log_every", "save_every", "val_batch_size")


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of a training run. Defaults are the paper's MAEST-30s recipe (REFERENCE 6)."""

    # [model] architecture: maest, or effnet-b0 (the paper's CNN baseline: 128-frame crops, no
    # patchout, random init; the MAEST shape keys below do not apply to it).
    architecture: str = "maest"
    # variant: 5s/10s/20s/30s (ViT-Base) or tiny; the other shape fields override it.
    variant: str = "30s"
    frames: int | None = None  # segment length in frames = the training crop (None: the variant's)
    width: int | None = None
    depth: int | None = None
    heads: int | None = None
    mlp_dim: int | None = None
    pos_embed: str = "separable"
    init: str = "random"  # random, a weights file (MAEST/PaSST/DeiT), or a cached registry name
    normalization: str = "auto"  # auto (official constants for an official init, else dataset), dataset, official
    default_block: int | None = None  # the block extract embeds by default; None: min(7, depth)
    # [data]
    epoch_len: int = 200_000  # tracks drawn (without replacement) per epoch
    batch_size: int = 12  # per process; global batch = batch_size x processes x accum_steps
    accum_steps: int = 1
    workers: int = 2  # DataLoader processes per training process (0: load in the main process)
    class_weight_scale: float = 1000.0  # class weight = scale / (count + offset)
    class_weight_offset: float = 100.0
    # [optim] AdamW
    lr: float = 2e-5
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 0.0  # max gradient norm; 0: off
    # [schedule] PaSST/MAEST's exp_warmup_linear_down: exponential warm-up, flat, linear decay
    # to final_lr_factor x lr; a factor per epoch, as the authors' LambdaLR stepped every epoch
    epochs: int = 130
    warmup_epochs: float = 5.0
    decay_start_epoch: float = 50.0
    decay_epochs: float = 50.0
    final_lr_factor: float = 0.01
    lr_update: str = "epoch"  # epoch (the authors'), or step: the same curve at the fractional epoch
    # [augment]
    patchout_time: int | None = None  # time columns dropped per batch (None: paper's for the variant)
    patchout_freq: int = 3
    mixup_alpha: float = 0.3  # 0: off
    # SpecAugment as the authors' code: this many masks per example, each 0 to width - 1 frames
    # (bands) wide, uniformly (torchaudio's mask_param); the paper's text: "up to 20 x 8 frames,
    # up to 5 x 8 bands". See train_data.spec_augment.
    specaug_time_masks: int = 20
    specaug_time_width: int = 8
    specaug_freq_masks: int = 8
    specaug_freq_width: int = 5
    # [swa] running mean of the weights at the end of epochs swa_start, swa_start + swa_every, ...
    swa_start: int = 50  # 0: no SWA
    swa_every: int = 5
    # [run]
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16/fp16 on GPU, bf16 on CPUs with native bf16, else fp32
    threads: int | None = None  # torch threads per process (None: cores / local processes)
    log_every: int = 50  # steps between metrics.jsonl lines
    save_every: int = 1000  # steps between resumable state saves (and at every epoch end)
    val_batch_size: int = 24
    val_segments: int = 1  # 1: the centre crop of each validation track; k: k evenly spaced crops
    best_metric: str = "map"  # map or roc_auc, of the validation split

    # ------------------------------------------------------------------ derived

    def model_config(self, n_classes: int) -> MaestConfig:
        """The MAEST shape this recipe trains, for a dataset with n_classes labels."""
        base = tiny_config(n_classes=n_classes) if self.variant == "tiny" else VARIANTS[self.variant]
        shape = {k: getattr(self, k) for k in ("frames", "width", "depth", "heads", "mlp_dim")
                 if getattr(self, k) is not None}
        return dataclasses.replace(base, n_classes=n_classes, pos_embed=self.pos_embed, **shape)

    @property
    def is_maest(self) -> bool:
        return self.architecture == "maest"

    def crop_frames(self) -> int:
        """The training crop in mel frames: the MAEST segment, or EfficientNet-B0's 128-frame patch."""
        if self.is_maest:
            return self.model_config(n_classes=1).frames

        return PATCH_FRAMES

    def drop_time(self, t_patches: int) -> int:
        """Time columns that training patchout drops from a grid of t_patches columns."""
        if self.patchout_time is not None:
            return self.patchout_time
        if self.variant in PAPER_PATCHOUT_TIME and self.frames is None:
            return PAPER_PATCHOUT_TIME[self.variant]
        return round(t_patches * 90 / 187)  # the paper's share, for other segment lengths

    def to_dict(self) -> dict:
        return asdict(self)

    def to_sections(self) -> dict:
        """The recipe grouped as a TOML file groups it (for config.resolved.json)."""
        d = self.to_dict()
        return {section: {k: d[k] for k in keys} for section, keys in SECTIONS.items()}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> TrainConfig:
        return _validate(cls, dict(d), where)

    def replace(self, where: str = "command line", **changes) -> TrainConfig:
        return _validate(TrainConfig, {**self.to_dict(), **changes}, where)


_FIELDS = {f.name: f for f in fields(TrainConfig)}
_SECTION_OF = {k: s for s, keys in SECTIONS.items() for k in keys}
assert set(_SECTION_OF) == set(_FIELDS), "every TrainConfig field belongs to one section"


def _type_of(name: str) -> tuple[type, bool]:
    """(base type, optional) of a field, from its annotation string."""
    ann = str(_FIELDS[name].type).replace(" ", "")
    optional = ann.endswith("|None")
    base = {"int": int, "float": float, "str": str}[ann.removesuffix("|None")]
    return base, optional


def _coerce(name: str, value, where: str):
    base, optional = _type_of(name)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: {name} must be set")
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, base):
        raise ConfigError(f"{where}: {name} = {value!r}: expected {'an' if base is int else 'a'} "
                          f"{base.__name__}{' or nothing' if optional else ''}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"{where}: {name} = {value!r}: expected a finite number")
    return value


def _validate(cls, d: dict, where: str) -> TrainConfig:
    unknown = sorted(set(d) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    values = {k: _coerce(k, v, where) for k, v in d.items()}
    cfg = cls(**values)

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}: {key} = {getattr(cfg, key)!r}: {why}")

    if cfg.architecture not in ARCHITECTURES:
        raise bad("architecture", f"expected one of {', '.join(ARCHITECTURES)}")
    if cfg.variant not in (*VARIANTS, "tiny"):
        raise bad("variant", f"expected one of {', '.join([*VARIANTS, 'tiny'])}")
    if cfg.pos_embed not in ("separable", "grid"):
        raise bad("pos_embed", "expected separable or grid")
    if cfg.normalization not in ("auto", "dataset", "official"):
        raise bad("normalization", "expected auto, dataset or official")
    if cfg.lr_update not in ("epoch", "step"):
        raise bad("lr_update", "expected epoch or step")
    if cfg.best_metric not in ("map", "roc_auc"):
        raise bad("best_metric", "expected map or roc_auc")
    if cfg.dtype not in ("auto", "fp32", "bf16", "fp16"):
        raise bad("dtype", "expected auto, fp32, bf16 or fp16")
    positive = ("epoch_len", "batch_size", "accum_steps", "epochs", "log_every", "save_every", "val_batch_size",
                "val_segments", "swa_every", "lr", "class_weight_scale")
    for key in positive:
        if getattr(cfg, key) <= 0:
            raise bad(key, "must be positive")
    for key in ("frames", "width", "depth", "heads", "mlp_dim", "threads", "default_block"):
        if getattr(cfg, key) is not None and getattr(cfg, key) <= 0:
            raise bad(key, "must be positive")
    if cfg.default_block is not None and cfg.is_maest and cfg.default_block > cfg.model_config(1).depth:
        raise bad("default_block", f"the model has blocks 1..{cfg.model_config(1).depth}")
    non_negative = ("workers", "weight_decay", "grad_clip", "warmup_epochs", "decay_start_epoch", "decay_epochs",
                    "patchout_freq", "mixup_alpha", "specaug_time_masks", "specaug_time_width",
                    "specaug_freq_masks", "specaug_freq_width", "swa_start", "seed", "class_weight_offset",
                    "adam_eps")
    for key in non_negative:
        if getattr(cfg, key) < 0:
            raise bad(key, "must not be negative")
    if cfg.patchout_time is not None and cfg.patchout_time < 0:
        raise bad("patchout_time", "must not be negative")
    if cfg.specaug_freq_width > 96:
        raise bad("specaug_freq_width", "there are 96 mel bands")
    if not 0 < cfg.final_lr_factor <= 1:
        raise bad("final_lr_factor", "expected a factor in (0, 1]")
    for key in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise bad(key, "expected a value in [0, 1)")
    if not cfg.is_maest:
        return _validate_effnet(cfg, where)
    try:
        mcfg = cfg.model_config(n_classes=1)
    except ValueError as e:
        raise ConfigError(f"{where}: [model] does not describe a valid MAEST: {e}") from None
    if cfg.patchout_freq >= mcfg.f_patches:
        raise bad("patchout_freq", f"the model has only {mcfg.f_patches} frequency rows; keep at least one")
    if cfg.drop_time(mcfg.t_patches) >= mcfg.t_patches:
        raise ConfigError(f"{where}: patchout_time = {cfg.drop_time(mcfg.t_patches)}: the model has only "
                          f"{mcfg.t_patches} time columns; keep at least one")
    return cfg


def _validate_effnet(cfg: TrainConfig, where: str) -> TrainConfig:
    """EfficientNet-B0 has one shape and input (Discogs-EffNet's 128 x 96 patches) and trains from
    random weights here: MAEST's shape keys and a weights file to start from are refused, not
    ignored. The variant, pos_embed and patchout keys are MAEST's and have no effect."""

    shaped = [k for k in ("width", "depth", "heads", "mlp_dim") if getattr(cfg, k) is not None]
    if shaped:
        raise ConfigError(f"{where}: {', '.join(shaped)}: MAEST shape keys; architecture effnet-b0 has a fixed shape")
    if cfg.frames is not None and cfg.frames != PATCH_FRAMES:
        raise ConfigError(f"{where}: frames = {cfg.frames}: architecture effnet-b0 trains on {PATCH_FRAMES}-frame "
                          f"crops (Discogs-EffNet's patches); leave frames unset")
    if cfg.init != "random":
        raise ConfigError(f"{where}: init = {cfg.init!r}: architecture effnet-b0 trains from random weights only")
    return cfg


def recipe_path(name_or_path: str | Path) -> str | Path:
    """'tiny' or 'maest-30s' -> train/NAME.toml in configs/; anything else is a path."""
    p = Path(name_or_path)
    if p.is_file() or "/" in str(name_or_path) or p.suffix == ".json":
        return p
    return f"train/{p.name if p.suffix == '.toml' else p.name + '.toml'}"


def load_train_config(name_or_path: str | Path = "maest-30s", overrides: dict | None = None) -> TrainConfig:
    """A recipe (name in configs/train or a TOML/JSON file), with overrides applied, validated."""
    where = str(name_or_path)
    path = recipe_path(name_or_path)
    if Path(path).suffix == ".json":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: unreadable JSON config ({e})") from None
        data = data.get("config", data)
    else:
        try:
            data = read_toml(path)
        except ConfigError:
            if isinstance(path, Path):
                raise

            known = sorted(f.stem for f in (config_dir() / "train").glob("*.toml"))
            raise ConfigError(f"--config {name_or_path}: no such recipe or file (recipes: {', '.join(known)})") from None
    flat: dict = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key not in SECTIONS:
                raise ConfigError(f"{where}: unknown table [{key}] (known: {', '.join(SECTIONS)})")
            for k, v in value.items():
                if k in _SECTION_OF and _SECTION_OF[k] != key:
                    raise ConfigError(f"{where}: {k} belongs in [{_SECTION_OF[k]}], not [{key}]")
                flat[k] = v
        else:
            flat[key] = value
    cfg = TrainConfig.from_dict(flat, where)
    if overrides:
        cfg = cfg.replace("command line", **{k: v for k, v in overrides.items()})
    return cfg


def parse_set(items: list[str] | None) -> dict:
    """`--set key=value` pairs, values read as TOML scalars (1e-4, 12, "cpu", true) or bare strings."""
    import tomllib

    out = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=1e-4")
        if key not in _FIELDS:
            raise ConfigError(f"--set {key}: unknown key (known: {', '.join(_FIELDS)})")
        text = text.strip()
        if text.lower() in ("none", "null", ""):
            out[key] = None
            continue
        try:
            out[key] = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            out[key] = text
        if _type_of(key)[0] is str and not isinstance(out[key], str):
            out[key] = text
    return out


__all__ = ["TrainConfig", "load_train_config", "parse_set", "recipe_path", "PAPER_PATCHOUT_TIME", "ARCHITECTURES",
           "RESUMABLE_CHANGES", "SECTIONS"]
