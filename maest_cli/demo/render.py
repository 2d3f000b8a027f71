"""One clip of the demo corpus: how it is played (drawn from a seed), and the audio.

`draw_render` decides everything about a clip from the piece and one random generator:
which parts play, the ensemble and the General MIDI instrument of each part (chosen by the
part's register), the tempo, the transposition, the excerpt, the articulation, the
soundfont's reverb and chorus, and the loudness. `clip_notes` turns piece + decisions into the
notes of the clip in seconds, `midi_file` into a Standard MIDI File, and a renderer into sound:
`FluidSynthRenderer` runs the fluidsynth program on the FluidR3 General MIDI soundfont. The
renderer is an argument everywhere, so tests run the whole builder with a fake one.

`finish_audio` makes the delivered clip: exactly the clip's length, mono, resampled (soxr) to
the corpus rate, brought to the drawn loudness without clipping, and 16-bit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from maest_cli.demo.scores import BPM_RANGES, Piece, beat_ql, dominant_meter
from maest_cli.errors import MaestError
from maest_cli.io.artefacts import sha256_file

RENDER_RATE = 44100  # the soundfont's own rate; the corpus rate is reached by soxr afterwards
DEFAULT_SOUNDFONT = "/usr/share/sounds/sf2/FluidR3_GM.sf2"
MAX_CHANNELS = 15  # 16 MIDI channels without channel 10 (drums)


@dataclass(frozen=True)
class Instrument:
    program: int  # General MIDI program, 0-based
    family: str
    centre: int  # MIDI pitch the instrument sounds best around: parts go to the nearest


INSTRUMENTS = {
    "violin": Instrument(40, "strings", 76), "viola": Instrument(41, "strings", 62),
    "cello": Instrument(42, "strings", 50), "contrabass": Instrument(43, "strings", 38),
    "trumpet": Instrument(56, "brass", 70), "horn": Instrument(60, "brass", 60),
    "trombone": Instrument(57, "brass", 52), "tuba": Instrument(58, "brass", 40),
    "flute": Instrument(73, "woodwinds", 79), "oboe": Instrument(68, "woodwinds", 72),
    "clarinet": Instrument(71, "woodwinds", 65), "bassoon": Instrument(70, "woodwinds", 50),
    "soprano-sax": Instrument(64, "saxophones", 75), "alto-sax": Instrument(65, "saxophones", 67),
    "tenor-sax": Instrument(66, "saxophones", 58), "baritone-sax": Instrument(67, "saxophones", 48),
    "piano": Instrument(0, "keyboards", 60), "harpsichord": Instrument(6, "keyboards", 60),
    "organ": Instrument(19, "organ", 60), "guitar": Instrument(24, "plucked", 60),
    "harp": Instrument(46, "plucked", 60), "choir": Instrument(52, "voices", 60),
}
# An ensemble is drawn per clip, independently of the piece, so that instruments are learnable
# apart from style. Sections give each part the instrument nearest its register; "one" plays
# every part on one instrument; "solo+keyboard" gives the top part to a melody instrument and
# the rest to one keyboard; "mixed" draws each part among the melody instruments near it.
ENSEMBLES = {
    "strings": ("section", ("violin", "viola", "cello", "contrabass")),
    "brass": ("section", ("trumpet", "horn", "trombone", "tuba")),
    "woodwinds": ("section", ("flute", "oboe", "clarinet", "bassoon")),
    "saxophones": ("section", ("soprano-sax", "alto-sax", "tenor-sax", "baritone-sax")),
    "piano": ("one", ("piano",)), "harpsichord": ("one", ("harpsichord",)), "organ": ("one", ("organ",)),
    "guitar": ("one", ("guitar",)), "harp": ("one", ("harp",)), "choir": ("one", ("choir",)),
    "solo+keyboard": ("solo+keyboard", ("violin", "flute", "oboe", "clarinet", "trumpet", "alto-sax")),
    "mixed": ("mixed", ("violin", "viola", "cello", "trumpet", "horn", "trombone", "flute", "oboe", "clarinet",
                        "bassoon", "alto-sax", "tenor-sax")),
}
KEYBOARDS = ("piano", "harpsichord", "organ")
# A random subset of the parts plays in 55 % of the clips of a polyphonic piece (a duo from a
# chorale, a trio from a madrigal), one part alone less often: the folk collections give solos
# enough, and ensemble size must not be a proxy for style.
P_ALL_PARTS = 0.45
P_SOLO_WEIGHT = 0.3  # relative to 1 for every other subset size


@dataclass(frozen=True)
class RenderParams:
    """Everything that decides a clip's audio besides the piece. Recorded per clip."""

    clip_id: str
    piece_id: str
    seconds: float
    parts: tuple[int, ...]  # indices of the piece's parts that play
    ensemble: str
    instruments: tuple[str, ...]  # one per played part
    transpose: int  # semitones
    tempo_class_drawn: str
    beat_bpm: float
    beat_ql: float  # the beat in quarter notes (time signature at the excerpt)
    start_ql: float  # where the excerpt starts in the piece
    loops: int  # how often the piece is played in a row (short pieces repeat, like verses)
    legato: float  # sounding fraction of each written duration
    velocities: tuple[int, ...]  # one per played part
    humanize_ms: float  # sd of onset jitter
    reverb_room: float
    reverb_damp: float
    reverb_width: float
    reverb_level: float
    reverb_send: int  # MIDI CC 91
    chorus: bool
    chorus_nr: int
    chorus_level: float
    chorus_speed: float
    chorus_depth: float
    chorus_send: int  # MIDI CC 93
    loudness_db: float  # RMS of the delivered clip, dBFS (lowered if it would clip)
    note_seed: int

    @property
    def quarter_bpm(self) -> float:
        return self.beat_bpm * self.beat_ql

    @property
    def gap_ql(self) -> float:
        """The rest between two repetitions of a short piece: one beat."""
        return self.beat_ql

    def period_ql(self, piece: Piece) -> float:
        return piece.length_ql + self.gap_ql

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RenderParams:
        d = dict(d)
        for k in ("parts", "instruments", "velocities"):
            d[k] = tuple(d[k])
        return cls(**d)


