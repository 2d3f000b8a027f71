"""maest findings (issue 8): EfficientNet-B0 through `maest train`, the one-pass embedding sweep
(exact against `maest extract --block k`), and the pipeline end to end on a toy corpus, killed
and resumed.

Everything is generated: tone clips whose labels are the bands their tones are in (so a probe
can learn them), a tiny random MAEST (4 blocks), EfficientNet-B0 trained for a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf
import torch
from conftest import write_audio
from typer.testing import CliRunner

import maest_cli.demo.findings as findings_module
from maest_cli.audio.frontend import file_mel
from maest_cli.cli.app import app
from maest_cli.embed.extraction import extract
from maest_cli.embed.store import read_errors, read_metadata
from maest_cli.embed.sweep import (
    TOKEN_STACKS,
    EffNetEmbedder,
    MaestSweep,
    MelCache,
    MelStatsEmbedder,
    block_dir,
    run_sweep,
)
from maest_cli.io.config import ConfigError
from maest_cli.models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from maest_cli.models.maest import MAEST, tiny_config
from maest_cli.models.registry import load_model
from maest_cli.training.config import TrainConfig, load_train_config

BANDS_HZ = (250, 700, 1800, 4500)
LABELS = ["band0", "band1", "band2", "band3"]
SEG = 96  # frames per segment of the tiny model: a 2.5 s clip is 2 segments (one end-aligned)
runner = CliRunner()

EFFNET_RECIPE = """
[model]
architecture = "effnet-b0"
[data]
epoch_len = 16
batch_size = 4
workers = 0
[optim]
lr = {lr}
grad_clip = 1.0
[schedule]
epochs = {epochs}
warmup_epochs = 1
decay_start_epoch = 1
decay_epochs = 2
lr_update = "step"
[augment]
mixup_alpha = {mixup}
specaug_time_masks = {masks}
specaug_freq_masks = {masks}
[swa]
swa_start = {swa_start}
swa_every = 1
[run]
device = "cpu"
threads = 1
log_every = 1
save_every = 4
val_batch_size = 16
val_segments = 1
"""

PROBE_GRID = """
[protocol]
warmup_epochs = 2
hold_epochs = 0
[grid]
batch_size = [8]
epochs = [5]
dropout = [0.5]
lr = [1e-3]
"""


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tone(bands: list[int], rng: np.random.Generator, seconds: float = 2.5) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.05 * rng.standard_normal(len(t))
    for b in bands:
        x += 0.3 * np.sin(2 * np.pi * BANDS_HZ[b] * (1 + 0.03 * rng.uniform(-1, 1)) * t)
    return x.astype(np.float32)


def toy_corpus(root: Path, n: int = 15) -> Path:
    """A folder that reads as a finished `maest corpus build`: pretrain/ (tagged with the bands
    sounding) and downstream/ with two tasks, `low` (is band 0 or 1 the loudest of the pair) and
    `bands` (multi-label: the bands sounding)."""
    rng = np.random.default_rng(0)
    splits = ["train", "train", "train", "validation", "test"]
    pre = ["path\ttags\tartist\tsplit\ttrack_id"]
    low = ["path\ttags\tsplit\tartist\ttrack_id"]
    multi = ["path\ttags\tsplit\tartist\ttrack_id"]
    for pool in ("pretrain", "downstream"):
        (root / pool / "audio" / "tones").mkdir(parents=True)
    for i in range(n):
        bands = [i % 2] + [b for b in (2, 3) if rng.random() < 0.5]
        for pool, rows in (("pretrain", pre), ("downstream", None)):
            rel = f"audio/tones/c{i:03d}.wav"
            sf.write(root / pool / rel, tone(bands, rng), 16000, subtype="PCM_16")
            tags = "|".join(f"band{b}" for b in bands)
            if pool == "pretrain":
                pre.append(f"{rel}\t{tags}\tp{i}\t{splits[i % 5]}\tp{i}")
            else:
                low.append(f"{rel}\t{'low' if i % 2 == 0 else 'high'}\t{splits[i % 5]}\tp{i}\tp{i}")
                multi.append(f"{rel}\t{tags}\t{splits[i % 5]}\tp{i}\tp{i}")
    (root / "pretrain" / "labels.tsv").write_text("\n".join(pre) + "\n")
    (root / "downstream" / "low.tsv").write_text("\n".join(low) + "\n")
    (root / "downstream" / "bands.tsv").write_text("\n".join(multi) + "\n")
    manifest = {"format": "maest-corpus/1", "seed": 0, "created": "2026-01-01T00:00:00+00:00",
                "counts": {"clips": 2 * n, "by_split": {}}, "versions": {},
                "files": {"low": {"path": "downstream/low.tsv", "sha256": "x"}},
                "tasks": {"low": {"description": "band 0 or 1", "file": "downstream/low.tsv",
                                  "seen_in_pretraining": False},
                          "bands": {"description": "bands sounding", "file": "downstream/bands.tsv",
                                    "seen_in_pretraining": True}}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return toy_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return str(save_checkpoint(path, MAEST(tiny_config(frames=SEG, n_classes=4)), labels=LABELS,
                               extra={"name": "tiny-maest"}))


def table(out) -> "pads.Dataset":
    return pads.dataset(str(out), format="parquet").to_table().sort_by("path")


def embeddings(out) -> np.ndarray:
    return np.stack(table(out)["embedding"].to_numpy(zero_copy_only=False))


# ------------------------------------------------------------------ the sweep is extract, exactly

def test_every_block_of_one_forward_equals_extract_of_that_block(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    (audio / "sub").mkdir(parents=True)
    for i, (name, seconds) in enumerate([("a.wav", 2.5), ("sub/b.flac", 4.1), ("c.mp3", 1.2)]):
        write_audio(audio / name, seconds, seed=i)
    lm = load_model(tiny_model)
    sweep = MaestSweep(lm, tmp_path / "sweep", batch_size=3)
    s = run_sweep([audio], sweep, MelCache(tmp_path / "mels"))
    assert (s.n_files, s.n_done, s.n_failed) == (3, 3, 0)
    assert len(sweep.outputs) == 4 * len(TOKEN_STACKS)
    for k in range(1, 5):
        ref = tmp_path / f"extract-{k}"
        extract([str(audio)], str(ref), model=tiny_model, block=k, workers=0, progress=False,
                engine="torch")  # the sweep's engine: bit-identical rows
        full = block_dir(tmp_path / "sweep", k, ("cls", "dist", "avg"))
        a, b = table(ref), table(full)
        assert a.drop(["embedding"]).equals(b.drop(["embedding"]))  # path, root, duration, n_segments
        assert np.array_equal(embeddings(ref), embeddings(full)), f"block {k} differs from extract --block {k}"
        for j, tok in enumerate(("cls", "dist", "avg")):  # the single tokens are slices of the same forward
            single = embeddings(block_dir(tmp_path / "sweep", k, (tok,)))
            assert np.array_equal(single, embeddings(ref)[:, j * 64:(j + 1) * 64])
        # same settings as extract: extract run into the sweep's folder finds nothing to do
        again = extract([str(audio)], str(full), model=tiny_model, block=k, workers=0, progress=False)
        assert (again.n_files, again.n_skipped, again.n_done) == (3, 3, 0)
        ours, theirs = read_metadata(full), read_metadata(ref)
        assert ours.pop("made_by").startswith("maest_cli.embed.sweep")
        for key in ("runtime", "versions"):
            ours.pop(key), theirs.pop(key)
        assert ours == theirs


def test_sweep_killed_midway_resumes_to_the_same_datasets(tmp_path, tiny_model):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(5):
        write_audio(audio / f"t{i}.wav", 1.5 + 0.3 * i, seed=i)
    (audio / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    lm = load_model(tiny_model)
    stacks = [("avg",), ("cls", "dist", "avg")]
    clean = MaestSweep(lm, tmp_path / "clean", token_stacks=stacks, blocks=[2, 4])
    run_sweep([audio], clean)

    class Killed(MaestSweep):
        calls = 0

        def __call__(self, f, mel, n):
            Killed.calls += 1
            if Killed.calls == 3:
                raise KeyboardInterrupt
            return super().__call__(f, mel, n)

    with pytest.raises(KeyboardInterrupt):
        run_sweep([audio], Killed(lm, tmp_path / "resumed", token_stacks=stacks, blocks=[2, 4]),
                  MelCache(tmp_path / "mels"))
    cache = MelCache(tmp_path / "mels")
    s = run_sweep([audio], MaestSweep(lm, tmp_path / "resumed", token_stacks=stacks, blocks=[2, 4]), cache)
    assert s.n_skipped == 2 and s.n_done == 3 and s.n_failed == 1  # broken.wav fails again, reported
    assert cache.hits >= 1  # the clip in flight at the kill was decoded once already
    for b in (2, 4):
        for tok in stacks:
            out = block_dir(tmp_path / "resumed", b, tok)
            assert np.array_equal(embeddings(out), embeddings(block_dir(tmp_path / "clean", b, tok)))
            errors = read_errors(out).to_pylist()
            assert [e["path"] for e in errors] == ["broken.wav"] and errors[0]["stage"] in ("open", "decode")


def test_effnet_and_mel_stats_rows_are_what_they_say(tmp_path, tiny_model):
    from maest_cli.audio.frontend import InputNorm
    from maest_cli.models.effnet import mel_patches
    from maest_cli.training.effnet import build_tagger, load_effnet, save_effnet_checkpoint

    audio = tmp_path / "audio"
    audio.mkdir()
    write_audio(audio / "x.wav", 4.0, seed=3)
    write_audio(audio / "y.wav", 1.0, seed=4)  # 64 frames: one zero-padded patch
    torch.manual_seed(0)
    tagger = build_tagger(4)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so that folding them is tested
        for m in tagger.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = save_effnet_checkpoint(tmp_path / "eff.safetensors", tagger, LABELS,
                                  extra={"input_norm": {"mean": 1.0, "std": 2.0, "source": "dataset"}})
    eff = load_effnet(path)
    run_sweep([audio], EffNetEmbedder(eff, tmp_path / "eff"))
    run_sweep([audio], MelStatsEmbedder(tmp_path / "stats"))
    rows = table(tmp_path / "eff")
    norm = InputNorm(1.0, 2.0, "dataset")
    for r, emb in zip(rows.to_pylist(), embeddings(tmp_path / "eff")):
        mel = torch.from_numpy(file_mel(str(audio / r["path"])))
        with torch.no_grad():
            want = eff.model(norm.apply(mel_patches(mel)))[0].double().mean(0).numpy()
        assert r["n_segments"] == len(mel_patches(mel))
        np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
    for r, emb in zip(table(tmp_path / "stats").to_pylist(), embeddings(tmp_path / "stats")):
        mel = file_mel(str(audio / r["path"])).astype(np.float64)
        np.testing.assert_allclose(emb, np.concatenate([mel.mean(0), mel.std(0)]), rtol=1e-6, atol=1e-6)
    meta = read_metadata(tmp_path / "eff")
    assert meta["model"]["architecture"] == "effnet-b0" and meta["embedding_dim"] == 1280
    assert read_metadata(tmp_path / "stats")["embedding_dim"] == 192


# ------------------------------------------------------------------ EfficientNet-B0 in `maest train`

def test_effnet_trains_in_maest_train_loss_falls_and_checkpoints_reload(tmp_path, corpus, monkeypatch):
    import maest_cli.training.loop as train_module
    from maest_cli.mels.prepare import prepare_mels
    from maest_cli.training.effnet import FORMAT, load_effnet
    from maest_cli.training.loop import METRICS, train

    monkeypatch.setattr(train_module, "SWA_BN_CROPS", 16)  # 512 in a real run

    prepare_mels(corpus / "pretrain", tmp_path / "mels", labels=corpus / "pretrain" / "labels.tsv", crop="full",
                 progress=False)
    recipe = tmp_path / "effnet.toml"
    recipe.write_text(EFFNET_RECIPE.format(epochs=5, mixup=0.0, masks=0, swa_start=4, lr=3e-4))
    run = tmp_path / "run"
    summary = train(tmp_path / "mels", run, recipe, progress=False)
    assert summary["epochs"] == 5
    losses = [r["train_loss"] for r in map(json.loads, (run / METRICS).read_text().splitlines())
              if r["kind"] == "epoch"]
    assert losses[-1] < losses[0], losses
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["patchout"] is None and resolved["model"]["architecture"] == "effnet-b0"
    for kind in ("last", "best", "swa"):
        eff = load_effnet(run / f"{kind}.safetensors")
        assert eff.labels == LABELS and eff.cfg.frames == 128 and eff.input_norm.source == "dataset"
        assert eff.metadata["format"] == FORMAT
        assert json.loads(eff.metadata["train_config"])["architecture"] == "effnet-b0"
    # the SWA weights' BatchNorm statistics are re-estimated, not the mean of the snapshots'
    swa = load_effnet(run / "swa.safetensors").model
    last = load_effnet(run / "last.safetensors").model
    assert not torch.equal(swa.features[0][1].running_var, last.features[0][1].running_var)
    with pytest.raises(CheckpointError):  # a MAEST loader never takes it for a MAEST
        load_checkpoint(run / "best.safetensors")
    again = train(resume=run, progress=False)
    assert again.get("already_complete")


def test_effnet_recipe_refuses_maest_only_keys(tmp_path):
    cfg = load_train_config("effnet-b0")
    assert cfg.architecture == "effnet-b0" and cfg.crop_frames() == 128
    assert TrainConfig().architecture == "maest" and TrainConfig().crop_frames() == 1876
    for bad in ({"width": 192}, {"frames": 626}, {"init": "some.ckpt"}, {"architecture": "resnet"}):
        with pytest.raises(ConfigError):
            cfg.replace(**bad)


def test_recalibrated_batchnorm_holds_the_average_statistics_of_the_batches():
    from maest_cli.training.effnet import recalibrate_batchnorm

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1, bias=False), torch.nn.BatchNorm2d(2, momentum=0.01),
                              torch.nn.Dropout(0.9))
    torch.nn.init.ones_(net[0].weight)
    batches = [torch.full((4, 1, 2, 2), 1.0), torch.full((4, 1, 2, 2), 3.0)]
    recalibrate_batchnorm(net, batches)
    assert torch.allclose(net[1].running_mean, torch.tensor([2.0, 2.0]))
    assert not net.training and net[1].momentum == 0.01


# ------------------------------------------------------------------ the pipeline

def options(tmp: Path, model: str, **kw) -> findings_module.FindingsOptions:
    grid = tmp / "grid.toml"
    grid.write_text(PROBE_GRID)
    recipe = tmp / "effnet.toml"
    recipe.write_text(EFFNET_RECIPE.format(epochs=1, mixup=0.3, masks=1, swa_start=0, lr=1e-3))
    base = dict(model=model, grid=str(grid), seeds=2, sweep_seeds=1, token_stacks=(("cls",), ("cls", "dist", "avg")),
                presets=("none", "fast"), effnet_config=str(recipe), jobs=1, repeats=1, warmup=0, batch_size=4,
                compile_baseline=False)  # torch.compile takes tens of seconds; test_bench covers it
    return findings_module.FindingsOptions(**{**base, **kw})


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, corpus, tiny_model):
    """The pipeline run once, killed in its first probe step and resumed: (out, options, calls)."""
    tmp = tmp_path_factory.mktemp("findings")
    opts = options(tmp, tiny_model)
    real = findings_module.probe_one
    calls = {"killed_run": 0, "resumed_run": 0}
    mp = pytest.MonkeyPatch()

    def killing(job, grid, threads=1):
        calls["killed_run"] += 1
        if calls["killed_run"] == 7:
            raise KeyboardInterrupt
        return real(job, grid, threads)

    mp.setattr(findings_module, "probe_one", killing)
    with pytest.raises(KeyboardInterrupt):
        findings_module.run_findings(corpus, tmp / "out", options=opts, log=lambda m: None)

    def counting(job, grid, threads=1):
        calls["resumed_run"] += 1
        return real(job, grid, threads)

    mp.setattr(findings_module, "probe_one", counting)
    f = findings_module.run_findings(corpus, tmp / "out", options=opts, log=lambda m: None)
    mp.undo()
    return tmp / "out", opts, calls, f


def test_pipeline_end_to_end_writes_the_tables_and_plots(pipeline):
    out, opts, calls, f = pipeline
    for name in ("findings.json", "findings.md", "blocks.png", "presets.png", "baselines.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    md = (out / "findings.md").read_text()
    assert md.startswith("## What the tool finds on the demo corpus")
    for heading in ("### 1. Where are the best features?", "### 2. Inference patchout", "### 3. Does training help?"):
        assert heading in md
    assert "| block | low | bands | mean | random weights (mean) |" in md
    saved = json.loads((out / "findings.json").read_text())
    assert saved["format"] == "maest-findings/1" and saved["blocks"]["depth"] == 4
    rows = saved["blocks"]["rows"]
    assert len(rows) == 4 * 2 * 2 + 4 * 2  # maest: blocks x stacks x tasks; random: blocks x tasks
    scored = [r for r in rows if r["test_map"] is not None]
    assert len(scored) == len(rows), [r.get("error") for r in rows if r["test_map"] is None]
    assert all(0 <= r["test_map"] <= 1 and 0 <= r["test_roc_auc"] <= 1 for r in scored)
    best = saved["blocks"]["best_by_validation"]["maest"]
    val = {b: np.mean([r["val_map"] for r in rows if r["model"] == "maest" and r["block"] == b
                       and r["tokens"] == "cls+dist+avg"]) for b in range(1, 5)}
    assert val[best] == max(val.values())  # chosen on validation
    presets = {r["preset"]: r for r in saved["presets"]["rows"]}
    assert set(presets) == {"none", "fast"} and saved["presets"]["block"] == best
    assert presets["fast"]["tokens"] < presets["none"]["tokens"]
    for r in [*presets.values(), saved["presets"]["effnet"]]:
        assert r["audio_min_per_s"] > 0 and set(r["tasks"]) == {"low", "bands"}
        assert r["engine"] == "openvino"  # auto on a CPU; EfficientNet-B0 runs through the same engine
        assert all(t["seeds"] == 2 for t in r["tasks"].values())
    base = saved["baselines"]["rows"]
    assert [r["task"] for r in base] == ["low", "bands"]
    assert all(r[m]["test_map"] is not None for r in base for m in ("maest", "random", "effnet", "mel-stats"))
    assert saved["models"]["effnet"]["training"]["epochs"] == 1
    assert saved["observations"] and f["observations"] == saved["observations"]
    # the mel-statistics rows and the EfficientNet rows are probed from their own datasets
    assert read_metadata(Path(saved["work"]) / "emb" / "mel-stats")["model"]["name"] == "mel-stats"


def test_pipeline_killed_in_a_step_redoes_only_what_was_not_finished(pipeline):
    out, opts, calls, f = pipeline
    probes = list((Path(f["work"]) / "probes").rglob("*.json"))
    distinct = 4 * 2 * 2 + 4 * 2 + 2 * (4 + (f["presets"]["block"] != f["baselines"]["blocks"]["maest"]) + 1)
    assert len(probes) == distinct  # one cached result per distinct probe
    # the kill came in the 7th probe: the 6 before it were kept, the resumed run did the rest once
    assert calls["killed_run"] == 7 and calls["resumed_run"] == distinct - 6
    steps = json.loads((Path(f["work"]) / "steps.json").read_text())
    print(json.dumps(steps))
    # a step counts once finished: embed-maest finished before the kill and again (cached) after it
    assert steps["embed-maest"]["runs"] == 2 and steps["probe-blocks"]["runs"] == 1 and steps["bench"]["runs"] == 1


def test_rerun_of_a_finished_pipeline_computes_nothing(pipeline, corpus, monkeypatch):
    out, opts, calls, f = pipeline
    import maest_cli.training.loop as train_module

    def nothing(*a, **k):
        raise AssertionError("recomputed a cached step")

    monkeypatch.setattr(findings_module, "probe_one", nothing)
    monkeypatch.setattr(findings_module, "bench_models", nothing)
    monkeypatch.setattr(train_module, "TrainBatches", nothing)  # no training step
    monkeypatch.setattr(train_module, "evaluate", nothing)
    again = findings_module.run_findings(corpus, out, options=opts, log=lambda m: None)
    assert all(s["done"] == 0 and s["failed"] == 0 for s in again["sweeps"].values())
    for key in ("blocks", "presets", "baselines"):
        assert json.dumps(again[key], sort_keys=True) == json.dumps(f[key], sort_keys=True)


def test_a_work_dir_of_another_corpus_is_refused(pipeline, tmp_path):
    out, opts, calls, f = pipeline
    other = toy_corpus(tmp_path / "other", n=10)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "2027-01-01T00:00:00+00:00"
    (other / "manifest.json").write_text(json.dumps(manifest))
    from maest_cli.errors import UsageError

    with pytest.raises(UsageError, match="another corpus"):
        findings_module.run_findings(other, out, options=opts, log=lambda m: None)


def test_best_block_is_chosen_on_validation_over_tasks_scored_everywhere():
    rows = [{"block": b, "tokens": "cls+dist+avg", "task": t, "val_map": v}
            for (b, t, v) in [(1, "a", 0.5), (1, "b", 0.9), (2, "a", 0.8), (2, "b", 0.7), (3, "a", 0.8),
                              (3, "b", 0.7), (1, "c", None), (2, "c", 0.99), (3, "c", 0.1)]]
    assert findings_module.best_block(rows) == 2  # task c is unscored at block 1: left out; tie 2/3 -> 2
    assert findings_module.best_block([{**r, "val_map": None} for r in rows]) is None


def test_effnet_budget_stretches_the_recipe_schedule():
    o = findings_module.effnet_overrides("effnet-b0", 20)
    base = load_train_config("effnet-b0")
    assert o["epochs"] == 20 and o["decay_start_epoch"] == base.decay_start_epoch * 2
    assert o["swa_start"] == base.swa_start * 2
    assert findings_module.effnet_overrides("effnet-b0", None) == {}


def test_cli_findings_refuses_a_folder_that_is_not_a_corpus(tmp_path):
    (tmp_path / "notes.txt").write_text("not a corpus")
    r = runner.invoke(app, ["findings", str(tmp_path / "out"), "--corpus", str(tmp_path)])
    assert r.exit_code == 2, r.output
    r = runner.invoke(app, ["findings", str(tmp_path / "out"), "--corpus", str(tmp_path), "--seeds", "0"])
    assert r.exit_code == 2


def _probe_or_die(job, grid: str, threads: int = 1) -> dict:
    """Stands in for findings.probe_one in the probe processes: task "crash" segfaults every time."""
    if job.task == "crash":
        import ctypes
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        ctypes.string_at(0)
    return {"test_map": 0.5, "task": job.task}


def test_a_probe_that_kills_its_process_is_an_error_not_cached_the_others_finish(tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "emb" / "m").mkdir(parents=True)
    labels = tmp_path / "labels.tsv"
    labels.write_text("path\ttags\n")
    jobs = [findings_module.ProbeJob(str(work / "emb" / "m"), t, str(labels), 1) for t in ("a", "crash", "b")]
    monkeypatch.setattr(findings_module, "probe_one", _probe_or_die)
    got = findings_module.run_probes(jobs, work, "none", 2, log=lambda m: None)
    assert got[jobs[0]] == {"test_map": 0.5, "task": "a"} and got[jobs[2]] == {"test_map": 0.5, "task": "b"}
    assert got[jobs[1]] == {"error": "probe process died (killed by SIGSEGV) while probing, 2 times"}
    assert [j.cache_file(work, "none").is_file() for j in jobs] == [True, False, True]  # a rerun probes it again
