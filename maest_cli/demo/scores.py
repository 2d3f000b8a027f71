"""Scores of the demo corpus as note tables, and the labels that the notes decide.

music21 reads a score (MusicXML, Humdrum, ABC) once; what the corpus needs of it is kept as a
`Piece`: per part, the notes as (onset, duration, MIDI pitch) in quarter notes, after repeats
are written out and ties joined, plus the time signatures and the title. A Piece is plain data
(JSON), so the builder reads each score in a worker once and the renderer never parses again.

The labels that come from the music itself are derived here, each by one small rule that the
tests check on hand-made streams: the mode of an excerpt (music21's key analysis of the notes
that sound), its meter class (from the time signature in force), the ensemble size (parts that
sound) and the tempo class (from the beat rate the clip was rendered at).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from maest_cli.errors import MaestError

MIN_NOTES = 8
MIN_LENGTH_QL = 8.0  # quarter notes: anything shorter is a fragment, not a piece
# Repeats are written out only in scores up to this long (quarter notes): in a long movement
# they change nothing a 30 s excerpt needs, and music21 takes seconds to expand them.
EXPAND_REPEATS_QL = 256.0
# Tempo classes by beats per minute (the beat of the time signature: a dotted quarter in 6/8,
# a half note in 2/2). Clips are drawn inside BPM_RANGES, away from the class boundaries, so
# that a class is audible and not a coin flip at 89 vs 91 BPM.
TEMPO_BOUNDS = (74.0, 112.0)  # slow < 74 <= medium < 112 <= fast
BPM_RANGES = {"slow": (48.0, 68.0), "medium": (80.0, 104.0), "fast": (120.0, 150.0)}
ENSEMBLE_SIZES = ("solo", "duo", "trio", "quartet", "larger")
METERS = ("duple", "triple", "compound")
MODES = ("major", "minor")
KEY_METHOD = "music21 analyze('key') (Krumhansl-Schmuckler with Aarden-Essen weights)"
ABC_TUNE_START = re.compile(r"^X:\s*(\d+)", re.MULTILINE)


class UnusablePiece(MaestError):
    """A score that cannot become clips (unreadable, no notes, too short): the builder records
    the reason and takes the collection's next candidate instead."""


@dataclass
class Piece:
    """One piece as the renderer needs it. Times are in quarter notes from the first note."""

    piece_id: str
    title: str
    composer: str
    parts: list[np.ndarray]  # per part [n, 3] float64: onset, duration, MIDI pitch; sorted by onset
    part_names: list[str]
    meters: list[tuple[float, str]]  # (onset, "3/4"), sorted; [] if the score has none
    length_ql: float

    def to_json(self) -> dict:
        return {"piece_id": self.piece_id, "title": self.title, "composer": self.composer,
                "part_names": self.part_names, "meters": [[o, r] for o, r in self.meters],
                "length_ql": self.length_ql,
                "parts": [[[round(float(v), 6) for v in row] for row in p] for p in self.parts]}

    @classmethod
    def from_json(cls, d: dict) -> Piece:
        return cls(d["piece_id"], d["title"], d["composer"],
                   [np.asarray(p, np.float64).reshape(-1, 3) for p in d["parts"]], list(d["part_names"]),
                   [(float(o), str(r)) for o, r in d["meters"]], float(d["length_ql"]))

    @property
    def n_notes(self) -> int:
        return sum(len(p) for p in self.parts)

    def medians(self) -> list[float]:
        """The median pitch of each part: where it sits, for choosing its instrument."""
        return [float(np.median(p[:, 2])) for p in self.parts]


# ---------------------------------------------------------------- reading scores

def abc_tunes(text: str) -> list[tuple[str, str]]:
    """The tunes of a many-tune ABC file as (X number without leading zeros, text of a one-tune
    file): the lines before the first X: (file-wide settings) go in front of each tune."""
    starts = [m.start() for m in ABC_TUNE_START.finditer(text)]
    if not starts:
        return []
    header = text[:starts[0]]
    ends = starts[1:] + [len(text)]
    return [(str(int(ABC_TUNE_START.match(text, s).group(1))), header + text[s:e]) for s, e in zip(starts, ends)]


def parse_score(path: Path, tune: str = ""):
    """A music21 stream of one file, or of one tune of an ABC file. music21's pickle cache
    is bypassed (forceSource, no pickle written): no hidden files, the same result every time."""
    from music21 import converter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tune:
            text = path.read_text(encoding="utf-8", errors="replace")
            found = [t for x, t in abc_tunes(text) if x == tune]
            if not found:
                raise UnusablePiece(f"no tune X:{tune} in {path.name}")
            return converter.parse(found[0], format="abc", forceSource=True)
        return converter.parseFile(str(path), forceSource=True, storePickle=False)


