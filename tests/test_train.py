"""`maest train`: the recipe's parts one by one, then whole runs of a tiny MAEST on a generated
dataset (tones in four frequency bands; label = which bands sound): it learns, two gloo
processes train exactly as one process with the same global batch, a run killed with SIGKILL
resumes to the very losses and weights of an uninterrupted run, and `maest extract` embeds with
the input scaling the model was trained with."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf
import torch
from typer.testing import CliRunner

import maest_cli.training.loop as train_module
from maest_cli.audio.frontend import OFFICIAL_NORM, InputNorm, file_mel
from maest_cli.cli.app import app
from maest_cli.io.config import ConfigError
from maest_cli.models.maest import MAEST, random_patchout, tiny_config
from maest_cli.training.config import TrainConfig, load_train_config, parse_set
from maest_cli.training.data import (
    TIME_MASK_MAX_SHARE,
    BatchLayout,
    class_weights,
    draw_epoch,
    mixup,
    mixup_lambda,
    patchout_generator,
    spec_augment,
    track_weights,
)
from maest_cli.training.loop import (
    METRICS,
    RESOLVED,
    STATE,
    SwaAverage,
    lr_factor,
    swa_due,
    tagging_scores,
    train,
    worker_argv,
)
from maest_cli.training.warmstart import deit_to_maest, detect_init_kind, init_model, passt_to_maest, separate_pos_grid

REPO = Path(__file__).resolve().parents[1]
BANDS_HZ = (250, 700, 1800, 4500)
runner = CliRunner()

# A tiny MAEST on 96-frame segments (9 x 9 patches) with every part of the recipe switched on.
RECIPE = """
[model]
variant = "tiny"
frames = 96
[data]
epoch_len = 32
batch_size = 8
workers = 0
[optim]
lr = 3e-3
grad_clip = 1.0
[schedule]
epochs = 4
warmup_epochs = 1
decay_start_epoch = 2
decay_epochs = 2
[augment]
patchout_time = 3
patchout_freq = 1
mixup_alpha = 0.3
specaug_time_masks = 2
specaug_time_width = 8
specaug_freq_masks = 1
specaug_freq_width = 8
[swa]
swa_start = 2
swa_every = 1
[run]
device = "cpu"
dtype = "fp32"   # the exactness comparisons need it; "auto" would give bf16 on CPUs with native bf16
threads = 1
log_every = 1
save_every = 2
val_batch_size = 64
"""


def tone(bands: list[int], rng: np.random.Generator, seconds: float = 1.6, amplitude: float = 1.0) -> np.ndarray:
    """Noise plus a tone in each of the given bands, 16 kHz mono."""
    t = np.arange(int(seconds * 16000)) / 16000
    x = 0.05 * rng.standard_normal(len(t))
    for b in bands:
        x += 0.3 * np.sin(2 * np.pi * BANDS_HZ[b] * (1 + 0.03 * rng.uniform(-1, 1)) * t)
    return (amplitude * x).astype(np.float32)


def tone_dataset(root: Path, n: int, split_of, bands_of, amplitude: float = 1.0) -> str:
    """n generated tracks of 1.6 s through `prepare_mels`; split_of(i) and bands_of(i, rng) say
    where track i goes and which bands sound in it (its labels)."""
    from maest_cli.mels.prepare import prepare_mels

    audio = root / "audio"
    audio.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path\ttags\tsplit"]
    for i in range(n):
        bands = bands_of(i, rng)
        sf.write(audio / f"t{i:03d}.wav", tone(bands, rng, amplitude=amplitude), 16000, subtype="PCM_16")
        lines.append(f"t{i:03d}.wav\t{','.join(f'band{b}' for b in bands)}\t{split_of(i)}")
    (root / "labels.tsv").write_text("\n".join(lines) + "\n")
    prepare_mels(audio, root / "ds", labels=root / "labels.tsv", crop="full", workers=1, progress=False)
    return str(root / "ds")


@pytest.fixture(scope="module")
def tone_data(tmp_path_factory) -> str:
    """100 tracks (60 train / 20 validation / 20 test): each of four bands holds a tone with
    probability 0.4, over noise."""
    return tone_dataset(tmp_path_factory.mktemp("tones"), 100, lambda i: ["train", "train", "train", "validation",
                                                                          "test"][i % 5],
                        lambda i, rng: [b for b in range(4) if rng.random() < 0.4])


@pytest.fixture(scope="module")
def quiet_data(tmp_path_factory) -> str:
    """16 tracks at a tenth of the level (log-mel mean ~0.5, std ~0.6: far from the official
    2.07 / 1.27), 12 train; the 4 validation tracks all carry exactly band0, so no class has both
    positives and negatives there and validation cannot be scored."""
    return tone_dataset(tmp_path_factory.mktemp("quiet"), 16, lambda i: "validation" if i % 4 == 3 else "train",
                        lambda i, rng: [0] if i % 4 == 3 else [b for b in range(4) if rng.random() < 0.5] or [1],
                        amplitude=0.1)


@pytest.fixture
def recipe(tmp_path) -> str:
    p = tmp_path / "test-recipe.toml"
    p.write_text(RECIPE)
    return str(p)


def step_losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / METRICS).read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "step":
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def epochs_of(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / METRICS).read_text().splitlines()) if r["kind"] == "epoch"]


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------ sampler

def test_class_weights_are_1000_over_count_plus_100_and_tracks_sum_their_labels():
    w = class_weights(np.array([0, 900, 100]))
    assert np.allclose(w, [10.0, 1.0, 5.0])
    targets = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.float32)
    assert np.allclose(track_weights(targets, w), [10.0, 6.0, 0.0])


def test_epoch_draw_is_weighted_without_replacement_seeded_per_epoch():
    w = np.array([1.0, 0.0, 2.0, 4.0, 1.0, 0.0, 8.0])
    order = draw_epoch(w, 5, seed=3, epoch=0)
    assert len(set(order)) == 5 and not {1, 5} & set(order)  # distinct, zero weights never drawn
    assert np.array_equal(order, draw_epoch(w, 5, seed=3, epoch=0))  # keyed: resumable
    assert any(not np.array_equal(draw_epoch(w, 5, 3, e), order) for e in range(1, 5))
    with pytest.raises(ValueError):
        draw_epoch(w, 6, 0, 0)  # only 5 tracks can be drawn without replacement
    # The first draw of an epoch is index i with probability w_i / sum(w).
    firsts = np.bincount([draw_epoch(w, 2, 0, e)[0] for e in range(3000)], minlength=len(w))
    expected = 3000 * w / w.sum()
    assert np.all(np.abs(firsts - expected) < 4 * np.sqrt(expected + 1))


def test_layout_gives_each_rank_a_disjoint_slice_of_the_same_global_batches():
    one = BatchLayout(batch=8, world=1, accum=2, epoch_len=70)
    two = BatchLayout(batch=4, world=2, accum=2, epoch_len=70)
    assert one.steps == two.steps == 70 // 16 and one.global_batch == two.global_batch == 16
    seen = []
    for micro in range(two.micro_batches):
        a, b = two.positions(micro, 0), two.positions(micro, 1)
        assert not set(a) & set(b)
        assert sorted([*a, *b]) == sorted(one.positions(micro, 0))
        seen += [*a, *b]
    assert sorted(seen) == list(range(one.steps * 16))  # every draw once, the tail dropped


# ------------------------------------------------------------------ augmentations, patchout

def test_training_patchout_drops_whole_columns_and_rows_the_same_on_every_rank():
    model = MAEST(tiny_config(frames=316, n_classes=4))
    f, t = model.cfg.f_patches, model.cfg.t_patches
    po = random_patchout(f, t, 15, 3, generator=patchout_generator(0, step=7, micro=0))
    assert len(po.time_index(t)) == t - 15 and len(po.freq_index(f)) == f - 3
    assert model.embed(torch.zeros(2, 316, 96), po).shape == (2, 2 + (f - 3) * (t - 15), 64)
    again = random_patchout(f, t, 15, 3, generator=patchout_generator(0, step=7, micro=0))
    other = random_patchout(f, t, 15, 3, generator=patchout_generator(0, step=8, micro=0))
    assert again == po and other != po
    out = model(torch.randn(2, 316, 96), logits=True, patchout=po)
    assert out.logits.shape == (2, 4)


def test_mixup_lambda_is_folded_above_one_half_and_mixes_labels_alike():
    lam = mixup_lambda(np.random.default_rng(0), 0.3, size=10000)
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    assert 0.8 < lam.mean() < 0.95  # Beta(0.3, 0.3) is U-shaped: most mass near 0 and 1
    x = np.stack([np.full((4, 3), v, np.float32) for v in (0.0, 1.0)])
    y = np.array([[1, 0], [0, 1]], np.float32)
    xm, ym = mixup(x, y, np.array([0.7, 0.9]), np.array([1, 0]))
    assert np.allclose(xm[0], 0.3) and np.allclose(xm[1], 0.9)
    assert np.allclose(ym, [[0.7, 0.3], [0.1, 0.9]])


def test_spec_augment_follows_the_authors_torchaudio_masking():
    """Each of N masks is floor(U[0, W)) wide (0..W-1, uniformly), starts in bounds, holds 0;
    time masks stay under 20 % of the segment (torchaudio's p = 0.2)."""
    rng = np.random.default_rng(0)
    widths = {0: [], 1: []}
    for _ in range(4000):  # one mask at a time: its width and place are visible
        for axis, args in ((0, (1, 8, 0, 5)), (1, (0, 8, 1, 5))):
            x = spec_augment(np.ones((200, 96), np.float32), rng, *args)
            masked = np.flatnonzero((x == 0).all(1 - axis))
            assert (x == 0).sum() == len(masked) * x.shape[1 - axis]  # whole rows / columns, set to 0
            if len(masked):
                assert masked[-1] - masked[0] + 1 == len(masked)  # one contiguous band
            widths[axis].append(len(masked))
    for axis, w in ((0, 8), (1, 5)):
        counts = np.bincount(widths[axis], minlength=w)
        assert len(counts) == w, counts  # never w or more
        assert np.all(np.abs(counts - 4000 / w) < 5 * np.sqrt(4000 / w)), counts  # uniform over 0..w-1
    short = [(spec_augment(np.ones((20, 96), np.float32), rng, 1, 8, 0, 5) == 0).all(1).sum() for _ in range(300)]
    assert max(short) == int(20 * TIME_MASK_MAX_SHARE) - 1  # a 20-frame segment: masks of 0..3 frames
    many = spec_augment(np.ones((200, 96), np.float32), rng, 20, 8, 8, 5)  # the recipe: 20 + 8 masks
    assert 0 < (many == 0).all(1).sum() <= 20 * 7 and 0 < (many == 0).all(0).sum() <= 8 * 4
    assert np.array_equal(spec_augment(np.ones((50, 96), np.float32), rng, 0, 8, 0, 5), np.ones((50, 96)))


# ------------------------------------------------------------------ schedule, SWA, metrics

def test_schedule_is_the_authors_exp_warmup_linear_down_per_epoch():
    cfg = TrainConfig()  # warm-up 5, flat to 50, linear over 50 to 0.01
    warm = [math.exp(-5 * 0.9 ** 2), math.exp(-5 * 0.8 ** 2), math.exp(-5 * 0.6 ** 2), math.exp(-5 * 0.4 ** 2),
            math.exp(-5 * 0.2 ** 2)]
    assert [round(lr_factor(e, cfg), 4) for e in range(5)] == [0.0174, 0.0408, 0.1653, 0.4493, 0.8187]
    assert [lr_factor(e, cfg) for e in range(5)] == pytest.approx(warm, rel=1e-12)
    assert all(lr_factor(e, cfg) == 1.0 for e in range(5, 51))
    assert lr_factor(51, cfg) == pytest.approx(0.01 + 0.99 * 49 / 50)
    assert lr_factor(75, cfg) == pytest.approx(0.505)
    assert all(lr_factor(e, cfg) == pytest.approx(0.01) for e in range(100, 131))
    # Per epoch (the authors' LambdaLR) by default; lr_update = "step" follows the same curve.
    assert train_module.lr_at(2, 0, 10, cfg) == train_module.lr_at(2, 9, 10, cfg) == cfg.lr * lr_factor(2, cfg)
    step = cfg.replace(lr_update="step")
    assert train_module.lr_at(2, 5, 10, step) == pytest.approx(cfg.lr * math.exp(-5 * (1 - 2.5 / 5) ** 2))
    assert train_module.lr_at(0, 3, 10, step) == train_module.lr_at(0, 0, 10, step)  # e clipped to >= 0.5
    assert [e for e in range(1, 131) if swa_due(e, cfg)] == list(range(50, 131, 5))


def test_swa_is_the_mean_of_the_snapshots():
    models = []
    for v in (1.0, 2.0, 6.0):
        m = MAEST(tiny_config(frames=96, n_classes=2))
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(v)
        models.append(m)
    swa = SwaAverage()
    for m in models:
        swa.update(m)
    target = swa.copy_to(MAEST(tiny_config(frames=96, n_classes=2)))
    assert swa.n == 3 and all(torch.allclose(p, torch.full_like(p, 3.0)) for p in target.parameters())
    again = SwaAverage()
    again.load_state_dict(swa.state_dict())
    assert again.n == 3 and torch.equal(again.state["cls_token"], swa.state["cls_token"])


def test_tagging_scores_skip_and_name_classes_without_positives_or_negatives():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]], np.float32)
    p = np.array([[0.9, 0.1, 0.5], [0.2, 0.2, 0.5], [0.8, 0.3, 0.5], [0.1, 0.1, 0.5]], np.float32)
    s = tagging_scores(y, p, ["a", "b", "c"])
    assert s["roc_auc"] == 1.0 and s["map"] == 1.0 and s["classes"] == 1
    assert s["skipped"] == ["b", "c"] and s["skipped_classes"] == 2
    none = tagging_scores(y[:, 1:], p[:, 1:], ["b", "c"])
    assert none["map"] is None and "no class has both" in none["reason"]
    assert "not finite" in tagging_scores(y, np.full_like(p, np.nan), ["a", "b", "c"])["reason"]


