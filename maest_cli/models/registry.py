"""The official models: where their weights come from, where they are cached, how they load.

`--model NAME` looks in the cache directory ($MAEST_CACHE, default ~/.cache/maest-cli) and
downloads on a miss: HTTPS, resumable (.part + Range), atomic (rename when complete).
The release files are pinned (size and sha256 in configs/models.toml): a download that does not
match is deleted and the next source (the Hugging Face port) is tried. That port publishes no
hash, so its first download records its own (source.json beside the weights) and later loads
are checked against it; `model_info` reports such weights as unpinned. Offline (or with
MAEST_OFFLINE=1) the error says which file to put where. `--model PATH` loads a local file and
never touches the network.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from maest_cli.errors import MaestError, UsageError, exit_code_of
from maest_cli.io.artefacts import write_json
from maest_cli.io.config import ConfigError, read_labels, read_toml
from maest_cli.io.download import DownloadError, cache_dir, download_file, download_with_digest, offline
from maest_cli.models.checkpoints import PAPER_BLOCK, build_model, load_checkpoint
from maest_cli.models.maest import count_parameters


class ModelNotFound(UsageError):
    """A model name or file that cannot be resolved to weights; the message says what to do."""


class WeightsMismatch(MaestError):
    """Cached weights whose sha256 differs from their pin or from the hash recorded at download."""


RECORD = "source.json"  # beside the weights: where they came from and their sha256 at download
SOURCE_NAMES = {"official": "the authors' release", "hf": "the Hugging Face port", "bundled": "this installation"}


@dataclass(frozen=True)
class RemoteFile:
    url: str
    filename: str
    sha256: str | None = None
    size: int | None = None
    optional: bool = False


@dataclass(frozen=True)
class Source:
    """One way to obtain a model: files to fetch, the first being the weights."""

    kind: str  # "official" (GitHub .ckpt) or "hf"
    files: tuple[RemoteFile, ...]
    alternatives: tuple[RemoteFile, ...] = ()  # other names for the weights file


@dataclass(frozen=True)
class ModelEntry:
    name: str
    variant: str
    labels: str
    description: str = ""
    aliases: tuple[str, ...] = ()
    sources: tuple[Source, ...] = ()
    kind: str = "model"  # "model" (a MAEST) or "init" (weights `maest train --init` starts from)


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelEntry] = field(default_factory=dict)
    inits: dict[str, ModelEntry] = field(default_factory=dict)  # PaSST, DeiT: downloadable, not loadable

    def _entries(self) -> list[ModelEntry]:
        return [*self.models.values(), *self.inits.values()]

    def get(self, name: str) -> ModelEntry:
        for m in self._entries():
            if name == m.name or name in m.aliases:
                return m
        names = sorted(n for m in self._entries() for n in (m.name, *m.aliases))
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFound(f"unknown model {name!r} and no such file.{hint} "
                            f"Known models: `maest models list`.")

    def has(self, name: str) -> bool:
        return any(name == m.name or name in m.aliases for m in self._entries())

    def pinned_sha256(self) -> dict[str, str]:
        """Published sha256 -> registry name, to recognise a pinned file given by path."""
        return {f.sha256: m.name for m in self._entries() for s in m.sources for f in (*s.files, *s.alternatives)
                if f.sha256}


def load_registry(path: str | os.PathLike | None = None) -> Registry:
    """Registry from configs/models.toml, or from `path` / $MAEST_REGISTRY (mirrors, tests)."""
    data = read_toml(path or os.environ.get("MAEST_REGISTRY") or "models.toml")
    where = path or "models.toml"
    try:
        gh, hf = data.get("github_base", ""), data.get("hf_base", "")
        models = {}
        for name, m in data["models"].items():
            sha = m.get("sha256") or None
            size = m.get("size") or None
            sources = []
            if m.get("bundled_file"):  # shipped inside the package: no download, works offline
                sources.append(Source("bundled", (RemoteFile("", m["bundled_file"], sha, size),)))
            if m.get("github_file"):
                sources.append(Source("official", (RemoteFile(gh + m["github_file"], m["github_file"], sha, size),)))
            if m.get("hf_repo"):
                base = f"{hf}{m['hf_repo']}/resolve/main/"
                sources.append(Source(
                    "hf",
                    (RemoteFile(base + "model.safetensors", "model.safetensors", m.get("hf_sha256") or None),
                     RemoteFile(base + "config.json", "config.json", optional=True)),
                    (RemoteFile(base + "pytorch_model.bin", "pytorch_model.bin"),),
                ))
            models[name] = ModelEntry(name=name, variant=m["variant"], labels=m.get("labels", ""),
                                      description=m.get("description", ""),
                                      aliases=tuple(m.get("aliases", ())), sources=tuple(sources))
        inits = {}
        for name, m in data.get("inits", {}).items():
            file = RemoteFile(m["url"], m["url"].rsplit("/", 1)[-1], m.get("sha256") or None, m.get("size") or None)
            inits[name] = ModelEntry(name=name, variant="", labels="", description=m.get("description", ""),
                                     aliases=tuple(m.get("aliases", ())), sources=(Source("official", (file,)),),
                                     kind="init")
        reg = Registry(default=data["default"], models=models, inits=inits)
        reg.get(reg.default)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: invalid model registry (missing or wrong field {e})") from None
    return reg


def bundled_dir() -> Path:
    """Weights that ship inside the package (maest_cli/weights/)."""
    return Path(str(resources.files("maest_cli"))) / "weights"


def cached_weights(entry: ModelEntry, cache: Path | None = None) -> Path | None:
    """The weights file of a model that is bundled or already in the cache, if any."""
    d = (cache or cache_dir()) / entry.name
    for src in entry.sources:
        if src.kind == "bundled":
            p = bundled_dir() / src.files[0].filename
            if p.is_file():
                return p
            continue
        for f in (src.files[0], *src.alternatives):
            if (d / f.filename).is_file():
                return d / f.filename
    return None


# ---------------------------------------------------------------- downloading

def fetch_model(entry: ModelEntry, cache: Path | None = None, progress: bool = True) -> Path:
    """Download a model's weights into the cache (first source that works); return their path."""
    d = (cache or cache_dir()) / entry.name
    hit = cached_weights(entry, cache)
    if hit:
        return hit
    if entry.sources and all(src.kind == "bundled" for src in entry.sources):
        raise ModelNotFound(f"the bundled weights of model {entry.name!r} are missing from this installation "
                            f"({bundled_dir() / entry.sources[0].files[0].filename}); reinstall maest-cli")
    if offline():
        raise ModelNotFound(_missing_message(entry, d, "could not be downloaded: MAEST_OFFLINE is set"))
    errors = []
    for i, src in enumerate(entry.sources):
        if src.kind == "bundled":  # missing from this installation: nothing to download
            errors.append(f"{bundled_dir() / src.files[0].filename} is missing from this installation")
            continue
        try:
            weights, remote, digest = _fetch_source(src, d, progress)
        except DownloadError as e:
            errors.append(str(e))
            later = [s for s in entry.sources[i + 1:] if s.kind != "bundled"]
            if later:  # say why before the next source starts a long download
                print(f"maest: warning: {e}; trying {SOURCE_NAMES.get(later[0].kind, later[0].kind)}",
                      file=sys.stderr)
            continue
        write_json(d / RECORD, {"model": entry.name, "source": src.kind, "url": remote.url, "file": weights.name,
                                "sha256": digest, "size": weights.stat().st_size, "pinned": bool(remote.sha256)})
        return weights
    raise ModelNotFound(_missing_message(entry, d, f"could not be downloaded ({'; '.join(errors) or 'no sources'})"))


