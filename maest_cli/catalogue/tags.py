"""`maest tag`: the strongest labels of a model, by name, per track.

Built on `extract`: audio is embedded with scores into an ordinary extract dataset (a cache
folder named by the inputs and the spec, unless `out` is given), or an existing dataset with
scores is read. A track's activations are the sigmoid outputs of the model's head averaged over
its segments (what extract's track rows hold; segment rows are averaged here the same way).

Labels of the form "Genre---Style" (the Discogs models) or "facet:value" (maest-tiny's demo-corpus
tags) are split in two, and each track also gets a summary per group: the group's strongest label
(for Discogs, the highest style activation of each genre).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.audio.walk import find_audio_files
from maest_cli.catalogue.cached import STALE_CACHE, cached_extract, every_file_failed, split_spec_fields
from maest_cli.catalogue.tables import write_csv
from maest_cli.embed.extraction import ExtractSummary, display_path, extract
from maest_cli.embed.reading import describe_embeddings, open_embeddings
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import read_errors, read_metadata
from maest_cli.errors import UsageError
from maest_cli.io.download import cache_dir
from maest_cli.models.registry import load_model

# (separator, what the part before it is, what the part after it is)
LABEL_STYLES = (("---", "genre", "style"), (":", "facet", "value"))
CSV_COLUMNS = ("path", "kind", "rank", "label", "group", "name", "activation")


@dataclass(frozen=True)
class Tag:
    label: str  # the model's label, whole
    activation: float  # mean sigmoid activation over the track's segments
    group: str | None = None  # "Electronic" of "Electronic---Techno"; None for labels without groups
    name: str = ""  # "Techno"; the label itself for labels without groups


@dataclass(frozen=True)
class TrackTags:
    path: str  # the audio file (its root joined with its path in the dataset)
    labels: list[Tag]  # the top labels, strongest first, none below the threshold
    groups: list[Tag]  # per group its strongest label, strongest groups first; [] without groups


@dataclass(frozen=True)
class TagFailure:
    path: str
    stage: str  # as extract records it: walk, decode, model, ...; "tag" for a track without scores
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason} (stage: {self.stage})"


@dataclass
class TagTable:
    """What `tag` returns and every output format is made from (table, CSV rows, JSON)."""

    tracks: list[TrackTags]
    failures: list[TagFailure]
    dataset: str  # the extract dataset the activations were read from
    model: str | None
    group_title: str | None  # "genre" (Discogs) or "facet"; None when labels have no groups
    name_title: str  # "style", "value" or "label"
    top: int
    threshold: float
    warnings: list[str] = field(default_factory=list)
    failures_shown: int = 0  # how many of the first failures extract's progress display printed already
    summary: ExtractSummary | None = None  # the extract run (None with `from_dataset`)

    @property
    def exit_code(self) -> int:
        return 1 if self.failures else 0

    def rows(self) -> list[dict]:
        """One row per (track, label) and per (track, group summary): the CSV's rows."""
        out = []
        for t in self.tracks:
            for kind, tags in (("label", t.labels), ("group", t.groups)):
                out += [{"path": t.path, "kind": kind, "rank": i + 1, "label": g.label, "group": g.group,
                         "name": g.name, "activation": g.activation} for i, g in enumerate(tags)]
        return out

    def to_csv(self) -> str:
        return write_csv(self.rows(), CSV_COLUMNS)

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "model": self.model, "group_title": self.group_title,
                "name_title": self.name_title, "top": self.top, "threshold": self.threshold,
                "tracks": [asdict(t) for t in self.tracks], "failures": [asdict(f) for f in self.failures]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)


def label_style(labels: list[str]) -> tuple[str | None, str | None, str]:
    """(separator, group title, name title) shared by every label; (None, None, "label") if none is."""
    for sep, group, name in LABEL_STYLES:
        if labels and all(sep in lab for lab in labels):
            return sep, group, name
    return None, None, "label"


def top_tags(activations: np.ndarray, labels: list[str], top: int, threshold: float,
             sep: str | None) -> tuple[list[Tag], list[Tag]]:
    """The `top` strongest labels, then those below `threshold` dropped; the same rule for the
    groups, each ranked by its strongest label."""
    def tag(i: int) -> Tag:
        group, name = labels[i].split(sep, 1) if sep else (None, labels[i])
        return Tag(labels[i], float(activations[i]), group, name)

    order = np.argsort(-activations, kind="stable")
    tags = [tag(i) for i in order[:top] if activations[i] >= threshold]
    groups: list[Tag] = []
    if sep:
        seen: set[str] = set()
        for i in order:  # strongest first: a group's first label is its strongest
            if len(groups) >= top or activations[i] < threshold:
                break
            t = tag(i)
            if t.group not in seen:
                seen.add(t.group)
                groups.append(t)
    return tags, groups


