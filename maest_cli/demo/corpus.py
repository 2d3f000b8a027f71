"""`maest corpus`: a tagged music corpus made offline, from the scores inside the music21 package.

One command renders thousands of 30 s clips with FluidSynth (corpus_render.py) from the
collections in configs/corpus.toml, labels them, and writes them ready for the other commands:
`prepare-mels`/`train` on OUT/pretrain (style, composer and instrument tags) and `extract` +
`probe custom` on OUT/downstream (mode, tempo, meter, ensemble size: tags pre-training never
saw, on pieces it never heard).

The build runs in four steps, each resumable, all decided by the seed:
1. candidates: every piece of every collection (a file, or one tune of a many-tune ABC file),
   in an order shuffled by the seed; each collection's share of the clips (its weight) says how
   many pieces it needs and how many renders each gets.
2. read: music21 reads candidates in that order until the collection has its pieces; a piece it
   cannot use (unreadable, too short) is replaced by the next. Each read piece is kept as a note
   table in OUT/_work/pieces, so a killed build never reads it again.
3. plan: split groups (a piece; a Palestrina mass; a chorale and its variants) go to
   pre-training or downstream, then to train/validation/test, per collection; every clip's
   render is drawn (corpus_render.draw_render) from the seed and the clip's name.
4. render: worker processes play each clip (MIDI -> fluidsynth -> 16-bit FLAC, atomic) and
   label it from its notes; each finished clip is one fsynced line in OUT/_work/rendered.jsonl.
   A rerun after a kill skips what that journal and the disk both hold.
Then the label files, clips.tsv, pieces.tsv, README.md and, last, manifest.json are written.
The same seed and versions (music21, fluidsynth, soundfont) give the same clips, labels and
audio bytes.
"""

from __future__ import annotations

import datetime
import fnmatch
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maest_cli.demo.render import (
    INSTRUMENTS,
    FluidSynthRenderer,
    RenderParams,
    clip_notes,
    draw_render,
    finish_audio,
    midi_file,
)
from maest_cli.demo.scores import (
    KEY_METHOD,
    Piece,
    UnusablePiece,
    abc_tunes,
    dominant_meter,
    ensemble_size,
    meter_class,
    mode_of,
    read_piece,
    tempo_class,
)
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file, tool_versions, write_atomic, write_json
from maest_cli.io.config import ConfigError, read_toml
from maest_cli.io.workers import TaskDied, WorkerPool, WorkersDied

FORMAT = "maest-corpus/1"
MANIFEST = "manifest.json"
WORK_DIR = "_work"
POOLS = ("pretrain", "downstream")
SPLITS = ("train", "validation", "test")
FORMAT_PREFERENCE = (".mxl", ".xml", ".musicxml", ".krn", ".abc")
GROUP_RULES = ("piece", "stem", "humdrum-work")
# Downstream tasks: the first four are never pre-training tags; instrument and style are, on
# pieces pre-training never heard (how far the pre-training tags generalise).
TASKS = {"mode": "major or minor (music21 key analysis of the notes in the clip)",
         "tempo": "slow, medium or fast (beats per minute of the render)",
         "meter": "duple, triple or compound (the time signature of the excerpt)",
         "ensemble": "solo, duo, trio, quartet or larger (parts sounding in the clip)",
         "instrument": "the instruments sounding (multi-label; also a pre-training tag)",
         "style": "the collection (also a pre-training tag)"}
NEW_TASKS = ("mode", "tempo", "meter", "ensemble")
MIN_TAG_TRAIN_CLIPS = 10  # rarer tags leave the label files (listed in the manifest's dropped_tags)
Log = Callable[[str], None]


# ---------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Collection:
    id: str
    title: str
    root: str  # "music21" or a folder
    files: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    group: str = "piece"
    era: str = ""
    composer: str = ""  # "", a name, or "from-folder"
    weight: float = 1.0
    source: str = ""
    licence: str = ""


@dataclass(frozen=True)
class CorpusConfig:
    clips: int
    clip_seconds: float
    sample_rate: int
    min_renders: int
    max_renders: int
    downstream_fraction: float
    pretrain_validation: float
    pretrain_test: float
    downstream_validation: float
    downstream_test: float
    collections: tuple[Collection, ...]
    path: str = ""

    def to_json(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)


def music21_corpus_dir() -> Path:
    try:
        import music21
    except ImportError:
        raise UsageError("the corpus is made from the music21 package: pip install 'maest-cli[corpus]' "
                         "(or pip install music21)") from None
    return Path(music21.__file__).parent / "corpus"


