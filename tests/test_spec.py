"""InferenceSpec and the rules it applies once: precision, the default block, the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch

import maest_cli.models.precision as precision
from maest_cli.embed.extraction import extract
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import read_metadata
from maest_cli.errors import UsageError
from maest_cli.models.checkpoints import CheckpointError, default_block, save_checkpoint
from maest_cli.models.maest import MAEST, VARIANTS, tiny_config
from maest_cli.models.precision import choose_dtype
from maest_cli.models.registry import load_model
from maest_cli.training.config import load_train_config

CPU = torch.device("cpu")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "music"


@pytest.mark.parametrize("native", [True, False])
def test_one_precision_rule(monkeypatch, native):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native)
    auto = choose_dtype("auto", CPU)
    assert auto.dtype == ("bf16" if native else "fp32")
    assert (auto.note is None) if native else ("auto gives fp32" in auto.note and "no native bf16" in auto.note)
    assert choose_dtype("auto", CPU, default="int8").dtype == "int8"  # the -int8 presets' own dtype
    assert choose_dtype("fp32", CPU, default="int8").dtype == "fp32"  # an explicit dtype wins over the preset's
    if native:
        assert choose_dtype("bf16", CPU) == precision.DtypeChoice("bf16")
    else:
        with pytest.raises(UsageError, match="--dtype bf16: .*emulated"):
            choose_dtype("bf16", CPU)
        assert choose_dtype("auto", CPU, default="bf16").dtype == "fp32"  # a preset's bf16 falls back, said once
    for bad, words in (("fp16", "for GPUs"), ("fp8", "expected auto"), ("int4", "expected auto")):
        with pytest.raises(UsageError, match=words):
            choose_dtype(bad, CPU)


def test_default_block_comes_from_the_model():
    assert default_block({}, 12) == 7 and default_block({}, 4) == 4  # the paper's 7, never deeper than the model
    assert default_block({"default_block": "5"}, 12) == 5
    for bad in ("13", "0", "seven"):
        with pytest.raises(CheckpointError, match="default_block"):
            default_block({"default_block": bad}, 12, "x.safetensors")


def test_a_checkpoint_records_and_carries_its_default_block(tmp_path):
    model = MAEST(tiny_config(frames=316))
    p = save_checkpoint(tmp_path / "m.safetensors", model, extra={"default_block": 2})
    lm = load_model(str(p))
    assert lm.default_block == 2
    assert InferenceSpec().resolve(lm.config, lm.default_block).block == 2
    assert InferenceSpec(block=3).resolve(lm.config, lm.default_block).block == 3
    with pytest.raises(UsageError, match="blocks 0..4"):
        InferenceSpec(block=5).resolve(lm.config, lm.default_block)


def test_a_recipe_may_choose_the_default_block_within_the_model():
    assert load_train_config("tiny").default_block is None
    assert load_train_config("tiny", {"default_block": 3}).default_block == 3
    with pytest.raises(UsageError, match="default_block"):
        load_train_config("tiny", {"default_block": 9})


def test_patchout_that_does_not_fit_the_model_is_a_usage_error():
    cfg = VARIANTS["30s"]
    with pytest.raises(UsageError, match="--patchout"):
        InferenceSpec(preset="fast", drop_freq_rows="0,20").resolve(cfg, 7, CPU)


def test_the_shipped_maest_tiny_extracts_a_bundled_clip_with_scores(tmp_path):
    """What `make demo` runs, on one clip: the bundled weights load, the default block is 7, the
    scores are probabilities and the labels are the model's own."""
    lm = load_model("maest-tiny")
    assert lm.default_block == 7 and lm.config.depth == 12 and len(lm.labels) == lm.config.n_classes
    clip = sorted(EXAMPLES.glob("*.ogg"))[0]
    s = extract([str(clip)], tmp_path / "out", model="maest-tiny", scores=True, workers=0, progress=False)
    assert (s.n_done, s.n_failed) == (1, 0)
    meta = read_metadata(tmp_path / "out")
    assert meta["block"] == 7 and meta["model"]["name"] == "maest-tiny"
    assert meta["scores"]["labels"] == lm.labels
    table = pads.dataset(str(tmp_path / "out")).to_table()
    scores = np.asarray(table["scores"].to_pylist()[0])
    assert scores.shape == (len(lm.labels),) and np.isfinite(scores).all() and ((scores > 0) & (scores < 1)).all()
