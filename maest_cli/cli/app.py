"""The `maest` command: parse options, call the Python API, map errors to exit codes.

torch and the heavy modules are imported inside the commands, so `maest --help` is instant.
Exit codes: 0 success, 1 some inputs failed (or the run failed), 2 usage error.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(
    name="maest",
    help="MAEST music embeddings: mel-spectrograms, training, extraction, probes and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The official MAEST models: list, download, inspect.", no_args_is_help=True)
app.add_typer(models_app, name="models")

err = Console(stderr=True, highlight=False)


def _exit_code(e: BaseException) -> int | None:
    """2 for usage/config/model errors, 1 for failures of the run; None: a bug, let it raise."""
    from maest_cli.audio.decode import AudioError
    from maest_cli.errors import UsageError
    from maest_cli.io.config import ConfigError
    from maest_cli.mels.dataset import DatasetError
    from maest_cli.models.checkpoints import CheckpointError
    from maest_cli.models.registry import DownloadError, ModelNotFound

    if isinstance(e, (UsageError, ConfigError, ModelNotFound, CheckpointError)):
        return 2
    if isinstance(e, (AudioError, DatasetError, DownloadError, OSError)):
        return 1
    return None


def print_error(e: BaseException | str) -> None:
    """Errors go to stderr unwrapped (rich would fold long paths across lines)."""
    print(f"maest: error: {e}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def errors_to_exit_codes():
    try:
        yield
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        err.print("maest: interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # noqa: BLE001 - mapped or re-raised below
        code = _exit_code(e)
        if code is None:
            raise
        print_error(e)
        raise typer.Exit(code) from None


# ------------------------------------------------------------------ models

@models_app.command("list")
def models_list(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The registry of official models and whether each is in the cache."""
    with errors_to_exit_codes():
        from maest_cli.models.registry import cache_dir, cached_weights, load_registry

        reg = load_registry()
        rows = [{"name": m.name, "aliases": list(m.aliases), "variant": m.variant, "labels": m.labels,
                 "default": m.name == reg.default, "cached": str(cached_weights(m) or ""),
                 "description": m.description} for m in reg.models.values()]
        if as_json:
            print(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        t = Table(title=f"MAEST models (cache: {cache_dir()})")
        for col in ("name", "aliases", "segment", "labels", "cached", "description"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["name"] + (" (default)" if r["default"] else ""), ", ".join(r["aliases"]),
                      r["variant"], r["labels"], "yes" if r["cached"] else "no", r["description"])
        Console().print(t)
        Console().print("Weights: CC BY-NC-SA 4.0 (non-commercial use).")


@models_app.command("download")
def models_download(
    names: list[str] = typer.Argument(None, help="Model names or aliases (default: the default model)."),
    all_models: bool = typer.Option(False, "--all", help="Download every model of the registry."),
) -> None:
    """Fetch weights into the cache (resumable, verified, atomic)."""
    with errors_to_exit_codes():
        from maest_cli.models.registry import fetch_model, load_registry

        reg = load_registry()
        entries = list(reg.models.values()) if all_models else [reg.get(n) for n in (names or [reg.default])]
        failed = 0
        for entry in entries:
            try:
                path = fetch_model(entry)
                err.print(f"{entry.name}: {path}")
            except Exception as e:  # noqa: BLE001 - report each model, go on
                if _exit_code(e) is None:
                    raise
                print_error(e)
                failed += 1
        if failed:
            raise typer.Exit(1)


@models_app.command("info")
def models_info(
    model: str = typer.Argument(..., help="Model name, alias, or path to a weights file."),
    download: bool = typer.Option(False, "--download", help="Download the weights if missing."),
) -> None:
    """Config, parameter count, labels and checksum of a model."""
    with errors_to_exit_codes():
        from maest_cli.models.maest import count_parameters
        from maest_cli.models.registry import load_model, load_registry

        reg = load_registry()
        try:
            lm = load_model(model, registry=reg, download=download)
        except Exception as e:  # registry facts are still useful without weights
            if not reg.has(model):
                raise
            entry = reg.get(model)
            print(json.dumps({"name": entry.name, "variant": entry.variant, "labels": entry.labels,
                              "sources": [s.files[0].url for s in entry.sources],
                              "cached": False, "note": str(e).splitlines()[0]}, indent=2))
            return
        print(json.dumps({"name": lm.name, "path": lm.path, "sha256": lm.sha256, "format": lm.source_format,
                          "config": lm.config.to_dict(), "parameters": count_parameters(lm.model),
                          "n_labels": len(lm.labels) if lm.labels else None,
                          "first_labels": (lm.labels or [])[:5]}, indent=2))


# ------------------------------------------------------------------ extract

@app.command()
def extract(
    paths: list[Path] = typer.Argument(..., help="Audio files or directories (walked recursively, sorted).",
                                       show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Output Parquet dataset directory (resumable)."),
    model: Optional[str] = typer.Option(None, help="Model name, alias or weights file; default: the registry "
                                        "default (MAEST-30s)."),
    patchout: str = typer.Option("none", "--patchout", help="Speed preset: none (exact), fast, faster, fastest, "
                                 "none-int8, fast-int8 (CPU int8 Linear layers; configs/presets.toml)."),
    time_keep_every: Optional[int] = typer.Option(None, "--time-keep-every", help="Expert: keep every Nth time "
                                                  "column (overrides the preset)."),
    drop_freq_rows: Optional[str] = typer.Option(None, "--drop-freq-rows", help="Expert: frequency rows to drop, "
                                                 "e.g. 0,8 ('none': drop none; overrides the preset)."),
    block: int = typer.Option(7, help="Embedding after this many transformer blocks (7: the paper's best)."),
    tokens: str = typer.Option("cls,dist,avg", help="Tokens to concatenate: cls, dist, avg (mean of patches)."),
    pool: str = typer.Option("track", help="track: one row per file (mean over segments); segment: one per segment."),
    hop: str = typer.Option("half", help="Segment hop: half, full or seconds."),
    scores: bool = typer.Option(False, "--scores", help="Add the sigmoid Discogs style activations."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (the preset's: bf16 where native, else fp32; int8 for the -int8 "
                          "presets), fp32, bf16, fp16 (GPU), int8 (CPU)."),
    workers: int = typer.Option(1, help="Decoder processes (0: decode in the main process)."),
    batch_size: int = typer.Option(1, "--batch-size", help="Segments per forward (CPU: 1 is fastest)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Model threads in the main process (default: "
                                          "torch's, all cores). Decoders use one each."),
    ext: Optional[str] = typer.Option(None, "--ext", help="Extensions to take from directories, e.g. mp3,wav "
                                      "(default: every decodable format)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Discard what DIR holds and start again."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: process part I of N of the files (torchrun: "
                                        "RANK/WORLD_SIZE)."),
    files_per_part: int = typer.Option(512, "--files-per-part", hidden=True, help="Audio files per Parquet part."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no per-file error lines."),
    as_json: bool = typer.Option(False, "--json", help="Print a one-line JSON summary on stdout."),
) -> None:
    """Embed directories of audio into a Parquet dataset (resumable, shardable)."""
    with errors_to_exit_codes():
        from maest_cli.embed.extraction import extract as run_extract

        summary = run_extract(
            [str(p) for p in paths], out, model=model, preset=patchout, time_keep_every=time_keep_every,
            drop_freq_rows=drop_freq_rows, block=block, tokens=tokens, pool=pool, hop=hop, scores=scores,
            device=device, dtype=dtype, workers=workers, batch_size=batch_size, threads=threads,
            extensions=ext.split(",") if ext else None, overwrite=overwrite, shard=shard,
            progress=not quiet, files_per_part=files_per_part)
        if as_json:
            print(summary.to_json())
        if not quiet:
            err.print(f"maest: {out}: {summary.n_done} files embedded ({summary.audio_seconds / 60:.1f} audio-min, "
                      f"{summary.audio_min_per_s:.2f} audio-min/s), {summary.n_skipped} already there, "
                      f"{summary.n_failed} failed", markup=False, soft_wrap=True)
        if summary.n_failed:
            err.print(f"maest: {summary.n_failed} failed; see {summary.errors_file}", markup=False, soft_wrap=True)
            raise typer.Exit(1)

# ------------------------------------------------------------------ prepare-mels

@app.command("prepare-mels")
def prepare_mels_cmd(
    paths: list[Path] = typer.Argument(None, help="AUDIO_ROOT; with --verify: DATASET_DIR; with --merge: the PARTs.",
                                       show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Dataset directory to write (or finish)."),
    labels: list[Path] = typer.Option(None, "--labels", help="Label file: TSV path<TAB>tags[,...], MTG-Jamendo "
                                      "split TSVs, or MagnaTagATune annotations_final.csv. Repeatable."),
    vocabulary: Optional[str] = typer.Option(None, help="Fix the label list (name in configs/labels or a file); "
                                             "other tags are reported as unknown."),
    top_k: int = typer.Option(50, "--top-k", help="MagnaTagATune: keep the K most frequent tags."),
    crop: str = typer.Option("center:30", help="center:SECONDS (the paper: the central 30 s) or full."),
    shard_size: str = typer.Option("2GB", help="Largest shard file, e.g. 2GB, 512MB."),
    workers: int = typer.Option(1, help="Decoding processes."),
    split_by: str = typer.Option("artist", help="artist (artist-disjoint), none (by track) or mtt-directory "
                                 "(MagnaTagATune 12:1:3); label files with splits win."),
    val_fraction: float = typer.Option(0.1, help="Share of tracks for validation (when splits are drawn)."),
    test_fraction: float = typer.Option(0.1, help="Share of tracks for test (when splits are drawn)."),
    seed: int = typer.Option(0, help="Seed of the split draw."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: do part I of N of the input (join with --merge)."),
    verify: bool = typer.Option(False, "--verify", help="Check DATASET_DIR against its shards; exit 1 on a problem."),
    merge: bool = typer.Option(False, "--merge", help="Join the PART directories of a --shard run into --out."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Audio files -> sharded float16 log-mel memmaps with an index, for training (resumable)."""
    with errors_to_exit_codes():
        from maest_cli.errors import UsageError
        from maest_cli.mels.dataset import DatasetError
        from maest_cli.mels.prepare import merge_datasets, prepare_mels, verify_dataset

        paths = list(paths or [])
        if verify and merge:
            raise UsageError("--verify and --merge do not go together")
        if verify:
            if len(paths) != 1:
                raise UsageError("--verify takes one DATASET_DIR")
            problems = verify_dataset(paths[0])
            for line in problems:
                print(line)
            if problems:
                print(f"maest: {paths[0]}: {len(problems)} problems", file=sys.stderr)
                raise typer.Exit(1)
            print(f"maest: {paths[0]}: ok", file=sys.stderr)
            return
        if out is None:
            raise UsageError("--out DATASET_DIR is required")
        try:
            if merge:
                summary = merge_datasets(paths, out, progress=not quiet)
            else:
                if len(paths) != 1:
                    raise UsageError("give one AUDIO_ROOT (or --verify DATASET_DIR, or --merge PART... --out DIR)")
                summary = prepare_mels(paths[0], out, labels=labels or None, vocabulary=vocabulary, top_k=top_k,
                                       crop=crop, shard_size=shard_size, workers=workers, split_by=split_by,
                                       val_fraction=val_fraction, test_fraction=test_fraction, shard=shard,
                                       seed=seed, progress=not quiet)
        except DatasetError as e:
            print_error(e)
            raise typer.Exit(1) from None
        problems = summary.get("verify_problems") or []
        for line in problems:
            print(line)
        splits = ", ".join(f"{k} {v}" for k, v in summary.get("written_per_split", {}).items())
        rate = summary.get("audio_minutes_per_s")
        print(f"maest: {out}: {summary['written']} tracks in {summary['shards']} shards ({splits})"
              + (f", {rate} audio-min/s" if rate else "")
              + (" (already complete)" if summary.get("already_complete") else ""), file=sys.stderr)
        if summary["failed"]:
            print(f"maest: {summary['failed']} files failed, see {out / 'errors.tsv'}", file=sys.stderr)
        if summary["failed"] or problems:
            raise typer.Exit(1)

# ------------------------------------------------------------------ train

@app.command("train")
def train_cmd(
    data: Optional[Path] = typer.Option(None, "--data", help="A `maest prepare-mels` dataset directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory to create (checkpoints, metrics, state)."),
    config: Optional[str] = typer.Option(None, "--config", help="Recipe: tiny, maest-5s/10s/20s/30s (configs/train) "
                                         "or a TOML file. Default: maest-30s."),
    init: Optional[str] = typer.Option(None, "--init", help="random, or a local weights file: MAEST (.ckpt, "
                                       "safetensors, HF), PaSST or DeiT; a model name only if already cached."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (overrides the recipe)."),
    epoch_len: Optional[int] = typer.Option(None, "--epoch-len", help="Tracks drawn per epoch."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Examples per process per step."),
    nproc: int = typer.Option(1, "--nproc", help="Local processes (torchrun): GPUs, or CPU processes over gloo."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this directory from its "
                                          "last saved state."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the init, the epoch draws and augmentations."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, fp32, bf16, fp16 (GPU)."),
    sets: list[str] = typer.Option(None, "--set", help="Any recipe key, e.g. --set lr=1e-4 (repeatable)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar (epoch lines still print)."),
) -> None:
    """Train MAEST with patchout on a mel dataset (resumable; --nproc N for DDP)."""
    with errors_to_exit_codes():
        from maest_cli.errors import UsageError
        from maest_cli.training.config import load_train_config, parse_set

        if nproc < 1:
            raise UsageError("--nproc must be 1 or more")
        overrides = {**parse_set(sets), **{k: v for k, v in dict(
            init=init, epochs=epochs, epoch_len=epoch_len, batch_size=batch_size, device=device, seed=seed,
            dtype=dtype).items() if v is not None}}
        from maest_cli.training.loop import (
            TrainError,
            in_launched_worker,
            launch,
            train,
            worker_argv,
        )

        if nproc > 1 and not in_launched_worker():
            # Fail on usage errors here, before N processes start and fail alike.
            if resume is None:
                load_train_config(config or "maest-30s", overrides)
                if data is None or out is None:
                    raise UsageError("--data DATASET_DIR and --out RUN_DIR are required (or --resume RUN_DIR)")
                from maest_cli.mels.dataset import DatasetError, MelDataset

                try:
                    MelDataset(data)
                except DatasetError as e:
                    raise UsageError(f"--data: {e}") from None
            code = launch(nproc, worker_argv(sys.argv))
            raise typer.Exit(code)
        try:
            summary = train(data, out, config, overrides, resume=resume, progress=not quiet)
        except TrainError as e:
            print_error(e)
            raise typer.Exit(1) from None
        if "already_complete" not in summary and summary["rank"] == 0:
            b = summary["best"]
            best = f"best {b['metric']} {b['value']:.4f} at epoch {b['epoch']}" if b.get("value") is not None else ""
            err.print(f"maest: {summary['run_dir']}: {summary['epochs']} epochs, {summary['global_step']} steps"
                      + (f"; {best}" if best else ""), markup=False, highlight=False)

# ------------------------------------------------------------------ probe

@app.command("probe")
def probe_cmd(
    args: list[str] = typer.Argument(None, metavar="DATASET | RESULTS.json...",
                                     help="mtt, mtg-jamendo-{genre,instrument,moodtheme,top50} or custom; "
                                          "with --compare: results.json files."),
    embeddings: Optional[Path] = typer.Option(None, "--embeddings", "-e",
                                              help="`maest extract` output folder (the cache with --audio-root)."),
    dataset_root: Optional[Path] = typer.Option(None, "--dataset-root",
                                                help="mtt: folder of annotations_final.csv; MTG-Jamendo: clone of "
                                                     "mtg-jamendo-dataset; custom: the TSV/CSV file."),
    audio_root: Optional[Path] = typer.Option(None, "--audio-root", help="Extract from this audio folder first."),
    split: Optional[int] = typer.Option(None, "--split", help="MTG-Jamendo split number (default 0)."),
    grid: str = typer.Option("quick", "--grid", help="paper, quick, none, or a grid TOML file."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds of the selected setting (mean and std)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N."),
    out: Optional[Path] = typer.Option(None, "--out", help="Results folder (default: probe-DATASET-EMBEDDINGSNAME)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: all cores)."),
    min_match: float = typer.Option(0.5, "--min-match", help="Least share of labelled tracks that must have "
                                                            "an embedding."),
    fresh: bool = typer.Option(False, "--fresh", help="Discard the state of an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace results of other inputs in --out."),
    compare: bool = typer.Option(False, "--compare", help="Print results.json files side by side."),
    model: Optional[str] = typer.Option(None, "--model", help="With --audio-root: model name or weights file."),
    patchout: str = typer.Option("none", "--patchout", help="With --audio-root: speed preset (as extract)."),
    block: int = typer.Option(7, "--block", help="With --audio-root: embeddings after this many blocks."),
    tokens: str = typer.Option("cls,dist,avg", "--tokens", help="With --audio-root: tokens to stack."),
    dtype: str = typer.Option("auto", "--dtype", help="With --audio-root: auto, fp32, bf16."),
    workers: int = typer.Option(1, "--workers", help="With --audio-root: decoding workers."),
    extract_batch_size: int = typer.Option(1, "--extract-batch-size", help="With --audio-root: model batch."),
) -> None:
    """The paper's downstream evaluation: an MLP probe on embeddings, scored on the test split."""
    with errors_to_exit_codes():
        from maest_cli.errors import UsageError

        if compare:
            from maest_cli.probing.report import compare_table, read_results

            if not args:
                raise UsageError("--compare needs results.json files")
            Console(width=None if sys.stdout.isatty() else 200).print(
                compare_table([(a, read_results(a)) for a in args]))
            return
        if not args or len(args) != 1:
            raise UsageError("give one DATASET (or --compare A.json B.json)")
        if dataset_root is None:
            raise UsageError("--dataset-root is required")
        from maest_cli.probing.data import ProbeError
        from maest_cli.probing.report import results_table
        from maest_cli.probing.run import default_out, probe

        try:
            results = probe(args[0], dataset_root=dataset_root, embeddings=embeddings, audio_root=audio_root,
                            split=split, grid=grid, seeds=seeds, device=device,
                            out=out or default_out(args[0], embeddings, audio_root), threads=threads,
                            min_match=min_match, resume=not fresh, overwrite=overwrite,
                            log=lambda m: err.print(m, markup=False, highlight=False, soft_wrap=True),
                            extract_options={"model": model, "preset": patchout, "block": block,
                                             "tokens": tuple(t for t in tokens.split(",") if t), "dtype": dtype,
                                             "workers": workers, "batch_size": extract_batch_size,
                                             "device": device})
        except ProbeError as e:
            err.print(f"maest: error: {e}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from None
        Console(width=None if sys.stdout.isatty() else 200).print(results_table(results))
        if results.get("extract_failed"):
            print_error(f"{results['extract_failed']} audio files could not be embedded (see "
                        f"{results['embeddings']['dir']}); the probe used the others")
            raise typer.Exit(1)

# ------------------------------------------------------------------ corpus
# (corpus command goes here)
corpus_app = typer.Typer(help="The demo corpus: tagged music rendered offline from the music21 scores.",
                         no_args_is_help=True)
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("build")
def corpus_build(
    out: Path = typer.Argument(..., help="Folder of the corpus (new, or an unfinished build to resume)."),
    clips: Optional[int] = typer.Option(None, help="Clips in total, pre-training + downstream (default: "
                                                    "configs/corpus.toml, 3600)."),
    seed: int = typer.Option(0, help="Decides pieces, splits, instruments, tempi, excerpts: same seed, same corpus."),
    workers: int = typer.Option(1, help="Processes reading scores and rendering clips."),
    sample_rate: Optional[int] = typer.Option(None, help="Hz of the FLAC files (default 22050)."),
    collections: Optional[str] = typer.Option(None, help="Comma-separated collection ids (default: all of the "
                                                          "config)."),
    config: Optional[Path] = typer.Option(None, help="A corpus TOML instead of configs/corpus.toml."),
    soundfont: Optional[Path] = typer.Option(None, help="SoundFont file (default: FluidR3_GM of the Debian package "
                                                         "fluid-soundfont-gm)."),
) -> None:
    """Render the scores of music21 to labelled 30 s clips (FluidSynth): resumable, deterministic."""
    with errors_to_exit_codes():
        from maest_cli.demo.corpus import build_corpus

        summary = build_corpus(out, clips=clips, seed=seed, workers=workers, sample_rate=sample_rate,
                               collections=collections.split(",") if collections else None, config=config,
                               soundfont=soundfont)
        print(json.dumps(summary, indent=2))
        if summary.get("failed"):
            raise typer.Exit(1)


@corpus_app.command("info")
def corpus_info_command(
    out: Path = typer.Argument(..., help="Folder of a finished corpus."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole manifest."),
) -> None:
    """What a corpus holds: clips per split and collection, tags, versions, licences."""
    with errors_to_exit_codes():
        from maest_cli.demo.corpus import corpus_info

        m = corpus_info(out)
        if as_json:
            print(json.dumps(m, indent=2))
            return
        from rich.table import Table

        console = Console(width=None if sys.stdout.isatty() else 160)
        s = m["summary"]
        console.print(f"{out}: {s['clips']} clips ({s['hours']} h, {s['audio_bytes'] / 1e6:.0f} MB of "
                      f"{m['audio']['format']} at {m['audio']['sample_rate']} Hz), {s['pieces']} pieces, seed {m['seed']}"
                      + (f", {s['failed']} failed" if s["failed"] else ""), markup=False, highlight=False)
        t = Table(title="clips per collection and split (pre-training | downstream)")
        t.add_column("collection")
        for pool in ("pretrain", "downstream"):
            for split in ("train", "validation", "test"):
                t.add_column(f"{pool[:4]} {split[:5]}", justify="right")
        t.add_column("licence")
        for c in m["collections"]:
            t.add_row(c["id"], *[str(c["clips"][p][sp]) for p in ("pretrain", "downstream")
                                 for sp in ("train", "validation", "test")], c["licence"][:60])
        console.print(t)
        for name, tags in m["tags"].items():
            t = Table(title=f"{name}: clips per tag ({m['files'].get('task:' + name, m['files'].get(name, {})).get('path', '')})")
            for col in ("tag", "train", "validation", "test"):
                t.add_column(col, justify="left" if col == "tag" else "right")
            for tag, n in tags.items():
                t.add_row(tag, str(n["train"]), str(n["validation"]), str(n["test"]))
            console.print(t)
        console.print(f"versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if 'sha' not in k)}",
                      markup=False, highlight=False)

# ------------------------------------------------------------------ findings
# (findings command: issue 8)

@app.command("findings")
def findings_cmd(
    out: Path = typer.Argument(..., help="Folder for findings.json, findings.md and the PNGs."),
    corpus: Path = typer.Option(..., "--corpus", help="A `maest corpus build` folder (built there when absent)."),
    model: str = typer.Option("maest-tiny", help="The trained MAEST: registry name or weights file."),
    work: Optional[Path] = typer.Option(None, help="Cache of every step (default OUT/work); rerun to resume."),
    mels: Optional[Path] = typer.Option(None, help="prepare-mels dataset of the pre-training clips for "
                                        "EfficientNet-B0 (default: the model's own, else prepared in WORK)."),
    effnet: Optional[Path] = typer.Option(None, help="A trained EfficientNet-B0 (`maest train --config effnet-b0`) "
                                          "instead of training one."),
    effnet_epochs: Optional[int] = typer.Option(None, help="EfficientNet-B0 training budget in epochs (default: "
                                                "configs/train/effnet-b0.toml, 10); the schedule is stretched."),
    tasks: Optional[str] = typer.Option(None, help="Comma-separated downstream tasks (default: all of the corpus)."),
    presets: Optional[str] = typer.Option(None, help="Comma-separated presets (default: all of configs/presets.toml)."),
    preset_block: Optional[int] = typer.Option(None, help="Block of the preset comparison (default: the best on "
                                               "validation)."),
    grid: str = typer.Option("quick", help="Probe grid of configs/probe.toml (each probe's setting chosen on validation)."),
    seeds: int = typer.Option(3, help="Probe seeds of the headline comparisons."),
    sweep_seeds: int = typer.Option(1, help="Probe seeds of the block x token sweep."),
    jobs: int = typer.Option(2, help="Probes run at once (one thread each)."),
    batch_size: int = typer.Option(8, help="Segments per forward."),
    repeats: int = typer.Option(5, help="Timing rounds of the throughput comparison."),
    clips: Optional[int] = typer.Option(None, help="Clips of the corpus, when it has to be built."),
    corpus_workers: int = typer.Option(2, help="Render processes, when the corpus has to be built."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
) -> None:
    """Reproduce the paper's findings on the demo corpus: best blocks, presets vs EfficientNet-B0, training helps."""
    with errors_to_exit_codes():
        from maest_cli.demo.findings import FindingsOptions, run_findings

        def names(text: Optional[str]) -> Optional[tuple[str, ...]]:
            return tuple(t.strip() for t in text.split(",") if t.strip()) if text else None

        opts = FindingsOptions(model=model, tasks=names(tasks), grid=grid, seeds=seeds, sweep_seeds=sweep_seeds,
                               presets=names(presets), preset_block=preset_block,
                               effnet=str(effnet) if effnet else None, effnet_epochs=effnet_epochs,
                               mels=str(mels) if mels else None, corpus_clips=clips, corpus_workers=corpus_workers,
                               batch_size=batch_size, device=device, jobs=jobs, repeats=repeats)
        f = run_findings(corpus, out, work=work, options=opts)
        for line in f["observations"]:
            err.print(f"- {line}", markup=False, highlight=False, soft_wrap=True)
        err.print(f"maest: findings in {out}/findings.md (tables), findings.json, blocks.png, presets.png, "
                  f"baselines.png", markup=False, highlight=False, soft_wrap=True)
        failed = sum(v.get("failed", 0) for v in f["sweeps"].values())
        if failed:
            print_error(f"{failed} clip embeddings failed (see the _errors folders under {f['work']}/emb)")
            raise typer.Exit(1)

# ------------------------------------------------------------------ bench

@app.command()
def bench(
    presets: str = typer.Option("all", help="Comma-separated presets of configs/presets.toml, or all."),
    baseline: str = typer.Option("effnet-b0", help="effnet-b0 (EfficientNet-B0, Discogs-EffNet input) or none."),
    model: Optional[str] = typer.Option(None, help="Model name or path; default: random weights of --variant "
                                        "(the same time as real ones; fidelity then means little)."),
    variant: str = typer.Option("30s", help="Segment length of the random-weight model: 5s, 10s, 20s, 30s."),
    block: int = typer.Option(7, help="Stop after this block (0: all blocks and the classifier head)."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help="auto (each preset's own: bf16 only where native, else fp32), fp32, "
                                           "bf16 or int8 for every preset."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads (default: torch's, all cores)."),
    audio: Optional[Path] = typer.Option(None, "--audio", help="Also end to end from the audio files in DIR, and "
                                         "fidelity (cosine to preset none) of each preset."),
    workers: int = typer.Option(1, help="With --audio: decoder processes."),
    hop: str = typer.Option("half", help="With --audio: segment hop of extract (half, full or seconds)."),
    repeats: int = typer.Option(5, help="Timed rounds; every contender runs once per round (median, min, max)."),
    warmup: int = typer.Option(1, help="Untimed calls of each contender first."),
    probe: list[str] = typer.Option(None, "--probe", help="A `maest probe` results.json ([NAME=]FILE; NAME: a "
                                    "preset or effnet-b0, default the file's preset): mAP in the table and plot."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG of throughput vs fidelity (and vs probe "
                                        "mAP), like the paper's Figure 3 (needs --audio or --probe)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    out: Optional[Path] = typer.Option(None, help="Write the report as JSON here."),
    model_only: bool = typer.Option(False, "--model-only", help="Model-only timing even when --audio is given."),
    compile_baseline: bool = typer.Option(False, "--compile", help="torch.compile the baseline (about 1.7x faster "
                                          "on CPU; MAEST is GEMM-bound and gains nothing, so it stays eager)."),
) -> None:
    """Audio-minutes per second of each preset against EfficientNet-B0, FLOPs and efficiency."""
    with errors_to_exit_codes():
        from maest_cli.bench.throughput import print_report, run_bench

        console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 200)
        report = run_bench(model=model, variant=variant, block=block or None, presets=presets, baseline=baseline,
                           device=device, dtype=dtype, threads=threads, audio=None if model_only else audio,
                           workers=workers, hop=hop, repeats=repeats, warmup=warmup, probe_results=probe,
                           plot=plot, compile_baseline=compile_baseline, console=console)
        print_report(report, console)
        if out:
            from maest_cli.io.artefacts import write_json

            write_json(out, report)
        if plot:
            console.print(f"maest: plot written to {plot}", markup=False, soft_wrap=True)
        if as_json:
            print(json.dumps(report, indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
