"""The Python API as a user scripts it: every submodule imported first (which once turned
`maest_cli.train` into a module), then the whole pipeline on tiny data through `maest_cli.*`."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf

import maest_cli
from maest_cli.embed.spec import InferenceSpec
from maest_cli.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECIPE = """
[model]
variant = "tiny"
frames = 96
[data]
epoch_len = 16
batch_size = 8
workers = 0
[schedule]
epochs = 1
warmup_epochs = 0
[augment]
patchout_time = 3
patchout_freq = 1
[swa]
swa_start = 0
[run]
device = "cpu"
dtype = "fp32"
threads = 1
val_batch_size = 64
"""


def test_import_maest_cli_is_cheap():
    code = "import sys, maest_cli; assert 'torch' not in sys.modules, 'torch imported by import maest_cli'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_api_name_is_a_function_that_runs_after_every_submodule_was_imported(tmp_path):
    for info in pkgutil.walk_packages(maest_cli.__path__, "maest_cli."):
        if info.name != "maest_cli.__main__":
            importlib.import_module(info.name)
    for name in ("extract", "prepare_mels", "train", "probe", "run_bench", "load_model", "tag", "similar",
                 "find_duplicates", "build_index"):
        assert inspect.isfunction(getattr(maest_cli, name)), f"maest_cli.{name} is not a function"

    # 24 tracks of 1.2 s: a tone in one of two bands, the tag says which
    audio = tmp_path / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    rows = ["path\ttags\tsplit"]
    for i in range(24):
        band = (i // 4) % 2  # every split holds both tags
        t = np.arange(int(1.2 * 16000)) / 16000
        x = 0.05 * rng.standard_normal(len(t)) + 0.3 * np.sin(2 * np.pi * (400, 3000)[band] * t)
        sf.write(audio / f"t{i:02d}.wav", x.astype(np.float32), 16000, subtype="PCM_16")
        rows.append(f"t{i:02d}.wav\t{('low', 'high')[band]}\t{('train', 'train', 'validation', 'test')[i % 4]}")
    labels = tmp_path / "labels.tsv"
    labels.write_text("\n".join(rows) + "\n")

    mels = maest_cli.prepare_mels(audio, tmp_path / "mels", labels=[labels], crop="full", workers=1, progress=False)
    assert mels["written"] == 24 and not mels["failed"]

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    run = maest_cli.train(tmp_path / "mels", tmp_path / "run", config=recipe, progress=False)
    weights = tmp_path / "run" / "last.safetensors"
    assert weights.is_file(), run

    lm = maest_cli.load_model(str(weights))
    assert lm.config.depth == 4 and lm.default_block == 4  # min(7, depth): shallow models work under defaults
    assert json.loads(lm.metadata["default_block"]) == 4  # recorded by train

    summary = maest_cli.extract(audio, tmp_path / "emb", model=str(weights), workers=0, progress=False)
    assert (summary.n_done, summary.n_failed) == (24, 0)
    meta = maest_cli.read_extract_metadata(tmp_path / "emb")
    assert meta["block"] == 4 and meta["model"]["sha256"] == lm.sha256
    emb = np.stack(pads.dataset(str(tmp_path / "emb")).to_table()["embedding"].to_numpy(zero_copy_only=False))
    assert emb.shape == (24, 3 * lm.config.width) and np.isfinite(emb).all()

    tags = maest_cli.tag(audio, model=str(weights), top=1, workers=0, progress=False)  # the labels it was trained on
    assert isinstance(tags, maest_cli.TagTable) and len(tags.tracks) == 24 and not tags.failures
    assert lm.labels and {t.labels[0].label for t in tags.tracks} <= set(lm.labels)

    near = maest_cli.similar([str(audio / "t05.wav")], tmp_path / "emb", k=3)  # a track of the dataset
    assert isinstance(near, maest_cli.SimilarTable) and near.rows()[0]["path"] == str(audio / "t05.wav")
    assert maest_cli.build_index(tmp_path / "emb").tracks == 24
    assert maest_cli.similar([str(audio / "t05.wav")], tmp_path / "emb", k=3).search == "usearch"
    assert maest_cli.find_duplicates(tmp_path / "emb", threshold=1.0).pairs == []  # 24 different tracks

    grid = tmp_path / "grid.toml"
    grid.write_text("batch_size = [8]\nepochs = [3]\ndropout = [0.5]\nlr = [1e-3]\n[protocol]\nhidden = 16\n"
                    "warmup_epochs = 1\n")
    res = maest_cli.probe("custom", dataset_root=labels, embeddings=tmp_path / "emb", grid=str(grid), seeds=1,
                          device="cpu", out=tmp_path / "probe")
    assert res["dataset"]["join"]["matched"] == 24 and 0 <= res["test"]["roc_auc"]["mean"] <= 1
    assert json.loads((tmp_path / "probe" / "results.json").read_text())["block"] == 4

    report = maest_cli.run_bench(InferenceSpec(model=str(weights), device="cpu"), presets="none,fast",
                                 baseline="none", repeats=1, warmup=0)
    assert [r["name"] for r in report["results"]] == ["none", "fast"] and report["block"] == 4
    assert all(r["audio_min_per_s"] > 0 for r in report["results"])


def test_the_spec_is_checked_before_anything_is_loaded():
    for bad in ({"pool": "album"}, {"tokens": "cls,cls"}, {"hop": "often"}, {"preset": "warp"}, {"block": -1},
                {"time_keep_every": 0}, {"drop_freq_rows": "a,b"}):
        with pytest.raises(UsageError):
            InferenceSpec(**bad)
    spec = InferenceSpec(tokens="cls, avg", drop_freq_rows="none", block="3")
    assert spec.tokens == ("cls", "avg") and spec.drop_freq_rows == () and spec.block == 3
    assert spec.replace(preset="fast").preset == "fast" and spec.preset == "none"  # frozen: replace makes a new one


@pytest.mark.usefixtures("loopback_only")
def test_datasets_fetch_verify_and_find_through_the_package(mtt_mirror, tmp_path):
    with pytest.raises(maest_cli.DatasetMissing, match="run `maest datasets download mtt`"):
        maest_cli.locate_dataset("mtt")
    s = maest_cli.download_dataset("mtt", progress=False)  # from the loopback mirror (tests/conftest.py)
    assert s.complete and not s.failed and "Creative Commons" in s.licence
    loc = maest_cli.locate_dataset("mtt")
    assert loc.complete and (loc.annotations_root / "annotations_final.csv").is_file()
    assert len(list(loc.audio_root.rglob("*.mp3"))) == loc.manifest["audio"]["members"] == 33
    assert maest_cli.dataset_info("mtt")["state"] == "complete"
    assert [r["state"] for r in maest_cli.list_datasets()] == ["complete", "missing"]
