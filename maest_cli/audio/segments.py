"""Audio file -> log-mel segments, streaming: the segmentation rule of MAEST inference.

Segments are `segment_frames` mel frames long (the model's input length: 1876 = 30 s for the
30 s models; 1 frame = 16 ms) and start every `hop` frames. A track shorter than one segment
is one shorter segment (the model truncates its time encodings, as the reference does: no
padding). A longer track gets segments at 0, hop, 2 hop, ... while they end before its last
frame, then one last segment aligned to its end: no audio is ignored, no zeros are fed.
Tracks under 16 frames (0.224 s) are an error. Memory stays at about two segments whatever
the file length.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from maest_cli.audio.decode import AudioError
from maest_cli.audio.frontend import (
    HOP_SIZE,
    N_MELS,
    SAMPLE_RATE,
    StreamingMel,
    iter_file_mel,
    n_frames,
)
from maest_cli.errors import UsageError


def hop_frames(hop: str | float, segment_frames: int) -> int:
    """'half' | 'full' | seconds -> hop in mel frames (1 frame = 16 ms)."""
    if hop == "half":
        return max(segment_frames // 2, 1)
    if hop == "full":
        return segment_frames
    try:
        seconds = float(hop)
    except (TypeError, ValueError):
        raise UsageError(f"--hop {hop!r}: expected half, full or a number of seconds") from None
    if not math.isfinite(seconds):  # nan, inf, 1e400: float() takes them, round() would not
        raise UsageError(f"--hop {hop}: expected a finite number of seconds")
    frames = round(seconds * SAMPLE_RATE / HOP_SIZE)
    if not 1 <= frames <= segment_frames:
        raise UsageError(f"--hop {hop}: must be between {HOP_SIZE / SAMPLE_RATE} s and one segment "
                         f"({(segment_frames - 1) * HOP_SIZE / SAMPLE_RATE:.2f} s); a longer hop would skip audio")
    return frames


def segment_starts(total_frames: int, segment_frames: int, hop: int) -> list[int]:
    """First frames of the segments of a track (the rule in the module docstring)."""
    if total_frames <= segment_frames:
        return [0] if total_frames > 0 else []
    starts = list(range(0, total_frames - segment_frames, hop))
    return starts + [total_frames - segment_frames]


@dataclass
class Segment:
    index: int
    start: int  # first mel frame
    frames: np.ndarray  # [length, 96] float32 log-mel, not yet normalised (the model's InputNorm does that)


class SegmentCutter:
    """Cuts a stream of mel frames into the segments of `segment_starts`, holding at most
    about one segment plus one hop plus one fed block: a long file never sits in memory.

    A segment is emitted once a frame beyond its end has arrived (only then is it certain
    that it is not the last, end-aligned one); `finish` emits the end-aligned last segment.
    """

    def __init__(self, segment_frames: int, hop: int, min_frames: int = 16):
        if hop < 1 or hop > segment_frames:
            raise ValueError(f"hop {hop} must be in 1..{segment_frames}")
        self.segment_frames, self.hop, self.min_frames = segment_frames, hop, min_frames
        self._buf = np.zeros((0, N_MELS), np.float32)
        self._buf_start = 0  # absolute index of _buf[0]
        self.total = 0
        self._next = 0  # start of the next regular segment
        self._index = 0
        self.max_buffered = 0

    def _take(self, start: int, length: int) -> Segment:
        a = start - self._buf_start
        seg = Segment(self._index, start, self._buf[a:a + length].copy())
        self._index += 1
        return seg

    def feed(self, frames: np.ndarray) -> list[Segment]:
        if len(frames) == 0:
            return []
        self._buf = np.concatenate([self._buf, frames]) if len(self._buf) else np.asarray(frames, np.float32)
        self.total += len(frames)
        self.max_buffered = max(self.max_buffered, len(self._buf))
        out = []
        L = self.segment_frames
        while self._next + L < self.total:
            out.append(self._take(self._next, L))
            # the end-aligned last segment starts after this one: frames before start+1 are done
            keep_from = self._next + 1
            self._next += self.hop
            drop = keep_from - self._buf_start
            if drop > 0:
                self._buf = self._buf[drop:]
                self._buf_start = keep_from
        if out:  # release the memory of the dropped frames (slices keep the old array alive)
            self._buf = self._buf.copy()
        return out

    @property
    def n_emitted(self) -> int:
        return self._index

    def finish(self) -> list[Segment]:
        L = self.segment_frames
        if self.total < self.min_frames:
            raise ValueError(f"{self.total} mel frames; the model needs at least {self.min_frames}")
        if self.total <= L:
            return [self._take(0, self.total)]
        return [self._take(self.total - L, L)]


@dataclass
class DecodeStats:
    n_segments: int = 0
    n_samples: int = 0

    @property
    def duration_s(self) -> float:
        return self.n_samples / SAMPLE_RATE


def too_short(path: str, n_samples: int, min_frames: int) -> AudioError:
    """The error of a file too short for the model: what it gave, and what the model needs."""
    return AudioError(path, f"too short: {n_samples / SAMPLE_RATE:.3f} s gives {n_frames(n_samples)} mel frames; "
                            f"the model needs at least {min_frames} "
                            f"({((min_frames - 2) * HOP_SIZE + 1) / SAMPLE_RATE:.3f} s)", stage="segment")


def iter_file_segments(path: str, segment_frames: int, hop: int, stats: DecodeStats | None = None,
                       min_frames: int = 16) -> Iterator[Segment]:
    """Decode -> 16 kHz -> log-mel -> segments, streaming. Raises AudioError
    (stage open/decode/mel/segment); segments already yielded belong to a failed file then."""
    stats = stats if stats is not None else DecodeStats()
    mel = StreamingMel()
    cutter = SegmentCutter(segment_frames, hop, min_frames)
    for frames in iter_file_mel(path, stream=mel):
        yield from cutter.feed(frames)
    stats.n_samples = mel.samples_in
    try:
        last = cutter.finish()
    except ValueError:
        raise too_short(path, stats.n_samples, min_frames) from None
    yield from last
    stats.n_segments = cutter.n_emitted
