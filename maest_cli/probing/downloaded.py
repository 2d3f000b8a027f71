"""`maest probe DATASET` with nothing else: the copy `maest datasets download` made.

The dataset is found under the data root (maest_cli.datasets.layout.locate); its audio is
embedded into ROOT/NAME/embeddings/SPEC, an ordinary `extract` dataset named by what the
embeddings are, so a rerun resumes and other models or settings get their own folder.

A downloaded subset (MTG-Jamendo tars 0-9, an MTT with folders missing) is probed as such:
the labelled tracks whose audio is not on disk are set aside before the join, so the share
`--min-match` asks for is measured against what was downloaded (an embeddings folder that
does not match the audio that is there is still refused), and the report says which part of
each split the result covers. Audio files of zero bytes are known defects of the published
data (MagnaTagATune ships three: the reason the standard split has 25,860 of its 25,863
clips): they are reported by name as failed files and do not fail the probe.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from maest_cli.audio.walk import find_audio_files
from maest_cli.datasets.layout import Located
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import read_errors
from maest_cli.errors import UsageError
from maest_cli.mels.labels import SPLITS, audio_key
from maest_cli.probing.data import Annotations, Join

CACHE_DIR = "embeddings"


def embeddings_cache(located: Located, spec: InferenceSpec, registry) -> Path:
    """ROOT/NAME/embeddings/MODEL-DIGEST: MODEL the registry name (or the file's stem), DIGEST
    of every field of `spec` that changes the rows (and of a weights file's path, size and
    modification time), so two settings never share a folder and the same ones always do."""
    key = spec.model or registry.default
    path = Path(key).expanduser()
    if path.exists():
        st = path.stat()
        slug, model_id = path.stem, [str(path.resolve()), st.st_size, st.st_mtime_ns]
    else:
        slug = model_id = registry.get(key).name  # an unknown name is a usage error here, before any work
    fields = dataclasses.asdict(spec.replace(pool="track"))
    for name in ("model", "device", "engine"):  # the model by identity; device and engine do not change the rows
        fields.pop(name)
    digest = hashlib.sha256(json.dumps([model_id, fields], sort_keys=True, default=str).encode()).hexdigest()[:10]
    return located.root / CACHE_DIR / f"{slug}-{digest}"


@dataclasses.dataclass
class Downloaded:
    """The labelled tracks whose audio is on disk, and how many of each split that is."""

    annotations: Annotations  # only the tracks whose audio is present
    labelled: dict[str, int]  # per split, in the label files
    downloaded: dict[str, int]  # per split, audio present


def downloaded_part(ann: Annotations, audio_root: Path, folders: tuple[str, ...] | None = None) -> Downloaded:
    """`ann` restricted to the tracks with an audio file under AUDIO_ROOT (matched by
    `audio_key`, so `48/948.mp3` in a split file finds `48/948.low.mp3`) and, when `folders` is
    given (MTG-Jamendo: the tars the manifest records as verified), in one of those folders: the
    tracks of a tar whose unpacking was killed are not counted as downloaded."""
    files, _ = find_audio_files([audio_root])
    present = {audio_key(f.path) for f in files}
    keep = np.fromiter((audio_key(p) in present and (folders is None or p.split("/")[0] in folders)
                        for p in ann.paths), bool, len(ann.paths))
    counts = ann.counts()
    if not keep.any():
        raise UsageError(f"{audio_root}: none of the {len(ann.paths)} labelled tracks of {ann.dataset} has its "
                         f"audio there (e.g. {ann.paths[0]!r})")
    sub = dataclasses.replace(ann, paths=[p for p, k in zip(ann.paths, keep) if k], splits=ann.splits[keep],
                              labels=ann.labels[keep])
    have = sub.counts()
    for s in SPLITS:
        if counts[s] and not have[s]:
            raise UsageError(f"{ann.dataset}: none of the {counts[s]} {s} tracks has its audio under {audio_root} "
                             f"(a subset without them cannot be probed)")
    return Downloaded(sub, counts, have)


def empty_audio(cache: Path) -> list[str]:
    """The files extract could not embed because they hold zero bytes (root-relative paths)."""
    table = read_errors(cache)
    empty = []
    for root, path in zip(table.column("root").to_pylist(), table.column("path").to_pylist()):
        full = os.path.join(root or "", *path.split("/"))
        try:
            if os.path.getsize(full) == 0:
                empty.append(path)
        except OSError:
            continue
    return sorted(set(empty))


def coverage(located: Located, part: Downloaded, join: Join, empty: list[str]) -> dict:
    """Per split: labelled, downloaded, with an embedding; one line each for the report."""
    matched = join.track_of_label >= 0
    ann = part.annotations
    empty_keys = {audio_key(p) for p in empty}
    splits, lines = {}, []
    for s in SPLITS:
        in_split = ann.splits == s
        n_emb = int((matched & in_split).sum())
        n_empty = sum(audio_key(p) in empty_keys for p, ok in zip(ann.paths, in_split) if ok)
        splits[s] = {"labelled": part.labelled[s], "downloaded": part.downloaded[s], "embedded": n_emb,
                     "empty_audio": n_empty}
        extra = [f"{part.downloaded[s]} downloaded: {located.coverage}"] \
            if part.downloaded[s] != part.labelled[s] else []
        if n_empty:
            extra.append(f"{n_empty} with empty audio")
        lines.append(f"{s}: {n_emb} of {part.labelled[s]} {'clips' if located.name == 'mtt' else 'tracks'}"
                     + (f" ({', '.join(extra)})" if extra else ""))
    return {"of": str(located.coverage), "complete": located.complete, "splits": splits, "lines": lines}