# ------------------------------------------------------------------ init conversions

def _tiny_state(**kw) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return MAEST(tiny_config(**kw)).state_dict()


def ramp_positions(n_in: int, n_out: int) -> np.ndarray:
    """Where output cell j of an n_in -> n_out resize samples the input (align_corners=False):
    a linear ramp 0..n_in-1 resized is (about) this; bicubic is off by < 0.2 at the borders."""
    return (np.arange(n_out) + 0.5) * n_in / n_out - 0.5


def test_passt_grid_is_interpolated_to_96_bands_and_its_audioset_head_dropped():
    cfg = tiny_config(frames=1876, n_classes=5)
    state = _tiny_state(n_classes=527)
    # PaSST-S: 128 bands, a 12 x 99 grid. Channel 0 holds a constant, channel 1 a linear ramp
    # along the encoding's axis, the rest noise.
    freq, time_ = torch.randn(1, 64, 12, 1), torch.randn(1, 64, 1, 99)
    freq[0, 0], time_[0, 0] = 3.0, -2.0
    freq[0, 1, :, 0], time_[0, 1, 0, :] = torch.arange(12.0), torch.arange(99.0)
    state["freq_new_pos_embed"], state["time_new_pos_embed"] = freq, time_
    state["head_dist.weight"] = torch.randn(527, 64)
    assert detect_init_kind(state, {}, cfg.f_patches) == "passt"
    out = passt_to_maest(state, cfg)
    f, t = out["freq_new_pos_embed"], out["time_new_pos_embed"]
    assert f.shape == (1, 64, 9, 1) and t.shape == (1, 64, 1, 187)
    assert torch.allclose(f[0, 0], torch.full((9, 1), 3.0)) and torch.allclose(t[0, 0], torch.full((1, 187), -2.0))
    np.testing.assert_allclose(f[0, 1, :, 0].numpy(), ramp_positions(12, 9), atol=0.2)
    np.testing.assert_allclose(t[0, 1, 0, :].numpy(), ramp_positions(99, 187), atol=0.2)
    np.testing.assert_allclose(t[0, 1, 0, 3:-3].numpy(), ramp_positions(99, 187)[3:-3], atol=0.06)
    assert not {"head.1.weight", "head.1.bias", "head_dist.weight"} & set(out)
    assert "head.0.weight" in out