def clip_seed(seed: int, clip_id: str) -> int:
    """The seed of one clip: from the corpus seed and the clip's name only, so a clip is the
    same whatever else is in the corpus and in whatever order it is rendered."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{clip_id}".encode()).digest()[:8], "little")


def assign_instruments(ensemble: str, medians: list[float], rng: np.random.Generator) -> list[str]:
    """The instrument of each part (parts given by their median pitch, top part first)."""
    kind, names = ENSEMBLES[ensemble]
    if kind == "one":
        return [names[0]] * len(medians)

    def nearest(pitch: float, pool) -> str:
        return min(pool, key=lambda n: (abs(INSTRUMENTS[n].centre - pitch), n))

    if kind == "section":
        return [nearest(m, names) for m in medians]
    if kind == "solo+keyboard":
        top = int(np.argmax(medians))
        solo = str(rng.choice(names))
        keyboard = str(rng.choice(KEYBOARDS))
        return [solo if i == top else keyboard for i in range(len(medians))]
    out = []  # mixed
    for m in medians:
        near = sorted(names, key=lambda n: (abs(INSTRUMENTS[n].centre - m), n))[:4]
        out.append(str(rng.choice(near)))
    return out


def _excerpt_starts(piece: Piece, parts: tuple[int, ...], beat: float, latest: float, clip_ql: float) -> np.ndarray:
    """Where an excerpt of `clip_ql` may start: beat-aligned onsets of the played parts up to
    `latest`, so it starts where its music starts. If the played parts only enter later, any
    onset (or `latest` itself) from which one of their notes sounds within the excerpt."""
    played = np.unique(np.concatenate([piece.parts[i][:, 0] for i in parts]))
    every = np.unique(np.concatenate([p[:, 0] for p in piece.parts] + [np.array([latest])]))
    for onsets in (played, every):
        early = onsets[onsets <= latest + 1e-9]
        on_beat = early[np.abs(early / beat - np.round(early / beat)) < 1e-6]
        early = on_beat if len(on_beat) else early
        heard = np.searchsorted(played, early - 1e-9) < np.searchsorted(played, early + clip_ql - 1e-9)
        if heard.any():
            return early[heard]
    return np.array([max(0.0, latest)])


def draw_render(piece: Piece, clip_id: str, seed: int, seconds: float = 30.0) -> RenderParams:
    """Every decision about one clip, from the corpus seed and the clip's name (clip_seed)."""
    rng = np.random.default_rng(clip_seed(seed, clip_id))
    n = len(piece.parts)
    if n > 1 and rng.random() >= P_ALL_PARTS:
        sizes = np.arange(1, n)
        weights = np.where(sizes == 1, P_SOLO_WEIGHT, 1.0)
        k = int(rng.choice(sizes, p=weights / weights.sum()))
        parts = tuple(sorted(int(i) for i in rng.choice(n, size=k, replace=False)))
    else:
        parts = tuple(range(n))
    parts = parts[:MAX_CHANNELS]
    ensemble = str(rng.choice(sorted(ENSEMBLES)))
    transpose = int(rng.integers(-5, 6))
    medians = [piece.medians()[i] + transpose for i in parts]
    instruments = tuple(assign_instruments(ensemble, medians, rng))
    tempo = str(rng.choice(sorted(BPM_RANGES)))
    beat_bpm = round(float(rng.uniform(*BPM_RANGES[tempo])), 1)
    # The beat comes from the piece's most used time signature; an excerpt in a section of
    # another meter is rare (its meter label comes from the signature actually heard).
    beat = beat_ql(dominant_meter(piece.meters, 0.0, piece.length_ql, piece.length_ql, share=0.0))
    clip_ql = seconds * beat_bpm * beat / 60.0
    if piece.length_ql >= clip_ql:
        starts = _excerpt_starts(piece, parts, beat, piece.length_ql - clip_ql, clip_ql)
        start, loops = float(starts[int(rng.integers(len(starts)))]), 1
    else:
        start, loops = 0.0, int(np.ceil(clip_ql / (piece.length_ql + beat)))
    top = int(np.argmax(medians))
    velocities = tuple(int(np.clip(rng.integers(70, 101) + (8 if i == top and len(parts) > 1 else 0), 1, 127))
                       for i in range(len(parts)))
    chorus = bool(rng.random() < 0.4)
    return RenderParams(
        clip_id=clip_id, piece_id=piece.piece_id, seconds=float(seconds), parts=parts, ensemble=ensemble,
        instruments=instruments, transpose=transpose, tempo_class_drawn=tempo, beat_bpm=beat_bpm, beat_ql=beat,
        start_ql=start, loops=loops, legato=round(float(rng.uniform(0.8, 1.0)), 3), velocities=velocities,
        humanize_ms=round(float(rng.uniform(0.0, 12.0)), 2),
        reverb_room=round(float(rng.uniform(0.1, 0.9)), 3), reverb_damp=round(float(rng.uniform(0.0, 0.7)), 3),
        reverb_width=round(float(rng.uniform(0.3, 1.0)), 3), reverb_level=round(float(rng.uniform(0.3, 0.9)), 3),
        reverb_send=int(rng.integers(10, 111)), chorus=chorus, chorus_nr=int(rng.integers(2, 6)),
        chorus_level=round(float(rng.uniform(0.5, 2.5)), 3), chorus_speed=round(float(rng.uniform(0.15, 0.9)), 3),
        chorus_depth=round(float(rng.uniform(2.0, 12.0)), 3), chorus_send=int(rng.integers(20, 90)) if chorus else 0,
        loudness_db=round(float(rng.uniform(-28.0, -16.0)), 2), note_seed=int(rng.integers(2**31)))