def piece_from_stream(score, piece_id: str = "", title: str = "", composer: str = "") -> Piece:
    """The note table of a music21 Score (or a single Part/Stream): repeats written out where
    music21 can, ties joined, grace notes dropped, chords split into their notes."""
    from music21 import meter, stream

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if isinstance(score, stream.Opus):
            raise UnusablePiece("a collection of several works, not one piece")
        if float(score.highestTime) <= EXPAND_REPEATS_QL:
            try:
                expanded = score.expandRepeats()
                score = expanded if expanded is not None else score
            except Exception:  # noqa: BLE001 - music21 refuses unusual repeat structures; play as written
                pass
        parts = list(score.parts) if isinstance(score, stream.Score) else [score]
        tables, names, meters = [], [], []
        for k, part in enumerate(parts):
            flat = part.flatten()
            table = _note_table(flat.notes)
            if not meters:
                meters = [(float(ts.offset), ts.ratioString) for ts in flat.getElementsByClass(meter.TimeSignature)]
            if len(table):
                tables.append(table)
                names.append(str(part.partName or f"part {k + 1}"))
        md = score.metadata
        title = title or (md.title if md and md.title else "") or ""
        composer = composer or (md.composer if md and md.composer else "") or ""
    if not tables:
        raise UnusablePiece("no notes")
    first = min(float(t[0, 0]) for t in tables)
    tables = [t - np.array([first, 0.0, 0.0]) for t in tables]
    meters = _distinct_meters([(max(0.0, o - first), r) for o, r in sorted(meters)])
    length = max(float((t[:, 0] + t[:, 1]).max()) for t in tables)
    piece = Piece(piece_id, str(title), str(composer), tables, names, meters, length)
    if piece.n_notes < MIN_NOTES:
        raise UnusablePiece(f"only {piece.n_notes} notes")
    if length < MIN_LENGTH_QL:
        raise UnusablePiece(f"only {length:g} quarter notes long")
    return piece


def _note_table(notes) -> np.ndarray:
    """[n, 3] onset, duration, MIDI pitch of a flat run of notes and chords, sorted. Tied notes
    become one (music21's stripTies does the same but takes seconds on a quartet movement);
    grace notes (no duration) are dropped, unisons kept once."""
    rows: dict[tuple[float, float], float] = {}  # (onset, pitch) -> duration
    open_ties: dict[float, tuple[float, float]] = {}  # pitch -> (onset, end) of a note whose tie goes on
    for n in notes:
        ql = float(n.quarterLength)
        if ql <= 0:
            continue
        onset = float(n.offset)
        members = [(p, n.getTie(p) if hasattr(n, "getTie") else n.tie) for p in getattr(n, "pitches", ())]
        for p, tie in members:
            pitch = float(round(p.ps))
            kind = tie.type if tie is not None else None
            held = open_ties.get(pitch)
            if held is not None and abs(held[1] - onset) < 1e-6:  # some encodings mark only the start
                start = held[0]
                rows[(start, pitch)] = onset + ql - start
            else:
                start = onset
                rows[(start, pitch)] = max(ql, rows.get((start, pitch), 0.0))
            if kind in ("start", "continue"):
                open_ties[pitch] = (start, onset + ql)
            else:
                open_ties.pop(pitch, None)
    table = np.array([(o, d, p) for (o, p), d in rows.items()], np.float64).reshape(-1, 3)
    return table[np.lexsort((table[:, 2], table[:, 0]))] if len(table) else table


