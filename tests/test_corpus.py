"""The demo corpus: labels from notes, splits by piece, a seeded plan, a resumable build.

Scores are made here (a few ABC tunes, a three-part MusicXML written by music21), so nothing
depends on which pieces the music21 package ships. The builder runs with a fake renderer
(noise from the MIDI bytes: fast and deterministic); one test renders with the real FluidSynth
and FluidR3 soundfont, which `make test` installs (it fails, with the install command, if not).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from maest_cli.demo.corpus import (
    Collection,
    CorpusConfig,
    Source,
    allocate,
    assign_splits,
    build_corpus,
    common_tags,
    corpus_info,
    find_sources,
    load_corpus_config,
    plan_clips,
    split_counts,
)
from maest_cli.demo.render import (
    ENSEMBLES,
    INSTRUMENTS,
    RENDER_RATE,
    FluidSynthRenderer,
    RenderParams,
    assign_instruments,
    clip_notes,
    draw_render,
    finish_audio,
    midi_file,
)
from maest_cli.demo.scores import (
    BPM_RANGES,
    Piece,
    UnusablePiece,
    abc_tunes,
    dominant_meter,
    ensemble_size,
    excerpt_meter,
    meter_class,
    mode_of,
    piece_from_stream,
    read_piece,
    tempo_class,
)
from maest_cli.errors import UsageError
from maest_cli.mels.labels import read_label_files

# ---------------------------------------------------------------- scores made here

TUNES = """%abc-2.1
% file header: applies to every tune
X:1
T:Major in two
M:2/4
L:1/8
K:C
CDEF GABc|cBAG FEDC|CEGc GECE|C2E2 G4|]

X:2
T:Minor waltz
M:3/4
L:1/8
K:Am
A2 c2 e2|a4 e2|^g2 e2 B2|A6|c2 B2 A2|^G2 B2 e2|A4 z2|]

X:3
T:Jig
M:6/8
L:1/8
K:G
GAB cde|dBG AFD|GAB cde|d3 G3|BAG AGF|G3 G3|]

X:4
T:Too short
M:4/4
L:1/8
K:C
CDEF|]

X:5
T:Reel in four
M:4/4
L:1/8
K:D
DFAd fdAF|GBdg bgdB|Afaf gfed|cAce d4|]
"""


def _chorale(path: Path, transpose: int = 0) -> None:
    """A short three-part piece in 4/4, written as MusicXML by music21."""
    from music21 import meter, note, stream

    score = stream.Score()
    lines = [[72, 74, 76, 77, 79, 77, 76, 74, 72, 71, 72, 72], [67, 67, 67, 69, 71, 69, 67, 65, 64, 62, 64, 64],
             [48, 47, 48, 53, 55, 53, 48, 50, 43, 43, 48, 48]]
    for k, line in enumerate(lines):
        part = stream.Part()
        part.partName = f"voice {k + 1}"
        part.append(meter.TimeSignature("4/4"))
        for p in line:
            part.append(note.Note(p + transpose, quarterLength=1.0))
        score.insert(0, part)
    score.write("musicxml", fp=str(path))


@pytest.fixture(scope="module")
def score_dirs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scores")
    (root / "folk").mkdir()
    (root / "folk" / "tunes.abc").write_text(TUNES, encoding="utf-8")
    (root / "chorales").mkdir()
    for i in range(4):
        _chorale(root / "chorales" / f"chorale{i}.musicxml", transpose=i)
    return root


def _config(root: Path, clips: int = 14, seconds: float = 4.0, extra: str = "") -> Path:
    text = f"""
[corpus]
clips = {clips}
clip_seconds = {seconds}
sample_rate = 16000
downstream_fraction = 0.3
{extra}
[[collection]]
id = "folk"
root = "{root / 'folk'}"
files = ["*.abc"]
era = "folk"
licence = "made in the test"