def load_corpus_config(path: str | os.PathLike | None = None, *, clips: int | None = None,
                       sample_rate: int | None = None, collections: Iterable[str] | None = None) -> CorpusConfig:
    """configs/corpus.toml (or `path`), validated; options given here replace the file's."""

    name = str(path) if path else "corpus.toml"
    raw = read_toml(name)
    where = str(path or "configs/corpus.toml")
    base = Path(path).resolve().parent if path and Path(path).is_file() else None
    top = raw.get("corpus", {})
    known = {"clips", "clip_seconds", "sample_rate", "min_renders", "max_renders", "downstream_fraction",
             "pretrain_validation", "pretrain_test", "downstream_validation", "downstream_test"}
    unknown = sorted(set(top) - known)
    if unknown:
        raise ConfigError(f"{where}: [corpus] has unknown keys {', '.join(unknown)}")
    fields = {"id", "title", "root", "files", "exclude", "group", "era", "composer", "weight", "source", "licence"}
    cols = []
    for i, c in enumerate(raw.get("collection", [])):
        bad = sorted(set(c) - fields)
        if bad or not c.get("id") or not c.get("files"):
            raise ConfigError(f"{where}: collection {i + 1} ({c.get('id', '?')}): "
                              + (f"unknown keys {', '.join(bad)}" if bad else "needs id and files"))
        if c.get("group", "piece") not in GROUP_RULES:
            raise ConfigError(f"{where}: collection {c['id']}: group {c['group']!r}, expected one of "
                              f"{', '.join(GROUP_RULES)}")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", c["id"]):
            raise ConfigError(f"{where}: collection id {c['id']!r}: lower-case letters, digits and '-' only")
        root = str(c.get("root", "music21"))
        if root != "music21" and not Path(root).is_absolute() and base is not None:
            root = str(base / root)
        cols.append(Collection(c["id"], c.get("title", c["id"]), root, tuple(c["files"]), tuple(c.get("exclude", ())),
                               c.get("group", "piece"), c.get("era", ""), c.get("composer", ""),
                               float(c.get("weight", 1.0)), c.get("source", ""), c.get("licence", "")))
    if len({c.id for c in cols}) != len(cols):
        raise ConfigError(f"{where}: two collections with the same id")
    if collections is not None:
        wanted = [w for w in collections if w]
        missing = [w for w in wanted if w not in {c.id for c in cols}]
        if missing:
            raise UsageError(f"--collections: unknown {', '.join(missing)} (known: {', '.join(c.id for c in cols)})")
        cols = [c for c in cols if c.id in wanted]
    if not cols:
        raise ConfigError(f"{where}: no collections")
    cfg = CorpusConfig(
        clips=int(clips if clips is not None else top.get("clips", 3600)),
        clip_seconds=float(top.get("clip_seconds", 30.0)),
        sample_rate=int(sample_rate if sample_rate is not None else top.get("sample_rate", 22050)),
        min_renders=int(top.get("min_renders", 2)), max_renders=int(top.get("max_renders", 12)),
        downstream_fraction=float(top.get("downstream_fraction", 0.3)),
        pretrain_validation=float(top.get("pretrain_validation", 0.15)),
        pretrain_test=float(top.get("pretrain_test", 0.15)),
        downstream_validation=float(top.get("downstream_validation", 0.2)),
        downstream_test=float(top.get("downstream_test", 0.2)),
        collections=tuple(cols), path=where)
    _check_config(cfg)
    return cfg


def _check_config(cfg: CorpusConfig) -> None:
    if cfg.clips < 1:
        raise UsageError(f"--clips {cfg.clips}: expected 1 or more")
    if not 8000 <= cfg.sample_rate <= 48000:
        raise UsageError(f"--sample-rate {cfg.sample_rate}: expected 8000 to 48000 Hz")
    if not 1.0 <= cfg.clip_seconds <= 600.0:
        raise UsageError(f"clip_seconds {cfg.clip_seconds}: expected 1 to 600")
    if not 1 <= cfg.min_renders <= cfg.max_renders:
        raise UsageError(f"renders per piece: expected 1 <= min_renders ({cfg.min_renders}) <= max_renders "
                         f"({cfg.max_renders})")
    for name in ("downstream_fraction", "pretrain_validation", "pretrain_test", "downstream_validation",
                 "downstream_test"):
        if not 0.0 <= getattr(cfg, name) < 1.0:
            raise UsageError(f"{name} {getattr(cfg, name)}: expected a fraction in [0, 1)")
    for pool in POOLS:
        if getattr(cfg, f"{pool}_validation") + getattr(cfg, f"{pool}_test") >= 1.0:
            raise UsageError(f"{pool}_validation + {pool}_test must leave a training split (sum < 1)")
    if any(c.weight <= 0 for c in cfg.collections):
        raise UsageError("collection weights must be positive")


# ---------------------------------------------------------------- candidates

@dataclass(frozen=True)
class Source:
    """One piece before it is read."""

    piece_id: str  # "<collection>/<name>", unique; also the audio file's stem
    collection: str
    path: str  # relative to the collection's root
    tune: str = ""  # the ABC X: number inside a many-tune file
    group: str = ""  # what stays in one split


def collection_root(col: Collection) -> Path:
    return music21_corpus_dir() if col.root == "music21" else Path(col.root)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.") or "piece"


def _humdrum_work(path: Path) -> str:
    """The !!!OPR (parent work) record of a Humdrum file: a Palestrina movement's mass."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("!!!OPR:"):
                    return line.split(":", 1)[1].strip()
                if not line.startswith("!"):
                    break
    except OSError:
        pass
    return ""


def find_sources(col: Collection) -> list[Source]:
    """Every candidate piece of a collection, sorted by path (and tune number)."""
    root = collection_root(col)
    if not root.is_dir():
        raise UsageError(f"collection {col.id}: {root} is not a folder")
    files: set[str] = set()
    for pattern in col.files:
        files.update(p.relative_to(root).as_posix() for p in root.glob(pattern) if p.is_file())
    files = {f for f in files if not any(fnmatch.fnmatch(f, x) for x in col.exclude)}
    by_stem: dict[str, list[str]] = defaultdict(list)
    for f in files:
        stem, ext = os.path.splitext(f)
        if ext.lower() in FORMAT_PREFERENCE:
            by_stem[stem].append(f)
    chosen = sorted(min(fs, key=lambda f: FORMAT_PREFERENCE.index(os.path.splitext(f)[1].lower()))
                    for fs in by_stem.values())
    sources: list[Source] = []
    names: Counter = Counter()
    for f in chosen:
        stem = os.path.splitext(f)[0]
        flat = _safe_name(stem.split("/", 1)[1] if "/" in stem and col.root == "music21" else stem)
        if f.lower().endswith(".abc"):

            tunes = abc_tunes((root / f).read_text(encoding="utf-8", errors="replace"))
            entries = [(x, f"{flat}-x{x}") for x, _ in tunes] if len(tunes) > 1 else [("", flat)]
        else:
            entries = [("", flat)]
        for tune, name in entries:
            names[name] += 1
            unique = name if names[name] == 1 else f"{name}-{names[name]}"
            piece_id = f"{col.id}/{unique}"
            if col.group == "stem":
                group = f"{col.id}/{_safe_name(os.path.basename(stem).split('-', 1)[0])}"
            elif col.group == "humdrum-work":
                work = _humdrum_work(root / f)
                group = f"{col.id}/{_safe_name(work)}" if work else piece_id
            else:
                group = piece_id
            sources.append(Source(piece_id, col.id, f, tune, group))
    return sources


def _rng(seed: int, *names: str) -> np.random.Generator:
    digest = hashlib.sha256(":".join([str(seed), *names]).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def shuffled(sources: list[Source], seed: int, collection: str) -> list[Source]:
    """The order in which a collection's candidates are tried: a permutation from the seed."""
    order = _rng(seed, "candidates", collection).permutation(len(sources))
    return [sources[i] for i in order]


