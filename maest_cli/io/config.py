"""The data in configs/ (model registry, presets, training recipes, label lists).

In a source checkout configs/ is the top-level folder; in a wheel it ships inside the
package as `maest_cli.configs` (pyproject maps one to the other), so both read the same way.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

from maest_cli.errors import UsageError


class ConfigError(UsageError):
    """A config file that is missing or does not validate; the message names file and field."""


def config_dir() -> Path:
    return Path(str(resources.files("maest_cli.configs")))


def read_toml(path_or_name: str | Path) -> dict:
    """A TOML file by path, or by name relative to configs/ (e.g. 'models.toml', 'train/tiny.toml')."""
    p = Path(path_or_name)
    if not p.is_file():
        p = config_dir() / path_or_name
    if not p.is_file():
        raise ConfigError(f"{path_or_name}: no such config file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML ({e})") from None


def read_labels(name: str) -> list[str]:
    """A label list: a name in configs/labels (e.g. 'discogs400') or a path, one label per line."""
    p = Path(name)
    if not p.is_file():
        p = config_dir() / "labels" / f"{name}.txt"
    if not p.is_file():
        raise ConfigError(f"{name}: no such label list")
    return [line.rstrip("\n") for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
