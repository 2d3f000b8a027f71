"""Shared fixtures: generated audio and tiny random-weight models (no downloads, no ../shared)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from maest_cli.models.engines import no_telemetry

no_telemetry()  # before any test imports openvino: tests never send its usage events


@pytest.fixture(autouse=True)
def _no_network_or_user_cache(tmp_path_factory, monkeypatch):
    """Tests never download and never touch the user's model cache."""
    monkeypatch.setenv("MAEST_OFFLINE", "1")
    monkeypatch.setenv("MAEST_CACHE", str(tmp_path_factory.mktemp("maest-cache")))


def tone_mix(seconds: float, sr: int = 44100, seed: int = 0, channels: int = 2) -> np.ndarray:
    """A few harmonic tones plus a little noise: audio that exercises every mel band."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = sum(0.15 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(80, 5000, 4))
    x = x + 0.02 * rng.standard_normal(len(t))
    stereo = np.stack([x, 0.8 * x[::-1].copy()], 1)[:, :channels]
    return stereo.astype(np.float32)


def write_audio(path, seconds: float, sr: int = 44100, seed: int = 0, channels: int = 2) -> str:
    """Write generated audio in the format its extension names (wav, flac, ogg, opus, mp3)."""
    fmt = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
           ".opus": ("OGG", "OPUS"), ".mp3": ("MP3", "MPEG_LAYER_III")}[str(path)[str(path).rfind("."):]]
    if fmt[1] == "OPUS":
        sr = 48000
    sf.write(str(path), tone_mix(seconds, sr, seed, channels), sr, format=fmt[0], subtype=fmt[1])
    return str(path)


@pytest.fixture
def audio_file(tmp_path):
    """Factory: audio_file('x.mp3', seconds=3.0) -> path of a generated file."""
    def make(name: str, seconds: float = 3.0, **kw) -> str:
        return write_audio(tmp_path / name, seconds, **kw)
    return make


@pytest.fixture
def tiny_model_file(tmp_path):
    """A tiny random MAEST (316-frame segments, 10 labels) in our safetensors format."""
    import torch

    from maest_cli.models.checkpoints import save_checkpoint
    from maest_cli.models.maest import MAEST, tiny_config

    torch.manual_seed(0)
    model = MAEST(tiny_config(frames=316, n_classes=10))
    return str(save_checkpoint(tmp_path / "tiny.safetensors", model, labels=[f"tag{i}" for i in range(10)],
                               extra={"name": "tiny-test"}))


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread on a shared machine; restored afterwards.
    Modules use it with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