def test_deit_grid_rows_become_frequency_and_columns_time():
    """An image's rows are the spectrogram's frequency axis (PaSST feeds [B, 1, F, T]). The grid
    here encodes its own coordinates: channel 0 = row, channel 1 = column, channel 2 = 5."""
    cfg = tiny_config(frames=626, n_classes=5)  # 9 x 62 patches
    state = {k: v for k, v in _tiny_state().items()
             if not k.startswith(("freq_new", "time_new", "new_pos", "head."))}
    state["patch_embed.proj.weight"] = torch.randn(64, 3, 16, 16)
    pos = torch.zeros(1, 2 + 24 * 24, 64)  # DeiT-B 384: cls, dist, then 24 x 24 positions row by row
    pos[0, :2] = torch.randn(2, 64)
    for k in range(24 * 24):
        pos[0, 2 + k, :3] = torch.tensor([k // 24, k % 24, 5.0])
    state["pos_embed"] = pos
    state["head.weight"], state["head_dist.weight"] = torch.randn(1000, 64), torch.randn(1000, 64)
    assert detect_init_kind(state, {}, cfg.f_patches) == "deit"
    out = deit_to_maest(state, cfg)
    assert torch.allclose(out["patch_embed.proj.weight"], state["patch_embed.proj.weight"].sum(1, keepdim=True))
    freq, time_ = out["freq_new_pos_embed"], out["time_new_pos_embed"]
    assert freq.shape == (1, 64, 9, 1) and time_.shape == (1, 64, 1, 62)
    # Frequency = the mean over time: it follows the rows, and the columns average out to 11.5.
    np.testing.assert_allclose(freq[0, 0, :, 0].numpy(), ramp_positions(24, 9), atol=0.1)
    np.testing.assert_allclose(freq[0, 1, :, 0].numpy(), np.full(9, 11.5), atol=1e-4)
    # Time = the mean over frequency: it follows the columns; the rows average to their mean.
    np.testing.assert_allclose(time_[0, 1, 0, :].numpy(), ramp_positions(24, 62), atol=0.25)
    np.testing.assert_allclose(time_[0, 0, 0, :].numpy(), np.full(62, ramp_positions(24, 9).mean()), atol=0.1)
    assert torch.allclose(freq[0, 2], torch.full((9, 1), 5.0)) and torch.allclose(time_[0, 2], torch.full((1, 62), 5.0))
    assert torch.equal(out["new_pos_embed"], state["pos_embed"][:, :2])
    assert not any(k.startswith(("head.", "head_dist.", "pos_embed")) for k in out)


def test_a_full_grid_splits_back_into_separable_encodings_exactly():
    freq, time_ = torch.randn(1, 8, 9, 1), torch.randn(1, 8, 1, 31)
    f2, t2 = separate_pos_grid(freq + time_)
    assert torch.allclose(f2 + t2, freq + time_, atol=1e-6)


def test_init_model_reads_passt_deit_and_cached_official_files(tmp_path):
    labels = ["a", "b", "c"]
    passt = _tiny_state(n_classes=527)
    passt["freq_new_pos_embed"], passt["time_new_pos_embed"] = torch.randn(1, 64, 12, 1), torch.randn(1, 64, 1, 99)
    torch.save({"net." + k: v for k, v in passt.items()}, tmp_path / "passt.pt")
    model = MAEST(tiny_config(frames=96, n_classes=3))
    info = init_model(model, str(tmp_path / "passt.pt"), labels)
    assert info.kind == "passt" and info.head == "new" and len(info.sha256) == 64
    assert torch.equal(model.blocks[0].attn.qkv.weight, passt["blocks.0.attn.qkv.weight"])

    deit = {k: v for k, v in passt.items() if not k.startswith(("freq_new", "time_new", "new_pos", "head"))}
    deit["patch_embed.proj.weight"] = torch.randn(64, 3, 16, 16)
    deit["pos_embed"] = torch.randn(1, 578, 64)
    deit["head.weight"], deit["head.bias"] = torch.randn(1000, 64), torch.randn(1000)
    torch.save({"model": deit}, tmp_path / "deit.pth")
    info = init_model(MAEST(tiny_config(frames=96, n_classes=3)), str(tmp_path / "deit.pth"), labels)
    assert info.kind == "deit" and info.input_norm is None

    # A registry name is used only when its weights are already in the cache: no download.
    with pytest.raises(Exception, match="maest models download"):
        init_model(MAEST(tiny_config(frames=96, n_classes=3)), "maest-5s", labels)
    official = _tiny_state(frames=316, n_classes=400)
    official["head_dist.weight"] = torch.randn(400, 64)
    cached = Path(os.environ["MAEST_CACHE"]) / "discogs-maest-5s-pw-129e"
    cached.mkdir(parents=True)
    torch.save(official, cached / "discogs-maest-5s-pw-129e-swa.ckpt")
    model = MAEST(tiny_config(frames=96, n_classes=3))
    info = init_model(model, "maest-5s", labels)
    assert info.kind == "maest" and info.head == "new" and info.input_norm["source"] == "official"
    assert torch.equal(model.time_new_pos_embed, official["time_new_pos_embed"][..., :9])  # truncated

    with pytest.raises(Exception, match="do not fit"):  # a ViT-Base file into the tiny recipe
        bad = dict(official)
        bad["cls_token"] = torch.zeros(1, 1, 768)
        torch.save(bad, tmp_path / "bad.ckpt")
        init_model(MAEST(tiny_config(frames=96, n_classes=3)), str(tmp_path / "bad.ckpt"), labels)


# ------------------------------------------------------------------ config

def test_recipes_validate_and_match_the_paper():
    for name, drop in (("maest-5s", 15), ("maest-10s", 30), ("maest-20s", 60), ("maest-30s", 90)):
        cfg = load_train_config(name)
        assert cfg.patchout_time == drop and cfg.patchout_freq == 3 and cfg.lr == 2e-5
        assert (cfg.epochs, cfg.epoch_len, cfg.swa_start, cfg.swa_every, cfg.mixup_alpha) == (130, 200000, 50, 5, 0.3)
    tiny = load_train_config("tiny", {"epochs": 2})
    assert tiny.epochs == 2 and tiny.model_config(7).width == 64


def test_bad_recipes_are_refused_naming_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_train_config(bad)
    bad.write_text('[optim]\nlr = "fast"\n')
    with pytest.raises(ConfigError, match="lr"):
        load_train_config(bad)
    bad.write_text("[model]\nepochs = 3\n")
    with pytest.raises(ConfigError, match=r"\[schedule\]"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="patchout_time"):
        load_train_config("tiny", {"patchout_time": 31})
    assert parse_set(["lr=1e-4", "device=cpu", "threads=none"]) == {"lr": 1e-4, "device": "cpu", "threads": None}


# ------------------------------------------------------------------ whole runs

def test_tiny_model_learns_the_tones(tone_data, recipe, tmp_path):
    run = tmp_path / "run"
    summary = train(tone_data, run, recipe, {"epochs": 12, "epoch_len": 48, "patchout_freq": 0, "mixup_alpha": 0.0,
                                             "decay_start_epoch": 9.0, "decay_epochs": 3.0, "swa_start": 10,
                                             "log_every": 6, "save_every": 100}, progress=False)
    ep = epochs_of(run)
    stats = json.loads((Path(tone_data) / "stats.json").read_text())
    assert len(ep) == 12 and summary["epochs"] == 12
    assert np.mean([e["train_loss"] for e in ep[-3:]]) < 0.8 * np.mean([e["train_loss"] for e in ep[:2]])
    assert ep[-1]["val"]["roc_auc"] > 0.9, [e["val"]["roc_auc"] for e in ep]
    assert ep[-1]["swa"]["roc_auc"] > 0.9 and ep[-1]["swa_snapshots"] == 3

    # The checkpoints load as models anywhere a model is accepted, with labels and provenance.
    from maest_cli.models.registry import load_model

    for kind in ("last", "best", "swa"):
        lm = load_model(str(run / f"{kind}.safetensors"))
        assert lm.labels == ["band0", "band1", "band2", "band3"] and lm.model.cfg.frames == 96
        norm = json.loads(lm.metadata["input_norm"])
        assert norm == InputNorm(stats["mean"], stats["std"], "dataset").to_dict()
        assert norm["formula"] == "(x - mean) / (2 * std)"
        assert json.loads(lm.metadata["dataset"])["tracks"] == 100
        assert lm.input_norm == InputNorm(stats["mean"], stats["std"], "dataset")
    best = json.loads(load_model(str(run / "best.safetensors")).metadata["epoch"])
    assert best == summary["best"]["epoch"]
    resolved = json.loads((run / "config.resolved.json").read_text())
    assert resolved["dtype"] == "fp32" and resolved["patchout"] == {"drop_time": 3, "drop_freq": 0, "grid": [9, 9]}
    state = torch.load(run / STATE, weights_only=True)
    assert state["finished"] and state["global_step"] == 12 * 6 and state["swa"]["n"] == 3


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_trains_in_bf16_only_on_cpus_that_run_it_natively(tone_data, recipe, tmp_path, monkeypatch,
                                                                     native):
    import maest_cli.models.precision as rt

    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    run = tmp_path / "run"
    train(tone_data, run, recipe, {"dtype": "auto", "epochs": 1}, progress=False)
    assert json.loads((run / "config.resolved.json").read_text())["dtype"] == ("bf16" if native else "fp32")
    losses = step_losses(run)
    assert len(losses) == 4 and all(np.isfinite(v) for v in losses.values())
    # the weights are kept in fp32 whatever the compute dtype (autocast), as the checkpoint says
    assert all(t.dtype == torch.float32 for t in weights(run / "last.safetensors").values())


def test_two_gloo_processes_train_exactly_like_one_with_the_same_global_batch(tone_data, recipe, tmp_path):
    # Mixup pairs examples within each process's micro-batch, so it is off here; crops,
    # SpecAugment and patchout are keyed by draw position / step, the same in both runs.
    args = ["--data", tone_data, "--config", recipe, "--set", "mixup_alpha=0", "--epochs", "2", "-q"]
    r = subprocess.run([sys.executable, "-m", "maest_cli", "train", "--nproc", "2", "--batch-size", "4",
                        "--out", str(tmp_path / "ddp"), *args], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    train(tone_data, tmp_path / "one", recipe, {"mixup_alpha": 0.0, "epochs": 2, "batch_size": 8}, progress=False)
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    assert all(e["ranks_in_sync"] for e in epochs_of(ddp))  # bit-identical weights on both ranks
    assert json.loads((ddp / "config.resolved.json").read_text())["processes"] == 2
    a, b = step_losses(ddp), step_losses(one)
    assert a.keys() == b.keys() and len(a) == 8
    assert max(abs(a[k] - b[k]) for k in a) < 1e-5
    wa, wb = weights(ddp / "last.safetensors"), weights(one / "last.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_gradient_accumulation_equals_the_larger_batch(tone_data, recipe, tmp_path):
    # Patchout is drawn per micro-batch, mixup pairs within one: both off for this comparison.
    same = {"epochs": 1, "patchout_time": 0, "patchout_freq": 0, "mixup_alpha": 0.0}
    train(tone_data, tmp_path / "acc", recipe, {**same, "batch_size": 4, "accum_steps": 2}, progress=False)
    train(tone_data, tmp_path / "one", recipe, {**same, "batch_size": 8}, progress=False)
    a, b = step_losses(tmp_path / "acc"), step_losses(tmp_path / "one")
    assert a.keys() == b.keys() and max(abs(a[k] - b[k]) for k in a) < 1e-5
    wa, wb = weights(tmp_path / "acc" / "last.safetensors"), weights(tmp_path / "one" / "last.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_resume_after_sigkill_continues_exactly(tone_data, recipe, tmp_path):
    opts = {"epochs": 8}  # 8 epochs x 4 steps, state saved every 2 steps and at epoch ends
    train(tone_data, tmp_path / "ref", recipe, opts, progress=False)
    run = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "maest_cli", "train", "--data", tone_data, "--out", str(run),
                          "--config", recipe, "--epochs", "8", "-q"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        metrics = run / METRICS
        if (run / STATE).exists() and metrics.exists() and metrics.read_text().count('"kind": "step"') >= 6:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = torch.load(run / STATE, weights_only=True)
    assert 0 < saved["global_step"] < 32 and not saved["finished"]

    r = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert r.exit_code == 0, r.output
    a, b = step_losses(run), step_losses(tmp_path / "ref")
    assert sorted(a) == sorted(b) == list(range(1, 33))
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-6
    for ea, eb in zip(epochs_of(run), epochs_of(tmp_path / "ref"), strict=True):
        assert abs(ea["train_loss"] - eb["train_loss"]) <= 1e-6 and ea["val"] == eb["val"] and ea["swa"] == eb["swa"]
    for kind in ("last", "swa"):
        wa, wb = weights(run / f"{kind}.safetensors"), weights(tmp_path / "ref" / f"{kind}.safetensors")
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    # A finished run resumes to "nothing to do"; --epochs extends it.
    r = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert r.exit_code == 0 and "complete" in r.output


def test_cli_refuses_bad_runs_with_usage_errors(tone_data, recipe, tmp_path):
    r = runner.invoke(app, ["train", "--out", str(tmp_path / "x"), "--config", recipe])
    assert r.exit_code == 2 and "--data" in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"),
                            "--config", recipe])
    assert r.exit_code == 2 and "nothing" in r.output
    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(tmp_path / "x"), "--config", recipe,
                            "--set", "lr=-1"])
    assert r.exit_code == 2 and "lr" in r.output
    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(tmp_path / "x"), "--config", recipe,
                            "--init", str(tmp_path / "missing.ckpt")])
    assert r.exit_code == 2 and "missing.ckpt" in r.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(busy), "--config", recipe])
    assert r.exit_code == 2 and "not an empty directory" in r.output
    assert (busy / "notes.txt").read_text() == "mine"

    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(run), "--config", recipe, "--epochs", "1", "-q",
                            "--set", "val_segments=2"])  # two crops per validation track, outputs averaged
    assert r.exit_code == 0, r.output
    assert "2 evenly spaced" in json.loads((run / "config.resolved.json").read_text())["validation"]["crops"]
    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(run), "--config", recipe])
    assert r.exit_code == 2 and "--resume" in r.output
    r = runner.invoke(app, ["train", "--resume", str(run), "--batch-size", "4"])
    assert r.exit_code == 2 and "batch_size" in r.output
    r = runner.invoke(app, ["train", "--resume", str(run), "--epochs", "2", "-q"])  # extending is allowed
    assert r.exit_code == 0, r.output
    assert [e["epoch"] for e in epochs_of(run)] == [1, 2]