def allocate(clips: int, weights: dict[str, float], candidates: dict[str, int], min_renders: int,
             max_renders: int) -> dict[str, tuple[int, int]]:
    """(clips, pieces) per collection: clips by weight (largest remainder, summing to `clips`);
    pieces so that each gets between min_renders and max_renders renders where the collection
    has candidates enough (a small collection gives more excerpts of each piece)."""
    total = sum(weights.values())
    exact = {c: clips * w / total for c, w in weights.items()}
    quota = {c: int(math.floor(v)) for c, v in exact.items()}
    for c in sorted(exact, key=lambda c: (-(exact[c] - quota[c]), c))[:clips - sum(quota.values())]:
        quota[c] += 1
    out = {}
    for c, q in quota.items():
        n = candidates[c]
        if q == 0 or n == 0:
            out[c] = (q, 0)
            continue
        renders = min(max_renders, max(min_renders, math.ceil(q / n)))
        out[c] = (q, min(n, max(1, math.ceil(q / renders))))
    return out


# ---------------------------------------------------------------- splits

def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int]:
    """How many of n groups each name gets: largest remainder, and at least one for every name
    with a fraction > 0 when n allows (a collection must be in every split)."""
    exact = {k: n * f for k, f in fractions.items()}
    counts = {k: int(math.floor(v)) for k, v in exact.items()}
    order = sorted(exact, key=lambda k: (-(exact[k] - counts[k]), list(fractions).index(k)))
    for k in order[:n - sum(counts.values())]:
        counts[k] += 1
    wanted = [k for k, f in fractions.items() if f > 0]
    if n >= len(wanted):
        for k in wanted:
            if counts[k] == 0:
                donor = max(counts, key=lambda d: (counts[d], -list(fractions).index(d)))
                counts[donor] -= 1
                counts[k] += 1
    return counts


def assign_groups(groups: list[str], fractions: dict[str, float], rng: np.random.Generator) -> dict[str, str]:
    """Each group to one name (pool or split), in the proportions asked, by a seeded shuffle."""
    order = [groups[i] for i in rng.permutation(len(groups))]
    counts = split_counts(len(order), fractions)
    out, k = {}, 0
    for name, c in counts.items():
        for g in order[k:k + c]:
            out[g] = name
        k += c
    return out


def assign_splits(sources: list[Source], cfg: CorpusConfig, seed: int) -> dict[str, tuple[str, str]]:
    """(pool, split) of every group, per collection so that each collection is in every split;
    no group (and so no piece) is in two."""
    out: dict[str, tuple[str, str]] = {}
    by_col: dict[str, list[str]] = defaultdict(list)
    for s in sources:
        if s.group not in by_col[s.collection]:
            by_col[s.collection].append(s.group)
    for col, groups in by_col.items():
        groups = sorted(groups)
        pools = assign_groups(groups, {"pretrain": 1 - cfg.downstream_fraction, "downstream": cfg.downstream_fraction},
                              _rng(seed, "pool", col))
        for pool in POOLS:
            members = sorted(g for g in groups if pools[g] == pool)
            val, test = getattr(cfg, f"{pool}_validation"), getattr(cfg, f"{pool}_test")
            splits = assign_groups(members, {"train": 1 - val - test, "validation": val, "test": test},
                                   _rng(seed, "split", pool, col))
            out.update({g: (pool, splits[g]) for g in members})
    return out


# ---------------------------------------------------------------- the plan

@dataclass(frozen=True)
class PlannedClip:
    clip_id: str
    path: str  # relative to OUT: <pool>/audio/<collection>/<name>-r<k>.flac
    pool: str
    split: str
    collection: str
    group: str
    params: RenderParams


def plan_clips(sources: list[Source], pieces: dict[str, Piece], quotas: dict[str, int], cfg: CorpusConfig,
               seed: int) -> list[PlannedClip]:
    """Every clip of the corpus from the read pieces (in candidate order per collection): the
    collection's clips spread over its pieces (the first ones get one more when it does not
    divide), each with its split and its drawn render."""
    splits = assign_splits(sources, cfg, seed)
    by_col: dict[str, list[Source]] = defaultdict(list)
    for s in sources:
        by_col[s.collection].append(s)
    clips = []
    for col in cfg.collections:
        members = by_col.get(col.id, [])
        q = quotas.get(col.id, 0)
        if not members:
            continue
        for i, s in enumerate(members):
            renders = q // len(members) + (1 if i < q % len(members) else 0)
            pool, split = splits[s.group]
            for k in range(renders):
                clip_id = f"{s.piece_id}-r{k}"
                params = draw_render(pieces[s.piece_id], clip_id, seed, cfg.clip_seconds)
                clips.append(PlannedClip(clip_id, f"{pool}/audio/{clip_id}.flac", pool, split, col.id, s.group, params))
    return sorted(clips, key=lambda c: c.clip_id)


