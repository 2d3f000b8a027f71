"""The mel frontend against Essentia's TensorflowInputMusiCNN (the oracle, from PyPI)."""

import essentia.standard as es  # a dev dependency: missing, the oracle tests must fail, not vanish
import numpy as np
import pytest
import torch

from maest_cli.audio import frontend
from maest_cli.audio.frontend import StreamingMel, mel_frontend, n_frames, normalize

SR = 16000


def essentia_mel(audio: np.ndarray) -> np.ndarray:
    algo = es.TensorflowInputMusiCNN()
    frames = es.FrameGenerator(audio.astype(np.float32), frameSize=512, hopSize=256, startFromZero=False)
    return np.array([algo(f) for f in frames])


def _chord(seconds):
    t = np.arange(int(seconds * SR)) / SR
    return 0.2 * sum(np.sin(2 * np.pi * f * t) for f in (261.63, 329.63, 392.0, 523.25))


rng = np.random.default_rng(0)
CASES = {
    "chord": _chord(2.0),
    "white_noise": rng.standard_normal(3 * SR) * 0.3,
    "silence": np.zeros(SR),
    "not_multiple_of_256": rng.standard_normal(12345) * 0.1,
    "multiple_of_256": rng.standard_normal(256 * 40) * 0.1,
    "exactly_30s": rng.standard_normal(30 * SR) * 0.1,
    "clipped_loud": np.clip(rng.standard_normal(SR) * 2, -1, 1),
    "shorter_than_a_frame": rng.standard_normal(100) * 0.1,
}


@pytest.mark.parametrize("name", CASES)
def test_matches_essentia(name):
    audio = CASES[name].astype(np.float32)
    ref = essentia_mel(audio)
    ours = mel_frontend(audio).numpy()
    assert ours.shape == ref.shape == (n_frames(len(audio)), 96)
    assert np.abs(ours - ref).max() <= 1e-3


def test_30s_gives_1876_frames():
    assert n_frames(480_000) == 1876
    assert mel_frontend(np.zeros(480_000, np.float32)).shape == (1876, 96)


def test_filterbank_unit_area_triangles():
    fb = frontend.mel_filterbank()
    assert fb.shape == (257, 96)
    assert (fb >= 0).all() and (fb.sum(0) > 0).all()


def test_batched_equals_single():
    x = torch.from_numpy(rng.standard_normal((3, 5000)).astype(np.float32))
    batched = mel_frontend(x)
    for i in range(3):
        torch.testing.assert_close(batched[i], mel_frontend(x[i]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("block", [1, 255, 256, 777, 4096])
def test_streaming_equals_whole(block):
    audio = (rng.standard_normal(SR * 2 + 77) * 0.2).astype(np.float32)
    stream = StreamingMel()
    parts = [stream.feed(audio[i:i + block]) for i in range(0, len(audio), block)] + [stream.finish()]
    np.testing.assert_allclose(np.concatenate(parts), mel_frontend(audio).numpy(), atol=1e-5)


def test_official_normalisation_is_pinned():
    """(x - 2.06755686098554) / (2 * 1.268292820667291): the authors' training code and Essentia.
    Expected values are literals, so a changed constant or a lost factor 2 fails."""
    assert (frontend.NORM_MEAN, frontend.NORM_STD) == (2.06755686098554, 1.268292820667291)
    assert (frontend.OFFICIAL_NORM.mean, frontend.OFFICIAL_NORM.std) == (2.06755686098554, 1.268292820667291)
    x = np.array([0.0, 2.06755686098554, 4.0, 10.0])
    want = np.array([-0.8150944432129362, 0.0, 0.7618284624514935, 3.127212820948138], np.float32)
    np.testing.assert_allclose(normalize(x), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(normalize(torch.tensor(x, dtype=torch.float32)), torch.from_numpy(want))
    assert normalize(x).dtype == np.float32
