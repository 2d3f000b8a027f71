"""Extract datasets kept in the user cache, one per (inputs, spec): `maest tag` and `maest similar`
embed audio through here, so a rerun resumes and skips the files already done."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path

from maest_cli.audio.walk import as_text
from maest_cli.embed.extraction import ExtractSummary, extract
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import MANIFEST, PART_GLOB, SettingsMismatch
from maest_cli.io.download import cache_dir

# how a run goes, not what the rows are: left out of the folder's name
RUN_ONLY_FIELDS = ("device", "engine")
STALE_CACHE = "were made with other settings and were extracted again"


def cache_key(paths, spec: InferenceSpec) -> dict:
    """What names a cached dataset: the inputs as absolute paths (in the order given: with
    overlapping inputs the first one names a file), the size and modification time of each input
    that is a file (a file replaced under its name gets a new folder: extract resumes by path and
    would otherwise keep its old rows), and the spec fields that decide the rows. A directory is
    named by its path alone: a file changed inside it is not seen (extract again with --out)."""
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    model = spec.model
    if model is not None and os.path.exists(model):  # a weights file: the same file from any directory
        model = os.path.abspath(model)
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k not in RUN_ONLY_FIELDS}
    fields["model"] = model
    inputs = [os.path.abspath(os.fspath(p)) for p in items]
    return {"inputs": [as_text(p) for p in inputs], "files": [file_stats(p) for p in inputs], "spec": fields}


def file_stats(path: str) -> list[int] | None:
    """[size, mtime_ns] of a file (links followed); None for a directory or what cannot be read."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return None if stat.S_ISDIR(st.st_mode) else [st.st_size, st.st_mtime_ns]


def every_file_failed(directory: str | os.PathLike) -> bool:
    """An extract dataset that ran and holds no part: every file failed (see its _errors/)."""
    d = Path(directory)
    return d.is_dir() and (d / MANIFEST).is_file() and not any(d.glob(PART_GLOB))


def cache_folder(paths, spec: InferenceSpec, cache_root: str | os.PathLike | None = None) -> Path:
    """cache_root/<first input's name>[+N]-<model>-<hash of cache_key>: readable, and unique per key."""
    key = cache_key(paths, spec)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    first = Path(key["inputs"][0]).name or "root"
    more = f"+{len(key['inputs']) - 1}" if len(key["inputs"]) > 1 else ""
    model = Path(spec.model).stem if spec.model else "default"
    name = re.sub(r"[^\w.+-]+", "_", f"{first}{more}-{model}")[:80]
    root = Path(cache_root) if cache_root is not None else cache_dir() / "extract"
    return root / f"{name}-{digest}"


def split_spec_fields(spec: InferenceSpec | None, options: dict) -> tuple[InferenceSpec, dict]:
    """extract's keywords split into the spec (fields such as preset="fast" folded in) and the
    options that decide only how the run goes."""
    names = {f.name for f in dataclasses.fields(InferenceSpec)}
    fields = {k: v for k, v in options.items() if k in names}
    spec = spec or InferenceSpec()
    return (spec.replace(**fields) if fields else spec), {k: v for k, v in options.items() if k not in names}


def cached_extract(paths, spec: InferenceSpec | None = None, *, cache_root: str | os.PathLike | None = None,
                   **run_options) -> tuple[Path, ExtractSummary]:
    """Extract `paths` with `spec` into the cache folder of (paths, spec) and return it with the
    run's summary. Files done by an earlier call are skipped; failures are recorded in the folder's
    _errors/ as by `extract` (never raised). A folder whose rows were made otherwise (the same model
    name now meaning other weights) is a stale cache: it is started again, with a warning in the summary.

    `run_options`: extract's keywords that decide only how the run goes (workers, threads,
    batch_size, extensions, progress, registry, ...); spec fields given as keywords (preset="fast")
    are folded into `spec`, as extract takes them."""
    spec, run_options = split_spec_fields(spec, run_options)
    out = cache_folder(paths, spec, cache_root)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        return out, extract(paths, out, spec, **run_options)
    except SettingsMismatch:
        summary = extract(paths, out, spec, **{**run_options, "overwrite": True})
        summary.warnings.insert(0, f"cached embeddings in {out} {STALE_CACHE} (a model file changed under its name?)")
        return out, summary