# ---------------------------------------------------------------- worker jobs (top level: picklable)

def read_job(root: str, path: str, piece_id: str, tune: str) -> dict:
    """Read one candidate: {"status": "ok", "piece": ...} or {"status": "unusable", "reason": ...}."""
    try:
        piece = read_piece(Path(root) / path, piece_id, tune)
    except UnusablePiece as e:
        return {"status": "unusable", "reason": str(e)}
    return {"status": "ok", "piece": piece.to_json()}


@functools.lru_cache(maxsize=16)
def _load_piece(path: str) -> Piece:
    return Piece.from_json(json.loads(Path(path).read_text(encoding="utf-8"))["piece"])


def render_job(piece_file: str, out_file: str, params_json: dict, sample_rate: int, renderer) -> dict:
    """Play one clip, write its FLAC atomically, and label it from its notes."""
    import soundfile as sf

    t0 = time.perf_counter()
    piece = _load_piece(piece_file)
    params = RenderParams.from_json(params_json)
    notes = clip_notes(piece, params)
    sounding = [i for i, p in enumerate(notes.parts) if len(p)]
    if not sounding:
        raise UnusablePiece(f"{params.clip_id}: no note in the excerpt")
    allnotes = np.concatenate([notes.parts[i] for i in sounding])
    mode, key, corr = mode_of(allnotes[:, 2] - params.transpose, allnotes[:, 3])
    ratio = dominant_meter(piece.meters, notes.start_ql, notes.end_ql, notes.period_ql)
    midi = midi_file(notes, params)
    stereo = renderer.render(midi, params)
    pcm, stats = finish_audio(stereo, params, sample_rate)
    buf = io.BytesIO()
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    data = buf.getvalue()
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_file, data)
    instruments = sorted({params.instruments[i] for i in sounding})
    return {"clip_id": params.clip_id, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "mode": mode, "key": key, "key_correlation": corr, "time_signature": ratio,
            "meter": meter_class(ratio) if ratio else None,
            "tempo": tempo_class(params.beat_bpm), "parts_sounding": len(sounding),
            "ensemble_size": ensemble_size(len(sounding)), "instruments": instruments,
            "families": sorted({INSTRUMENTS[n].family for n in instruments}), "notes": int(len(allnotes)),
            **stats, "render_seconds": round(time.perf_counter() - t0, 3)}


# ---------------------------------------------------------------- running jobs

def _pool(workers: int) -> WorkerPool:
    """Jobs in worker processes under the crash policy of every pool (io/workers.py), or in this
    process when workers == 1 (tests, debugging)."""
    return WorkerPool(workers if workers > 1 else 0, role="corpus worker")


def _wait_any(futures: set):
    from concurrent.futures import FIRST_COMPLETED, wait

    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    return done


# ---------------------------------------------------------------- the build

def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _piece_file(work: Path, piece_id: str) -> Path:
    return work / "pieces" / f"{piece_id}.json"


def read_pieces(ordered: dict[str, list[Source]], needed: dict[str, int], roots: dict[str, str], work: Path,
                pool: WorkerPool, log: Log) -> tuple[dict[str, list[Source]], dict[str, dict]]:
    """The first `needed[c]` usable candidates of each collection, in candidate order, reading
    (in parallel) only as many as that takes; results are kept in work/pieces. Returns the
    chosen sources and the status of every candidate read. A score that kills its reader is
    unusable (and not kept: a rerun reads it again)."""
    status: dict[str, dict] = {}
    nxt = {c: 0 for c in ordered}
    good: dict[str, list[int]] = {c: [] for c in ordered}
    outstanding: dict[str, int] = {c: 0 for c in ordered}
    running: dict = {}
    t0, last = time.monotonic(), 0.0

    def settle(col: str, idx: int, result: dict) -> None:
        status[ordered[col][idx].piece_id] = {k: v for k, v in result.items() if k != "piece"}
        if result["status"] == "ok":
            good[col].append(idx)

    def fill(col: str) -> None:
        while len(good[col]) + outstanding[col] < needed[col] and nxt[col] < len(ordered[col]):
            idx = nxt[col]
            nxt[col] += 1
            src = ordered[col][idx]
            cached = _piece_file(work, src.piece_id)
            if cached.is_file():
                try:
                    settle(col, idx, json.loads(cached.read_text(encoding="utf-8")))
                    continue
                except (OSError, json.JSONDecodeError, KeyError):
                    pass  # torn or foreign: read it again
            outstanding[col] += 1
            running[pool.submit_task(read_job, (roots[col], src.path, src.piece_id, src.tune), label=src.path,
                                     doing="while reading this score")] = (col, idx)

    for col in ordered:
        fill(col)
    while running:
        for fut in _wait_any(set(running)):
            col, idx = running.pop(fut)
            outstanding[col] -= 1
            src = ordered[col][idx]
            try:
                result = fut.result()
            except TaskDied as e:
                result = {"status": "unusable", "reason": e.reason}
            else:
                target = _piece_file(work, src.piece_id)
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(target, json.dumps(result, separators=(",", ":")))
            settle(col, idx, result)
            fill(col)
        now = time.monotonic()
        if now - last > 10:
            last = now
            n = sum(len(v) for v in good.values())
            log(f"corpus: read {len(status)} scores, {n}/{sum(needed.values())} pieces usable "
                f"({now - t0:.0f} s)")
    chosen = {c: [ordered[c][i] for i in sorted(good[c])] for c in ordered}
    return chosen, status