def test_resume_takes_the_process_count_the_run_recorded(tone_data, recipe, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tone_data, run, recipe, {"epochs": 1}, progress=False)
    assert train_module.recorded_processes(run) == 1
    launched = []
    monkeypatch.setattr(train_module, "launch", lambda n, args: launched.append((n, args)) or 0)
    r = runner.invoke(app, ["train", "--resume", str(run), "-q"])  # one process recorded: no torchrun
    assert r.exit_code == 0 and "complete" in r.output and launched == [], r.output

    monkeypatch.setattr(train_module, "recorded_processes", lambda run_dir: 2)
    monkeypatch.setattr(sys, "argv", ["maest", "train", "--resume", str(run), "-q"])
    r = runner.invoke(app, ["train", "--resume", str(run), "-q"])
    assert r.exit_code == 0 and launched == [(2, ["--resume", str(run), "-q"])], r.output
    for other in ("1", "3"):  # an explicit count that differs is refused before anything starts
        r = runner.invoke(app, ["train", "--resume", str(run), "--nproc", other])
        errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error: ")]
        assert r.exit_code == 2 and len(errors) == 1 and f"--nproc {other}" in errors[0] \
            and "used 2 processes" in errors[0], r.output
    assert len(launched) == 1


def test_train_bench_step_runs_with_and_without_patchout():
    from maest_cli.bench.training import train_step_seconds
    from maest_cli.training.loop import make_optimizer

    model = MAEST(tiny_config(frames=96, n_classes=4))
    opt = make_optimizer(model, TrainConfig(variant="tiny"))
    before = model.cls_token.detach().clone()
    assert train_step_seconds(model, opt, 2, 0, 0, "fp32", 0) > 0
    assert train_step_seconds(model, opt, 2, 3, 1, "fp32", 1) > 0
    assert not torch.equal(model.cls_token, before)  # the optimiser stepped