def _fetch_source(src: Source, d: Path, progress: bool) -> tuple[Path, RemoteFile, str]:
    """The weights of one source (its first file, else an alternative name) and its other files:
    (weights path, the RemoteFile they came from, their sha256)."""
    weights_file, *rest = src.files
    try:
        remote = weights_file
        weights, digest = download_with_digest(weights_file.url, d / weights_file.filename, weights_file.sha256,
                                    weights_file.size, progress, 60.0)
    except DownloadError as first:
        for alt in src.alternatives:
            try:
                remote = alt
                weights, digest = download_with_digest(alt.url, d / alt.filename, alt.sha256, alt.size, progress, 60.0)
                break
            except DownloadError:
                continue
        else:
            raise first
    for f in rest:
        try:
            download_file(f.url, d / f.filename, f.sha256, f.size, progress=False)
        except DownloadError:
            if not f.optional:
                raise
    return weights, remote, digest


def read_record(weights: Path) -> dict:
    """What was recorded when these cached weights were downloaded ({} when nothing was)."""
    try:
        rec = json.loads((weights.parent / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) and rec.get("file") == weights.name else {}


def _missing_message(entry: ModelEntry, d: Path, why: str) -> str:
    """Where the weights of `entry` can come from; `why`: why they are not here ("could not be ...")."""
    where = "\n".join(f"  - {src.files[0].url}\n    -> {d / src.files[0].filename}"
                      + ("\n    (with config.json beside it)" if src.kind == "hf" else "")
                      for src in entry.sources)
    return (f"weights of model {entry.name!r} are not in the cache and {why}.\n"
            f"Run `maest models download {entry.name}` on a connected machine, or put one of these "
            f"files in place:\n{where}\n(set MAEST_CACHE to use another cache directory)")


# ---------------------------------------------------------------- name or path -> model

@dataclass
class LoadedModel:
    model: "object"  # maest_cli.models.maest.MAEST
    name: str
    path: str
    sha256: str | None
    labels: list[str] | None
    source_format: str
    metadata: dict = field(default_factory=dict)
    input_norm: "object" = None  # frontend.InputNorm: the input scaling the model was trained with
    default_block: int = PAPER_BLOCK  # the block embeddings come from unless asked (Checkpoint.default_block)
    source: str | None = None  # registry source of the weights: official, hf, bundled; None: a file by path
    pinned: bool = False  # sha256 equals a hash published in configs/models.toml
    recorded_sha256: str | None = None  # unpinned registry weights: their sha256 recorded at download

    @property
    def config(self):
        return self.model.cfg


def resolve_weights(name_or_path: str | os.PathLike | None, registry: Registry | None = None,
                    cache: Path | None = None, download: bool = True,
                    progress: bool = True) -> tuple[Path, ModelEntry | None]:
    """A registry name (or alias) to cached/downloaded weights; an existing path to itself."""
    reg = registry or load_registry()
    key = str(name_or_path) if name_or_path else reg.default
    p = Path(key).expanduser()
    if p.exists():
        return p, None
    if not reg.has(key) and (os.sep in key or key.endswith((".ckpt", ".safetensors", ".bin", ".pt"))):
        raise ModelNotFound(f"{key}: no such file")
    entry = reg.get(key)
    hit = cached_weights(entry, cache)
    if hit:
        return hit, entry
    if not download:
        raise ModelNotFound(_missing_message(entry, (cache or cache_dir()) / entry.name,
                                            "were not downloaded (this command never downloads)"))
    if not offline() and any(src.kind != "bundled" for src in entry.sources):
        print(f"maest: downloading {entry.name} to {(cache or cache_dir()) / entry.name}", file=sys.stderr)
    return fetch_model(entry, cache, progress), entry


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "cpu",
               registry: Registry | None = None, cache: Path | None = None,
               download: bool = True, progress: bool = True) -> LoadedModel:
    """The Python entry point: a ready, eval-mode MAEST with its labels and provenance.

    Registry weights are checked against their pin, or the hash recorded at download, on every
    load (load_checkpoint hashes the file anyway): a cached file that changed is refused."""
    reg = registry or load_registry()
    key = str(name_or_path) if name_or_path else reg.default
    if not Path(key).expanduser().exists() and reg.has(key) and reg.get(key).kind == "init":
        raise UsageError(f"{key} holds the weights training starts from, not a MAEST model: use it as "
                         f"`maest train --init {reg.get(key).name}`")
    path, entry = resolve_weights(name_or_path, reg, cache, download, progress)
    labels = read_labels(entry.labels) if entry and entry.labels else None  # else: the file's own
    ckpt = load_checkpoint(path, labels=labels)
    if entry:
        source, pinned, recorded = _check_cached(entry, Path(path), ckpt.sha256)
    else:
        source, pinned, recorded = None, ckpt.sha256 in reg.pinned_sha256(), None
    if ckpt.labels is None and ckpt.source_format == "official":
        # A bare official file: its output count tells which Discogs list it was trained on.
        known = {400: "discogs400", 519: "discogs519"}
        if ckpt.config.n_classes in known:
            ckpt.labels = read_labels(known[ckpt.config.n_classes])
    model = build_model(ckpt).to(device)
    name = entry.name if entry else ckpt.metadata.get("name", Path(path).stem)
    return LoadedModel(model, name, str(path), ckpt.sha256, ckpt.labels, ckpt.source_format, ckpt.metadata,
                       ckpt.input_norm, ckpt.default_block, source=source, pinned=pinned, recorded_sha256=recorded)


