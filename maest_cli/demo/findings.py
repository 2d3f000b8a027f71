"""`maest findings`: the paper's three findings, reproduced at small scale on the demo corpus.

Given a corpus (`maest corpus build`; built here when absent) and a trained MAEST (the bundled
`maest-tiny` by default), one call reproduces, on the corpus's held-out downstream tasks, with
the probe of `maest probe custom`:
1. blocks: test ROC-AUC / mAP of the embeddings of every block (1..depth) and token stack (cls,
   dist, avg, cls+dist+avg): where are the best features? (paper: the middle blocks);
2. presets: for every inference-patchout preset, model-only throughput (maest_cli.bench.throughput, timed in
   the same run) against probe mAP, MAEST against an EfficientNet-B0 trained here on the same
   pre-training data (`maest train`, architecture effnet-b0): the paper's Figure 3;
3. baselines: the trained model against the same architecture with random weights and against
   mel statistics (mean and std of each band): training must help.
OUT gets findings.json (every figure, how it was made), findings.md (Markdown tables for the
README) and blocks.png, presets.png, baselines.png.

Every step is cached in WORK (default OUT/work) and a rerun skips what is done: the corpus and
the pre-training mels resume themselves, EfficientNet-B0 training resumes from its state,
embedding datasets skip the clips they hold (embed_sweep, extract's store), each probe result is
one JSON file written atomically, the timings one file. A kill loses the step in flight only.

Protocol choices (recorded in findings.json): probes use grid `quick` (learning rate 1e-4 or
1e-3, dropout 0.5 or 0.75, 30 epochs, the setting chosen on validation per probe, as the paper
chooses its probe's hyper-parameters on validation). The authors' one setting (grid `none`: lr
1e-4, 60 epochs of batch 128) was made for MagnaTagATune's 19,000 training tracks; on the demo
corpus's 637 it takes 300 steps, too few: it ranks the embeddings by how fast a probe
learns from them (mel statistics, 192 dims, gain 33 mAP points on `instrument` with the grid).
The block x token sweep trains one seed per probe, the headline comparisons (selected blocks,
presets, baselines) `seeds` seeds. Blocks are selected on VALIDATION mAP averaged over the tasks
(cls+dist+avg), never on test.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from maest_cli.audio.frontend import HOP_SIZE, SAMPLE_RATE
from maest_cli.bench import throughput as bench
from maest_cli.demo.corpus import MANIFEST, build_corpus, corpus_info
from maest_cli.demo.report import assemble, write_report
from maest_cli.embed.reading import EmbeddingsError
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.sweep import (
    EffNetEmbedder,
    MaestSweep,
    MelCache,
    MelStatsEmbedder,
    block_dir,
    run_sweep,
)
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import sha256_file, tool_versions, write_json
from maest_cli.io.config import ConfigError
from maest_cli.io.workers import TaskDied, WorkerPool
from maest_cli.mels.dataset import DatasetError, MelDataset
from maest_cli.mels.prepare import prepare_mels
from maest_cli.models.checkpoints import save_checkpoint
from maest_cli.models.maest import MAEST
from maest_cli.models.precision import (
    choose_dtype,
    machine_info,
)
from maest_cli.models.presets import load_presets
from maest_cli.models.registry import load_model
from maest_cli.probing.data import ProbeError
from maest_cli.probing.run import probe
from maest_cli.training.config import load_train_config
from maest_cli.training.effnet import load_effnet
from maest_cli.training.loop import METRICS, RESOLVED, STATE, train

FORMAT = "maest-findings/1"
STACK_ALL = ("cls", "dist", "avg")
Log = Callable[[str], None]


@dataclass(frozen=True)
class FindingsOptions:
    """Everything that shapes the figures (recorded in findings.json)."""

    model: str = "maest-tiny"  # the trained MAEST: registry name or weights file
    tasks: tuple[str, ...] | None = None  # downstream tasks (None: all of the corpus manifest)
    grid: str = "quick"  # probe grid (configs/probe.toml): chosen on validation, see above
    seeds: int = 3  # probe seeds of the headline comparisons
    sweep_seeds: int = 1  # probe seeds of the block x token sweep
    token_stacks: tuple[tuple[str, ...], ...] = (("cls",), ("dist",), ("avg",), STACK_ALL)
    presets: tuple[str, ...] | None = None  # None: every preset of configs/presets.toml
    preset_block: int | None = None  # block of the preset comparison (None: the trained model's best on validation)
    random_seed: int = 0  # seed of the random-weight twin
    effnet: str | None = None  # an EfficientNet-B0 checkpoint of `maest train` (None: train one)
    effnet_config: str = "effnet-b0"  # its recipe (configs/train)
    effnet_epochs: int | None = None  # the training budget (None: the recipe's); the schedule is stretched
    mels: str | None = None  # prepare-mels dataset of the pre-training clips (None: the model's own, else made)
    corpus_clips: int | None = None  # when the corpus must be built (None: configs/corpus.toml)
    corpus_seed: int = 0
    corpus_workers: int = 2
    hop: str = "half"
    batch_size: int = 8  # segments per forward
    device: str = "cpu"
    engine: str = "auto"  # of the preset timing (the embeddings of the sweeps run on torch: one forward, every block)
    jobs: int = 2  # probe processes (each one thread)
    repeats: int = 5  # bench rounds
    warmup: int = 1
    compile_baseline: bool = True  # torch.compile EfficientNet-B0 for the bench, as `make bench` does

    def spec(self, preset: str = "none") -> InferenceSpec:
        """What the embeddings of `preset` are made with (blocks and tokens: each sweep's own)."""
        return InferenceSpec(model=self.model, preset=preset, hop=self.hop, device=self.device, engine=self.engine)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["token_stacks"] = ["+".join(t) for t in self.token_stacks]
        return d


# ------------------------------------------------------------------ steps, cached

class Steps:
    """The work directory's record of which steps finished and how long they took."""

    def __init__(self, work: Path, log: Log):
        self.work, self.log = work, log
        self.file = work / "steps.json"
        self.done: dict = json.loads(self.file.read_text()) if self.file.is_file() else {}
        self.timing: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], object]):
        """Run (or resume, or skip through the caches) one step; its time is added to the step's
        total in WORK/steps.json (a cached rerun adds seconds, a resumed one the rest of the work)."""
        self.log(f"findings: {name}")
        t0 = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t0, 1)
        self.timing[name] = seconds
        prev = self.done.get(name, {})
        self.done[name] = {"runs": prev.get("runs", 0) + 1,
                           "seconds_total": round(prev.get("seconds_total", 0) + seconds, 1),
                           "seconds_last_run": seconds}
        write_json(self.file, self.done)
        return result