# ------------------------------------------------------------------ input scaling end to end

def test_extract_embeds_a_trained_model_with_its_training_input_scaling(quiet_data, recipe, tmp_path):
    """Train on a dataset whose stats are far from the official constants; `maest extract
    --model RUN/best.safetensors` must scale its input with the dataset's mean and std."""
    from maest_cli.embed.extraction import extract
    from maest_cli.embed.store import read_metadata
    from maest_cli.models.checkpoints import build_model, load_checkpoint

    run = tmp_path / "run"
    train(quiet_data, run, recipe, {"epochs": 1, "epoch_len": 8, "swa_start": 0}, progress=False)
    stats = json.loads((Path(quiet_data) / "stats.json").read_text())
    norm = InputNorm(stats["mean"], stats["std"], "dataset")
    assert abs(norm.mean - OFFICIAL_NORM.mean) > 1.0 and abs(norm.std - OFFICIAL_NORM.std) > 0.3

    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "one.wav", tone([0, 2], np.random.default_rng(7), seconds=1.0, amplitude=0.1), 16000,
             subtype="FLOAT")
    s = extract([audio], tmp_path / "emb", model=str(run / "best.safetensors"), block=4, preset="none",
                dtype="fp32", workers=0, progress=False)
    assert s.n_done == 1 and s.n_failed == 0, (s, s.errors_file and Path(s.errors_file).read_text())
    assert read_metadata(tmp_path / "emb")["input_norm"] == norm.to_dict()
    got = np.asarray(pads.dataset(str(tmp_path / "emb")).to_table().column("embedding")[0].as_py(), np.float32)

    model = build_model(load_checkpoint(run / "best.safetensors")).eval()
    mel = file_mel(audio / "one.wav")  # 64 frames: one segment shorter than the model's 96
    with torch.inference_mode():
        want = model(torch.from_numpy(norm.apply(mel))[None], blocks=[4]).embedding(4)[0].numpy()
        official = model(torch.from_numpy(OFFICIAL_NORM.apply(mel))[None], blocks=[4]).embedding(4)[0].numpy()
    assert np.abs(got - want).max() <= 1e-6
    assert np.abs(got - official).max() > 1e-2  # the official constants would give another embedding