def _check_cached(entry: ModelEntry, path: Path, digest: str) -> tuple[str | None, bool, str | None]:
    """(source kind, pinned, recorded sha256) of a registry model's weights; refuses weights
    that differ from their pin or from the hash recorded when they were downloaded."""
    for src in entry.sources:
        for f in (*src.files, *src.alternatives):
            if f.filename != path.name:
                continue
            if f.sha256:
                if digest != f.sha256.lower():
                    raise WeightsMismatch(f"{path}: expected sha256 {f.sha256.lower()} (published for "
                                          f"{entry.name}), got {digest}; delete it and run "
                                          f"`maest models download {entry.name}`")
                return src.kind, True, None
            if src.kind == "bundled":
                return src.kind, False, None
            recorded = read_record(path).get("sha256")
            if recorded and digest != recorded:
                raise WeightsMismatch(f"{path}: expected sha256 {recorded} (recorded in {path.parent / RECORD} "
                                      f"when it was downloaded), got {digest}; delete {path.parent} and run "
                                      f"`maest models download {entry.name}`")
            return src.kind, False, recorded
    return None, False, None


def describe_entry(entry: ModelEntry, cache: Path | None = None) -> dict:
    """A registry entry's facts without its weights: sources, their pins, whether it is cached."""
    return {"name": entry.name, "kind": entry.kind, "aliases": list(entry.aliases), "variant": entry.variant,
            "labels": entry.labels, "description": entry.description,
            "sources": [{"kind": s.kind, "url": s.files[0].url, "file": s.files[0].filename,
                         "sha256": s.files[0].sha256, "size": s.files[0].size, "pinned": bool(s.files[0].sha256)}
                        for s in entry.sources],
            "cached": cached_weights(entry, cache) is not None}