def _inputs_check(work: Path, manifest: dict, corpus: Path) -> None:
    """WORK belongs to one corpus: results of another would silently mix (same clip paths)."""
    ident = {"corpus": str(corpus.resolve()), "created": manifest.get("created"), "seed": manifest.get("seed"),
             "clips": manifest.get("counts", {}).get("clips"),
             "files": {k: v.get("sha256") for k, v in manifest.get("files", {}).items()}}
    f = work / "inputs.json"
    if f.is_file():
        old = json.loads(f.read_text())
        if old != ident:
            raise UsageError(f"--work {work}: holds the findings of another corpus ({old.get('corpus')}, created "
                             f"{old.get('created')}); use a new --work directory")
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json(f, ident)


def ensure_corpus(corpus: Path, opts: FindingsOptions, log: Log) -> dict:
    """The corpus manifest; the corpus is built (or its unfinished build finished) when absent."""

    if not (corpus / MANIFEST).is_file():
        log(f"findings: no corpus in {corpus}; building it (maest corpus build {corpus} --seed {opts.corpus_seed})")
        summary = build_corpus(corpus, clips=opts.corpus_clips, seed=opts.corpus_seed, workers=opts.corpus_workers,
                               progress=True, log=log)
        if summary.get("failed"):
            raise UsageError(f"{corpus}: {summary['failed']} clips failed to render (errors.tsv); rerun to retry")
    return corpus_info(corpus)


