"""maest probe: the MAEST paper's downstream evaluation (section 3.3) of a set of embeddings.

Labels and embeddings are joined (probe_data), a grid of MLP settings is trained on the train
split and compared on validation scores only (probe_train), and only the selected setting is
scored on the test split, once per seed. Results go to RESULTS_DIR/results.json (every grid
point, per-tag scores, how the embeddings were made) with the selected weights in
probe.safetensors; an interrupted grid resumes from RESULTS_DIR/.probe-state, one finished
grid point at a time. Results of other inputs already in RESULTS_DIR are never replaced
unless asked (`overwrite`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from maest_cli.datasets.layout import locate
from maest_cli.embed.extraction import extract
from maest_cli.embed.reading import EmbeddingSet, describe_embeddings, open_embeddings
from maest_cli.embed.spec import InferenceSpec
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import atomic_path, sha256_file, tool_versions, write_json
from maest_cli.mels.labels import SPLITS
from maest_cli.models.precision import resolve_device
from maest_cli.models.registry import load_registry
from maest_cli.probing.data import (
    DATASETS,
    MTG_TASKS,
    Annotations,
    Join,
    ProbeError,
    join_tracks,
    load_annotations,
)
from maest_cli.probing.downloaded import coverage, downloaded_part, embeddings_cache, empty_audio
from maest_cli.probing.fit import (
    ProbeConfig,
    ProbeData,
    Protocol,
    load_grid,
    logits_of,
    prepare_data,
    train_run,
)
from maest_cli.probing.metrics import MACRO_AVERAGE, evaluable, macro_scores
from maest_cli.probing.paper import paper_model_name, paper_rows

FORMAT = "maest-probe/1"
Log = Callable[[str], None]


def _tool_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("maest-cli")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------- grid search with resume

class GridState:
    """Finished grid points and seeds of an interrupted probe, kept in RESULTS_DIR/.probe-state
    so that a rerun with the same inputs skips them. The best weights so far are written first
    (best.safetensors), then state.json, which names them by checksum: a kill between the two
    leaves weights that state.json does not vouch for, and they are retrained, never trusted.

    A state of other inputs is refused (UsageError) unless `discard` (--fresh, --overwrite):
    it may be the only copy of hours of another run's grid."""

    def __init__(self, out: Path | None, fingerprint: str, resume: bool = True, discard: bool = False):
        self.dir = out / ".probe-state" if out else None
        self.fingerprint = fingerprint
        self.points: dict[str, dict] = {}
        self.seeds: dict[str, dict] = {}
        self.best_key: str | None = None
        self.best_state: dict | None = None
        self.best_sha256: str | None = None
        if not (self.dir and (self.dir / "state.json").is_file()):
            return
        try:
            saved = json.loads((self.dir / "state.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            saved = {}
        if saved.get("fingerprint") != fingerprint:
            if not discard and saved:
                raise UsageError(f"{self.dir}: an interrupted probe of other inputs (or another version of the tool) "
                                 f"is kept there; rerun it, or pass --fresh to discard it, or use another --out")
            return
        if not resume:
            return
        self.points = saved.get("points", {})
        self.seeds = saved.get("seeds", {})
        weights = self.dir / "best.safetensors"
        if saved.get("best_key") and weights.is_file() and sha256_file(weights) == saved.get("best_sha256"):
            from safetensors.torch import load_file

            self.best_key, self.best_sha256 = saved["best_key"], saved["best_sha256"]
            self.best_state = load_file(str(weights))

    def save(self, best_key: str | None = None, best_state: dict | None = None) -> None:
        if not self.dir:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if best_state is not None:
            from safetensors.torch import save_file

            with atomic_path(self.dir / "best.safetensors") as tmp:
                save_file({k: v.contiguous() for k, v in best_state.items()}, str(tmp))
                sha = sha256_file(tmp)
            self.best_key, self.best_state, self.best_sha256 = best_key, best_state, sha
        write_json(self.dir / "state.json", {"fingerprint": self.fingerprint, "best_key": self.best_key,
                                                    "best_sha256": self.best_sha256, "points": self.points,
                                                    "seeds": self.seeds})

    def clear(self) -> None:
        if self.dir and self.dir.is_dir():
            for f in self.dir.iterdir():
                f.unlink()
            self.dir.rmdir()


def _rank(point: dict, order: dict[str, int]) -> tuple:
    """Selection order: validation ROC-AUC, then validation PR-AUC, then the earlier grid point.
    A total order, so the choice does not depend on the order the runs were trained in."""
    roc, pr = point["val_roc_auc"], point.get("val_pr_auc")
    roc = roc if roc is not None and math.isfinite(roc) else -math.inf
    pr = pr if pr is not None and math.isfinite(pr) else -math.inf
    return roc, pr, -order[point["key"]]


def grid_search(data: ProbeData, configs: list[ProbeConfig], protocol: Protocol, device: torch.device,
                state: GridState, seed: int = 0, log: Log | None = None) -> tuple[list[dict], dict, dict]:
    """Every grid point's validation scores, the selected point and its weights.

    Each point is one independent run, saved to the state as soon as it ends. Selection reads
    validation scores only; the test split is not touched here at all."""
    order = {c.key(): i for i, c in enumerate(configs)}
    best_key, best_state = state.best_key, state.best_state
    if best_key not in order or best_state is None:  # resumed from another grid, or weights not vouched for
        best_key, best_state = None, None
    val = data.splits["validation"]
    for n, c in enumerate(configs, 1):
        if c.key() in state.points:
            continue
        t0 = time.perf_counter()
        r = train_run(data, c, seed, protocol, device)
        point = r.point()
        point["val_pr_auc"] = (macro_scores(val.y_np, logits_of(r.state, val.x))["pr_auc"]
                               if r.state is not None else float("nan"))
        state.points[c.key()] = point = _nan_to_none(point)
        if r.state is not None and (best_key is None or _rank(point, order) > _rank(state.points[best_key], order)):
            best_key, best_state = c.key(), r.state
            state.save(best_key, best_state)
        else:
            state.save()
        if log:
            log(f"[{n}/{len(configs)}] batch {c.batch_size} epochs {c.epochs} dropout {c.dropout:g} lr {c.lr:g}: "
                f"validation ROC-AUC {_fmt(point['val_roc_auc'])}"
                f"{' (diverged)' if point['diverged'] else ''} ({time.perf_counter() - t0:.0f} s)")
    points = [state.points[c.key()] for c in configs]
    chosen = max(points, key=lambda p: _rank(p, order))
    if not math.isfinite(_rank(chosen, order)[0]):
        raise ProbeError("every run of the grid diverged or gave no finite validation score "
                         "(try smaller learning rates)")
    if chosen["key"] != best_key or best_state is None:  # after a resume whose weights were not kept
        c = ProbeConfig(chosen["batch_size"], chosen["epochs"], chosen["dropout"], chosen["lr"])
        best_state = train_run(data, c, seed, protocol, device).state
    return points, chosen, best_state


def _fmt(v) -> str:
    return f"{v:.4f}" if v is not None and math.isfinite(v) else "n/a"


# ---------------------------------------------------------------- the whole probe

def run_extract(audio_root: Path, cache: Path, spec: InferenceSpec, options: dict | None, log: Log | None):
    """`maest extract` of AUDIO_ROOT into the cache folder with the paper's pooling (the mean over
    the track's segments); an existing cache is resumed, not redone. `options`: how extract runs
    (workers, batch_size, progress), never what it computes (that is `spec`)."""
    if not audio_root.is_dir():
        raise UsageError(f"--audio-root {audio_root}: no such directory")
    opts = {"workers": 1, "batch_size": 1, "progress": True}
    opts.update({k: v for k, v in (options or {}).items() if v is not None})
    if log:
        log(f"extracting {audio_root} -> {cache}")
    return extract([str(audio_root)], str(cache), spec.replace(pool="track"), overwrite=False, **opts)


def _fingerprint(*parts) -> str:
    """A digest of the inputs of a run; files (Path) count by name, size and modification time."""
    def plain(p):
        if isinstance(p, Path):
            st = os.stat(p)
            return [str(p), st.st_size, st.st_mtime_ns]
        if isinstance(p, (list, tuple)):
            return [plain(v) for v in p]
        return p

    blob = json.dumps(plain(list(parts)), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ProbeInputs:
    """What a probe reads: the labels, the embeddings, and how the two join."""

    dataset: str
    dataset_root: str
    split: int | None  # MTG-Jamendo's split-N (None: split-0 / not numbered)
    annotations: Annotations
    embeddings: EmbeddingSet
    join: Join
    extract_summary: object = None
    coverage: dict | None = None  # a downloaded dataset: which part of each split was probed
    empty_audio: list[str] = dataclasses.field(default_factory=list)  # zero-byte files, reported, not failures
    paper: dict | None = None  # the paper's rows for this model and dataset


def load_inputs(dataset: str, dataset_root: str | Path, *, embeddings: str | Path | None = None,
                audio_root: str | Path | None = None, split: int | None = None, out: Path | None = None,
                min_match: float = 0.5, spec: InferenceSpec | None = None, extract_options: dict | None = None,
                log: Log | None = None) -> ProbeInputs:
    """Labels of DATASET, the embeddings (extracted first from AUDIO_ROOT if given), their join."""
    if embeddings is None and audio_root is None:
        raise UsageError("give --embeddings DIR (from `maest extract`) or --audio-root DIR")
    ann = load_annotations(dataset, dataset_root, split=split)
    split = (split or 0) if dataset in MTG_TASKS else None  # one spelling of the default, for the fingerprint
    summary = None
    if audio_root is not None:
        cache = Path(embeddings) if embeddings else (out / "embeddings" if out else None)
        if cache is None:
            raise UsageError("--audio-root needs --out or --embeddings for the embeddings cache")
        summary = run_extract(Path(audio_root), cache, spec or InferenceSpec(), extract_options, log)
        embeddings = cache
        if log and _n_failed(summary):
            log(f"extract: {_n_failed(summary)} files failed (listed in {getattr(summary, 'errors_file', cache)}); "
                f"probing the others, the run will exit with code 1")
    emb = open_embeddings(embeddings)
    join = join_tracks(ann, emb, min_match=min_match)
    return ProbeInputs(dataset, str(dataset_root), split, ann, emb, join, summary)


def _locate(dataset: str, data_root: str | Path | None):
    """The downloaded copy of a probe dataset (custom has none: its labels are the user's)."""
    if dataset == "custom":
        raise UsageError("custom: give its label file (--dataset-root) and --embeddings or --audio-root; only "
                         f"{', '.join(d for d in DATASETS if d != 'custom')} can be downloaded")
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    return locate(dataset, data_root)


def load_downloaded(dataset: str, data_root: str | Path | None = None, *, split: int | None = None,
                    min_match: float = 0.5, spec: InferenceSpec | None = None, extract_options: dict | None = None,
                    log: Log | None = None, grid: str = "paper") -> ProbeInputs:
    """DATASET as `maest datasets download` left it under DATA_ROOT (default: $MAEST_DATA, else
    the user cache): its labels, its audio embedded into the dataset's own cache (resumed), the
    part of each split that was downloaded, and the paper's rows for the model (module
    probing.downloaded)."""
    located = _locate(dataset, data_root)
    spec = spec or InferenceSpec()
    registry = load_registry()
    cache = embeddings_cache(located, spec, registry)
    ann = load_annotations(dataset, located.annotations_root, split=split)
    split = (split or 0) if dataset in MTG_TASKS else None
    part = downloaded_part(ann, located.audio_root, located.coverage.parts if located.name == "mtg-jamendo" else None)
    if log:
        log(f"{dataset}: {located.root} ({located.coverage}); embeddings cache {cache}")
    summary = run_extract(located.audio_root, cache, spec, extract_options, log)
    empty = empty_audio(cache)
    if log and empty:
        log(f"{len(empty)} audio files are empty (0 bytes), left out as failed files: {', '.join(empty[:3])}"
            f"{', ...' if len(empty) > 3 else ''}")
    emb = open_embeddings(cache)
    join = join_tracks(part.annotations, emb, min_match=min_match)
    model = emb.metadata.get("model") if isinstance(emb.metadata.get("model"), dict) else {}
    paper = paper_rows(dataset, paper_model_name(spec.model, model.get("sha256"), registry), split, grid, spec)
    return ProbeInputs(dataset, str(located.annotations_root), split, part.annotations, emb, join, summary,
                       coverage=coverage(located, part, join, empty), empty_audio=empty, paper=paper)


def _n_failed(summary) -> int:
    """Files `extract` could not embed (its summary object, or a dict from a stand-in)."""
    if isinstance(summary, dict):
        return int(summary.get("n_failed", 0) or 0)
    return int(getattr(summary, "n_failed", 0) or 0)


def default_out(dataset: str, embeddings: str | Path | None, audio_root: str | Path | None) -> Path:
    """probe-DATASET-NAME, NAME the embeddings (or audio) folder's: probing two sets of
    embeddings on one dataset never writes both into one folder by default."""
    source = Path(embeddings or audio_root or "embeddings").resolve()
    name = source.stem if source.is_file() else source.name
    return Path(f"probe-{dataset}-{name or 'embeddings'}")


def downloaded_out(dataset: str, data_root: str | Path | None, spec: InferenceSpec) -> Path:
    """probe-DATASET-CACHE for a downloaded dataset, CACHE the embeddings folder's name (model
    and settings), so runs with two models never write into one folder by default."""
    located = _locate(dataset, data_root)
    return Path(f"probe-{dataset}-{embeddings_cache(located, spec, load_registry()).name}")


def probe(dataset: str, *, dataset_root: str | Path | None = None, embeddings: str | Path | None = None,
          audio_root: str | Path | None = None, data_root: str | Path | None = None, split: int | None = None,
          grid: str | None = None, seeds: int = 3, device: str = "auto", out: str | Path | None = None,
          threads: int | None = None, min_match: float = 0.5, resume: bool = True, overwrite: bool = False,
          spec: InferenceSpec | None = None, extract_options: dict | None = None, log: Log | None = None) -> dict:
    """Evaluate embeddings on DATASET with the paper's MLP probe; returns the results dict
    (also written to OUT/results.json with the selected weights in OUT/probe.safetensors).

    With none of `dataset_root`, `embeddings`, `audio_root`: the dataset as `maest datasets
    download` left it under `data_root` (`load_downloaded`), embedded with `spec`, the paper's
    grid by default, its Table 4 rows in results["paper"]. Else the labels under `dataset_root`
    and `embeddings` (or `audio_root`, extracted first), grid "quick" by default.

    `split`: MTG-Jamendo's split-N (default 0; refused for the other datasets). OUT holding
    the results of other inputs is a UsageError unless `overwrite`. results["extract_failed"]
    counts the files extraction could not embed (the CLI then exits 1; empty files of a
    downloaded dataset are listed in results["empty_audio"] instead). `spec`: the embeddings
    extraction makes (default: InferenceSpec() on `device`); rows are always pooled per track;
    `extract_options`: workers, batch_size, progress."""
    t_start = time.perf_counter()
    if seeds < 1:
        raise UsageError("--seeds must be >= 1")
    if not 0 <= min_match <= 1:
        raise UsageError("--min-match must be between 0 and 1")
    downloaded = dataset_root is None and embeddings is None and audio_root is None
    if not downloaded and data_root is not None:
        raise UsageError("--data-root finds a downloaded dataset: give it alone, not with --dataset-root, "
                         "--embeddings or --audio-root")
    if not downloaded and dataset_root is None:
        raise UsageError("--dataset-root is required with --embeddings or --audio-root (or give none of the "
                         "three to probe the dataset `maest datasets download` fetched)")
    out = Path(out) if out else None
    grid_name, protocol, configs = load_grid(grid or ("paper" if downloaded else "quick"))
    spec = spec or InferenceSpec(device=device)
    if downloaded:
        inputs = load_downloaded(dataset, data_root, split=split, min_match=min_match, spec=spec,
                                 extract_options=extract_options, log=log, grid=grid_name)
    else:
        inputs = load_inputs(dataset, dataset_root, embeddings=embeddings, audio_root=audio_root, split=split,
                             out=out, min_match=min_match, spec=spec, extract_options=extract_options, log=log)
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)  # restored on the way out: the caller's process is not ours
    try:
        return evaluate(inputs, grid_name, protocol, configs, seeds=seeds, device=device, out=out, resume=resume,
                        overwrite=overwrite, log=log, t_start=t_start)
    finally:
        torch.set_num_threads(threads_before)


def evaluate(inputs: ProbeInputs, grid_name: str, protocol: Protocol, configs: list[ProbeConfig], *,
             seeds: int = 3, device: str = "auto", out: Path | None = None, resume: bool = True,
             overwrite: bool = False, log: Log | None = None, t_start: float | None = None) -> dict:
    """Grid search on validation, then the selected setting on test for each seed; the results."""
    t_start = time.perf_counter() if t_start is None else t_start
    ann, emb = inputs.annotations, inputs.embeddings
    dev = resolve_device(device)
    data = prepare_data(ann, emb, inputs.join, dev)
    notes = ann.notes + emb.notes + data.notes
    if log:
        jr = inputs.join.report()
        log(f"{inputs.dataset}: {len(data.tags)} tags; tracks train {len(data.splits['train'])}, validation "
            f"{len(data.splits['validation'])}, test {len(data.splits['test'])}; "
            f"{jr['labelled_without_embedding']} labelled tracks without embedding, "
            f"{jr['embeddings_without_label']} embeddings without label")
        for note in notes:
            log(f"note: {note}")
    fingerprint = _fingerprint(FORMAT, _tool_version(), inputs.dataset, inputs.split, [Path(p) for p in ann.source],
                               [Path(f) for f in emb.files], protocol.to_dict(), dev.type, torch.__version__)
    results_fingerprint = _fingerprint(fingerprint, [c.key() for c in configs], seeds)
    if out:
        check_out(out, results_fingerprint, overwrite)
    state = GridState(out, fingerprint, resume, discard=overwrite or not resume)
    if log and (state.points or state.seeds):
        log(f"resuming: {len(state.points)} grid points and {len(state.seeds)} seeds already done")
    t_grid = time.perf_counter()
    points, chosen, best_state = grid_search(data, configs, protocol, dev, state, seed=0, log=log)
    t_seeds = time.perf_counter()
    selected = ProbeConfig(chosen["batch_size"], chosen["epochs"], chosen["dropout"], chosen["lr"])
    if log:
        log(f"selected {selected.key()} (validation ROC-AUC {_fmt(chosen['val_roc_auc'])}); testing "
            f"{seeds} seed{'s' if seeds > 1 else ''}")
    per_seed = score_seeds(data, selected, chosen, best_state, seeds, protocol, dev, state, log)
    timing = {"load": round(t_grid - t_start, 2), "grid": round(t_seeds - t_grid, 2),
              "seeds": round(time.perf_counter() - t_seeds, 2), "total": round(time.perf_counter() - t_start, 2)}
    results = _results(inputs, data, notes, grid_name, protocol, configs, points, chosen, per_seed, dev, timing)
    results["fingerprint"] = results_fingerprint
    if out:
        write_outputs(out, results, best_state, data)
        state.clear()
        if log:
            log(f"wrote {out / 'results.json'} and {out / 'probe.safetensors'}")
    return results


def score_seeds(data: ProbeData, selected: ProbeConfig, chosen: dict, best_state: dict, seeds: int,
                protocol: Protocol, device: torch.device, state: GridState, log: Log | None) -> list[dict]:
    """The selected setting trained with seeds 0..N-1 (seed 0 is the grid's run), each scored on
    the test split: the only place the test labels are read."""
    test = data.splits["test"]
    records = []
    for seed in range(seeds):
        rec = state.seeds.get(str(seed))
        if rec is None or rec.get("config") != selected.key():
            if seed == 0:
                st, val_auc, epoch = best_state, chosen["val_roc_auc"], chosen["best_epoch"]
            else:
                r = train_run(data, selected, seed, protocol, device)
                st, val_auc, epoch = r.state, r.val_roc_auc, r.best_epoch
            rec = {"seed": seed, "config": selected.key(), "val_roc_auc": val_auc, "best_epoch": epoch,
                   "test_roc_auc": None, "test_pr_auc": None, "per_tag_roc_auc": None, "per_tag_pr_auc": None}
            if st is not None:
                m = macro_scores(test.y_np, logits_of(st, test.x))
                rec.update(test_roc_auc=m["roc_auc"], test_pr_auc=m["pr_auc"],
                           per_tag_roc_auc=m["per_tag_roc_auc"].tolist(), per_tag_pr_auc=m["per_tag_pr_auc"].tolist())
            state.seeds[str(seed)] = rec = _nan_to_none(rec)
            state.save()
        records.append(rec)
        if log and seed > 0:
            log(f"seed {seed}: test ROC-AUC {_fmt(rec['test_roc_auc'])}, PR-AUC {_fmt(rec['test_pr_auc'])}")
    if all(r["test_roc_auc"] is None for r in records):
        raise ProbeError(f"the selected setting {selected.key()} diverged for every seed")
    return records


def _results(inputs: ProbeInputs, data: ProbeData, notes: list[str], grid_name: str, protocol: Protocol,
             configs: list[ProbeConfig], points: list[dict], chosen: dict, per_seed: list[dict],
             dev: torch.device, timing: dict) -> dict:
    """Everything a reader needs to trust and reproduce the figures, as plain JSON."""
    emb = inputs.embeddings
    ys = {s: data.splits[s].y_np for s in SPLITS}
    tested = [r for r in per_seed if r["test_roc_auc"] is not None]
    roc = np.asarray([[np.nan if v is None else v for v in r["per_tag_roc_auc"]] for r in tested], float)
    ap = np.asarray([[np.nan if v is None else v for v in r["per_tag_pr_auc"]] for r in tested], float)
    results = {
        "format": FORMAT,
        "maest_cli_version": _tool_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset": {"name": inputs.dataset, "root": inputs.dataset_root,
                    "split": inputs.split,
                    "files": inputs.annotations.source, "label_files": inputs.annotations.files,
                    "n_tags": len(data.tags),
                    "tracks": {s: len(data.splits[s]) for s in SPLITS}, "join": inputs.join.report(),
                    "coverage": inputs.coverage,
                    "notes": notes},
        "embeddings": {"dir": emb.directory, "dim": data.dim, "rows": emb.n_rows, "tracks": len(emb.paths),
                       "segment_rows_averaged": emb.segment_rows, "metadata": emb.metadata,
                       "extract": _summary_dict(inputs.extract_summary)},
        "extract_failed": max(0, _n_failed(inputs.extract_summary) - len(inputs.empty_audio)),
        "empty_audio": inputs.empty_audio,
        "paper": inputs.paper,
        **describe_embeddings(emb.metadata),
        "protocol": {**protocol.to_dict(), "optimizer": "AdamW(lr=max_lr, weight_decay)", "loss": "binary cross-entropy",
                     "lr_schedule": "per epoch: exp warm-up exp(-5(1-e/warmup)^2) (e >= 0.5), hold_epochs at max_lr, "
                                    "then linear to lr_last_factor * max_lr at the end of the run (authors' "
                                    "ex_tl.py: exp_warmup_linear_down, hold 0)",
                     "selection": "validation macro ROC-AUC (best epoch per run, best run per grid)",
                     "standardisation": "train-split mean and std", "macro_average": MACRO_AVERAGE},
        "grid": {"name": grid_name, "n_points": len(configs), "points": points},
        "selected": {**ProbeConfig(chosen["batch_size"], chosen["epochs"], chosen["dropout"], chosen["lr"]).to_dict(),
                     "key": chosen["key"], "val_roc_auc": chosen["val_roc_auc"],
                     "val_pr_auc": chosen.get("val_pr_auc"), "best_epoch": chosen["best_epoch"]},
        "seeds": [{k: v for k, v in r.items() if not k.startswith("per_tag")} for r in per_seed],
        "test": {"roc_auc": _mean_std([r["test_roc_auc"] for r in tested]),
                 "pr_auc": _mean_std([r["test_pr_auc"] for r in tested]),
                 "n_seeds": len(tested), "std": "sample standard deviation over seeds (ddof=1)",
                 "macro_average": MACRO_AVERAGE},
        "excluded_tags": {s: [t for t, ok in zip(data.tags, evaluable(ys[s])) if not ok]
                          for s in ("validation", "test")},
        "per_tag": [{"tag": t, **{f"n_positive_{s}": int(ys[s][:, c].sum()) for s in SPLITS},
                     "test_roc_auc": _nanmean_or_none(roc[:, c]), "test_pr_auc": _nanmean_or_none(ap[:, c])}
                    for c, t in enumerate(data.tags)],
        "environment": {"device": str(dev), "threads": torch.get_num_threads(), "machine": platform.machine(),
                        **tool_versions()},
        "timing_s": timing,
    }
    results["excluded_tags"]["reason"] = ("all-0 or all-1 in that split: no ROC curve, so left out of both macro "
                                          "averages (ROC-AUC and PR-AUC) of that split")
    return _nan_to_none(results)


def _mean_std(v) -> dict:
    v = np.asarray(v, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "values": v.tolist()}


def _nanmean_or_none(v: np.ndarray):
    v = v[np.isfinite(v)]
    return float(v.mean()) if len(v) else None


def _nan_to_none(obj):
    """JSON has no NaN: write null instead."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_nan_to_none(v) for v in obj]
    if isinstance(obj, np.generic):
        return _nan_to_none(obj.item())
    return obj


def _summary_dict(summary):
    if summary is None:
        return None
    if isinstance(summary, dict):
        return json.loads(json.dumps(summary, default=str))
    if dataclasses.is_dataclass(summary):
        return json.loads(json.dumps(dataclasses.asdict(summary), default=str))
    return str(summary)


# ---------------------------------------------------------------- outputs

def check_out(out: Path, fingerprint: str, overwrite: bool = False) -> None:
    """Refuse to replace OUT/results.json made from other inputs (another embeddings folder,
    dataset, grid or seeds) unless `overwrite`: it may be the only copy of an earlier probe.
    The same inputs give the same results, so those are simply made again."""
    f = out / "results.json"
    if overwrite or not f.is_file():
        return
    try:
        old = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        old = None
    if isinstance(old, dict) and old.get("fingerprint") == fingerprint:
        return
    what = ""
    if isinstance(old, dict) and isinstance(old.get("dataset"), dict):
        what = (f" ({old['dataset'].get('name')} on {(old.get('embeddings') or {}).get('dir')}, "
                f"grid {(old.get('grid') or {}).get('name')})")
    raise UsageError(f"{f}: holds the results of another probe{what}, made from other inputs, grid, seeds or "
                     f"tool version; pass --overwrite to replace them, or choose another --out")


def write_outputs(out: Path, results: dict, state: dict, data: ProbeData) -> None:
    """probe.safetensors (weights + tags + standardisation), then results.json naming the
    weights by checksum, each atomically: a kill between the two leaves a results.json whose
    `weights_sha256` does not match, never a silent mix."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tensors["standardize.mean"] = torch.from_numpy(data.mean.astype(np.float32))
    tensors["standardize.std"] = torch.from_numpy(data.std.astype(np.float32))
    meta = {"format": FORMAT, "tags": json.dumps(data.tags), "config": json.dumps(results["selected"]),
            "protocol": json.dumps(results["protocol"]), "dataset": results["dataset"]["name"],
            "embeddings": json.dumps({k: results[k] for k in ("model", "block", "tokens", "preset")}),
            "maest_cli_version": _tool_version(), "fingerprint": results.get("fingerprint", "")}
    with atomic_path(out / "probe.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        results["weights_sha256"] = sha256_file(tmp)
    write_json(out / "results.json", results)


@dataclass
class TrainedProbe:
    """A saved probe, ready to tag new embeddings of the same kind."""

    tags: list[str]
    state: dict[str, torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor
    metadata: dict

    def predict(self, embeddings: np.ndarray) -> np.ndarray:
        """[n, D] raw embeddings -> [n, tags] probabilities."""
        x = (torch.as_tensor(np.asarray(embeddings, np.float32)) - self.mean) / self.std
        return 1 / (1 + np.exp(-logits_of(self.state, x)))


def load_probe(path: str | Path) -> TrainedProbe:
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "probe.safetensors"
    if not p.is_file():
        raise UsageError(f"{p}: no such probe file")
    with safe_open(str(p), framework="pt") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise UsageError(f"{p}: not a `maest probe` weights file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mean, std = tensors.pop("standardize.mean"), tensors.pop("standardize.std")
    return TrainedProbe(json.loads(meta["tags"]), tensors, mean, std, meta)