# ---------------------------------------------------------------- notes of a clip

@dataclass
class ClipNotes:
    """The notes of one clip: per played part, [n, 4] onset s, duration s, MIDI pitch (as
    sounding, transposed), written duration in quarter notes (for the key analysis)."""

    parts: list[np.ndarray]
    start_ql: float
    end_ql: float  # the excerpt in the piece's (looped) timeline
    period_ql: float


def clip_notes(piece: Piece, params: RenderParams) -> ClipNotes:
    """Loop the piece `params.loops` times (one beat of rest between), cut the excerpt of
    `params.seconds` at `params.start_ql`, and convert to seconds. Notes that start inside the
    excerpt are kept (a note held past the end is cut by the clip's end, as in any excerpt)."""
    spq = 60.0 / params.quarter_bpm
    period = params.period_ql(piece)
    start, end = params.start_ql, params.start_ql + params.seconds / spq
    out = []
    for i in params.parts:
        notes = piece.parts[i]
        looped = np.concatenate([notes + np.array([k * period, 0.0, 0.0]) for k in range(params.loops)])
        inside = looped[(looped[:, 0] >= start - 1e-9) & (looped[:, 0] < end - 1e-9)]
        secs = np.empty((len(inside), 4))
        secs[:, 0] = (inside[:, 0] - start) * spq
        secs[:, 1] = inside[:, 1] * spq
        secs[:, 2] = inside[:, 2] + params.transpose
        secs[:, 3] = inside[:, 1]
        out.append(secs)
    return ClipNotes(out, start, end, period)