def tag(paths=None, *, model: str | None = None, top: int = 5, threshold: float = 0.0,
        from_dataset: str | os.PathLike | None = None, out: str | os.PathLike | None = None,
        spec: InferenceSpec | None = None, progress: bool = True, registry=None, **run_options) -> TagTable:
    """Tag audio files (`paths`: files or directories) or an extract dataset with scores (`from_dataset`).

    From audio, `spec` (default: the preset `none`, the model's default block) is run with scores
    through `extract` into `out`, by default a cache folder named by the inputs and the spec
    (catalogue.cached), so a rerun skips the files already done. `run_options` go to extract
    (workers, threads, batch_size, extensions, ...; spec fields such as preset="fast" too, as extract
    takes them). Block and tokens shape only the dataset's embeddings: the activations come from the
    model's head after its last block whatever they are. Files that fail are listed in
    `TagTable.failures` (never raised); a dataset without scores, or a model without label names,
    is a UsageError.
    """
    top, threshold = int(top), float(threshold)
    if top < 1:
        raise UsageError("--top must be >= 1")
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(f"--threshold {threshold}: activations are sigmoid outputs, choose 0..1")
    summary, found, shown = None, None, False
    if from_dataset is not None:
        if paths:
            raise UsageError("give audio PATHs or --from DATASET, not both")
        if out is not None:
            raise UsageError("--out names where audio is embedded; with --from nothing is embedded")
        if spec is not None or model is not None or split_spec_fields(None, run_options)[0] != InferenceSpec():
            raise UsageError("--from reads the activations a dataset holds: its model and settings are recorded in it")
        directory = Path(from_dataset)
        if not directory.exists():
            raise UsageError(f"--from {directory}: no such file or directory")
    else:
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths or [])
        if not paths:
            raise UsageError("no audio PATH given (or --from DATASET)")
        spec, run_options = split_spec_fields(spec, run_options)
        spec = spec.replace(scores=True, pool="track", **({"model": model} if model else {}))
        _check_labels(spec, registry, progress)
        found, _ = find_audio_files(paths, run_options.get("extensions"))
        if out is None:
            directory, summary = cached_extract(paths, spec, cache_root=cache_dir() / "tags", progress=progress,
                                                registry=registry, **run_options)
        else:
            directory = Path(out)
            summary = extract(paths, directory, spec, progress=progress, registry=registry, **run_options)
        shown = progress
    return _tag_dataset(directory, top, threshold, found, summary, shown)


def _check_labels(spec: InferenceSpec, registry, progress: bool) -> None:
    """A model without label names cannot tag: say so before embedding anything."""
    lm = load_model(spec.model, registry=registry, progress=progress)
    if not lm.labels:
        raise UsageError(f"{lm.name}: the model has no label names, so it cannot tag (a model trained on "
                         "labelled data, e.g. the Discogs models or maest-tiny, can)")
    if len(lm.labels) != lm.config.n_classes:
        raise UsageError(f"{lm.name}: {len(lm.labels)} label names for {lm.config.n_classes} outputs")


def _tag_dataset(directory: Path, top: int, threshold: float, found, summary: ExtractSummary | None,
                 shown: bool) -> TagTable:
    if every_file_failed(directory):
        es, meta = None, read_metadata(directory)
    else:
        es = open_embeddings(directory, option="--from")
        meta = es.metadata
    scores_meta = meta.get("scores") or {}
    labels = scores_meta.get("labels")
    model = describe_embeddings(meta)["model"]
    if not scores_meta:
        raise UsageError(f"{directory}: the dataset has no scores (label activations); extract it with --scores, "
                         "or tag the audio files themselves")
    if not labels:
        raise UsageError(f"{directory}: the scores have no label names (model {model} has none), so they cannot "
                         "be tagged by name")
    keys = list(zip(es.roots, es.paths)) if es is not None else []
    means = es.matrix(np.arange(len(keys)), column="scores", width=len(labels)) if es is not None else None
    sep, group_title, name_title = label_style(labels)

    failures = [TagFailure(display_path(r["root"], r["path"]), r["stage"], r["reason"])
                for r in read_errors(directory).to_pylist()]
    failed, n_recorded = {f.path for f in failures}, len(failures)
    index = {k: i for i, k in enumerate(keys)}
    if found is None:  # the whole dataset
        wanted = [(i, display_path(*k)) for i, k in enumerate(keys)]
    else:  # the files found under the inputs now (a cached dataset may hold files deleted since)
        wanted = [(index.get(f.key), display_path(*f.key)) for f in found]
    tracks = []
    for i, where in wanted:
        if i is None or not np.isfinite(means[i]).all():  # no rows with scores
            if where not in failed:
                failures.append(TagFailure(where, "tag", f"no activations in {directory}"))
            continue
        tags, groups = top_tags(means[i].astype(np.float64), labels, top, threshold, sep)
        tracks.append(TrackTags(where, tags, groups))
    warnings = list(summary.warnings) if summary is not None and not shown else \
        [w for w in (summary.warnings if summary else []) if STALE_CACHE in w]
    return TagTable(tracks, failures, str(directory), model, group_title, name_title, top, threshold,
                    warnings + (es.notes if es else []), summary=summary,
                    failures_shown=n_recorded if shown and summary is not None else 0)