def model_key(lm) -> str:
    """A folder name for a model's results: its name and checksum (a retrained model gets new ones)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in lm.name)
    return f"{safe}-{(lm.sha256 or 'nosha')[:12]}"


def random_twin(lm, work: Path, seed: int, device: str):
    """The same architecture with random weights (timm's ViT init, seeded), the trained model's
    input scaling and labels, saved once in WORK/models so that its datasets record a checksum."""
    import torch


    path = work / "models" / f"{model_key(lm)}-random-seed{seed}.safetensors"
    if not path.is_file():
        torch.manual_seed(seed)
        model = MAEST(lm.config)
        save_checkpoint(path, model, lm.labels, extra={
            "name": f"{lm.name}-random", "input_norm": lm.input_norm.to_dict(),
            "random_init": {"seed": seed, "architecture_of": lm.sha256, "init": "timm ViT: truncated normal 0.02"}})
    return load_model(str(path), device=device)


# ------------------------------------------------------------------ EfficientNet-B0

def effnet_overrides(recipe: str, epochs: int | None) -> dict:
    """The recipe's schedule stretched to `epochs` (warm-up, decay and SWA at the same shares)."""

    if epochs is None:
        return {}
    if epochs < 1:
        raise UsageError("--effnet-epochs must be >= 1")
    base = load_train_config(recipe)
    f = epochs / base.epochs
    out = {"epochs": epochs, "warmup_epochs": base.warmup_epochs * f, "decay_start_epoch": base.decay_start_epoch * f,
           "decay_epochs": base.decay_epochs * f}
    if base.swa_start:
        out["swa_start"] = min(epochs, max(1, round(base.swa_start * f)))
    return out


def pretrain_mels(opts: FindingsOptions, lm, corpus: Path, work: Path, log: Log) -> Path:
    """The pre-training mel dataset EfficientNet-B0 trains on: --mels; else the one the MAEST was
    trained on (its checkpoint names it) when it is here with the same labels; else prepared from
    CORPUS/pretrain with the MAEST's label vocabulary (the same data either way)."""

    if opts.mels:
        return Path(opts.mels)
    try:
        recorded = json.loads(lm.metadata.get("dataset") or "null")
    except (TypeError, json.JSONDecodeError):
        recorded = None
    if isinstance(recorded, dict) and recorded.get("path"):
        try:
            ds = MelDataset(recorded["path"])
            if list(ds.labels) == list(lm.labels or []):
                log(f"findings: EfficientNet-B0 trains on {ds.root}, the mels {lm.name} was trained on")
                return ds.root
        except DatasetError:
            pass
    out = work / "pretrain-mels"
    log(f"findings: preparing the pre-training mels in {out}")
    prepare_mels(corpus / "pretrain", out, labels=corpus / "pretrain" / "labels.tsv",
                 vocabulary=list(lm.labels) if lm.labels else None, workers=1, progress=False)
    return out


def trained_effnet(opts: FindingsOptions, mels: Path, work: Path, log: Log) -> tuple[Path, dict]:
    """Train (or resume, or reuse) EfficientNet-B0 with `maest train`; its checkpoint (SWA if the
    recipe averages, else best by validation mAP) and the run's summary."""

    if opts.effnet:
        return Path(opts.effnet), {"given": opts.effnet}
    overrides = effnet_overrides(opts.effnet_config, opts.effnet_epochs)
    tag = f"{overrides['epochs']}ep" if overrides else "recipe"
    run = work / f"effnet-b0-{tag}"
    if (run / STATE).is_file():  # a killed run continues; a finished one returns at once
        train(resume=run, progress=False)
    else:
        train(data=mels, out=run, config=opts.effnet_config, overrides=overrides, progress=False)
    for kind in ("swa", "best", "last"):
        if (run / f"{kind}.safetensors").is_file():
            return run / f"{kind}.safetensors", {"run": str(run), "checkpoint": kind, **_run_facts(run)}
    raise UsageError(f"{run}: the EfficientNet-B0 run saved no weights")


def _run_facts(run: Path) -> dict:
    """Epochs, examples seen and wall time of a `maest train` run, from its metrics.jsonl."""

    facts: dict = {}
    try:
        resolved = json.loads((run / RESOLVED).read_text())
        facts.update(global_batch=resolved.get("global_batch"), steps_per_epoch=resolved.get("steps_per_epoch"),
                     epoch_len=resolved.get("epoch_len"))
    except (OSError, json.JSONDecodeError):
        pass
    epochs, steps, val, seconds, first, last = 0, 0, None, 0.0, None, None
    try:
        for line in (run / METRICS).read_text().splitlines():
            rec = json.loads(line)
            if rec.get("kind") == "resume" and first is not None:  # a kill: count the time before it
                seconds += last - first
                first = None
            if "time" in rec:
                first = rec["time"] if first is None else first
                last = rec["time"]
            if rec.get("kind") == "epoch":
                epochs, steps, val = rec["epoch"], rec["step"], rec.get("swa") or rec.get("val")
    except (OSError, json.JSONDecodeError):
        pass
    if first is not None:
        seconds += last - first
    facts.update(epochs=epochs, steps=steps, validation=val, seconds=round(seconds, 1))
    if facts.get("global_batch"):
        facts["examples"] = steps * facts["global_batch"]
    return facts



# ------------------------------------------------------------------ probes

@dataclass(frozen=True)
class ProbeJob:
    embeddings: str
    task: str
    labels: str
    seeds: int

    def cache_file(self, work: Path, grid: str) -> Path:
        rel = Path(self.embeddings).relative_to(work / "emb")
        return work / "probes" / rel / f"{self.task}-{Path(grid).stem}-s{self.seeds}.json"


def _probe_inputs(job: ProbeJob, grid: str) -> dict:
    """What a cached probe result depends on: the label file, the embedding part files, the grid."""
    parts = sorted(p for p in Path(job.embeddings).glob("part-*.parquet"))
    return {"labels_sha256": sha256_file(job.labels), "parts": [[p.name, p.stat().st_size] for p in parts],
            "grid": grid, "grid_sha256": sha256_file(grid) if Path(grid).is_file() else None}


def _compact(results: dict) -> dict:
    test, sel = results["test"], results["selected"]
    return {"test_map": test["pr_auc"]["mean"], "test_map_std": test["pr_auc"]["std"],
            "test_roc_auc": test["roc_auc"]["mean"], "test_roc_auc_std": test["roc_auc"]["std"],
            "seeds": test["n_seeds"], "val_map": sel.get("val_pr_auc"), "val_roc_auc": sel.get("val_roc_auc"),
            "tags": results["dataset"]["n_tags"], "tracks": results["dataset"]["tracks"],
            "dim": results["embeddings"]["dim"], "excluded_tags": results["excluded_tags"],
            "per_tag": results["per_tag"], "join": {k: results["dataset"]["join"][k] for k in
                                                    ("labelled", "matched", "embeddings")},
            "seconds": results["timing_s"]["total"]}


def probe_one(job: ProbeJob, grid: str, threads: int = 1) -> dict:
    """One probe (`maest probe custom`), as a compact record; expected failures become {"error"}."""

    try:
        res = probe("custom", dataset_root=job.labels, embeddings=job.embeddings, grid=grid, seeds=job.seeds,
                    device="cpu", threads=threads, out=None, log=None)
    except (UsageError, ProbeError, EmbeddingsError, ConfigError) as e:
        return {"error": " ".join(str(e).split())[:500]}
    return _compact(res)


def run_probes(jobs: list[ProbeJob], work: Path, grid: str, n_jobs: int, log: Log) -> dict[ProbeJob, dict]:
    """Every job's result, from the cache when its inputs are unchanged, else probed (in `n_jobs`
    processes of one thread each); each new result is written as soon as it is known."""
    out: dict[ProbeJob, dict] = {}
    todo: list[tuple[ProbeJob, dict]] = []
    for job in jobs:
        f = job.cache_file(work, grid)
        inputs = _probe_inputs(job, grid)
        if f.is_file():
            try:
                rec = json.loads(f.read_text())
                if rec.get("inputs") == inputs:
                    out[job] = rec["result"]
                    continue
            except (OSError, json.JSONDecodeError, KeyError):
                pass
        todo.append((job, inputs))
    if not todo:
        return out
    log(f"findings: {len(todo)} probes to run ({len(jobs) - len(todo)} cached), {n_jobs} at a time")
    t0, last = time.perf_counter(), time.perf_counter()

    def keep(job: ProbeJob, inputs: dict, result: dict, k: int, cache: bool = True) -> None:
        nonlocal last
        if cache:
            f = job.cache_file(work, grid)
            f.parent.mkdir(parents=True, exist_ok=True)
            write_json(f, {"job": asdict(job), "grid": grid, "inputs": inputs, "result": result})
        out[job] = result
        if "error" in result:
            log(f"findings: probe {job.task} on {job.embeddings}: {result['error']}")
        if time.perf_counter() - last > 30 or k == len(todo):
            last = time.perf_counter()
            rate = k / (last - t0)
            log(f"findings: probes {k}/{len(todo)} ({rate * 60:.1f}/min"
                + (f", about {(len(todo) - k) / rate / 60:.0f} min left)" if k < len(todo) else ")"))

    if n_jobs <= 1:
        for k, (job, inputs) in enumerate(todo, 1):
            keep(job, inputs, probe_one(job, grid), k)
        return out
    pool = WorkerPool(n_jobs, role="probe", doing="while probing")
    try:
        futures = {pool.submit_task(probe_one, (job, grid, 1), label=f"probe {job.task} on {job.embeddings}"):
                   (job, inputs) for job, inputs in todo}
        for k, fut in enumerate(as_completed(futures), 1):
            job, inputs = futures[fut]
            try:
                result, cache = fut.result(), True
            except TaskDied as e:  # the crash policy's one line; not cached, so a rerun probes it again
                result, cache = {"error": e.reason}, False
            keep(job, inputs, result, k, cache)
    finally:
        pool.shutdown(cancel_futures=True)
    return out


# ------------------------------------------------------------------ selection

def best_block(records: list[dict], tokens: str = "cls+dist+avg") -> int | None:
    """The block with the highest VALIDATION mAP averaged over the tasks scored at every block
    (ties: the earlier block)."""
    rows = [r for r in records if r["tokens"] == tokens]
    blocks = sorted({r["block"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    ok_tasks = [t for t in tasks if all(_num(r.get("val_map")) for r in rows if r["task"] == t)]
    if not ok_tasks:
        return None
    mean = {b: sum(r["val_map"] for r in rows if r["block"] == b and r["task"] in ok_tasks) / len(ok_tasks)
            for b in blocks}
    return max(blocks, key=lambda b: (mean[b], -b))


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------ timing

def bench_models(lm, eff, spec: InferenceSpec, preset_names: Sequence[str], repeats: int, warmup: int,
                 log: Log, compile_baseline: bool = True) -> dict:
    """Model-only audio-min/s of every preset (MAEST to `block`) and of the trained EfficientNet-B0
    on the same segment and engine, timed side by side by maest_cli.bench.throughput's machinery.
    Each preset runs at the dtype the one precision rule gives it (models.precision.choose_dtype)."""
    import torch

    net, cfg = lm.model.eval(), lm.config
    frames = cfg.frames
    plan = [spec.replace(preset=n).resolve(cfg, lm.default_block, model=lm) for n in preset_names]
    dev, block = plan[0].device, plan[0].block
    for note in dict.fromkeys(r.dtype_note for r in plan if r.dtype_note):
        log(f"findings: {note}")
    say = log if log is not None else (lambda _: None)
    contenders = bench.preset_contenders(plan, net, cfg, frames, block, [spec.engine], say)
    # The baseline gets every trick MAEST gets and those of `maest bench`: the dtype `auto` gives
    # here (bf16 on CPUs with native bf16), BatchNorm folded, channels_last, torch.compile, and the
    # same engine.
    (effnet,) = bench.baseline_contenders(frames, choose_dtype(spec.dtype, dev).dtype, dev, [spec.engine],
                                          compile_baseline, say, model=eff.model)
    effnet.info["weights"] = eff.path
    contenders.append(effnet)
    load_before = os.getloadavg()[0]
    bench.time_interleaved(contenders, repeats, warmup, dev, progress=None)
    rows = [bench.summarise(c) for c in contenders]
    base = rows[-1]
    for r in rows:
        r["ratio_to_effnet"] = r["audio_min_per_s"] / base["audio_min_per_s"]
    log(f"findings: timed {len(rows)} contenders x {repeats} rounds")
    return {"block": block, "frames": frames, "segment_s": (frames - 1) * HOP_SIZE / SAMPLE_RATE,
            "threads": torch.get_num_threads(), "repeats": repeats, "warmup": warmup,
            "load_average": {"before": load_before, "after": os.getloadavg()[0]}, "machine": machine_info(),
            "rows": rows, "counting": "model only: one timed call = one segment of the model; MAEST takes it whole "
                                      "(batch 1) up to the block, EfficientNet-B0 takes its 128-frame patches "
                                      f"(hop 62) in one batch ({', '.join(effnet.info['tricks'])}); "
                                      "audio-min/s = segment seconds / 60 / median seconds"}


# ------------------------------------------------------------------ the pipeline

def run_findings(corpus: str | os.PathLike, out: str | os.PathLike, *, work: str | os.PathLike | None = None,
                 options: FindingsOptions | None = None, log: Log | None = None) -> dict:
    """Reproduce the three findings on CORPUS; write OUT/findings.json, findings.md and the PNGs.
    Returns findings.json's content. Resumable: rerun the same call after a kill."""
    import sys


    opts = options or FindingsOptions()
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    corpus, out = Path(corpus), Path(out)
    work = Path(work) if work else out / "work"
    if opts.seeds < 1 or opts.sweep_seeds < 1 or opts.jobs < 1 or opts.batch_size < 1 or opts.repeats < 1:
        raise UsageError("seeds, sweep seeds, jobs, batch size and repeats must be >= 1")
    opts.spec()  # the inference options (engine, hop, device), checked before any work
    table = load_presets()
    preset_names = list(opts.presets) if opts.presets else list(table)
    unknown = [p for p in preset_names if p not in table]
    if unknown:
        raise UsageError(f"--presets: unknown {', '.join(unknown)} (known: {', '.join(table)})")
    if "none" not in preset_names:
        preset_names.insert(0, "none")
    # the inputs that are given are checked before the corpus is built (that takes minutes)
    lm = load_model(opts.model, device=opts.device)
    given_effnet = load_effnet(opts.effnet, device=opts.device) if opts.effnet else None
    if opts.mels:
        try:
            MelDataset(opts.mels)
        except DatasetError as e:
            raise UsageError(f"--mels: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    steps = Steps(work, log)

    manifest = steps.run("corpus", lambda: ensure_corpus(corpus, opts, log))
    _inputs_check(work, manifest, corpus)
    task_files = {t: corpus / info["file"] for t, info in manifest["tasks"].items()}
    tasks = list(opts.tasks) if opts.tasks else list(task_files)
    missing = [t for t in tasks if t not in task_files]
    if missing:
        raise UsageError(f"--tasks: unknown {', '.join(missing)} (this corpus has {', '.join(task_files)})")
    downstream = corpus / "downstream"
    depth = lm.config.depth
    mkey = model_key(lm)
    rnd = steps.run("random-weights", lambda: random_twin(lm, work, opts.random_seed, opts.device))
    rkey = model_key(rnd)

    def effnet_step():
        mels = pretrain_mels(opts, lm, corpus, work, log) if not opts.effnet else None
        return trained_effnet(opts, mels, work, log)

    effnet_path, effnet_run = steps.run("effnet-train", effnet_step)
    eff = given_effnet or load_effnet(effnet_path, device=opts.device)  # a given one is trained_effnet's path

    mels = MelCache(work / "mel-cache")
    emb = work / "emb"

    def sweep(name: str, embedder) -> dict:
        s = run_sweep([downstream], embedder, mels, log=log)
        if s.n_failed:
            log(f"findings: {s.n_failed} clips could not be embedded by {name} (see the _errors of {s.outputs[0]})")
        return {"clips": s.n_files, "done": s.n_done, "skipped": s.n_skipped, "failed": s.n_failed,
                "seconds": round(s.seconds, 1), "model_seconds": round(s.model_seconds, 1)}

    sweeps = {}
    sweeps["maest"] = steps.run("embed-maest", lambda: sweep(lm.name, MaestSweep(
        lm, emb / mkey / "none", opts.spec(), token_stacks=opts.token_stacks, batch_size=opts.batch_size)))
    sweeps["random"] = steps.run("embed-random", lambda: sweep(rnd.name, MaestSweep(
        rnd, emb / rkey / "none", opts.spec(), token_stacks=[STACK_ALL], batch_size=opts.batch_size)))
    ekey = f"effnet-b0-{eff.sha256[:12]}"
    sweeps["effnet"] = steps.run("embed-effnet", lambda: sweep(eff.name, EffNetEmbedder(
        eff, emb / ekey, device=opts.device)))
    sweeps["mel-stats"] = steps.run("embed-mel-stats", lambda: sweep("mel-stats", MelStatsEmbedder(emb / "mel-stats")))

    # -- finding 1: every block x token stack, one seed; the random twin's blocks (cls+dist+avg)
    stacks = ["+".join(t) for t in opts.token_stacks]
    sweep_jobs = {(m, b, s, t): ProbeJob(str(block_dir(emb / key / "none", b, s.split("+"))), t, str(task_files[t]),
                                         opts.sweep_seeds)
                  for m, key, ss in (("maest", mkey, stacks), ("random", rkey, ["cls+dist+avg"]))
                  for b in range(1, depth + 1) for s in ss for t in tasks}
    res = steps.run("probe-blocks", lambda: run_probes(list(sweep_jobs.values()), work, opts.grid, opts.jobs, log))
    block_rows = [{"model": m, "block": b, "tokens": s, "task": t, **_scores(res[j])}
                  for (m, b, s, t), j in sweep_jobs.items()]
    best = {m: best_block([r for r in block_rows if r["model"] == m]) for m in ("maest", "random")}
    for m in best:
        if best[m] is None:
            raise UsageError(f"no block of {m} could be scored on validation for any task; see the probe errors above")
    pblock = opts.preset_block or best["maest"]
    if not 1 <= pblock <= depth:
        raise UsageError(f"--preset-block {pblock}: the model has blocks 1..{depth}")

    # -- findings 2 and 3: the selected blocks, presets, baselines, `seeds` seeds each
    for p in preset_names:
        if p == "none":
            continue
        sweeps[f"preset-{p}"] = steps.run(f"embed-preset-{p}", lambda p=p: sweep(f"{lm.name} {p}", MaestSweep(
            lm, emb / mkey / p, opts.spec(p), blocks=[pblock], token_stacks=[STACK_ALL],
            batch_size=opts.batch_size)))
    heads = {}
    for t in tasks:
        lab = str(task_files[t])
        heads[("maest", t)] = ProbeJob(str(block_dir(emb / mkey / "none", best["maest"], STACK_ALL)), t, lab,
                                       opts.seeds)
        heads[("random", t)] = ProbeJob(str(block_dir(emb / rkey / "none", best["random"], STACK_ALL)), t, lab,
                                        opts.seeds)
        heads[("effnet", t)] = ProbeJob(str(emb / ekey), t, lab, opts.seeds)
        heads[("mel-stats", t)] = ProbeJob(str(emb / "mel-stats"), t, lab, opts.seeds)
        for p in preset_names:
            heads[(f"preset:{p}", t)] = ProbeJob(str(block_dir(emb / mkey / p, pblock, STACK_ALL)), t, lab, opts.seeds)
    hres = steps.run("probe-headline", lambda: run_probes(list(dict.fromkeys(heads.values())), work, opts.grid,
                                                          opts.jobs, log))
    head = {k: _scores(hres[j]) for k, j in heads.items()}

    effnet_how = "effnet-auto-compiled" if opts.compile_baseline else "effnet-auto"
    bench_file = work / f"bench-{mkey}-{ekey}-block{pblock:02d}-{'-'.join(preset_names)}-{effnet_how}.json"

    def bench_step() -> dict:
        if bench_file.is_file():
            return json.loads(bench_file.read_text())
        report = bench_models(lm, eff, opts.spec().replace(block=pblock), preset_names, opts.repeats,
                              opts.warmup, log, opts.compile_baseline)
        write_json(bench_file, report)
        return report

    timing = steps.run("bench", bench_step)


    findings = assemble(
        manifest=manifest, corpus=corpus, tasks=tasks, task_files=task_files, opts=opts, lm=lm, rnd=rnd, eff=eff,
        effnet_run=effnet_run, block_rows=block_rows, best=best, preset_block=pblock, preset_names=preset_names,
        head=head, timing=timing, sweeps=sweeps,
        steps={"seconds_total": {k: v.get("seconds_total") for k, v in steps.done.items()}, "this_run": steps.timing})
    findings["format"] = FORMAT
    findings["versions"] = tool_versions()
    findings["work"] = str(work)
    write_report(findings, out)
    log(f"findings: wrote {out / 'findings.json'}, {out / 'findings.md'} and the plots")
    return findings


def _scores(rec: dict) -> dict:
    keys = ("test_map", "test_map_std", "test_roc_auc", "test_roc_auc_std", "val_map", "val_roc_auc", "seeds")
    if "error" in rec:
        return {**{k: None for k in keys}, "error": rec["error"]}
    return {k: rec.get(k) for k in keys}


__all__ = ["run_findings", "FindingsOptions", "ProbeJob", "run_probes", "best_block", "bench_models",
           "random_twin", "effnet_overrides", "pretrain_mels", "trained_effnet", "model_key", "FORMAT"]