def _journal_records(path: Path) -> dict[str, dict]:
    """Finished clips from the render journal; a torn last line (a kill mid-write) is ignored."""
    done: dict[str, dict] = {}
    if not path.is_file():
        return done
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "clip_id" in rec and "sha256" in rec:
            done[rec["clip_id"]] = rec
    return done


def _options(cfg: CorpusConfig, seed: int, renderer_info: dict, music21_version: str) -> dict:
    """What decides the corpus: a rerun into the same folder must give the same options."""
    options = {"format": FORMAT, "seed": seed, "config": cfg.to_json() | {"path": None},
               "renderer": renderer_info, "music21": music21_version}
    return json.loads(json.dumps(options))  # as it reads back from options.json (tuples become lists)


def _state(out: Path) -> str:
    if (out / MANIFEST).is_file():
        return "finished"
    if (out / WORK_DIR / "options.json").is_file():
        return "unfinished"
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        return "foreign"
    return "empty"


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def build_corpus(out: str | os.PathLike, *, clips: int | None = None, seed: int = 0, workers: int = 1,
                 sample_rate: int | None = None, collections: Iterable[str] | None = None,
                 config: str | os.PathLike | None = None, soundfont: str | os.PathLike | None = None,
                 renderer=None, min_tag_train_clips: int = MIN_TAG_TRAIN_CLIPS, progress: bool = True,
                 log: Log | None = None) -> dict:
    """Build (or finish, after a kill) the corpus in `out`; returns the summary of its manifest.

    `clips`, `sample_rate` and `collections` (ids) override configs/corpus.toml (or `config`);
    `renderer` replaces FluidSynth (tests); tags on fewer than `min_tag_train_clips` training
    clips are left out of the label files (manifest: dropped_tags). Rerunning a finished build with the same options
    returns at once; other options in a used folder are a UsageError (never a mixed corpus).
    `failed` > 0 in the result means some clips could not be rendered (errors.tsv); a rerun
    retries them.
    """
    log = log or (_stderr if progress else (lambda m: None))
    out = Path(out)
    if workers < 1:
        raise UsageError(f"--workers {workers}: expected 1 or more")
    cfg = load_corpus_config(config, clips=clips, sample_rate=sample_rate,
                             collections=list(collections) if collections is not None else None)
    if renderer is None:
        renderer = FluidSynthRenderer(soundfont) if soundfont else FluidSynthRenderer()
        try:
            renderer.check()
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
    import music21

    options = _options(cfg, seed, renderer.describe(), music21.__version__)
    state = _state(out)
    if state == "foreign":
        raise UsageError(f"{out}: not empty and not a corpus folder; choose a new one")
    work = out / WORK_DIR
    if state == "finished":
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
        diff = _differences(manifest.get("options", {}), options)
        if diff:
            raise UsageError(f"{out}: holds a corpus made with other options ({', '.join(diff[:4])}); "
                             f"choose a new folder")
        if not manifest["counts"]["failed"]:
            return {**manifest["summary"], "out": str(out), "already_complete": True}
    elif state == "unfinished":
        old = json.loads((work / "options.json").read_text(encoding="utf-8"))
        diff = _differences(old, options)
        if diff:
            raise UsageError(f"{out}: holds an unfinished corpus with other options ({', '.join(diff[:4])}); "
                             f"rerun it with the same options to finish it, or choose a new folder")
        log(f"corpus: resuming the unfinished build in {out}")
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "options.json").is_file():
        write_json(work / "options.json", options)
    t_start = time.monotonic()

    # 1. candidates and shares
    ordered = {c.id: shuffled(find_sources(c), seed, c.id) for c in cfg.collections}
    roots = {c.id: str(collection_root(c)) for c in cfg.collections}
    shares = allocate(cfg.clips, {c.id: c.weight for c in cfg.collections}, {k: len(v) for k, v in ordered.items()},
                      cfg.min_renders, cfg.max_renders)
    empty = [c for c, v in ordered.items() if not v]
    if empty:
        raise UsageError(f"collection {empty[0]}: no score files match its patterns under {roots[empty[0]]}")
    pool = _pool(workers)
    try:
        # 2. read
        chosen, status = read_pieces(ordered, {c: n for c, (_, n) in shares.items()}, roots, work, pool, log)
        short = [c for c, (q, n) in shares.items() if q and not chosen[c]]
        if short:
            raise UsageError(f"collection {short[0]}: none of its {len(ordered[short[0]])} scores is usable")
        sources = [s for c in cfg.collections for s in chosen[c.id]]
        pieces = {s.piece_id: _load_piece(str(_piece_file(work, s.piece_id))) for s in sources}
        # 3. plan
        planned = plan_clips(sources, pieces, {c: q for c, (q, _) in shares.items()}, cfg, seed)
        log(f"corpus: {len(planned)} clips of {len(sources)} pieces planned "
            f"({time.monotonic() - t_start:.0f} s); rendering with {workers} worker(s)")
        # 4. render
        journal = work / "rendered.jsonl"
        path_of = {c.clip_id: out / c.path for c in planned}
        records = {k: r for k, r in _journal_records(journal).items()
                   if k in path_of and path_of[k].is_file() and path_of[k].stat().st_size == r["bytes"]}
        errors = _render_all(planned, records, out, work, journal, cfg, renderer, pool, log)
    except BaseException:
        pool.shutdown(cancel_futures=True)
        raise
    pool.shutdown()
    return _finalize(out, cfg, seed, options, ordered, status, sources, pieces, planned, records, errors,
                     time.monotonic() - t_start, min_tag_train_clips, log)


