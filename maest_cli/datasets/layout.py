"""Where the datasets live and how to find them: the folder layout under the data root.

`locate` is what `maest probe` asks: it reads the manifest `maest datasets download` wrote, or
says in one line which command fetches what is missing.

    ROOT/mtt/annotations_final.csv, ROOT/mtt/audio/{0..f}/*.mp3, ROOT/mtt/manifest.json
    ROOT/mtg-jamendo/metadata/data/...     (the repository's files at the pinned commit)
    ROOT/mtg-jamendo/audio-low/NN/ID.low.mp3 (or audio/NN/ID.mp3 for --quality high)
    ROOT/mtg-jamendo/manifest.json
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from maest_cli.errors import UsageError
from maest_cli.io.config import read_toml
from maest_cli.io.download import cache_dir

DATASETS = ("mtt", "mtg-jamendo")
# the probe's task names -> the dataset that holds their files
ALIASES = {"mtg-jamendo-genre": "mtg-jamendo", "mtg-jamendo-instrument": "mtg-jamendo",
           "mtg-jamendo-moodtheme": "mtg-jamendo", "mtg-jamendo-top50": "mtg-jamendo",
           "mtg": "mtg-jamendo", "magnatagatune": "mtt"}
MANIFEST = "manifest.json"


class DatasetMissing(UsageError):
    """A dataset (or the part of it asked for) is not under the root; the message names the command to run."""


@dataclass(frozen=True)
class Coverage:
    """How much of a dataset's audio is present: `text` for people, the counts for code."""

    text: str
    present: int  # parts present and verified (MTT: annotated clips with audio; MTG-Jamendo: tars)
    total: int
    parts: tuple[str, ...] = ()  # which parts ("00", "01", ... for MTG-Jamendo tars)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class Located:
    name: str  # "mtt" or "mtg-jamendo"
    root: Path  # the dataset's folder (ROOT/mtt, ROOT/mtg-jamendo)
    annotations_root: Path  # what maest_cli.probing.data.load_annotations takes as dataset_root
    audio_root: Path  # the folder the annotation paths are relative to
    manifest: dict = field(repr=False)
    complete: bool
    coverage: Coverage


def default_root() -> Path:
    """$MAEST_DATA, else the datasets folder of the user cache."""
    env = os.environ.get("MAEST_DATA")
    return Path(env).expanduser() if env else cache_dir() / "datasets"


def canonical_name(name: str) -> str:
    """'mtt', 'mtg-jamendo', or a probe task name mapped to its dataset; anything else is a usage error."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key not in DATASETS:
        raise UsageError(f"{name}: unknown dataset (known: {', '.join(DATASETS)}; the probe tasks "
                         f"{', '.join(a for a in ALIASES if a.startswith('mtg-jamendo-'))} use mtg-jamendo)")
    return key


def dataset_dir(name: str, root: str | Path | None = None) -> Path:
    """ROOT/NAME: the folder of one dataset."""
    return (Path(root).expanduser() if root is not None else default_root()) / canonical_name(name)


def download_command(name: str, root: str | Path | None = None) -> str:
    """The command line that fetches `name` into `root` (with --root only when it is not the default)."""
    cmd = f"maest datasets download {canonical_name(name)}"
    if root is not None and Path(root).expanduser().resolve() != default_root().resolve():
        cmd += f" --root {shlex.quote(str(root))}"  # copy-pastable: a path with spaces stays one argument
    return cmd


def audio_folder(quality: str) -> str:
    """MTG-Jamendo's folder for a quality ('low' -> 'audio-low'): the data type's name upstream, kept as is."""
    qualities = read_toml("datasets.toml")["mtg-jamendo"]["quality"]
    if quality not in qualities:
        raise UsageError(f"--quality {quality}: expected one of {', '.join(qualities)}")
    return qualities[quality]["type"]


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a dataset folder; None when absent or unreadable (a download that never finished)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def tar_numbers_text(parts: list[str] | tuple[str, ...]) -> str:
    """'00'..'09', '12' -> '0-9,12' (the --tars syntax)."""
    nums = sorted(int(p) for p in parts)
    runs: list[str] = []
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        runs.append(str(nums[i]) if i == j else f"{nums[i]}-{nums[j]}")
        i = j + 1
    return ",".join(runs)


def mtt_clip_paths(annotations: Path) -> list[str]:
    """The mp3_path column (the last) of MagnaTagATune's annotations_final.csv: one clip a line."""
    lines = annotations.read_text(encoding="utf-8", errors="replace").splitlines()[1:]
    return [line.rsplit("\t", 1)[-1].strip().strip('"') for line in lines if line.strip()]


def locate(name: str, root: str | Path | None = None) -> Located:
    """The downloaded dataset `name` under `root` (default: default_root()), or DatasetMissing naming the fix."""
    key = canonical_name(name)
    folder = dataset_dir(key, root)
    base = folder.parent
    fix = download_command(key, root)
    manifest = read_manifest(folder)
    if manifest is None:
        raise DatasetMissing(f"{key}: not found under {base}; run `{fix}`")
    if key == "mtt":
        audio = folder / "audio"
        ann = folder / "annotations_final.csv"
        unpacked = bool(manifest.get("audio", {}).get("unpacked"))
        if not ann.is_file() or not unpacked or not audio.is_dir():
            raise DatasetMissing(f"mtt: the download under {folder} is incomplete; run `{fix}`")
        paths = mtt_clip_paths(ann)
        found = sum((audio / p).is_file() for p in paths)  # MTT's three empty mp3s are files: they count
        complete = found == len(paths)
        text = (f"all {len(paths)} annotated clips of mp3.zip.001-003" if complete else
                f"{found} of the {len(paths)} annotated clips of mp3.zip.001-003 on disk")
        return Located(key, folder, folder, audio, manifest, complete, Coverage(text, found, len(paths), ("mp3.zip",)))
    quality = manifest.get("quality", "low")
    audio = folder / audio_folder(quality)
    meta = folder / "metadata"
    tars = manifest.get("tars", {})
    present = tuple(sorted(k for k, v in tars.items() if v.get("unpacked")))
    total = int(manifest.get("tars_total", 100))
    if not (meta / "data").is_dir():
        raise DatasetMissing(f"mtg-jamendo: the metadata under {folder} is missing; run `{fix}`")
    if not present or not audio.is_dir():
        raise DatasetMissing(f"mtg-jamendo: no audio tars under {folder}; run `{fix}` (e.g. with --tars 0-9)")
    all_text = f"0-{total - 1}"
    text = f"tars {tar_numbers_text(present)} of {all_text} ({len(present)}/{total}, {quality} quality)"
    cov = Coverage(text, len(present), total, present)
    return Located(key, folder, meta, audio, manifest, len(present) == total, cov)