# ---------------------------------------------------------------- MIDI

TICKS_PER_QUARTER = 480
MIDI_TEMPO_US = 500_000  # 120 BPM: one tick is 1/960 s; the music's tempo is already in seconds


def _varlen(n: int) -> bytes:
    out = [n & 0x7F]
    n >>= 7
    while n:
        out.append(0x80 | (n & 0x7F))
        n >>= 7
    return bytes(reversed(out))


def midi_file(notes: ClipNotes, params: RenderParams) -> bytes:
    """A format-0 Standard MIDI File of the clip: one channel per played part with its program,
    reverb and chorus sends; notes with seeded onset jitter and velocity variation, sounding
    `legato` of their written length. An event just after the clip's end makes the renderer
    play to the end, however the music ends."""
    rng = np.random.default_rng(params.note_seed)
    tick = TICKS_PER_QUARTER * 1_000_000 / MIDI_TEMPO_US  # ticks per second
    events: list[tuple[int, int, bytes]] = []  # (tick, order, bytes): note-offs before note-ons at a tick
    channels = [c for c in range(16) if c != 9][:len(params.parts)]
    for ch, name, vel, part in zip(channels, params.instruments, params.velocities, notes.parts):
        events += [(0, 0, bytes([0xC0 | ch, INSTRUMENTS[name].program])),
                   (0, 0, bytes([0xB0 | ch, 7, 100])), (0, 0, bytes([0xB0 | ch, 91, params.reverb_send])),
                   (0, 0, bytes([0xB0 | ch, 93, params.chorus_send]))]
        jitter = rng.normal(0.0, params.humanize_ms / 1000.0, len(part))
        velocity = np.clip(vel + rng.integers(-8, 9, len(part)), 1, 127)
        for (on, dur, pitch, _), j, v in zip(part, jitter, velocity):
            if not 0 <= pitch <= 127:
                continue
            t_on = max(0.0, on + j) if on > 0 else 0.0
            t_off = t_on + max(0.03, dur * params.legato)
            events.append((round(t_on * tick), 2, bytes([0x90 | ch, int(pitch), int(v)])))
            events.append((round(t_off * tick), 1, bytes([0x80 | ch, int(pitch), 0])))
    events.append((round((params.seconds + 0.25) * tick), 3, bytes([0xB0 | channels[0], 7, 100])))
    events.sort(key=lambda e: (e[0], e[1]))
    track = bytearray(b"\x00\xff\x51\x03" + MIDI_TEMPO_US.to_bytes(3, "big"))
    now = 0
    for t, _, data in events:
        track += _varlen(t - now) + data
        now = t
    track += b"\x00\xff\x2f\x00"
    return (b"MThd" + struct.pack(">IHHH", 6, 0, 1, TICKS_PER_QUARTER)
            + b"MTrk" + struct.pack(">I", len(track)) + bytes(track))


# ---------------------------------------------------------------- renderers

class RenderError(MaestError, RuntimeError):
    """A clip the synthesizer could not make (the message says why)."""