def _render_all(planned: list[PlannedClip], records: dict[str, dict], out: Path, work: Path, journal: Path,
                cfg: CorpusConfig, renderer, pool: WorkerPool, log: Log) -> dict[str, str]:
    todo = [c for c in planned if c.clip_id not in records]
    errors: dict[str, str] = {}
    if not todo:
        return errors
    log(f"corpus: {len(records)} clips already rendered, {len(todo)} to go")
    t0, last, done = time.monotonic(), time.monotonic(), 0
    # jobs in flight: enough to keep the workers busy, few to lose on a kill; one at a time in
    # this process, so that each finished clip is journalled before the next starts
    window = 4 * pool.workers or 1
    queue = iter(todo)
    running: dict = {}

    def top_up() -> None:
        while len(running) < window:
            c = next(queue, None)
            if c is None:
                return
            piece_file = str(_piece_file(work, c.params.piece_id))
            args = (piece_file, str(out / c.path), c.params.to_json(), cfg.sample_rate, renderer)
            running[pool.submit_task(render_job, args, label=c.clip_id, doing="while rendering this clip")] = c

    with open(journal, "a", encoding="utf-8") as jf:
        top_up()
        while running:
            for fut in _wait_any(set(running)):
                c = running.pop(fut)
                try:
                    rec = fut.result()
                except WorkersDied:
                    raise
                except Exception as e:  # noqa: BLE001 - one clip fails, the build goes on
                    errors[c.clip_id] = e.reason if isinstance(e, TaskDied) else f"{type(e).__name__}: {e}"
                    log(f"corpus: {c.clip_id}: {errors[c.clip_id]}")
                    continue
                jf.write(json.dumps(rec, separators=(",", ":")) + "\n")
                jf.flush()
                os.fsync(jf.fileno())
                records[c.clip_id] = rec
                done += 1
            top_up()
            now = time.monotonic()
            if now - last > 15 or not running:
                last = now
                rate = done / max(now - t0, 1e-9)
                left = len(todo) - done - len(errors)
                log(f"corpus: rendered {len(records)}/{len(planned)} clips ({rate:.1f}/s"
                    + (f", about {left / rate / 60:.0f} min left" if rate > 0 and left else "") + ")")
    return errors


# ---------------------------------------------------------------- outputs

def style_tags(col: Collection, source_path: str) -> list[str]:
    """The pre-training style tags of a collection's piece: collection, era, composer."""
    composer = source_path.split("/", 1)[0].lower() if col.composer == "from-folder" else col.composer
    return ([f"collection:{col.id}"] + ([f"era:{col.era}"] if col.era else [])
            + ([f"composer:{composer}"] if composer else []))


def task_tags(task: str, rec: dict, col: Collection) -> list[str]:
    """The tags of one clip for one downstream task ([] = the clip is not in that task)."""
    if task == "mode":
        return [rec["mode"]] if rec.get("mode") else []
    if task == "tempo":
        return [rec["tempo"]]
    if task == "meter":
        return [rec["meter"]] if rec.get("meter") else []
    if task == "ensemble":
        return [rec["ensemble_size"]]
    if task == "instrument":
        return [f"instrument:{i}" for i in rec["instruments"]]
    if task == "style":
        return [f"collection:{col.id}"]
    raise ValueError(task)


# clips.tsv names of the render parameters that would read like labels
PARAM_COLUMNS = {"parts": "parts_played", "instruments": "part_instruments", "velocities": "part_velocities"}


def _field(x) -> str:
    if x is None:
        return ""
    if isinstance(x, (list, tuple)):
        return "|".join(_field(v) for v in x)
    if isinstance(x, bool):
        return "true" if x else "false"
    return " ".join(str(x).split())