[[collection]]
id = "chorales"
root = "{root / 'chorales'}"
files = ["*.musicxml"]
era = "test-era"
composer = "tester"
licence = "made in the test"
"""
    path = root / f"corpus-{clips}-{seconds}.toml"
    path.write_text(text, encoding="utf-8")
    return path


class NoiseRenderer:
    """Stands in for fluidsynth: stereo noise seeded by the MIDI bytes (same MIDI, same audio)."""

    calls = 0

    def describe(self) -> dict:
        return {"renderer": "noise-for-tests", "render_rate": RENDER_RATE}

    def render(self, midi: bytes, params: RenderParams) -> np.ndarray:
        type(self).calls += 1
        rng = np.random.default_rng(int.from_bytes(hashlib.sha256(midi).digest()[:8], "little"))
        return (0.1 * rng.standard_normal((int(params.seconds * RENDER_RATE) + 100, 2))).astype(np.float32)


class Killed(BaseException):
    """A kill in the middle of the build (not an Exception: nothing catches it as a clip error)."""


class KillingRenderer(NoiseRenderer):
    def __init__(self, after: int):
        self.left = after

    def render(self, midi: bytes, params: RenderParams) -> np.ndarray:
        if self.left == 0:
            raise Killed()
        self.left -= 1
        return super().render(midi, params)


class SegfaultRenderer(NoiseRenderer):
    """Crashes its process (a real segmentation fault) on one clip, every time."""

    def __init__(self, bad: str):
        self.bad = bad

    def render(self, midi: bytes, params: RenderParams) -> np.ndarray:
        if params.clip_id == self.bad:
            import ctypes
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
            ctypes.string_at(0)
        return super().render(midi, params)


def _stream(notes, ts="4/4"):
    from music21 import meter, note, stream

    part = stream.Part()
    part.append(meter.TimeSignature(ts))
    for p, d in notes:
        part.append(note.Note(p, quarterLength=d))
    return part


# ---------------------------------------------------------------- labels

def test_mode_of_a_major_and_a_minor_tune():
    major = piece_from_stream(_stream([(p, 1.0) for p in (60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60, 60)]))
    minor = piece_from_stream(_stream([(p, 1.0) for p in (57, 59, 60, 62, 64, 65, 68, 69, 64, 60, 57, 57)]))
    for piece, want in ((major, "major"), (minor, "minor")):
        notes = piece.parts[0]
        mode, key, corr = mode_of(notes[:, 2], notes[:, 1])
        assert mode == want and corr > 0.5, (key, corr)
    assert mode_of(np.array([60.0, 61.0]), np.array([1.0, 1.0]), min_correlation=0.99)[0] is None  # no clear key


def test_meter_classes_from_time_signatures():
    assert [meter_class(r) for r in ("2/4", "4/4", "2/2", "4/2", "3/4", "3/2", "6/8", "9/8", "12/8", "3/8")] == \
        ["duple"] * 4 + ["triple"] * 2 + ["compound"] * 4
    assert meter_class("5/4") is None and meter_class("7/8") is None and meter_class("nonsense") is None
    piece = piece_from_stream(_stream([(60, 1.0)] * 12, ts="3/4"))
    assert piece.meters == [(0.0, "3/4")] and excerpt_meter(piece.meters, 0, 12, 12) == "triple"


def test_excerpt_meter_is_the_signature_heard_or_none():
    meters = [(0.0, "3/4"), (12.0, "6/8")]  # 12 quarter notes of 3/4, then 6/8 to the end (24)
    assert dominant_meter(meters, 0, 10, 24) == "3/4"
    assert dominant_meter(meters, 13, 23, 24) == "6/8"
    assert dominant_meter(meters, 6, 18, 24) is None  # half and half
    assert dominant_meter(meters, 22, 34, 24) == "3/4"  # a looped piece: 2 of 6/8, then 10 of 3/4 again
    assert dominant_meter(meters, 20, 34, 24) is None  # 4 of 6/8 and 10 of 3/4: 71 % is not one meter
    assert dominant_meter([], 0, 10, 10) is None


def test_ensemble_size_counts_parts_that_sound():
    assert [ensemble_size(n) for n in range(1, 8)] == ["solo", "duo", "trio", "quartet", "larger", "larger", "larger"]
    with pytest.raises(ValueError):
        ensemble_size(0)
    from music21 import note, stream

    score = stream.Score()
    for k in range(3):
        part = _stream([(60 + 4 * k, 1.0)] * 10)
        score.insert(0, part)
    rests = stream.Part()
    rests.append(note.Rest(quarterLength=10))
    score.insert(0, rests)  # a part that never plays is no part of the ensemble
    assert len(piece_from_stream(score).parts) == 3


def test_tempo_classes_and_the_drawn_ranges_agree():
    assert [tempo_class(b) for b in (40, 73.9, 74, 111.9, 112, 200)] == ["slow", "slow", "medium", "medium", "fast",
                                                                            "fast"]
    for name, (lo, hi) in BPM_RANGES.items():
        assert tempo_class(lo) == tempo_class(hi) == name


def test_ties_join_grace_notes_go_chords_split():
    from music21 import chord, note, stream, tie

    part = stream.Part()
    a, b = note.Note(60, quarterLength=2), note.Note(60, quarterLength=1)
    a.tie = tie.Tie("start")  # some encodings mark only the start
    part.append([a, b, note.Note(62, quarterLength=1).getGrace(), chord.Chord([64, 67], quarterLength=1)])
    part.append([note.Note(p, quarterLength=1) for p in (65, 67, 69, 71, 72)])
    piece = piece_from_stream(part)
    rows = [tuple(r) for r in piece.parts[0]]
    assert rows[0] == (0.0, 3.0, 60.0) and (3.0, 1.0, 64.0) in rows and (3.0, 1.0, 67.0) in rows
    assert not any(r[2] == 62 for r in rows)
    with pytest.raises(UnusablePiece):
        piece_from_stream(_stream([(60, 1.0)] * 3))  # a fragment


def test_abc_files_split_into_tunes_with_their_header(score_dirs):
    tunes = abc_tunes(TUNES)
    assert [x for x, _ in tunes] == ["1", "2", "3", "4", "5"]
    assert all(t.startswith("%abc-2.1") for _, t in tunes) and "Minor waltz" in tunes[1][1]
    piece = read_piece(score_dirs / "folk" / "tunes.abc", "folk/tunes-x3", tune="3")
    assert piece.meters == [(0.0, "6/8")] and len(piece.parts) == 1
    with pytest.raises(UnusablePiece, match="quarter notes long|notes"):
        read_piece(score_dirs / "folk" / "tunes.abc", "folk/tunes-x4", tune="4")
    with pytest.raises(UnusablePiece, match="no tune"):
        read_piece(score_dirs / "folk" / "tunes.abc", "x", tune="99")


# ---------------------------------------------------------------- candidates and splits

def test_sources_prefer_one_format_and_group_works(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("bwv1.6.mxl", "bwv1.6.krn", "bwv248.23-2.mxl", "bwv248.23-s.mxl", "skip.mxl"):
        (tmp_path / "a" / name).write_text("x")
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"""
[[collection]]
id = "bach"
root = "{tmp_path}"
files = ["a/*.mxl", "a/*.krn"]
exclude = ["a/skip.mxl"]
group = "stem"
[[collection]]
id = "masses"
root = "{tmp_path}"
files = ["m/*.krn"]
group = "humdrum-work"
""")
    (tmp_path / "m").mkdir()
    for i, work in enumerate(["Missa A", "Missa A", "Missa B", ""]):
        (tmp_path / "m" / f"mv{i}.krn").write_text((f"!!!OPR: {work}\n" if work else "") + "**kern\n4c\n*-\n")
    bach, masses = load_corpus_config(cfg, clips=10).collections
    got = find_sources(bach)
    assert [s.path for s in got] == ["a/bwv1.6.mxl", "a/bwv248.23-2.mxl", "a/bwv248.23-s.mxl"]
    assert got[1].group == got[2].group != got[0].group  # a chorale and its variant stay together
    groups = [s.group for s in find_sources(masses)]
    assert groups[0] == groups[1] != groups[2] and groups[3] == "masses/m-mv3"  # movements of one mass together


def _config_obj(**kw) -> CorpusConfig:
    base = dict(clips=100, clip_seconds=30.0, sample_rate=22050, min_renders=2, max_renders=12,
                downstream_fraction=0.3, pretrain_validation=0.15, pretrain_test=0.15, downstream_validation=0.2,
                downstream_test=0.2, collections=())
    return CorpusConfig(**{**base, **kw})


def test_splits_are_by_group_and_every_collection_is_in_every_split():
    sources = [Source(f"{c}/p{i}", c, f"p{i}", group=f"{c}/g{i // 3}") for c in ("x", "y") for i in range(90)]
    splits = assign_splits(sources, _config_obj(), seed=3)
    assert set(splits) == {s.group for s in sources}  # one (pool, split) per group: never two per piece
    for c in ("x", "y"):
        got = {splits[s.group] for s in sources if s.collection == c}
        assert got == {(p, s) for p in ("pretrain", "downstream") for s in ("train", "validation", "test")}
        pools = [splits[g][0] for g in {s.group for s in sources if s.collection == c}]
        assert pools.count("downstream") == 9  # 30 % of 30 groups
    assert assign_splits(sources, _config_obj(), seed=3) == splits
    assert assign_splits(sources, _config_obj(), seed=4) != splits
    assert split_counts(3, {"train": 0.7, "validation": 0.15, "test": 0.15}) == {"train": 1, "validation": 1, "test": 1}
    assert split_counts(10, {"a": 0.7, "b": 0.3}) == {"a": 7, "b": 3}


def test_allocation_sums_to_the_clips_asked():
    shares = allocate(1000, {"big": 1.0, "small": 1.0, "tiny": 0.5}, {"big": 5000, "small": 40, "tiny": 3}, 2, 12)
    assert sum(q for q, _ in shares.values()) == 1000
    assert shares["big"] == (400, 200)  # 2 renders per piece
    assert shares["small"] == (400, 40)  # 10 renders each, different excerpts
    assert allocate(1000, {"a": 1.0}, {"a": 50}, 2, 12)["a"] == (1000, 50)  # more than max_renders if need be
    assert shares["tiny"] == (200, 3)  # fewer candidates than needed: all of them, more renders


def test_rare_tags_leave_the_label_files():
    rows = [["a", ["x", "rare"], "train"], ["b", ["x"], "train"], ["c", ["rare"], "test"], ["d", ["x"], "test"]]
    kept, counts, dropped = common_tags(rows, split_col=2, min_train=2)
    assert kept == [["a", ["x"], "train"], ["b", ["x"], "train"], ["d", ["x"], "test"]]  # c had only "rare"
    assert counts == {"x": {"train": 2, "validation": 0, "test": 1}}
    assert dropped == {"rare": {"train": 1, "validation": 0, "test": 1}}


# ---------------------------------------------------------------- the plan

def _toy_piece(piece_id: str, parts: int = 3, length: float = 64.0) -> Piece:
    rows = [np.array([[t, 1.0, 72 - 7 * k + (t % 4)] for t in np.arange(0, length, 1.0)]) for k in range(parts)]
    return Piece(piece_id, "toy", "", rows, [f"p{k}" for k in range(parts)], [(0.0, "4/4")], length)


def test_the_render_plan_is_a_function_of_the_seed():
    sources = [Source(f"c/p{i}", "c", f"p{i}", group=f"c/p{i}") for i in range(20)]
    pieces = {s.piece_id: _toy_piece(s.piece_id, parts=1 + i % 5, length=16.0 + 40 * (i % 3))
              for i, s in enumerate(sources)}
    cfg = _config_obj(collections=(Collection("c", "toy", "music21", ("*",)),))
    a = plan_clips(sources, pieces, {"c": 50}, cfg, seed=7)
    assert plan_clips(sources, pieces, {"c": 50}, cfg, seed=7) == a
    b = plan_clips(sources, pieces, {"c": 50}, cfg, seed=8)
    assert [c.params for c in a] != [c.params for c in b]
    assert len(a) == 50 and len({c.clip_id for c in a}) == 50
    # a clip's render depends on the seed and its name only, not on what else is planned
    fewer = plan_clips(sources[:5], pieces, {"c": 10}, cfg, seed=7)
    mine = {c.clip_id: c.params for c in a}
    assert all(c.params == mine[c.clip_id] for c in fewer if c.clip_id in mine)
    # renders of one piece never straddle splits
    where = {}
    for c in a:
        assert where.setdefault(c.params.piece_id, (c.pool, c.split)) == (c.pool, c.split)
        assert c.path == f"{c.pool}/audio/{c.clip_id}.flac"


def test_draw_render_choices_are_valid():
    piece = _toy_piece("c/p", parts=4)
    for k in range(40):
        p = draw_render(piece, f"c/p-r{k}", seed=1)
        assert p.ensemble in ENSEMBLES and len(p.instruments) == len(p.parts) == len(p.velocities)
        assert all(n in INSTRUMENTS for n in p.instruments) and -5 <= p.transpose <= 5
        assert tempo_class(p.beat_bpm) == p.tempo_class_drawn
        assert 0 <= p.start_ql <= piece.length_ql and p.loops >= 1
        # inside fluidsynth's own ranges, with a margin (it refuses 0.1 for chorus speed, its minimum)
        assert 0.1 < p.chorus_speed <= 5 and 0 <= p.chorus_depth <= 256 and 0 <= p.chorus_level <= 10
        assert 0 <= p.reverb_room <= 1 and 0 <= p.reverb_damp <= 1 and 0 <= p.reverb_level <= 1
        notes = clip_notes(piece, p)
        assert sum(len(n) for n in notes.parts) > 0  # an excerpt always has music
        assert all(((n[:, 0] >= 0) & (n[:, 0] < p.seconds)).all() for n in notes.parts)
    late = Piece("c/late", "", "", [np.array([[t, 1.0, 72.0] for t in range(200)]), np.array([[190.0, 4.0, 48.0]])],
                 ["early", "late"], [(0.0, "4/4")], 200.0)
    for k in range(30):  # a part that enters only near the end still gets an excerpt with its note
        p = draw_render(late, f"c/late-r{k}", seed=3)
        assert sum(len(n) for n in clip_notes(late, p).parts) > 0 and (p.parts != (1,) or p.start_ql > 100)
    short = _toy_piece("c/short", parts=1, length=8.0)
    p = draw_render(short, "c/short-r0", seed=1)
    assert p.loops > 1 and p.start_ql == 0  # a short piece repeats, like the verses of a song
    # strings by register: the top part a violin, the bass a cello
    assert assign_instruments("strings", [76.0, 50.0], np.random.default_rng(0)) == ["violin", "cello"]
    assert assign_instruments("organ", [76.0, 50.0], np.random.default_rng(0)) == ["organ", "organ"]


def test_midi_file_holds_the_notes_and_programs():
    from music21 import midi

    piece = _toy_piece("c/p", parts=2, length=16.0)
    p = dataclasses.replace(draw_render(piece, "c/p-r0", seed=2), instruments=("flute", "cello"), parts=(0, 1),
                            velocities=(90, 80), loops=1, start_ql=0.0, humanize_ms=0.0)
    notes = clip_notes(piece, p)
    mf = midi.MidiFile()
    mf.readstr(midi_file(notes, p))
    change = midi.ChannelVoiceMessages.PROGRAM_CHANGE
    events = [e for t in mf.tracks for e in t.events if e.isNoteOn() or e.type == change]
    programs = sorted(e.data for e in events if e.type == change)
    assert programs == sorted([INSTRUMENTS["flute"].program, INSTRUMENTS["cello"].program])
    assert sum(e.isNoteOn() for e in events) == sum(len(n) for n in notes.parts)


def test_finish_audio_is_exact_length_at_the_loudness_drawn():
    p = draw_render(_toy_piece("c/p"), "c/p-r0", seed=0)
    t = np.arange(int(31 * RENDER_RATE)) / RENDER_RATE
    stereo = np.stack([0.01 * np.sin(2 * np.pi * 440 * t)] * 2, 1)
    pcm, stats = finish_audio(stereo, p, 22050)
    assert pcm.dtype == np.int16 and len(pcm) == 30 * 22050
    assert abs(stats["rms_db"] - p.loudness_db) < 0.2 and not stats["limited"]
    loud = dataclasses.replace(p, loudness_db=-1.0)
    pcm, stats = finish_audio(stereo, loud, 22050)
    assert stats["limited"] and np.abs(pcm).max() <= 0.97 * 32767 + 1  # never clipped
    with pytest.raises(Exception, match="silent"):
        finish_audio(np.zeros((RENDER_RATE, 2)), p, 22050)


# ---------------------------------------------------------------- the builder

def _outputs(out: Path) -> dict:
    """Every file of a corpus that must not depend on how the build went (not the manifest's
    timestamps), by checksum."""
    files = {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    m = json.loads((out / "manifest.json").read_text())
    return {**files, "tags": json.dumps(m["tags"]), "counts": json.dumps(m["counts"])}


def test_build_resumes_after_a_kill_and_equals_an_uninterrupted_build(score_dirs, tmp_path):
    cfg = _config(score_dirs)
    whole = build_corpus(tmp_path / "whole", config=cfg, seed=5, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    assert whole["clips"] == 14 and whole["failed"] == 0

    out = tmp_path / "killed"
    with pytest.raises(Killed):
        build_corpus(out, config=cfg, seed=5, renderer=KillingRenderer(after=6), min_tag_train_clips=1, progress=False)
    assert len(list(out.rglob("*.flac"))) == 6 and not (out / "manifest.json").exists()
    with open(out / "_work" / "rendered.jsonl", "a") as f:
        f.write('{"clip_id": "torn')  # a kill in the middle of a journal line
    with pytest.raises(UsageError, match="other options"):
        build_corpus(out, config=cfg, seed=6, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    NoiseRenderer.calls = 0
    again = build_corpus(out, config=cfg, seed=5, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    assert NoiseRenderer.calls == 14 - 6  # finished clips are kept, not rendered again
    assert again["clips"] == 14 and not (out / "_work").exists()
    assert _outputs(out) == _outputs(tmp_path / "whole")
    assert build_corpus(out, config=cfg, seed=5, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)["already_complete"]


def test_build_outputs_are_label_files_the_other_commands_read(score_dirs, tmp_path):
    out = tmp_path / "c"
    build_corpus(out, config=_config(score_dirs), seed=5, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    manifest = corpus_info(out)
    assert manifest["audio"]["sample_rate"] == 16000 and manifest["counts"]["clips"] == 14
    assert {c["id"] for c in manifest["collections"]} == {"folk", "chorales"}
    pre = read_label_files([out / "pretrain" / "labels.tsv"], format="tsv")
    assert pre.columns == ("path", "tags", "artist", "split", "track_id") and not pre.problems
    assert "collection:chorales" in pre.vocabulary and "composer:tester" in pre.vocabulary
    assert any(t.startswith("instrument:") for t in pre.vocabulary)
    assert not any(t in pre.vocabulary for t in ("major", "minor", "slow", "duple", "solo"))  # downstream only
    for row in pre.rows:
        info = sf.info(str(out / "pretrain" / row.path))
        assert info.samplerate == 16000 and info.channels == 1 and info.frames == 4 * 16000
    pre_pieces = {r.artist for r in pre.rows}
    for task in ("mode", "tempo", "meter", "ensemble", "instrument", "style"):
        table = read_label_files([out / "downstream" / f"{task}.tsv"], format="tsv")
        assert {"path", "split", "tags"} <= set(table.columns)
        assert not pre_pieces & {r.artist for r in table.rows}  # probes hear pieces pre-training never heard
        for row in table.rows:
            assert (out / "downstream" / row.path).is_file()
    tempo = read_label_files([out / "downstream" / "tempo.tsv"], format="tsv")
    assert set(tempo.vocabulary) <= {"slow", "medium", "fast"}
    clips = (out / "clips.tsv").read_text().splitlines()
    assert len(clips) == 15 and "part_instruments" in clips[0] and "reverb_room" in clips[0]
    # the unusable tune is recorded with its reason, not silently dropped
    pieces = {line.split("\t")[0]: line.split("\t") for line in (out / "pieces.tsv").read_text().splitlines()}
    if "folk/tunes-x4" in pieces:
        assert pieces["folk/tunes-x4"][5:7] == ["unusable", "only 4 notes"]


def test_parallel_workers_build_the_same_corpus(score_dirs, tmp_path):
    cfg = _config(score_dirs, clips=6, seconds=2.0)
    build_corpus(tmp_path / "one", config=cfg, seed=9, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    build_corpus(tmp_path / "two", config=cfg, seed=9, workers=2, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    assert _outputs(tmp_path / "one") == _outputs(tmp_path / "two")


def test_a_clip_that_kills_its_worker_fails_alone_and_a_rerun_renders_it(score_dirs, tmp_path):
    """The crash policy of every pool: the clip is rendered again in a fresh worker, fails when
    it kills that one too (one line in errors.tsv), the other clips are rendered; a rerun retries it."""
    cfg = _config(score_dirs, clips=6, seconds=2.0)
    build_corpus(tmp_path / "one", config=cfg, seed=9, renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    bad = (tmp_path / "one" / "clips.tsv").read_text().splitlines()[1].split("\t")[0]
    out = tmp_path / "two"
    first = build_corpus(out, config=cfg, seed=9, workers=2, renderer=SegfaultRenderer(bad), min_tag_train_clips=1,
                         progress=False)
    assert first["failed"] == 1
    (row,) = (out / "errors.tsv").read_text().splitlines()[1:]
    assert row.startswith(bad + "\t") and row.endswith(
        "\tcorpus worker process died (killed by SIGSEGV) while rendering this clip, 2 times")
    assert len(list(out.rglob("*.flac"))) == 5
    again = build_corpus(out, config=cfg, seed=9, workers=2, renderer=NoiseRenderer(), min_tag_train_clips=1,
                         progress=False)
    assert again["failed"] == 0 and _outputs(out) == _outputs(tmp_path / "one")


def test_bad_options_are_usage_errors(score_dirs, tmp_path):
    with pytest.raises(UsageError, match="--collections"):
        build_corpus(tmp_path / "x", config=_config(score_dirs), collections=["nope"], renderer=NoiseRenderer())
    with pytest.raises(UsageError, match="--clips"):
        build_corpus(tmp_path / "x", config=_config(score_dirs), clips=0, renderer=NoiseRenderer())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        build_corpus(tmp_path / "full", config=_config(score_dirs), renderer=NoiseRenderer(), min_tag_train_clips=1, progress=False)
    with pytest.raises(UsageError, match="not a corpus"):
        corpus_info(tmp_path / "full")


def test_default_config_names_real_music21_collections():
    cfg = load_corpus_config()
    assert cfg.clips >= 3000 and cfg.clip_seconds == 30.0
    assert {"bach-chorales", "palestrina-masses", "classical-quartets", "essen-german", "oneills-irish"} <= \
        {c.id for c in cfg.collections}
    assert all(c.licence and c.source for c in cfg.collections)
    for col in cfg.collections:
        assert find_sources(col), col.id  # the installed music21 ships every configured collection


# ---------------------------------------------------------------- the real synthesizer

def test_fluidsynth_renders_a_flute_a4_deterministically():
    renderer = FluidSynthRenderer()
    try:
        renderer.check()
    except FileNotFoundError as e:
        pytest.fail(f"{e}. The corpus tests need them: apt-get install fluidsynth fluid-soundfont-gm")
    piece = Piece("t/a4", "a4", "", [np.array([[0.0, 3.0, 69.0], [3.0, 1.0, 69.0]])], ["flute"], [(0.0, "4/4")], 4.0)
    p = dataclasses.replace(draw_render(piece, "t/a4-r0", seed=0, seconds=2.0), parts=(0,), instruments=("flute",),
                            velocities=(100,), transpose=0, beat_bpm=60.0, beat_ql=1.0, start_ql=0.0, loops=1,
                            humanize_ms=0.0, chorus=False, chorus_send=0)
    midi = midi_file(clip_notes(piece, p), p)
    a, b = renderer.render(midi, p), renderer.render(midi, p)
    assert a.shape[1] == 2 and a.dtype == np.float32 and np.array_equal(a, b)  # no dither: same bytes
    pcm, stats = finish_audio(a, p, 22050)
    assert len(pcm) == 2 * 22050 and not stats["limited"]
    x = pcm[2000:30000].astype(np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    peak_hz = np.argmax(spectrum) * 22050 / len(x)
    assert abs(peak_hz - 440.0) < 5, peak_hz
    info = renderer.describe()
    assert info["fluidsynth"] != "unknown" and len(info["soundfont_sha256"]) == 64


# ---------------------------------------------------------------- the command

def test_cli_info_and_usage_errors(score_dirs, tmp_path):
    from typer.testing import CliRunner

    from maest_cli.cli.app import app

    runner = CliRunner()
    out = tmp_path / "c"
    build_corpus(out, config=_config(score_dirs, clips=6, seconds=2.0), seed=1, renderer=NoiseRenderer(),
                 progress=False)
    r = runner.invoke(app, ["corpus", "info", str(out)])
    assert r.exit_code == 0, r.output
    assert "6 clips" in r.output and "mode: clips per tag" in r.output and "chorales" in r.output
    r = runner.invoke(app, ["corpus", "info", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["counts"]["clips"] == 6
    r = runner.invoke(app, ["corpus", "info", str(tmp_path / "nothing")])
    assert r.exit_code == 2 and "not a corpus folder" in r.output
    r = runner.invoke(app, ["corpus", "build", str(tmp_path / "new"), "--clips", "0"])
    assert r.exit_code == 2 and "--clips 0" in r.output
    r = runner.invoke(app, ["corpus", "build", str(tmp_path / "new"), "--collections", "bach-chorales,nope"])
    assert r.exit_code == 2 and "unknown nope" in r.output
