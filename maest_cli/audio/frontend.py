"""The mel frontend of every official MAEST model: Essentia's TensorflowInputMusiCNN, in torch.

16 kHz mono -> frames of 512 with hop 256, the first centred on sample 0 -> symmetric Hann ->
|rfft|^2 -> 96 Slaney mel bands (0-8 kHz, unit-area triangles) -> log10(1 + 10000 x).
N samples give ceil(N / 256) + 1 frames (30 s -> 1876). Tested against the essentia package
to 1e-3 in the log-mel. `normalize` applies the input scaling the models were trained with.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
import torch

from maest_cli.audio.decode import AudioError, iter_audio

SAMPLE_RATE = 16_000
FRAME_SIZE = 512
HOP_SIZE = 256
N_MELS = 96
F_MIN, F_MAX = 0.0, 8000.0
LOG_MULTIPLIER = 10_000.0
# Input normalisation of the official models: (x - mean) / (2 * std). The factor 2 is in the
# authors' training code and in Essentia's TensorflowPredictMAEST alike.
NORM_MEAN = 2.06755686098554
NORM_STD = 1.268292820667291


@dataclass(frozen=True)
class FrontendConstants:
    """Recorded in every artefact so a reader can tell which frontend made it."""

    name: str = "essentia.TensorflowInputMusiCNN"
    sample_rate: int = SAMPLE_RATE
    frame_size: int = FRAME_SIZE
    hop_size: int = HOP_SIZE
    window: str = "hann-symmetric"
    n_mels: int = N_MELS
    f_min: float = F_MIN
    f_max: float = F_MAX
    mel_scale: str = "slaney"
    mel_norm: str = "unit_tri"
    compression: str = "log10(1+10000*x)"
    norm_mean: float = NORM_MEAN
    norm_std: float = NORM_STD

    def to_dict(self) -> dict:
        return asdict(self)


FRONTEND = FrontendConstants()


def n_frames(n_samples: int) -> int:
    """Frames Essentia's FrameGenerator(startFromZero=False) yields for n_samples samples."""
    return math.ceil(n_samples / HOP_SIZE) + 1 if n_samples > 0 else 0


def frame_to_seconds(frame: int) -> float:
    return frame * HOP_SIZE / SAMPLE_RATE


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    lin = f / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(f, 1e-12) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    lin = m * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0))
    return np.where(m >= 15.0, log, lin)


@lru_cache(maxsize=None)
def mel_filterbank() -> np.ndarray:
    """[257, 96] float64: triangles linear in Hz between mel-spaced edges, each of unit area."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(F_MIN), _hz_to_mel(F_MAX), N_MELS + 2))
    freqs = np.arange(FRAME_SIZE // 2 + 1) * (SAMPLE_RATE / FRAME_SIZE)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs - lo) / (mid - lo)
    falling = (hi - freqs) / (hi - mid)
    tri = np.where((freqs >= lo) & (freqs < mid), rising,
                   np.where((freqs >= mid) & (freqs < hi), falling, 0.0))
    return (tri * (2.0 / (hi - lo))).T.copy()


def hann_window() -> torch.Tensor:
    n = torch.arange(FRAME_SIZE, dtype=torch.float64)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * n / (FRAME_SIZE - 1))).float()


@lru_cache(maxsize=None)
def _window_and_filterbank(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a streaming run calls _frames_to_mel for every decoded block."""
    return hann_window().to(device), torch.from_numpy(mel_filterbank()).float().to(device)


def _frames_to_mel(frames: torch.Tensor) -> torch.Tensor:
    """[..., n, 512] windowless frames -> [..., n, 96] log-mel, in float32."""
    window, fb = _window_and_filterbank(frames.device)
    spec = torch.fft.rfft(frames.float() * window, n=FRAME_SIZE)
    power = spec.real.square() + spec.imag.square()
    return torch.log10(1.0 + LOG_MULTIPLIER * (power @ fb))


