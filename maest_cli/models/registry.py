"""The official models: where their weights come from, where they are cached, how they load.

`--model NAME` looks in the cache directory ($MAEST_CACHE, default ~/.cache/maest-cli) and
downloads on a miss: HTTPS, resumable (.part + Range), atomic (rename when complete),
verified by size and sha256 where known. Offline (or with MAEST_OFFLINE=1) the error says
which file to put where. `--model PATH` loads a local file and never touches the network.
"""

from __future__ import annotations

import difflib
import http.client
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file, write_json
from maest_cli.io.config import ConfigError, read_labels, read_toml
from maest_cli.models.checkpoints import build_model, load_checkpoint

USER_AGENT = "maest-cli (+https://github.com/palonso/MAEST)"


class ModelNotFound(UsageError):
    """A model name or file that cannot be resolved to weights; the message says what to do."""


class DownloadError(Exception):
    pass


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


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelEntry] = field(default_factory=dict)

    def get(self, name: str) -> ModelEntry:
        if name in self.models:
            return self.models[name]
        for m in self.models.values():
            if name in m.aliases:
                return m
        names = sorted([*self.models, *(a for m in self.models.values() for a in m.aliases)])
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ModelNotFound(f"unknown model {name!r} and no such file.{hint} "
                            f"Known models: `maest models list`.")

    def has(self, name: str) -> bool:
        return name in self.models or any(name in m.aliases for m in self.models.values())


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
        reg = Registry(default=data["default"], models=models)
        reg.get(reg.default)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{where}: invalid model registry (missing or wrong field {e})") from None
    return reg


def cache_dir() -> Path:
    env = os.environ.get("MAEST_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "maest-cli"


def offline() -> bool:
    return os.environ.get("MAEST_OFFLINE", "").lower() in ("1", "true", "yes")


def bundled_dir() -> Path:
    """Weights that ship inside the package (maest_cli/weights/)."""
    return Path(__file__).parent / "weights"


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

def download_file(url: str, dest: Path, sha256: str | None = None, size: int | None = None,
                  progress: bool = True, timeout: float = 60.0) -> Path:
    """Fetch url to dest: resume from dest.part, verify, then rename into place.

    A truncated transfer leaves dest.part to resume from; a file that fails verification
    is deleted, so a bad download never sits at dest.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # already complete
            resp = None
        else:
            raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: {getattr(e, 'reason', e)}") from None

    if resp is not None:
        with resp:
            status = getattr(resp, "status", 200)
            if have and status != 206:
                have = 0  # server ignored the range: start over
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else size
            if size is not None and total is not None and total != size:
                raise DownloadError(f"{url}: server reports {total} bytes, expected {size}")
            _stream(resp, part, have, total, url, progress)
    got = part.stat().st_size
    want = size if size is not None else None
    if resp is not None and length is not None and got != have + int(length):
        raise DownloadError(f"{url}: transfer interrupted at {got} bytes; run again to resume")
    if want is not None and got != want:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: got {got} bytes, expected {want}; deleted, try again")
    if sha256:
        digest = sha256_file(part)
        if digest != sha256.lower():
            part.unlink(missing_ok=True)
            raise DownloadError(f"{url}: sha256 {digest} does not match {sha256}; the corrupt file "
                                "was deleted, try again")
    os.replace(part, dest)
    return dest


def _stream(resp, part: Path, have: int, total: int | None, url: str, progress: bool) -> None:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    mode = "ab" if have else "wb"
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with open(part, mode) as out, Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task(url.rsplit("/", 1)[-1], total=total, completed=have)
        try:
            while chunk := resp.read(1 << 16):
                out.write(chunk)
                bar.update(task, advance=len(chunk))
        except (OSError, ValueError, http.client.HTTPException) as e:  # reset, IncompleteRead
            out.flush()
            os.fsync(out.fileno())
            raise DownloadError(f"{url}: transfer interrupted ({e}); run again to resume") from None
        out.flush()
        os.fsync(out.fileno())


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
        raise ModelNotFound(_missing_message(entry, d, "MAEST_OFFLINE is set"))
    errors = []
    for src in entry.sources:
        if src.kind == "bundled":  # missing from this installation: nothing to download
            errors.append(f"{bundled_dir() / src.files[0].filename} is missing from this installation")
            continue
        try:
            weights = _fetch_source(src, d, progress)
            _write_provenance(d, entry, src, weights)
            return weights
        except DownloadError as e:
            errors.append(str(e))
    raise ModelNotFound(_missing_message(entry, d, "; ".join(errors) or "no sources"))


def _fetch_source(src: Source, d: Path, progress: bool) -> Path:
    weights_file, *rest = src.files
    try:
        weights = download_file(weights_file.url, d / weights_file.filename, weights_file.sha256,
                                weights_file.size, progress)
    except DownloadError as first:
        for alt in src.alternatives:
            try:
                weights = download_file(alt.url, d / alt.filename, alt.sha256, alt.size, progress)
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
    return weights


def _write_provenance(d: Path, entry: ModelEntry, src: Source, weights: Path) -> None:
    info = {"model": entry.name, "source": src.kind, "url": src.files[0].url, "file": weights.name,
            "sha256": sha256_file(weights), "size": weights.stat().st_size}
    write_json(d / "source.json", info)


def _missing_message(entry: ModelEntry, d: Path, why: str) -> str:
    where = "\n".join(f"  - {src.files[0].url}\n    -> {d / src.files[0].filename}"
                      + ("\n    (with config.json beside it)" if src.kind == "hf" else "")
                      for src in entry.sources)
    return (f"weights of model {entry.name!r} are not in the cache and could not be downloaded ({why}).\n"
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
        raise ModelNotFound(_missing_message(entry, (cache or cache_dir()) / entry.name, "not downloaded"))
    if not offline() and any(src.kind != "bundled" for src in entry.sources):
        print(f"maest: downloading {entry.name} to {(cache or cache_dir()) / entry.name}", file=sys.stderr)
    return fetch_model(entry, cache, progress), entry


def load_model(name_or_path: str | os.PathLike | None = None, device: str = "cpu",
               registry: Registry | None = None, cache: Path | None = None,
               download: bool = True, progress: bool = True) -> LoadedModel:
    """The Python entry point: a ready, eval-mode MAEST with its labels and provenance."""

    path, entry = resolve_weights(name_or_path, registry, cache, download, progress)
    labels = read_labels(entry.labels) if entry and entry.labels else None  # else: the file's own
    ckpt = load_checkpoint(path, labels=labels)
    if ckpt.labels is None and ckpt.source_format == "official":
        # A bare official file: its output count tells which Discogs list it was trained on.
        known = {400: "discogs400", 519: "discogs519"}
        if ckpt.config.n_classes in known:
            ckpt.labels = read_labels(known[ckpt.config.n_classes])
    model = build_model(ckpt).to(device)
    name = entry.name if entry else ckpt.metadata.get("name", Path(path).stem)
    return LoadedModel(model, name, str(path), ckpt.sha256, ckpt.labels, ckpt.source_format, ckpt.metadata,
                       ckpt.input_norm)