def model_info(name_or_path: str | os.PathLike | None, registry: Registry | None = None,
               cache: Path | None = None, download: bool = False, progress: bool = True) -> dict:
    """What `maest models info` prints: the loaded model's config, checksum and provenance
    ("pinned": its sha256 is a published one; else "recorded_sha256" is the hash its first
    download recorded). A registry model whose weights cannot be had (not cached, offline,
    changed) is still described from the registry, with a one-line "note" saying why."""
    reg = registry or load_registry()
    key = str(name_or_path) if name_or_path else reg.default
    try:
        lm = load_model(key, registry=reg, cache=cache, download=download, progress=progress)
    except Exception as e:
        if exit_code_of(e) is None or Path(key).expanduser().exists() or not reg.has(key):
            raise
        return {**describe_entry(reg.get(key), cache), "note": str(e).splitlines()[0]}
    return {"name": lm.name, "path": lm.path, "sha256": lm.sha256, "format": lm.source_format,
            "source": lm.source, "pinned": lm.pinned, "recorded_sha256": lm.recorded_sha256,
            "config": lm.config.to_dict(), "parameters": count_parameters(lm.model),
            "default_block": lm.default_block, "n_labels": len(lm.labels) if lm.labels else None,
            "first_labels": (lm.labels or [])[:5]}