def mel_frontend(audio: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Log-mel of whole clips: [N] or [B, N] samples at 16 kHz -> [F, 96] or [B, F, 96].

    Not normalised (that is `normalize`); batched clips share one length. Runs on the
    tensor's device.
    """
    x = torch.as_tensor(audio, dtype=torch.float32)
    squeeze = x.dim() == 1
    x = x.reshape(1, -1) if squeeze else x
    n = x.shape[-1]
    f = n_frames(n)
    if f == 0:
        out = x.new_zeros(x.shape[0], 0, N_MELS)
    else:
        right = (f - 1) * HOP_SIZE + FRAME_SIZE - HOP_SIZE - n
        padded = torch.nn.functional.pad(x, (HOP_SIZE, right))
        out = _frames_to_mel(padded.unfold(-1, FRAME_SIZE, HOP_SIZE))
    return out[0] if squeeze else out


@dataclass(frozen=True)
class InputNorm:
    """A model's input scaling: (log-mel - mean) / (2 * std), the official convention (the
    factor 2 is in the authors' code and in Essentia). Official models use the Discogs20
    constants; a model trained here records its dataset's (checkpoint metadata `input_norm`)."""

    mean: float = NORM_MEAN
    std: float = NORM_STD
    source: str = "official"

    def apply(self, mel):
        """numpy array or tensor -> the same type, float32."""
        out = (mel - self.mean) / (2.0 * self.std)
        return out.astype(np.float32, copy=False) if isinstance(out, np.ndarray) else out.float()

    def to_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "source": self.source, "formula": "(x - mean) / (2 * std)"}

    @classmethod
    def from_metadata(cls, metadata: dict | None) -> InputNorm:
        """The scaling recorded in checkpoint metadata, else the official constants (official
        and Hugging Face models carry none)."""
        import json

        raw = (metadata or {}).get("input_norm")
        if not raw:
            return OFFICIAL_NORM
        d = json.loads(raw) if isinstance(raw, str) else raw
        return cls(float(d["mean"]), float(d["std"]), str(d.get("source", "checkpoint")))


OFFICIAL_NORM = InputNorm()


def normalize(mel, norm: InputNorm = OFFICIAL_NORM):
    """The models' input scaling, (x - mean) / (2 * std); the official constants by default."""
    return norm.apply(mel)


class StreamingMel:
    """Log-mel of a long signal fed in blocks; the frames equal `mel_frontend` of the whole.

    Keeps only the samples the next frame still needs (under 512), so memory does not grow
    with the file. `feed` returns the frames completed so far; `finish` the zero-padded tail.
    """

    def __init__(self) -> None:
        self._buf = np.zeros(HOP_SIZE, np.float32)  # the zero padding before sample 0
        self._n_in = 0
        self._n_out = 0

    @property
    def frames_out(self) -> int:
        return self._n_out

    @property
    def samples_in(self) -> int:
        return self._n_in

    def _emit(self, buf: np.ndarray) -> np.ndarray:
        k = (len(buf) - FRAME_SIZE) // HOP_SIZE + 1 if len(buf) >= FRAME_SIZE else 0
        if k <= 0:
            self._buf = buf
            return np.zeros((0, N_MELS), np.float32)
        frames = torch.from_numpy(buf[: (k - 1) * HOP_SIZE + FRAME_SIZE]).unfold(0, FRAME_SIZE, HOP_SIZE)
        self._buf = buf[k * HOP_SIZE:].copy()
        self._n_out += k
        return _frames_to_mel(frames).numpy()

    def feed(self, samples: np.ndarray) -> np.ndarray:
        self._n_in += len(samples)
        return self._emit(np.concatenate([self._buf, np.asarray(samples, np.float32)]))

    def finish(self) -> np.ndarray:
        """The remaining frames, up to n_frames(total samples), with zeros after the end."""
        missing = n_frames(self._n_in) - self._n_out
        if missing <= 0:
            return np.zeros((0, N_MELS), np.float32)
        need = (missing - 1) * HOP_SIZE + FRAME_SIZE
        tail = np.zeros(max(need, len(self._buf)), np.float32)
        tail[: len(self._buf)] = self._buf
        out = self._emit(tail)
        assert len(out) == missing, (len(out), missing)
        return out


def iter_file_mel(path, start_s: float = 0.0, duration_s: float | None = None,
                  stream: StreamingMel | None = None):
    """Unnormalised log-mel frames of an audio file, yielded block by block ([k, 96] float32).

    Decoding, resampling and the mel all stream, so memory stays flat for any file length;
    the frames equal `mel_frontend(load_audio(path))`. Pass `stream` to read its sample count
    afterwards. Raises audio.AudioError, also for samples so large that the mel overflows
    (corrupt float WAVs: finite, but 1e30), which would otherwise become NaN embeddings.
    """

    stream = stream if stream is not None else StreamingMel()

    def checked(frames: np.ndarray) -> np.ndarray:
        if not np.isfinite(frames).all():
            at = stream.samples_in / SAMPLE_RATE
            raise AudioError(path, f"sample values out of range: the mel-spectrogram overflows "
                                   f"(before {at:.2f} s)", stage="mel")
        return frames

    for block in iter_audio(path, SAMPLE_RATE, start_s, duration_s):
        frames = stream.feed(block)
        if len(frames):
            yield checked(frames)
    tail = stream.finish()
    if len(tail):
        yield checked(tail)


def file_mel(path, start_s: float = 0.0, duration_s: float | None = None) -> np.ndarray:
    """[frames, 96] unnormalised log-mel of a whole file or excerpt (for bounded lengths)."""
    parts = list(iter_file_mel(path, start_s, duration_s))
    return np.concatenate(parts) if parts else np.zeros((0, N_MELS), np.float32)