# ------------------------------------------------------------------ best, early kills, workers, damage

def test_unscorable_validation_still_writes_best_and_warns_once(quiet_data, recipe, tmp_path):
    run = tmp_path / "run"
    summary = train(quiet_data, run, recipe, {"epochs": 2, "epoch_len": 8, "swa_start": 0}, progress=False)
    ep = epochs_of(run)
    assert [e["val"]["map"] for e in ep] == [None, None]
    assert summary["best"] == {"metric": "map", "value": None, "epoch": 2}  # best follows last
    from maest_cli.models.registry import load_model

    assert json.loads(load_model(str(run / "best.safetensors")).metadata["epoch"]) == 2
    assert weights(run / "best.safetensors").keys() == weights(run / "last.safetensors").keys()
    assert all(torch.equal(a, b) for a, b in zip(weights(run / "best.safetensors").values(),
                                                 weights(run / "last.safetensors").values()))
    warnings = [r for r in map(json.loads, (run / METRICS).read_text().splitlines()) if r["kind"] == "warning"]
    assert len(warnings) == 1 and "no class has both positive and negative" in warnings[0]["message"]


def test_a_run_stopped_before_its_first_state_starts_again_in_place(tone_data, recipe, tmp_path):
    run = tmp_path / "run"  # what a kill during the first state.pt write leaves at worst
    run.mkdir()
    (run / RESOLVED).write_text("{}\n")
    (run / METRICS).write_text('{"kind": "step", "epoch": 1, "step": 1, "loss": 123.0}\n')
    (run / ".state.pt.tmp4242").write_bytes(b"half a state")
    r = runner.invoke(app, ["train", "--resume", str(run)])
    assert r.exit_code == 2 and "before it saved its first state.pt" in r.output
    mixed = tmp_path / "mixed"  # anything else in the directory: not ours to delete
    mixed.mkdir()
    (mixed / METRICS).write_text("")
    (mixed / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(mixed), "--config", recipe])
    assert r.exit_code == 2 and "not an empty directory" in r.output and (mixed / "notes.txt").exists()

    r = runner.invoke(app, ["train", "--data", tone_data, "--out", str(run), "--config", recipe, "--epochs", "1",
                            "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(step_losses(run)) == [1, 2, 3, 4] and 123.0 not in step_losses(run).values()
    assert not list(run.glob(".*tmp*")) and torch.load(run / STATE, weights_only=True)["finished"]


def test_a_run_stopped_after_its_step0_state_resumes_exactly(tone_data, recipe, tmp_path, monkeypatch):
    opts = {"epochs": 3}
    train(tone_data, tmp_path / "ref", recipe, opts, progress=False)

    class Killed(Exception):
        pass

    class DiesAtFirstBatch(train_module.TrainBatches):
        def __getitem__(self, micro):
            raise Killed

    monkeypatch.setattr(train_module, "TrainBatches", DiesAtFirstBatch)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(tone_data, run, recipe, opts, progress=False)
    monkeypatch.undo()
    saved = torch.load(run / STATE, weights_only=True)  # written before the first step
    assert (saved["epoch"], saved["step_in_epoch"], saved["global_step"], saved["finished"]) == (0, 0, 0, False)
    assert not step_losses(run)
    train(resume=run, progress=False)
    a, b = step_losses(run), step_losses(tmp_path / "ref")
    assert sorted(a) == sorted(b) == list(range(1, 13)) and max(abs(a[k] - b[k]) for k in a) <= 1e-6
    # The learning rate is the authors' factor of the epoch, constant within it.
    cfg = load_train_config(tmp_path / "ref" / RESOLVED)
    for rec in map(json.loads, (run / METRICS).read_text().splitlines()):
        if rec["kind"] == "step":
            assert rec["lr"] == pytest.approx(cfg.lr * lr_factor(rec["epoch"] - 1, cfg), rel=1e-12)


def test_dataloader_workers_give_the_same_batches(tone_data, recipe, tmp_path):
    train(tone_data, tmp_path / "w0", recipe, {"epochs": 1}, progress=False)
    train(tone_data, tmp_path / "w2", recipe, {"epochs": 1, "workers": 2}, progress=False)
    assert step_losses(tmp_path / "w0") == step_losses(tmp_path / "w2")
    wa, wb = weights(tmp_path / "w0" / "last.safetensors"), weights(tmp_path / "w2" / "last.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_truncated_shard_stops_training_with_one_line_naming_it(tone_data, recipe, tmp_path, workers):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(tone_data, ds)
    shard = ds / "shards" / "mels-00000.f16"
    os.truncate(shard, shard.stat().st_size // 3)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(ds), "--out", str(run), "--config", recipe, "-q",
                            "--set", f"workers={workers}"])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    errors = [line for line in r.output.splitlines() if line.startswith("maest: error:")]
    assert len(errors) == 1, r.output
    assert str(shard) in errors[0] and "truncated" in errors[0] and f"--resume {run}" in errors[0]
    assert "Traceback" not in r.output and "worker" not in r.output
    assert torch.load(run / STATE, weights_only=True)["global_step"] == 0  # resumable once repaired


# ------------------------------------------------------------------ launcher, benchmark

def test_launched_workers_get_the_command_line_minus_nproc():
    argv = ["/opt/train/bin/maest", "train", "--data", "d", "--nproc", "2", "--set", "lr=1e-4", "-q", "--out=o",
            "--nproc=3", "--a-future-flag", "v", "--config", "train"]
    assert worker_argv(argv) == ["--data", "d", "--set", "lr=1e-4", "-q", "--out=o", "--a-future-flag", "v",
                                 "--config", "train"]
    assert worker_argv(["/x/maest_cli/__main__.py", "train", "--resume", "r", "--nproc", "4"]) == ["--resume", "r"]
    with pytest.raises(ValueError):
        worker_argv(["maest", "extract", "--nproc", "2"])


def test_train_bench_headline_is_time_patchout_only():
    from maest_cli.bench.training import bench_settings

    assert bench_settings(90, 3) == {"no patchout": (0, 0), "patchout -90t": (90, 0), "patchout -90t -3f": (90, 3)}
    assert list(bench_settings(90, 0).values()) == [(0, 0), (90, 0)]