class FluidSynthRenderer:
    """The fluidsynth program (Debian package `fluidsynth`) with a SoundFont (default: FluidR3
    General MIDI, package `fluid-soundfont-gm`). One process per clip, rendering faster than
    real time to 32-bit float (no dither: the same input gives the same bytes); samples are
    loaded on demand, so a clip reads only the instruments it uses from the 148 MB soundfont."""

    def __init__(self, soundfont: str | os.PathLike = DEFAULT_SOUNDFONT, executable: str = "fluidsynth"):
        self.soundfont = str(soundfont)
        self.executable = executable

    def check(self) -> None:
        """A UsageError-worthy message (ValueError) if fluidsynth or the soundfont is missing."""
        if shutil.which(self.executable) is None:
            raise FileNotFoundError(f"{self.executable}: not found; install the Debian packages fluidsynth and "
                                    f"fluid-soundfont-gm (`make corpus` does)")
        if not Path(self.soundfont).is_file():
            raise FileNotFoundError(f"{self.soundfont}: no such soundfont; install the Debian package "
                                    f"fluid-soundfont-gm (`make corpus` does) or pass --soundfont")

    def describe(self) -> dict:
        """What shapes the sound, for the manifest: program version, soundfont and its checksum."""

        out = subprocess.run([self.executable, "--version"], capture_output=True, text=True, timeout=30)
        first = (out.stdout or out.stderr).strip().splitlines()
        version = first[0].rsplit(" ", 1)[-1] if first else "unknown"
        return {"renderer": "fluidsynth", "fluidsynth": version, "soundfont": self.soundfont,
                "soundfont_sha256": sha256_file(self.soundfont), "render_rate": RENDER_RATE}

    def render(self, midi: bytes, params: RenderParams) -> np.ndarray:
        """[n, 2] float32 at RENDER_RATE."""
        with tempfile.TemporaryDirectory(prefix="maest-corpus-") as tmp:
            mid, raw = Path(tmp) / "clip.mid", Path(tmp) / "clip.raw"
            mid.write_bytes(midi)
            cmd = [self.executable, "-ni", "-q", "-F", str(raw), "-T", "raw", "-O", "float", "-E", "little",
                   "-r", str(RENDER_RATE), "-g", "0.3", "-R", "1", "-C", "1" if params.chorus else "0",
                   "-o", "synth.dynamic-sample-loading=1", "-o", "synth.cpu-cores=1", "-o", "synth.polyphony=512",
                   "-o", f"synth.reverb.room-size={params.reverb_room}",
                   "-o", f"synth.reverb.damp={params.reverb_damp}",
                   "-o", f"synth.reverb.width={params.reverb_width}", "-o", f"synth.reverb.level={params.reverb_level}",
                   "-o", f"synth.chorus.nr={params.chorus_nr}", "-o", f"synth.chorus.level={params.chorus_level}",
                   "-o", f"synth.chorus.speed={params.chorus_speed}", "-o", f"synth.chorus.depth={params.chorus_depth}",
                   self.soundfont, str(mid)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            except subprocess.TimeoutExpired:
                raise RenderError("fluidsynth took over 300 s") from None
            if done.returncode != 0 or not raw.is_file():
                why = (done.stderr or done.stdout).strip().splitlines()
                raise RenderError(f"fluidsynth failed (exit {done.returncode}): {why[-1] if why else 'no message'}")
            audio = np.fromfile(raw, dtype="<f4")
        return audio[: len(audio) // 2 * 2].reshape(-1, 2)


# ---------------------------------------------------------------- the delivered audio

def finish_audio(stereo: np.ndarray, params: RenderParams, sample_rate: int, rate_in: int = RENDER_RATE
                 ) -> tuple[np.ndarray, dict]:
    """int16 mono of exactly `params.seconds` at `sample_rate`, at the drawn loudness (RMS) or
    lower if that would clip; 5 ms fade-in and 50 ms fade-out so a cut note does not click."""
    import soxr

    n_in = round(params.seconds * rate_in)
    mono = np.asarray(stereo, np.float64).mean(axis=1) if stereo.ndim == 2 else np.asarray(stereo, np.float64)
    mono = np.pad(mono[:n_in], (0, max(0, n_in - len(mono))))
    if sample_rate != rate_in:
        mono = soxr.resample(mono, rate_in, sample_rate, quality="HQ")
    n = round(params.seconds * sample_rate)
    mono = np.pad(mono[:n], (0, max(0, n - len(mono))))
    fade_in, fade_out = round(0.005 * sample_rate), round(0.05 * sample_rate)
    mono[:fade_in] *= np.linspace(0.0, 1.0, fade_in)
    mono[n - fade_out:] *= np.linspace(1.0, 0.0, fade_out)
    rms = float(np.sqrt(np.mean(mono ** 2)))
    if rms < 10 ** (-70 / 20):
        raise RenderError(f"the rendered clip is silent (RMS {20 * np.log10(max(rms, 1e-12)):.0f} dBFS)")
    peak = float(np.abs(mono).max())
    gain = 10 ** (params.loudness_db / 20) / rms
    limited = peak * gain > 0.97
    if limited:
        gain = 0.97 / peak
    pcm = np.round(np.clip(mono * gain, -1.0, 1.0) * 32767).astype(np.int16)
    return pcm, {"rms_db": round(20 * float(np.log10(rms * gain)), 2), "gain_db": round(20 * float(np.log10(gain)), 2),
                 "peak": round(peak * gain, 4), "limited": bool(limited)}