def write_table(path: Path, header: list[str], rows: Iterable[Iterable]) -> str:
    """A TSV file, atomically; returns its sha256."""
    text = "\n".join(["\t".join(header)] + ["\t".join(_field(v) for v in r) for r in rows]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _tag_counts(rows: list[tuple[list[str], str]]) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for tags, split in rows:
        for t in tags:
            counts.setdefault(t, {s: 0 for s in SPLITS})[split] += 1
    return dict(sorted(counts.items()))


def common_tags(rows: list[list], split_col: int, min_train: int, tags_col: int = 1) -> tuple[list[list], dict, dict]:
    """Label rows without the tags that fewer than `min_train` training clips carry (a
    tuba, which a bass part rarely gets, is noise to a classifier head, and a probe cannot learn
    it); rows left without tags leave the file. Returns (rows, kept tag counts, dropped ones)."""
    counts = _tag_counts([(r[tags_col], r[split_col]) for r in rows])
    rare = {t for t, n in counts.items() if n["train"] < min_train}
    kept = []
    for r in rows:
        tags = [t for t in r[tags_col] if t not in rare]
        if tags:
            kept.append(r[:tags_col] + [tags] + r[tags_col + 1:])
    return (kept, {t: n for t, n in counts.items() if t not in rare},
            {t: n for t, n in counts.items() if t in rare})


def _licence_files(col: Collection, sources: list[Source]) -> list[dict]:
    """The licence texts shipped next to a collection's files (and music21's corpus-wide one)."""
    root = collection_root(col)
    folders = sorted({(root / s.path).parent for s in sources})
    candidates = [f / "license.txt" for f in folders]
    if col.root == "music21":
        candidates.append(root / "license.txt")
    out = []
    for p in dict.fromkeys(candidates):
        if p.is_file():
            out.append({"file": str(p.relative_to(root.parent) if col.root == "music21" else p),
                        "sha256": sha256_file(p), "text": p.read_text(encoding="utf-8", errors="replace")})
    return out


SOUNDFONT_COPYRIGHT = "/usr/share/doc/fluid-soundfont-gm/copyright"


def _soundfont_licence() -> dict:
    p = Path(SOUNDFONT_COPYRIGHT)
    info = {"name": "FluidR3_GM by Frank Wen", "licence": "MIT", "copyright_file": str(p)}
    if p.is_file():
        text = p.read_text(encoding="utf-8", errors="replace")
        info["sha256"] = sha256_file(p)
        info["licence"] = "MIT" if "MIT license" in text else "see copyright_file"
    return info


def _finalize(out: Path, cfg: CorpusConfig, seed: int, options: dict, ordered: dict[str, list[Source]],
              status: dict[str, dict], sources: list[Source], pieces: dict[str, Piece], planned: list[PlannedClip],
              records: dict[str, dict], errors: dict[str, str], seconds: float, min_tag_train_clips: int,
              log: Log) -> dict:
    import music21

    cols = {c.id: c for c in cfg.collections}
    src_of = {s.piece_id: s for s in sources}
    ok = [c for c in planned if c.clip_id in records]

    # clips.tsv: everything about every clip
    param_keys = [k for k in planned[0].params.to_json() if k not in ("clip_id", "piece_id")] if planned else []
    param_names = [PARAM_COLUMNS.get(k, k) for k in param_keys]
    label_keys = ["mode", "key", "key_correlation", "time_signature", "meter", "tempo", "ensemble_size",
                  "parts_sounding", "instruments", "families", "notes", "rms_db", "gain_db", "peak", "limited",
                  "bytes", "sha256"]
    header = ["clip_id", "path", "pool", "split", "collection", "piece_id", "group", "source", "tune", "title"]
    rows = []
    for c in ok:
        s, rec, p = src_of[c.params.piece_id], records[c.clip_id], c.params.to_json()
        rows.append([c.clip_id, c.path, c.pool, c.split, c.collection, s.piece_id, c.group, s.path, s.tune,
                     pieces[s.piece_id].title] + [rec.get(k) for k in label_keys] + [p[k] for k in param_keys])
    files = {"clips": {"path": "clips.tsv", "sha256": write_table(out / "clips.tsv", header + label_keys + param_names,
                                                                   rows)}}

    # pieces.tsv: every candidate read, used or not, and why not
    used = {s.piece_id for s in sources}
    pool_of = {c.params.piece_id: (c.pool, c.split) for c in planned}
    prow = []
    for col, cands in ordered.items():
        for s in cands:
            st = status.get(s.piece_id)
            if st is None:
                continue
            piece = pieces.get(s.piece_id)
            prow.append([s.piece_id, col, s.path, s.tune, s.group,
                         "used" if s.piece_id in used else st["status"], st.get("reason", ""),
                         *(pool_of.get(s.piece_id, ("", ""))), piece.title if piece else "",
                         piece.composer if piece else "", len(piece.parts) if piece else "",
                         piece.n_notes if piece else "", piece.length_ql if piece else ""])
    files["pieces"] = {"path": "pieces.tsv", "sha256": write_table(
        out / "pieces.tsv", ["piece_id", "collection", "source", "tune", "group", "status", "reason", "pool", "split",
                             "title", "composer", "parts", "notes", "length_quarters"], sorted(prow))}

    # the label files: prepare-mels / train on pretrain, probe custom on downstream
    pre = [c for c in ok if c.pool == "pretrain"]
    pre_rows = []
    for c in pre:
        rec, col = records[c.clip_id], cols[c.collection]
        tags = (style_tags(col, src_of[c.params.piece_id].path) + [f"instrument:{i}" for i in rec["instruments"]]
                + [f"family:{f}" for f in rec["families"]])
        pre_rows.append([c.path.split("/", 1)[1], tags, c.group, c.split, c.clip_id])
    pre_rows, tag_stats, dropped = common_tags(pre_rows, 3, min_tag_train_clips)
    files["pretrain"] = {"path": "pretrain/labels.tsv", "sha256": write_table(
        out / "pretrain" / "labels.tsv", ["path", "tags", "artist", "split", "track_id"], pre_rows)}
    tag_stats, dropped = {"pretrain": tag_stats}, {"pretrain": dropped}
    down = [c for c in ok if c.pool == "downstream"]
    for task in TASKS:
        rows_t = [[c.path.split("/", 1)[1], task_tags(task, records[c.clip_id], cols[c.collection]), c.split, c.group,
                   c.clip_id] for c in down]
        rows_t, tag_stats[task], dropped[task] = common_tags(rows_t, 2, min_tag_train_clips)
        files[f"task:{task}"] = {"path": f"downstream/{task}.tsv", "rows": len(rows_t), "sha256": write_table(
            out / "downstream" / f"{task}.tsv", ["path", "tags", "split", "artist", "track_id"], rows_t)}
    if errors:
        write_table(out / "errors.tsv", ["clip_id", "path", "error"],
                    [[c.clip_id, c.path, errors[c.clip_id]] for c in planned if c.clip_id in errors])
    elif (out / "errors.tsv").exists():
        (out / "errors.tsv").unlink()

    # counts and the manifest
    by_split = {pool: {s: sum(1 for c in ok if c.pool == pool and c.split == s) for s in SPLITS} for pool in POOLS}
    col_info = []
    for col in cfg.collections:
        cands = ordered[col.id]
        col_sources = [s for s in sources if s.collection == col.id]
        read = [s for s in cands if s.piece_id in status]
        col_info.append({
            "id": col.id, "title": col.title, "era": col.era, "composer": col.composer, "source": col.source,
            "licence": col.licence, "licence_files": _licence_files(col, col_sources or cands[:1]),
            "candidates": len(cands), "scores_read": len(read),
            "unusable": sum(status[s.piece_id]["status"] != "ok" for s in read), "pieces": len(col_sources),
            "groups": len({s.group for s in col_sources}),
            "clips": {pool: {s: sum(1 for c in ok if c.collection == col.id and c.pool == pool and c.split == s)
                             for s in SPLITS} for pool in POOLS}})
    audio_bytes = sum(records[c.clip_id]["bytes"] for c in ok)
    versions = {**tool_versions(), "music21": music21.__version__,
                **{k: v for k, v in options["renderer"].items() if k != "render_rate"}}
    summary = {"out": str(out), "clips": len(ok), "failed": len(errors),
               "pretrain_clips": len(pre), "downstream_clips": len(down), "pieces": len(sources),
               "hours": round(len(ok) * cfg.clip_seconds / 3600, 2), "audio_bytes": audio_bytes,
               "seconds_this_run": round(seconds, 1)}
    manifest = {
        "format": FORMAT, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seed": seed, "options": options, "versions": versions,
        "audio": {"format": "FLAC", "subtype": "PCM_16", "channels": 1, "sample_rate": cfg.sample_rate,
                  "seconds": cfg.clip_seconds, "render_rate": options["renderer"].get("render_rate")},
        "soundfont_licence": _soundfont_licence(),
        "key_analysis": KEY_METHOD,
        "tasks": {t: {"description": d, "file": f"downstream/{t}.tsv", "seen_in_pretraining": t not in NEW_TASKS}
                  for t, d in TASKS.items()},
        "collections": col_info, "files": files,
        "counts": {"clips": len(ok), "failed": len(errors), "by_split": by_split,
                   "pieces": len(sources), "groups": len({s.group for s in sources})},
        "tags": tag_stats, "dropped_tags": dropped, "min_tag_train_clips": min_tag_train_clips,
        "summary": summary}
    for pool in POOLS:
        empty = [s for s in SPLITS if not by_split[pool][s]]
        if empty and any(by_split[pool].values()):
            log(f"corpus: warning: {pool} has no {' or '.join(empty)} clips (too few pieces per collection for "
                f"the split fractions; build more --clips)")
    _write_readme(out, cfg, manifest)
    write_json(out / MANIFEST, manifest)  # last: its presence means "finished"
    if not errors:
        shutil.rmtree(out / WORK_DIR, ignore_errors=True)
    log(f"corpus: {len(ok)} clips ({summary['hours']} h, {audio_bytes / 1e6:.0f} MB) in {out}"
        + (f"; {len(errors)} failed (errors.tsv), rerun to retry them" if errors else ""))
    return summary


def _write_readme(out: Path, cfg: CorpusConfig, manifest: dict) -> None:
    """A README next to the audio: what it is, how to use it, where it comes from."""
    c = manifest["counts"]
    lines = [
        "# maest-cli demo corpus", "",
        f"{c['clips']} clips of {cfg.clip_seconds:g} s rendered with FluidSynth "
        f"({manifest['versions'].get('fluidsynth', '?')}) and the FluidR3_GM soundfont from the scores of the "
        f"music21 package ({manifest['versions']['music21']}), seed {manifest['seed']}. "
        f"Mono FLAC, 16-bit, {cfg.sample_rate} Hz. Built by `maest corpus build`; `manifest.json` says how.", "",
        "## Layout", "",
        "- `pretrain/audio/<collection>/<piece>-r<k>.flac`, `pretrain/labels.tsv` (path, tags, artist, split, "
        "track_id): style (collection:, era:, composer:) and instrument (instrument:, family:) tags; "
        "artist is the split group (a piece, a mass, a chorale and its variants).",
        "- `downstream/audio/...` and one label file per task, `downstream/<task>.tsv` (path, tags, split, artist, "
        "track_id), on pieces that pre-training never heard:",
        *[f"  - `{t}`: {d}" for t, d in TASKS.items()],
        "- `clips.tsv`: every clip with its labels and every render parameter; `pieces.tsv`: every score read "
        "and why it was or was not used.", "",
        "## Use", "",
        "With CORPUS this folder:", "",
        "```",
        "maest prepare-mels CORPUS/pretrain --out MELS --labels CORPUS/pretrain/labels.tsv",
        "maest extract CORPUS/downstream --out EMB --model MODEL",
        "maest probe custom --dataset-root CORPUS/downstream/mode.tsv --embeddings EMB",
        "```", "",
        "## Sources and licences", "",
        "The rendered audio derives from the encodings below; use it for research, and do not redistribute it "
        "where a licence says so.", ""]
    for col in manifest["collections"]:
        lines.append(f"- **{col['id']}** ({col['title']}): {col['source']}. Licence: {col['licence']}")
    sf = manifest["soundfont_licence"]
    lines += ["", f"Soundfont: {sf['name']}, {sf['licence']} ({sf['copyright_file']}).", ""]
    write_atomic(out / "README.md", "\n".join(lines))


def corpus_info(out: str | os.PathLike) -> dict:
    """The manifest of a finished corpus (UsageError if `out` is not one)."""
    out = Path(out)
    if not (out / MANIFEST).is_file():
        if (out / WORK_DIR / "options.json").is_file():
            raise UsageError(f"{out}: an unfinished corpus; rerun `maest corpus build` with the same options")
        raise UsageError(f"{out}: not a corpus folder (no {MANIFEST})")
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{out / MANIFEST}: cannot be read ({e})") from None
    if manifest.get("format") != FORMAT:
        raise UsageError(f"{out / MANIFEST}: not a {FORMAT} manifest")
    return manifest