def _distinct_meters(meters: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """One entry per change: repeated signatures (one per part, or restated) are dropped; of
    two at the same onset the last wins."""
    out: list[tuple[float, str]] = []
    for onset, ratio in meters:
        if out and abs(out[-1][0] - onset) < 1e-9:
            out[-1] = (onset, ratio)
        elif not out or out[-1][1] != ratio:
            out.append((onset, ratio))
    return out


def read_piece(path: Path, piece_id: str, tune: str = "") -> Piece:
    """`parse_score` then `piece_from_stream`; any failure of music21 is an UnusablePiece."""
    try:
        score = parse_score(path, tune)
        return piece_from_stream(score, piece_id)
    except UnusablePiece:
        raise
    except Exception as e:  # noqa: BLE001 - a score music21 cannot read is skipped with its reason
        raise UnusablePiece(f"music21 cannot read it ({type(e).__name__}: {str(e)[:160]})") from None


# ---------------------------------------------------------------- labels

def meter_class(ratio: str) -> str | None:
    """duple, triple or compound, by music21's beat model of the time signature: beats divided
    in three are compound (6/8, 9/8, 12/8, 6/4, and 3/8 counted in one); three simple beats are
    triple (3/4, 3/2, 3/1); two or four simple beats duple (2/4, 4/4, 2/2, 4/2, 2/1). Other
    meters (5/4, 7/8) have no class."""
    ts = _time_signature(ratio)
    if ts is None:
        return None
    if ts.beatDivisionCount == 3 or (ts.numerator % 3 == 0 and ts.denominator >= 8):  # music21 gives 3/8 one
        return "compound"                                                             # beat, undivided
    if ts.beatCount == 3:
        return "triple"
    if ts.beatCount in (2, 4):
        return "duple"
    return None


def beat_ql(ratio: str | None) -> float:
    """The beat of a time signature in quarter notes (1.5 for 6/8, 2 for 2/2); 1 without one."""
    ts = _time_signature(ratio) if ratio else None
    return float(ts.beatDuration.quarterLength) if ts is not None else 1.0


def _time_signature(ratio: str):
    from music21 import meter

    try:
        return meter.TimeSignature(ratio)
    except Exception:  # noqa: BLE001 - an odd signature string is no meter, not a crash
        return None


def meters_in(meters: list[tuple[float, str]], start: float, end: float, period: float) -> dict[str, float]:
    """How many quarter notes of [start, end) each time signature governs, in a timeline that
    repeats the piece every `period` quarter notes (`meters` are for one repetition)."""
    if not meters:
        return {}
    covered: dict[str, float] = {}
    k = math.floor(start / period)
    while k * period < end:
        base = k * period
        for i, (onset, ratio) in enumerate(meters):
            a = base + (0.0 if i == 0 else onset)  # the first signature also governs a pickup before it
            b = base + (meters[i + 1][0] if i + 1 < len(meters) else period)
            overlap = min(b, end) - max(a, start)
            if overlap > 0:
                covered[ratio] = covered.get(ratio, 0.0) + overlap
        k += 1
    return covered


def dominant_meter(meters: list[tuple[float, str]], start: float, end: float, period: float,
                   share: float = 0.8) -> str | None:
    """The time signature of an excerpt: the one governing at least `share` of it, else None
    (a piece switching between 6/8 and 3/4 every bar has no single meter)."""
    covered = meters_in(meters, start, end, period)
    total = sum(covered.values())
    if not total:
        return None
    ratio, ql = max(covered.items(), key=lambda kv: (kv[1], kv[0]))
    return ratio if ql >= share * total else None


def excerpt_meter(meters: list[tuple[float, str]], start: float, end: float, period: float) -> str | None:
    """The meter class of an excerpt (None if its time signature is mixed or has no class)."""
    ratio = dominant_meter(meters, start, end, period)
    return meter_class(ratio) if ratio else None


def mode_of(pitches, durations, min_correlation: float = 0.5) -> tuple[str | None, str, float]:
    """(mode, key name, correlation) of the notes that sound, by music21's key analysis
    weighted by duration. A weak fit (correlation below `min_correlation`, e.g. a few notes of
    a modal chant) gives mode None: such clips are left out of the mode task, not guessed."""
    from music21 import note, stream

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = stream.Stream()
        for p, d in zip(pitches, durations):
            if d > 0:
                s.append(note.Note(int(p), quarterLength=min(float(d), 16.0)))
        if not len(s):
            return None, "", 0.0
        key = s.analyze("key")
    corr = float(key.correlationCoefficient)
    name = f"{key.tonic.name} {key.mode}"
    mode = key.mode if key.mode in MODES and corr >= min_correlation else None
    return mode, name, round(corr, 4)


def ensemble_size(n_parts: int) -> str:
    """solo, duo, trio, quartet or larger: how many parts sound (a keyboard playing four
    parts counts four; what is heard is four voices)."""
    if n_parts < 1:
        raise ValueError("an ensemble has at least one part")
    return ENSEMBLE_SIZES[min(n_parts, 5) - 1]


def tempo_class(beat_bpm: float) -> str:
    """slow, medium or fast from beats per minute (TEMPO_BOUNDS)."""
    if beat_bpm < TEMPO_BOUNDS[0]:
        return "slow"
    return "medium" if beat_bpm < TEMPO_BOUNDS[1] else "fast"


@dataclass
class ExcerptLabels:
    """What the notes of one clip say, beside what was chosen for it (instruments, tempo)."""

    mode: str | None
    key: str
    key_correlation: float
    time_signature: str | None
    meter: str | None
    parts_sounding: list[int] = field(default_factory=list)  # indices into the kept parts
