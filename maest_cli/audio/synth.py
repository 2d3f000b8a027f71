"""A small deterministic music synthesizer: real-sounding test audio without any dataset.

Each song is drawn from a seed: tempo, key and mode, a chord progression, a drum style, and
timbres for bass, chords and melody; it is arranged in sections (instruments entering and
leaving), mixed in stereo with a convolution reverb and soft clipping. The same seed always
gives the same samples. Used to measure the speed and fidelity of extraction presets on
music-like input (`preset_eval.py`) and in tests; not meant for training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maest_cli.io.artefacts import atomic_path

SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10), "dorian": (0, 2, 3, 5, 7, 9, 10)}
# Progressions as scale degrees (0-based), one chord per bar.
PROGRESSIONS = ((0, 4, 5, 3), (0, 5, 3, 4), (1, 4, 0, 5), (0, 3, 4, 3), (5, 3, 0, 4), (0, 6, 5, 4), (0, 3, 0, 4))
DRUM_STYLES = ("rock", "four_on_floor", "half_time", "breakbeat", "none")
BASS_TIMBRES = ("saw", "sine", "square")
CHORD_TIMBRES = ("pad", "piano", "organ")
LEAD_TIMBRES = ("flute", "bell", "square_lead", "pluck")


@dataclass(frozen=True)
class SongSpec:
    seed: int
    duration_s: float
    tempo_bpm: float
    key: int  # 0 = C
    mode: str
    progression: tuple[int, ...]
    drums: str
    bass: str
    chords: str
    lead: str
    swing: float

    @property
    def name(self) -> str:
        keys = "C Cs D Ds E F Fs G Gs A As B".split()
        return f"song{self.seed:04d}-{keys[self.key]}{self.mode}-{self.tempo_bpm:.0f}bpm-{self.drums}-{self.lead}"


def random_song(seed: int, min_s: float = 30.0, max_s: float = 180.0) -> SongSpec:
    rng = np.random.default_rng(seed)
    return SongSpec(
        seed=seed, duration_s=float(rng.uniform(min_s, max_s)), tempo_bpm=float(rng.uniform(70, 170)),
        key=int(rng.integers(12)), mode=str(rng.choice(list(SCALES))),
        progression=PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))],
        drums=str(rng.choice(DRUM_STYLES, p=[0.3, 0.25, 0.2, 0.15, 0.1])), bass=str(rng.choice(BASS_TIMBRES)),
        chords=str(rng.choice(CHORD_TIMBRES)), lead=str(rng.choice(LEAD_TIMBRES)), swing=float(rng.uniform(0, 0.25)))


def _hz(midi: float) -> float:
    return 440.0 * 2 ** ((midi - 69) / 12)


def _adsr(n: int, sr: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    t = np.arange(n) / sr
    env = np.where(t < attack, t / max(attack, 1e-4), sustain + (1 - sustain) * np.exp(-(t - attack) / max(decay, 1e-4)))
    tail = min(int(release * sr), n)
    if tail:
        env[n - tail:] *= np.linspace(1, 0, tail)
    return env


def _additive(f0: float, n: int, sr: int, amps: list[float], detune: float = 0.0, phase_rng=None) -> np.ndarray:
    t = np.arange(n) / sr
    out = np.zeros(n)
    for k, a in enumerate(amps, start=1):
        f = f0 * k
        if f >= sr / 2 or a == 0:
            continue
        ph = phase_rng.uniform(0, 2 * np.pi) if phase_rng is not None else 0.0
        out += a * np.sin(2 * np.pi * f * (1 + detune) * t + ph)
    return out


def _note(timbre: str, midi: float, dur: float, sr: int, rng) -> np.ndarray:
    """One note with its release tail."""
    f0 = _hz(midi)
    n = int((dur + 0.3) * sr)
    t = np.arange(n) / sr
    if timbre == "saw":
        x = _additive(f0, n, sr, [1 / k for k in range(1, 16)])
        env = _adsr(n, sr, 0.005, 0.2, 0.6, 0.3)
    elif timbre == "square":
        x = _additive(f0, n, sr, [1 / k if k % 2 else 0 for k in range(1, 16)])
        env = _adsr(n, sr, 0.005, 0.15, 0.5, 0.3)
    elif timbre == "sine":
        x = np.sin(2 * np.pi * f0 * t) + 0.3 * np.sin(4 * np.pi * f0 * t)
        env = _adsr(n, sr, 0.01, 0.3, 0.7, 0.3)
    elif timbre == "pad":
        x = sum(_additive(f0, n, sr, [1 / k for k in range(1, 10)], d, rng) for d in (-0.004, 0.0, 0.005))
        env = _adsr(n, sr, 0.25, 0.5, 0.8, 0.3)
    elif timbre == "piano":
        x = sum(np.exp(-t * (1.5 + 1.2 * k)) * np.sin(2 * np.pi * f0 * k * (1 + 0.0004 * k * k) * t) / k
                for k in range(1, 9))
        env = _adsr(n, sr, 0.002, 0.8, 0.2, 0.3)
    elif timbre == "organ":
        x = _additive(f0, n, sr, [1, 0.5, 0, 0.3, 0, 0.2, 0, 0.12])
        env = _adsr(n, sr, 0.02, 0.1, 0.9, 0.25)
    elif timbre == "flute":
        vib = 1 + 0.004 * np.sin(2 * np.pi * 5.5 * t)
        x = np.sin(2 * np.pi * f0 * np.cumsum(vib) / sr) + 0.02 * rng.standard_normal(n)
        env = _adsr(n, sr, 0.06, 0.2, 0.8, 0.3)
    elif timbre == "bell":
        mod = 3.5 * np.exp(-t * 3) * np.sin(2 * np.pi * f0 * 1.4 * t)
        x = np.sin(2 * np.pi * f0 * t + mod)
        env = _adsr(n, sr, 0.002, 0.6, 0.1, 0.3)
    elif timbre == "square_lead":
        x = _additive(f0, n, sr, [1 / k if k % 2 else 0 for k in range(1, 12)])
        env = _adsr(n, sr, 0.01, 0.1, 0.7, 0.2)
    else:  # pluck: bright attack, fast decay of the high partials
        x = sum(np.exp(-t * (3 + 4 * k)) * np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 12))
        env = _adsr(n, sr, 0.001, 0.3, 0.0, 0.2)
    return x * env


def _lowpass(x: np.ndarray, width: int) -> np.ndarray:
    return np.convolve(x, np.ones(width) / width, mode="same")


def _drum(kind: str, sr: int, rng) -> np.ndarray:
    if kind == "kick":
        n = int(0.35 * sr)
        t = np.arange(n) / sr
        freq = 45 + 110 * np.exp(-t * 30)
        return np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t * 9) * 1.2
    if kind == "snare":
        n = int(0.2 * sr)
        t = np.arange(n) / sr
        noise = _lowpass(rng.standard_normal(n), 3)
        return (0.7 * noise * np.exp(-t * 22) + 0.5 * np.sin(2 * np.pi * 185 * t) * np.exp(-t * 30)) * 0.8
    n = int(0.06 * sr)  # closed hi-hat: high-passed noise
    t = np.arange(n) / sr
    noise = np.diff(np.diff(rng.standard_normal(n + 2)))
    return noise * np.exp(-t * 70) * 0.15


def _drum_hits(style: str, bar: int, rng) -> list[tuple[float, str]]:
    """(beat position in the bar, drum) for one 4/4 bar."""
    hits: list[tuple[float, str]] = []
    if style == "none":
        return hits
    if style == "four_on_floor":
        hits += [(b, "kick") for b in range(4)] + [(1, "snare"), (3, "snare")]
        hits += [(b + 0.5, "hat") for b in range(4)]
    elif style == "half_time":
        hits += [(0, "kick"), (2.5, "kick"), (2, "snare")] + [(b / 2, "hat") for b in range(8)]
    elif style == "breakbeat":
        hits += [(0, "kick"), (1.75, "kick"), (2.5, "kick"), (1, "snare"), (3, "snare"), (3.75, "snare")]
        hits += [(b / 4, "hat") for b in range(16) if rng.random() < 0.8]
    else:  # rock
        hits += [(0, "kick"), (2, "kick"), (1, "snare"), (3, "snare")] + [(b / 2, "hat") for b in range(8)]
        if bar % 4 == 3:
            hits += [(3.5, "snare"), (3.75, "snare")]
    return hits


def render(spec: SongSpec, sr: int = 44_100) -> np.ndarray:
    """[samples, 2] float32 in [-1, 1]."""
    rng = np.random.default_rng(spec.seed + 1)
    n = int(spec.duration_s * sr)
    beat = 60.0 / spec.tempo_bpm
    bar_s = 4 * beat
    scale = SCALES[spec.mode]
    root = 48 + spec.key  # C3 + key
    tracks = {k: np.zeros(n + sr) for k in ("drums", "bass", "chords", "lead")}

    def add(track: str, x: np.ndarray, at_s: float, gain: float) -> None:
        i = int(at_s * sr)
        if i >= n:
            return
        j = min(i + len(x), len(tracks[track]))
        tracks[track][i:j] += gain * x[: j - i]

    def degree(d: int, octave: int = 0) -> int:
        return root + 12 * (octave + d // 7) + scale[d % 7]

    drum_cache = {k: [_drum(k, sr, rng) for _ in range(4)] for k in ("kick", "snare", "hat")}
    note_cache: dict[tuple, np.ndarray] = {}

    def note(timbre: str, midi: int, dur: float) -> np.ndarray:
        """Songs repeat their notes: synthesise each (timbre, pitch, length) once."""
        key = (timbre, midi, round(dur * 1000))
        if key not in note_cache:
            note_cache[key] = _note(timbre, midi, dur, sr, rng)
        return note_cache[key]

    motif = [(int(rng.integers(-2, 5)), float(rng.choice([0.5, 0.5, 1.0, 1.5]))) for _ in range(8)]
    section_bars = 8
    n_bars = int(np.ceil(spec.duration_s / bar_s))
    arrangements = rng.random((n_bars // section_bars + 1, 4))  # which instruments play, per section
    for bar in range(n_bars):
        t0 = bar * bar_s
        section = bar // section_bars
        arrangement = arrangements[section]
        play_drums = section > 0 and arrangement[0] < 0.85
        play_bass = section > 0 or arrangement[1] < 0.3
        play_lead = section % 2 == 1 or arrangement[3] < 0.4
        chord_deg = spec.progression[bar % len(spec.progression)]
        # chords: triad (+ 7th now and then), one per bar
        notes = [chord_deg, chord_deg + 2, chord_deg + 4] + ([chord_deg + 6] if rng.random() < 0.3 else [])
        for d in notes:
            add("chords", note(spec.chords, degree(d, 1), bar_s * 0.95), t0, 0.12)
        if play_bass:
            step = 0.5 if spec.tempo_bpm < 120 else 1.0
            for k in range(int(4 / step)):
                d = chord_deg if k % 4 != 3 else chord_deg + 4
                add("bass", note(spec.bass, degree(d, -1), step * beat * 0.9), t0 + k * step * beat, 0.3)
        if play_drums:
            for pos, kind in _drum_hits(spec.drums, bar, rng):
                swing = spec.swing * beat * 0.5 if (pos * 2) % 2 == 1 else 0.0
                hit = drum_cache[kind][int(rng.integers(4))]
                add("drums", hit, t0 + pos * beat + swing, 0.6 * float(rng.uniform(0.8, 1.0)))
        if play_lead:
            pos = 0.0
            for step_deg, length in motif:
                if pos >= 4:
                    break
                if rng.random() < 0.85:
                    d = chord_deg + step_deg + (int(rng.integers(-1, 2)) if section % 3 == 2 else 0)
                    add("lead", note(spec.lead, degree(d, 2), length * beat * 0.9), t0 + pos * beat, 0.16)
                pos += length

    pans = {"drums": 0.0, "bass": 0.0, "chords": -0.25, "lead": 0.3}
    mix = np.zeros((n, 2))
    for name, x in tracks.items():
        p = pans[name]
        mix[:, 0] += x[:n] * np.sqrt(0.5 * (1 - p))
        mix[:, 1] += x[:n] * np.sqrt(0.5 * (1 + p))
    mix = _reverb(mix, sr, rng, wet=float(rng.uniform(0.1, 0.3)))
    mix = np.tanh(1.5 * mix / (np.abs(mix).max() + 1e-9))
    return (0.89 * mix / (np.abs(mix).max() + 1e-9)).astype(np.float32)


def _reverb(x: np.ndarray, sr: int, rng, wet: float) -> np.ndarray:
    """Convolution with a decaying noise impulse response, different per channel (width)."""
    length = int(float(rng.uniform(0.4, 1.2)) * sr)
    t = np.arange(length) / sr
    size = 1 << int(np.ceil(np.log2(len(x) + length)))
    out = np.empty_like(x)
    for c in range(2):
        ir = rng.standard_normal(length) * np.exp(-t * 6.0)
        ir[0] = 0.0
        ir /= np.sqrt((ir ** 2).sum()) + 1e-9
        y = np.fft.irfft(np.fft.rfft(x[:, c], size) * np.fft.rfft(ir, size), size)[: len(x)]
        out[:, c] = (1 - wet) * x[:, c] + wet * y
    return out


def write_song(spec: SongSpec, path: str | os.PathLike, sr: int = 44_100) -> Path:
    """Render and encode by extension (.mp3, .ogg, .flac, .wav, .opus), atomically."""
    import soundfile as sf

    p = Path(path)
    ext = p.suffix.lower()
    kw = {".mp3": {"format": "MP3"}, ".ogg": {"format": "OGG", "subtype": "VORBIS"},
          ".opus": {"format": "OGG", "subtype": "OPUS"}, ".flac": {"format": "FLAC"},
          ".wav": {"format": "WAV", "subtype": "PCM_16"}}[ext]
    rate = sr if ext != ".opus" else 48_000
    audio = render(spec, rate)
    # In blocks: libsndfile's Vorbis encoder crashes (segfault) on one write of minutes of audio.
    with atomic_path(p) as tmp:
        with sf.SoundFile(str(tmp), "w", rate, audio.shape[1] if audio.ndim > 1 else 1, **kw) as f:
            for start in range(0, len(audio), 1 << 16):
                f.write(audio[start:start + (1 << 16)])
    return p


def write_corpus(out_dir: str | os.PathLike, n_songs: int = 16, formats: tuple[str, ...] = ("mp3", "ogg"),
                 min_s: float = 30.0, max_s: float = 180.0, seed: int = 0, sr: int = 44_100) -> list[Path]:
    """n_songs songs alternating between `formats`; files already there are kept (resumable)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_songs):
        spec = random_song(seed * 100_003 + i, min_s, max_s)
        p = d / f"{spec.name}.{formats[i % len(formats)]}"
        if not p.exists():
            write_song(spec, p, sr)
        paths.append(p)
    return paths
