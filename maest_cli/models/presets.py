"""Speed/quality presets for extraction: inference patchout and precision (configs/presets.toml)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from maest_cli.io.config import ConfigError, read_toml
from maest_cli.models.maest import Patchout

# "int8": dynamic int8 quantisation of the Linear layers (CPU only; runtime.quantize_linear_int8).
PRESET_DTYPES = ("auto", "fp32", "bf16", "fp16", "int8")


@dataclass(frozen=True)
class PatchoutPreset:
    name: str
    description: str = ""
    time_keep_every: int = 1
    drop_freq_rows: tuple[int, ...] = ()
    dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.time_keep_every < 1:
            raise ConfigError(f"preset {self.name!r}: time_keep_every must be >= 1")
        if len(set(self.drop_freq_rows)) != len(self.drop_freq_rows):
            raise ConfigError(f"preset {self.name!r}: drop_freq_rows has duplicates")
        if self.dtype not in PRESET_DTYPES:
            raise ConfigError(f"preset {self.name!r}: dtype must be one of {', '.join(PRESET_DTYPES)}")

    @property
    def patchout(self) -> Patchout:
        return Patchout(time_keep_every=self.time_keep_every, drop_freq_rows=tuple(self.drop_freq_rows))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["drop_freq_rows"] = list(self.drop_freq_rows)
        return d


def load_presets(path: str | None = None) -> dict[str, PatchoutPreset]:
    data = read_toml(path or "presets.toml")
    try:
        return {name: PatchoutPreset(name=name, description=p.get("description", ""),
                                     time_keep_every=int(p.get("time_keep_every", 1)),
                                     drop_freq_rows=tuple(int(r) for r in p.get("drop_freq_rows", ())),
                                     dtype=p.get("dtype", "auto"))
                for name, p in data["presets"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'presets.toml'}: invalid presets ({e})") from None


def get_preset(name: str = "none", time_keep_every: int | None = None,
               drop_freq_rows: tuple[int, ...] | None = None, presets: dict | None = None) -> PatchoutPreset:
    """A preset by name, with the expert overrides applied (the name then records them)."""
    table = presets or load_presets()
    if name not in table:
        raise ConfigError(f"unknown patchout preset {name!r} (choose from {', '.join(table)})")
    p = table[name]
    if time_keep_every is None and drop_freq_rows is None:
        return p
    tke = p.time_keep_every if time_keep_every is None else time_keep_every
    dfr = p.drop_freq_rows if drop_freq_rows is None else tuple(drop_freq_rows)
    return PatchoutPreset(name=f"{name}+custom", description=f"{name} with time_keep_every={tke}, "
                          f"drop_freq_rows={list(dfr)}", time_keep_every=tke, drop_freq_rows=dfr, dtype=p.dtype)
