"""prepare-mels: label formats, splits, shards and index, the reader, verify, resume after SIGKILL, merge,
and faults: kills during the run and during finalisation, decoders that die, symlink loops.

Audio is generated under tmp_path; label fixtures (shaped like the real files) are in
tests/fixtures/mels. One reference dataset is built per module and the fault tests must end up
byte-identical to it. Decoding runs in child processes even with one worker, so runs started
in a subprocess (the SIGKILL tests) pay for a decoder process start (torch import) each.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import write_audio
from typer.testing import CliRunner

from maest_cli.audio.decode import load_audio
from maest_cli.audio.frontend import mel_frontend, n_frames
from maest_cli.cli.app import app
from maest_cli.errors import UsageError
from maest_cli.mels import writer as melwriter
from maest_cli.mels.dataset import FRAME_BYTES, MelDataset
from maest_cli.mels.labels import match_audio, read_label_files
from maest_cli.mels.prepare import (
    Crop,
    assign_splits,
    build_plan,
    merge_datasets,
    parse_size,
    prepare_mels,
    verify_dataset,
)

FIX = Path(__file__).parent / "fixtures" / "mels"
runner = CliRunner()

# path, seconds, sample rate, channels, artist, tags
TRACKS = [
    ("a/a1.wav", 7.0, 44100, 2, "ann", "rock,guitar"),
    ("a/a2.flac", 2.5, 22050, 1, "ann", "rock"),
    ("a/a3.ogg", 6.0, 44100, 2, "ann", "pop,happy"),
    ("b/b1.mp3", 5.5, 44100, 2, "bob", "jazz"),
    ("b/b2.wav", 1.2, 16000, 1, "bob", ""),
    ("b/b3.flac", 8.0, 48000, 2, "bob", "jazz,piano"),
    ("c/c1.ogg", 3.0, 32000, 1, "cid", "ambient"),
    ("c/c2.wav", 6.5, 44100, 2, "cid", "ambient,drone"),
    ("d/d1.wav", 4.0, 44100, 1, "dee", "pop"),
    ("d/d2.flac", 9.0, 44100, 2, "dee", "rock,pop"),
    ("e/e1.wav", 5.2, 44100, 2, "eve", "drone"),
    ("e/e2.wav", 2.0, 44100, 2, "eve", "happy"),
]
OPTIONS = dict(crop="center:5", shard_size="100kB", split_by="artist", val_fraction=0.2, test_fraction=0.2,
               seed=3, progress=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Audio of 5 artists in 5 formats, two broken files, one unlabelled file, one missing file."""
    base = tmp_path_factory.mktemp("mels")
    audio = base / "audio"
    rows = ["path\ttags\tartist"]
    for i, (path, seconds, sr, ch, artist, tags) in enumerate(TRACKS):
        (audio / path).parent.mkdir(parents=True, exist_ok=True)
        write_audio(audio / path, seconds, sr=sr, seed=i, channels=ch)
        rows.append(f"{path}\t{tags}\t{artist}")
    (audio / "x").mkdir()
    (audio / "x" / "corrupt.mp3").write_bytes(b"\x00\x01garbage" * 300)
    (audio / "x" / "empty.wav").write_bytes(b"")
    rows += ["x/corrupt.mp3\trock\txx", "x/empty.wav\tpop\txx", "gone/missing.wav\trock\tzed"]
    (audio / "u").mkdir()
    write_audio(audio / "u" / "unlabelled.wav", 1.0)
    labels = base / "labels.tsv"
    labels.write_text("\n".join(rows) + "\n")
    ref = base / "ref"
    summary = prepare_mels(audio, ref, labels=labels, **OPTIONS)
    return {"base": base, "audio": audio, "labels": labels, "ref": ref, "summary": summary}


def assert_same_dataset(a: Path, b: Path) -> None:
    """Same frames (byte for byte), same index rows in the same order, same stats and errors."""
    ta, tb = pq.read_table(a / "index.parquet"), pq.read_table(b / "index.parquet")
    assert ta.to_pylist() == tb.to_pylist()
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["shards"] == mb["shards"] and ma["plan_sha256"] == mb["plan_sha256"]
    for s in ma["shards"]:
        assert (a / s["file"]).read_bytes() == (b / s["file"]).read_bytes()
    assert sorted(p.name for p in (a / "shards").iterdir()) == sorted(p.name for p in (b / "shards").iterdir())
    for name in ("stats.json", "labels.txt", "errors.tsv", "label_problems.tsv"):
        assert (a / name).read_text() == (b / name).read_text(), name
    assert not (b / "_work").exists()


# ------------------------------------------------------------------ label formats

def test_mtg_jamendo_split_files():
    files = sorted(FIX.glob("autotagging_*.tsv"))
    table = read_label_files(files)
    assert table.format == "mtg-jamendo"
    rows = {r.path: r for r in table.rows}
    assert len(rows) == 9  # 8 top50 rows + 1 new moodtheme row; track 241 is in both files
    r = rows["41/241.mp3"]
    assert r.track_id == "track_0000241" and r.artist == "artist_000005" and r.split == "train"
    assert set(r.tags) == {"genre---rock", "mood/theme---dark"}  # united across the two task files
    assert rows["00/33400.mp3"].tags == ("genre---jazz", "instrument---saxophone", "instrument---piano",
                                         "instrument---bass", "instrument---drums")  # 5 tag columns
    assert rows["96/14096.mp3"].split == "validation" and rows["13/900013.mp3"].split == "test"
    assert not any("\r" in t for r in table.rows for t in r.tags)  # CRLF files
    assert table.vocabulary == sorted(table.vocabulary) and "genre---metal" in table.vocabulary
    assert not table.problems


def test_jamendo_paths_match_low_quality_copies_and_report_the_rest():
    table = read_label_files([FIX / "autotagging_top50tags-train.tsv"])
    audio = ["41/241.low.mp3", "42/242.mp3", "10/1310.ogg", "99/extra.mp3"]  # 17/7517 is missing
    m = match_audio(table.rows, audio)
    assert [(a, r.path) for a, r in m.pairs] == [("10/1310.ogg", "10/1310.mp3"), ("41/241.low.mp3", "41/241.mp3"),
                                                 ("42/242.mp3", "42/242.mp3")]
    assert m.without_audio == 1 and m.audio_without_labels == 1
    kinds = {(p.kind, p.path) for p in m.problems}
    assert ("label_without_audio", "17/7517.mp3") in kinds and ("audio_without_labels", "99/extra.mp3") in kinds
    ambiguous = match_audio(table.rows, ["41/241.low.mp3", "41/241.ogg"])
    assert "ambiguous" in next(p.detail for p in ambiguous.problems if p.path == "41/241.mp3")


def test_magnatagatune_annotations():
    table = read_label_files([FIX / "annotations_final.csv"], top_k=5)
    assert table.format == "mtt"
    header = (FIX / "annotations_final.csv").read_text().splitlines()[0].split("\t")
    assert len(header) == 190 and header[0] == '"clip_id"'  # clip_id, 188 tags, mp3_path; quoted
    rows = {r.track_id: r for r in table.rows}
    assert len(rows) == 10
    assert rows["2"].path == "f/american_bach_soloists-j_s__bach_solo_cantatas-01-bwv54__i_aria-30-59.mp3"
    assert rows["2"].artist == "american_bach_soloists" and set(rows["2"].tags) == {"classical", "violin",
                                                                                  "strings", "opera"}
    assert rows["11"].tags == ()  # a clip without tags stays, with no labels
    # top-k by count, ties in header order: guitar 4, classical 3, then the 2s in column order
    assert table.vocabulary[:2] == ["guitar", "classical"] and len(table.vocabulary) == 5
    assert table.unknown_tags and all(t not in table.vocabulary for t in table.unknown_tags)
    assert len(read_label_files([FIX / "annotations_final.csv"]).vocabulary) == 50


def test_plain_tsv_with_header_and_without(tmp_path):
    table = read_label_files([FIX / "tags.tsv"])
    rows = {r.path: r for r in table.rows}
    assert rows["a/two, live.wav"].tags == ("rock",)  # quoted path with a comma
    assert rows["b/three.flac"].tags == () and rows["b/three.flac"].artist == "artist_b"
    assert rows["b/four.ogg"].tags == ("jazz", "piano") and rows["b/four.ogg"].split == "test"
    assert rows["c/five.mp3"].split == "validation" and rows["c/five.mp3"].artist == ""
    bad = [p for p in table.problems if p.kind == "malformed_row"]
    assert [p.path for p in bad] == ["c/six.wav"] and "holdout" in bad[0].detail and "tags.tsv:7" in bad[0].where
    plain = read_label_files([FIX / "tags_noheader.tsv"])
    assert [(r.path, r.tags, r.artist) for r in plain.rows] == [("x/1.wav", ("ambient", "drone"), "art1"),
                                                                ("x/2.wav", (), "")]
    assert [p.path for p in plain.problems if p.kind == "malformed_row"] == ["x/3.wav"]
    with pytest.raises(UsageError, match="different formats"):
        read_label_files([FIX / "tags.tsv", FIX / "annotations_final.csv"])
    reordered = tmp_path / "reordered.tsv"
    reordered.write_text("track_id\tsplit\tpath\ttags\n7\ttest\ta.wav\tx,y\n")
    r = read_label_files([reordered]).rows[0]
    assert (r.path, r.tags, r.split, r.track_id) == ("a.wav", ("x", "y"), "test", "7")


def _touch_tree(root: Path, paths) -> None:
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(b"")


def test_plan_counts_what_does_not_match(tmp_path):
    table = read_label_files([FIX / "tags.tsv"])
    _touch_tree(tmp_path, ["a/one.wav", "a/two, live.wav", "b/four.ogg", "z/stray.wav", ".hidden.wav"])
    plan = build_plan(tmp_path, [FIX / "tags.tsv"], ["rock", "jazz"], 50, "artist", 0.0, 0.0, 0)
    r = plan.report
    assert r["tracks"] == 3 and r["audio_without_labels"] == 1 and r["label_rows_without_audio"] == 2
    assert r["malformed_label_rows"] == 1 and r["hidden_files_skipped"] == 1
    assert r["unknown_tags"] == {"guitar": 1, "piano": 1, "pop": 1}  # outside the given vocabulary
    assert plan.table["labels"].to_pylist() == [[0], [0], [1]]
    assert plan.table["split"].to_pylist() == ["train", "train", "test"]  # b/four.ogg's split is given
    assert len(table.rows) == 5


def test_jamendo_plan_uses_the_split_files(tmp_path):
    files = sorted(FIX.glob("autotagging_top50tags-*.tsv"))
    _touch_tree(tmp_path, ["41/241.low.mp3", "42/242.mp3", "96/14096.mp3", "00/33400.mp3"])
    plan = build_plan(tmp_path, files, None, 50, "artist", 0.3, 0.3, 0)
    got = dict(zip(plan.table["path"].to_pylist(), plan.table["split"].to_pylist()))
    assert got == {"00/33400.mp3": "test", "41/241.low.mp3": "train", "42/242.mp3": "train",
                   "96/14096.mp3": "validation"}
    assert plan.report["split_source"] == "label files" and plan.report["label_rows_without_audio"] == 4


def test_mtt_directory_split(tmp_path):
    table = read_label_files([FIX / "annotations_final.csv"])
    _touch_tree(tmp_path, [r.path for r in table.rows])
    plan = build_plan(tmp_path, [FIX / "annotations_final.csv"], None, 50, "mtt-directory", 0.1, 0.1, 0)
    for path, split in zip(plan.table["path"].to_pylist(), plan.table["split"].to_pylist()):
        assert split == {"0": "train", "3": "train", "b": "train", "c": "validation"}.get(path[0], "test"), path


def test_symlink_loops_and_unreadable_directories_are_reported_not_followed(tmp_path, monkeypatch):
    """The walk is extract's (walk.py): a link back up the tree is reported, not followed (it
    once turned 1 file into 41 tracks); an unreadable directory is an error of the run (its audio
    is missing); a name that is not UTF-8 is stored escaped and still decoded."""
    import maest_cli.audio.walk as walk

    root = tmp_path / "audio"
    (root / "a" / "deep").mkdir(parents=True)
    (root / "locked").mkdir()
    write_audio(root / "a" / "one.wav", 1.5, seed=1)
    write_audio(root / "a" / "deep" / "two.flac", 1.5, seed=2)
    write_audio(root / "locked" / "three.wav", 1.5, seed=3)
    (root / "a" / "notes.txt").write_text("not audio")
    os.symlink("..", root / "a" / "up")  # a -> root: a loop
    os.symlink(root / "a", root / "alias")  # the same folder under a second name
    latin1 = os.fsencode(root / "a") + b"/caf\xe9.wav"
    write_audio(tmp_path / "x.wav", 1.5, seed=4)
    os.rename(os.fsencode(tmp_path / "x.wav"), latin1)
    real_scandir = walk.os.scandir

    def scandir(path="."):
        if isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")  # the tests run as root: chmod would not do
        return real_scandir(path)

    monkeypatch.setattr(walk.os, "scandir", scandir)
    out = tmp_path / "ds"
    summary = prepare_mels(root, out, crop="center:1", split_by="none", val_fraction=0.0, test_fraction=0.0,
                           progress=False)
    paths = pq.read_table(out / "index.parquet")["path"].to_pylist()
    assert paths == ["a/caf\\xe9.wav", "a/deep/two.flac", "a/one.wav"]  # each once; escaped, still decoded
    report = json.loads((out / "report.json").read_text())
    assert report["other_files_by_extension"] == {".txt": 1}
    problems = {w["path"]: w for w in report["walk_problems"]}
    assert set(problems) == {"a/up", "alias", "locked"}
    assert "loop" in problems["a/up"]["reason"] and not problems["a/up"]["inputs_missed"]
    assert problems["locked"]["inputs_missed"] and "Permission denied" in problems["locked"]["reason"]
    errors = (out / "errors.tsv").read_text().splitlines()[1:]
    assert errors == ["-1\tlocked\twalk\tcannot read directory (Permission denied)"]
    assert summary["failed"] == 1 and summary["written"] == 3  # exit code 1: some input was missed


# ------------------------------------------------------------------ splits

def test_artist_disjoint_split_is_deterministic():
    rng = np.random.default_rng(1)
    artists = [f"artist{int(a)}" for a in rng.integers(0, 60, 600)]
    artists[::7] = [""] * len(artists[::7])  # tracks without an artist stand alone
    paths = [f"t{i:04d}.wav" for i in range(600)]
    splits = assign_splits(paths, artists, [""] * 600, "artist", 0.1, 0.2, seed=5)
    by_artist: dict[str, set] = {}
    for a, s in zip(artists, splits):
        if a:
            by_artist.setdefault(a, set()).add(s)
    assert all(len(s) == 1 for s in by_artist.values())  # no artist in two splits
    counts = {s: splits.count(s) for s in ("train", "validation", "test")}
    assert 0.15 < counts["test"] / 600 < 0.3 and 0.05 < counts["validation"] / 600 < 0.2
    assert splits == assign_splits(paths, artists, [""] * 600, "artist", 0.1, 0.2, seed=5)
    assert splits != assign_splits(paths, artists, [""] * 600, "artist", 0.1, 0.2, seed=6)


def test_reference_dataset_split_is_artist_disjoint(corpus):
    idx = pq.read_table(corpus["ref"] / "index.parquet").to_pylist()
    by_artist: dict[str, set] = {}
    for r in idx:
        by_artist.setdefault(r["artist"], set()).add(r["split"])
    assert all(len(s) == 1 for s in by_artist.values()) and len(by_artist) == 5


# ------------------------------------------------------------------ options

def test_option_parsing():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("512MB") == 512_000_000
    assert parse_size("1GiB") == 2**30 and parse_size("100kB") == 100_000
    for bad in ("2XB", "", "10"):
        with pytest.raises(UsageError):
            parse_size(bad)
    assert Crop.parse("center:30").window(100.0) == (35.0, 30.0)
    assert Crop.parse("center:30").window(20.0) == (0.0, None)  # short tracks stored whole
    assert Crop.parse("full").window(100.0) == (0.0, None)
    with pytest.raises(UsageError):
        Crop.parse("start:30")


# ------------------------------------------------------------------ the dataset

def within_one_fp16_step(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to one float16 rounding step (what a 1e-7 difference before rounding can make)."""
    a, b = np.asarray(a, np.float16), np.asarray(b, np.float16)
    step = np.spacing(np.maximum(np.abs(a), np.abs(b)))
    return a.shape == b.shape and bool((np.abs(a.astype(np.float32) - b.astype(np.float32)) <= step).all())


def test_frames_equal_the_frontend(corpus):
    """Stored frames against an independent computation: the whole file decoded (no seeking,
    no streaming mel), the crop's samples cut from it, mel_frontend of those at once."""
    ds = MelDataset(corpus["ref"])
    audio = corpus["audio"]
    assert len(ds) == 12 and ds.labels == sorted(ds.labels)
    rates = {p: sr for p, _, sr, *_ in TRACKS}
    for row in range(len(ds)):
        r = ds.index.slice(row, 1).to_pylist()[0]
        long = r["duration_s"] > 5.0
        assert r["start_s"] == pytest.approx((r["duration_s"] - 5.0) / 2 if long else 0.0, abs=0.011)
        stored = ds.frames(row)
        whole = load_audio(audio / r["path"])
        first = round(r["start_s"] * 16000)
        crop = whole[first: first + 80_000] if long else whole
        expect = mel_frontend(crop).numpy()
        assert stored.shape == expect.shape and (not long or stored.shape[0] == n_frames(80_000))
        np.testing.assert_allclose(stored, expect, rtol=1e-3, atol=2e-3)  # float16 precision
        # the resampler of a seeking decode starts 0.1 s before the crop: last-bit differences
        assert within_one_fp16_step(stored, expect), r["path"]
        if rates[r["path"]] == 16000:  # nothing resampled: exactly the same numbers
            np.testing.assert_array_equal(stored, expect.astype(np.float16).astype(np.float32))


def test_files_that_cannot_seek_give_the_same_frames(tmp_path, monkeypatch):
    """The fallback for files without a length in their header or that cannot seek decodes from
    the start; it must store the frames the seeking path stores (same start, same edges)."""
    import soundfile

    from maest_cli.mels import prepare as mels

    crop = Crop.parse("center:3")
    files = [write_audio(tmp_path / "s16.wav", 7.3, sr=16000, seed=1),  # no resampling
             write_audio(tmp_path / "s44.wav", 7.37, sr=44100, seed=2),  # a start off the 10 ms grid
             write_audio(tmp_path / "s22.flac", 6.1, sr=22050, seed=3, channels=1),
             write_audio(tmp_path / "short.ogg", 2.0, sr=44100, seed=4)]  # shorter than the crop
    seeking = [mels.decode_track(f, crop) for f in files]
    real_info = mels.audio_info
    monkeypatch.setattr(mels, "audio_info", lambda p: dataclasses.replace(real_info(p), frames=0))
    no_length = [mels.decode_track(f, crop) for f in files]
    monkeypatch.setattr(mels, "audio_info", real_info)
    monkeypatch.setattr(soundfile.SoundFile, "seekable", lambda self: False)
    no_seek = [mels.decode_track(f, crop) for f in files]
    for f, a, b, c in zip(files, seeking, no_length, no_seek):
        assert a[0] == b[0] == c[0] == "ok", (f, a[:3], b[:3], c[:3])
        long = a[2] > 3.0
        assert a[1].shape[0] == (n_frames(48_000) if long else n_frames(round(a[2] * 16000)))
        assert b[3] == c[3] == a[3] and (a[3] > 0) == long  # the same start, on the decoding grid
        assert b[2] == pytest.approx(a[2], abs=1e-4) and c[2] == pytest.approx(a[2], abs=1e-4)
        assert within_one_fp16_step(a[1], b[1]) and within_one_fp16_step(a[1], c[1]), f
        np.testing.assert_array_equal(b[1], c[1])
        if f.endswith("s16.wav") or not long:
            np.testing.assert_array_equal(a[1], b[1])  # nothing resampled or nothing cut: exactly equal
    assert seeking[1][3] == pytest.approx(2.18)  # (7.37 - 3) / 2 = 2.185, snapped to 10 ms
    # the crop's own samples, zero-padded at its edges (as the reference does), not frames that
    # look past the crop into the rest of the track
    s16 = load_audio(files[0])
    first = round(seeking[0][3] * 16000)
    own = mel_frontend(s16[first: first + 48_000]).numpy().astype(np.float16)
    np.testing.assert_array_equal(no_length[0][1], own)
    context = mel_frontend(s16[first - 256: first + 48_256]).numpy().astype(np.float16)[1:-1]
    assert not np.array_equal(context[0], own[0]) and np.array_equal(context[3:-3], own[3:-3])


def test_index_and_offsets_across_shards(corpus, tmp_path):
    ref = corpus["ref"]
    manifest = json.loads((ref / "manifest.json").read_text())
    idx = pq.read_table(ref / "index.parquet").to_pylist()
    assert len(manifest["shards"]) > 3
    expect_shard, expect_offset = 0, 0
    for r in idx:  # tracks back to back; a new shard when the next track would pass 100 kB
        size = r["n_frames"] * FRAME_BYTES
        if expect_offset and expect_offset + size > 100_000:
            expect_shard, expect_offset = expect_shard + 1, 0
        assert (r["shard"], r["offset"]) == (expect_shard, expect_offset)
        expect_offset += size
        assert r["offset"] + size <= manifest["shards"][r["shard"]]["bytes"]
    assert [s["bytes"] for s in manifest["shards"]] == [(ref / s["file"]).stat().st_size for s in manifest["shards"]]
    # one big shard holds the same frames
    one = tmp_path / "one"
    prepare_mels(corpus["audio"], one, labels=corpus["labels"], **{**OPTIONS, "shard_size": "1GB"})
    a, b = MelDataset(ref), MelDataset(one)
    assert len(json.loads((one / "manifest.json").read_text())["shards"]) == 1
    for row in range(len(a)):
        np.testing.assert_array_equal(a.frames(row), b.frames(row))


def test_stats_labels_and_reports(corpus):
    ref, s = corpus["ref"], corpus["summary"]
    assert s["written"] == 12 and s["failed"] == 2
    assert s["label_rows_without_audio"] == 1 and s["audio_without_labels"] == 1
    errors = (ref / "errors.tsv").read_text().splitlines()
    assert errors[0] == "plan_row\tpath\tstage\treason"
    assert sorted(line.split("\t")[1] for line in errors[1:]) == ["x/corrupt.mp3", "x/empty.wav"]
    assert "empty file" in (ref / "errors.tsv").read_text()
    problems = (ref / "label_problems.tsv").read_text()
    assert "label_without_audio\tgone/missing.wav" in problems and "audio_without_labels\tu/unlabelled.wav" in problems
    assert json.loads((ref / "report.json").read_text())["failed"] == 2

    ds = MelDataset(ref)
    train = ds.split_rows("train")
    x = np.concatenate([ds.frames(r) for r in train]).astype(np.float64)
    assert ds.stats["frames"] == len(x)
    assert ds.stats["mean"] == pytest.approx(x.mean(), rel=1e-9) and ds.stats["std"] == pytest.approx(x.std(), rel=1e-9)
    np.testing.assert_allclose(ds.stats["mean_per_band"], x.mean(0), rtol=1e-9)
    np.testing.assert_allclose(ds.stats["std_per_band"], x.std(0), rtol=1e-9)
    assert ds.label_counts("train").tolist() == ds.stats["label_counts"]["train"]
    assert sorted(np.concatenate([ds.split_rows(s) for s in ("train", "validation", "test")]).tolist()) == list(range(12))
    t = ds.targets([0, 1])
    assert t.dtype == np.float32 and t.shape == (2, len(ds.labels))
    for i, row in enumerate([0, 1]):
        tags = dict((p, tg) for p, _, _, _, _, tg in TRACKS)[ds.index["path"][row].as_py()]
        assert {ds.labels[j] for j in np.flatnonzero(t[i])} == set(filter(None, tags.split(",")))
    with pytest.raises(ValueError):
        ds.split_rows("dev")


class _Spy:
    """Records the slices the reader asks of a shard."""

    def __init__(self, arr, log):
        self.arr, self.log = arr, log

    def __getitem__(self, key):
        self.log.append(key)
        return self.arr[key]


def test_reader_crops_read_only_their_frames(corpus, monkeypatch):
    ds = MelDataset(corpus["ref"])
    assert ds._maps == {}  # nothing mapped at open
    real = ds._shard_array
    assert isinstance(real(0)[0:3], np.memmap)  # slices of a memmap: nothing read until touched
    log: list = []
    monkeypatch.setattr(ds, "_shard_array", lambda k: _Spy(real(k), log))
    row = int(np.argmax(ds._n_frames))
    n, f0 = ds.n_frames(row), int(ds._frame0[row])
    whole = ds.frames(row)
    assert log.pop() == slice(f0, f0 + n)

    got = ds.crop(row, 100, start=7)
    assert log.pop() == slice(f0 + 7, f0 + 107) and got.dtype == np.float32
    np.testing.assert_array_equal(got, whole[7:107])

    got = ds.crop(row, 100)  # centred
    c = (n - 100) // 2
    assert log.pop() == slice(f0 + c, f0 + c + 100)
    np.testing.assert_array_equal(got, whole[c:c + 100])

    starts = set()
    for seed in range(8):
        got = ds.crop(row, 100, rng=np.random.default_rng(seed))
        key = log.pop()
        assert key.stop - key.start == 100 and f0 <= key.start <= f0 + n - 100
        np.testing.assert_array_equal(got, whole[key.start - f0: key.stop - f0])
        np.testing.assert_array_equal(got, ds.crop(row, 100, rng=np.random.default_rng(seed)))
        log.pop()
        starts.add(key.start)
    assert len(starts) > 4

    short = int(np.argmin(ds._n_frames))
    m, g0 = ds.n_frames(short), int(ds._frame0[short])
    got = ds.crop(short, m + 11, rng=np.random.default_rng(0))
    assert log.pop() == slice(g0, g0 + m)
    assert got.shape == (m + 11, 96) and not got[:5].any() and not got[5 + m:].any()
    np.testing.assert_array_equal(got[5:5 + m], ds.frames(short))
    with pytest.raises(ValueError):
        ds.crop(row, 100, start=n - 99)


def test_reader_pickles_without_its_maps(corpus):
    import pickle

    ds = MelDataset(corpus["ref"])
    ds.crop(0, 10)
    assert ds._maps
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {} and np.array_equal(clone.crop(0, 10), ds.crop(0, 10))


# ------------------------------------------------------------------ verify

def test_verify_sound_dataset(corpus):
    assert verify_dataset(corpus["ref"]) == []
    r = runner.invoke(app, ["prepare-mels", "--verify", str(corpus["ref"])])
    assert r.exit_code == 0 and r.stdout == ""


def test_verify_catches_a_flipped_byte(corpus, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(corpus["ref"], d)
    idx = pq.read_table(d / "index.parquet").to_pylist()
    victim = idx[4]
    shard = d / "shards" / f"mels-{victim['shard']:05d}.f16"
    data = bytearray(shard.read_bytes())
    data[victim["offset"] + 1000] ^= 0x10
    shard.write_bytes(bytes(data))
    problems = verify_dataset(d)
    assert any("sha256" in p and shard.name in p for p in problems)
    assert any(f"row 4 ({victim['path']})" in p and "crc32" in p for p in problems)
    r = runner.invoke(app, ["prepare-mels", "--verify", str(d)])
    assert r.exit_code == 1 and r.stdout.splitlines() == problems


def test_verify_catches_a_truncated_shard_and_nan(corpus, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(corpus["ref"], d)
    manifest = json.loads((d / "manifest.json").read_text())
    last = d / manifest["shards"][-1]["file"]
    with open(last, "r+b") as f:
        f.truncate(last.stat().st_size - 500)
    problems = verify_dataset(d)
    assert any("truncated" in p and last.name in p for p in problems)
    assert any("past the end" in p for p in problems)
    # NaN written into a track (with a matching crc, so only the value check can catch it)
    d2 = tmp_path / "ds2"
    shutil.copytree(corpus["ref"], d2)
    first = d2 / manifest["shards"][0]["file"]
    arr = np.memmap(first, dtype=np.float16, mode="r+")
    arr[10] = np.nan
    arr.flush()
    del arr
    assert any("NaN/inf" in p for p in verify_dataset(d2))
    (d2 / "index.parquet").unlink()
    assert any("index.parquet" in p for p in verify_dataset(d2))


# ------------------------------------------------------------------ faults and resume

def _run_and_kill(corpus, out: Path, target: int, workers: int) -> tuple[subprocess.Popen, list[int]]:
    """Run prepare_mels in a subprocess and SIGKILL its main process once the journal has `target`
    tracks (0: as soon as _work exists). Returns the process and the decode workers seen."""
    code = (f"from maest_cli.mels.prepare import prepare_mels; prepare_mels({str(corpus['audio'])!r}, {str(out)!r}, "
            f"labels={str(corpus['labels'])!r}, commit_every=1, workers={workers}, **{OPTIONS!r})")
    journal = out / "_work" / "journal"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, kids, polls = time.monotonic() + 60, [], 0
    while proc.poll() is None and time.monotonic() < deadline:
        polls += 1
        if workers > 1 and polls % 50 == 0:  # scanning /proc is not free; the workers need the CPU
            kids = [p for p in _descendants(proc.pid) if b"multiprocessing" in _cmdline(p)] or kids
        if (target == 0 and (out / "_work").exists()) or (target and _lines(journal) >= target + 1):
            proc.kill()
            break
        time.sleep(0.002)
    proc.wait(timeout=60)
    return proc, kids


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_kill_and_resume_is_identical(corpus, tmp_path):
    """Real SIGKILLs at moments spread over the run; the finished dataset equals the uninterrupted one."""
    out = tmp_path / "killed"
    seen = []
    for target in (0, 4, 9):  # each run starts a decoder process (seconds): a few kills, spread out
        proc, _ = _run_and_kill(corpus, out, target, workers=1)
        seen.append(_lines(out / "_work" / "journal"))
        assert proc.returncode == -signal.SIGKILL, seen  # killed, not finished
    assert seen[0] <= 1 and seen[0] < seen[1] < seen[2] < 15, seen  # progress was kept between kills
    summary = prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)  # the rerun finishes
    assert summary["resumed_from"] >= 4, (summary["resumed_from"], seen)  # journal lines include seals
    assert_same_dataset(corpus["ref"], out)
    assert verify_dataset(out) == []


@pytest.mark.slow  # about 20 s: two worker processes start (and import torch) before the kill
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_of_a_killed_run_exit_and_the_run_resumes(corpus, tmp_path):
    """SIGKILL the main process of a --workers 2 run: its workers must not stay behind."""
    out = tmp_path / "orphans"
    proc, kids = _run_and_kill(corpus, out, 3, workers=2)
    assert proc.returncode != 0, "the run finished before it could be killed: nothing was tested"
    assert kids, "no decode workers seen"
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in kids):
        time.sleep(0.1)
    alive = [p for p in kids if Path(f"/proc/{p}").exists()]
    for p in alive:  # never leave them behind, even when the test fails
        os.kill(p, signal.SIGKILL)
    assert not alive, "decode workers outlived the killed run"
    prepare_mels(corpus["audio"], out, labels=corpus["labels"], workers=2, **OPTIONS)
    assert_same_dataset(corpus["ref"], out)


def _descendants(pid: int) -> list[int]:
    """Children, grandchildren, ... of pid (workers fork from a forkserver, a child of the run)."""
    parent = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            pass
    found, todo = [], [pid]
    while todo:
        of = todo.pop()
        kids = [p for p, pp in parent.items() if pp == of]
        found += kids
        todo += kids
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class _Crash(Exception):
    pass


def test_torn_journal_and_partial_shard_write_are_repaired(corpus, tmp_path, monkeypatch):
    out = tmp_path / "torn"
    real_write = melwriter.ShardWriter.write

    def crash_at_item_8(self, result):
        if self.item == 8:
            raise _Crash()
        return real_write(self, result)

    monkeypatch.setattr(melwriter.ShardWriter, "write", crash_at_item_8)
    with pytest.raises(_Crash):
        prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)
    monkeypatch.setattr(melwriter.ShardWriter, "write", real_write)
    # what a kill in the middle of writing leaves: half a journal line, frames after the last
    # committed track, the start of the next shard file; and a committed track whose bytes were lost
    journal = out / "_work" / "journal"
    state = melwriter.read_journal(journal, json.loads((out / "_work" / "plan.json").read_text())["plan_sha256"])
    shard, end = state.position()
    with open(journal, "ab") as f:
        f.write(b"ok\t8\t9\t3\t")
    with open(out / "shards" / f"mels-{shard:05d}.f16", "r+b") as f:
        f.seek(end)
        f.write(b"\x55" * 5000)
        f.seek(end - 10)
        f.write(b"\x00" * 10)  # the last committed track is damaged: it must be redone
    (out / "shards" / f"mels-{shard + 1:05d}.f16").write_bytes(b"\x77" * 999)
    summary = prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)
    assert 0 < summary["resumed_from"] < 8
    assert_same_dataset(corpus["ref"], out)


def test_crash_during_finalisation(corpus, tmp_path, monkeypatch):
    out = tmp_path / "final"
    real = melwriter.write_json

    def fail_on_manifest(path, obj):
        if path.name == "manifest.json":
            raise _Crash()
        return real(path, obj)

    monkeypatch.setattr(melwriter, "write_json", fail_on_manifest)
    with pytest.raises(_Crash):
        prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)
    assert (out / "index.parquet").exists() and (out / "_work").exists()
    assert MelDataset.__name__ and any("unfinished" in p for p in verify_dataset(out))
    monkeypatch.setattr(melwriter, "write_json", real)
    prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)
    assert_same_dataset(corpus["ref"], out)
    again = prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)
    assert again["already_complete"] and again["written"] == 12
    with pytest.raises(UsageError, match="other options"):
        prepare_mels(corpus["audio"], out, labels=corpus["labels"], **{**OPTIONS, "seed": 4})


def _shard_identity(d: Path) -> dict:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.stat().st_size) for p in (d / "shards").iterdir()}


def test_kill_while_removing_work_files_leaves_the_dataset_alone(corpus, tmp_path, monkeypatch):
    """Once the manifest is written the dataset is finished: whatever a kill during the removal
    of _work leaves (all of it, the plan without the journal, the journal without the plan, a
    half-deleted renamed directory), a rerun removes it and rebuilds nothing, and a reader can
    use the dataset meanwhile."""
    out = tmp_path / "base"
    real_discard, real_rmtree = melwriter.discard_work, shutil.rmtree
    monkeypatch.setattr(melwriter, "discard_work", lambda out: (_ for _ in ()).throw(_Crash()))
    with pytest.raises(_Crash):  # killed right after the manifest: all of _work is still there
        prepare_mels(corpus["audio"], out, labels=corpus["labels"], **OPTIONS)
    monkeypatch.setattr(melwriter, "discard_work", real_discard)
    assert (out / "manifest.json").exists() and (out / "_work" / "journal").exists()

    def only(*keep):
        def make(d: Path) -> None:
            for f in (d / "_work").iterdir():
                if f.name not in keep:
                    f.unlink()
        return make

    def renamed_half_deleted(d: Path) -> None:
        os.replace(d / "_work", d / "_work.done")
        (d / "_work.done" / "journal").unlink()

    def stale_temp_files(d: Path) -> None:
        (d / ".stats.json.tmp4242").write_text("{")

    states = {"all of _work": lambda d: None, "plan, no journal": only("plan.json", "plan.parquet"),
              "journal, no plan": only("journal"), "renamed, half deleted": renamed_half_deleted,
              "temp files of a killed write": stale_temp_files}
    for name, make in states.items():
        d = tmp_path / name.replace(" ", "_").replace(",", "")
        shutil.copytree(out, d)
        make(d)
        before = _shard_identity(d)
        ds = MelDataset(d)  # a reader may open it meanwhile
        frames = ds.frames(3)
        assert verify_dataset(d) == [], name
        summary = prepare_mels(corpus["audio"], d, labels=corpus["labels"], **OPTIONS)
        assert summary["already_complete"], name
        assert _shard_identity(d) == before, name  # not one shard rewritten
        assert not (d / "_work").exists() and not (d / "_work.done").exists(), name
        assert not list(d.glob(".*.tmp*")), name
        np.testing.assert_array_equal(ds.frames(3), frames)
        assert_same_dataset(corpus["ref"], d)

    # a real kill in the middle of the deletion (rmtree gets part way)
    def rmtree_dies_midway(path, *args, **kwargs):
        if Path(path).name == "_work.done" and Path(path).exists():
            (Path(path) / "journal").unlink()
            raise _Crash()
        return real_rmtree(path, *args, **kwargs)

    d = tmp_path / "midway"
    monkeypatch.setattr(melwriter.shutil, "rmtree", rmtree_dies_midway)
    with pytest.raises(_Crash):
        prepare_mels(corpus["audio"], d, labels=corpus["labels"], **OPTIONS)
    monkeypatch.setattr(melwriter.shutil, "rmtree", real_rmtree)
    assert (d / "_work.done" / "plan.json").exists() and not (d / "_work").exists()
    before = _shard_identity(d)
    assert prepare_mels(corpus["audio"], d, labels=corpus["labels"], **OPTIONS)["already_complete"]
    assert _shard_identity(d) == before and not (d / "_work.done").exists()
    assert_same_dataset(corpus["ref"], d)


def _decode_or_die(path: str, crop):
    """Stands in for mels.decode_track in the decoder processes: b1.mp3 segfaults every
    time (a decoder bug), a3.ogg is killed the first time only (the out-of-memory killer)."""
    import ctypes
    import resource

    from maest_cli.mels import prepare as mels

    if path.endswith("b1.mp3"):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        ctypes.string_at(0)  # a real segmentation fault
    marker = Path(path + ".killed-once")
    if path.endswith("a3.ogg") and not marker.exists():
        marker.write_text("")
        os.kill(os.getpid(), signal.SIGKILL)
    return mels.decode_track(path, crop)


def test_a_decoder_that_dies_fails_its_track_not_the_run(corpus, tmp_path, monkeypatch):
    """Decoder processes really die (a segfault, a SIGKILL). A track whose decoder died is decoded
    again: killed once, it is stored as if nothing happened; dying twice, it is failed and
    the run goes on. Crashes on track after track stop the run (the machine, not the files) with
    those tracks journalled as failed, so a rerun finishes it."""
    from maest_cli.io import workers
    from maest_cli.mels import prepare as mels

    audio = tmp_path / "audio"
    shutil.copytree(corpus["audio"], audio)
    out = tmp_path / "crashes"
    monkeypatch.setattr(mels, "decode_track", _decode_or_die)
    monkeypatch.setattr(workers, "MAX_LOSSES_IN_A_ROW", 1)  # so that b1.mp3 alone stops the run
    with pytest.raises(ChildProcessError, match=r"decoder processes keep dying \(killed by SIGSEGV, 1 times in a "
                                                r"row, the last on .*b1.mp3\)"):
        prepare_mels(audio, out, labels=corpus["labels"], **OPTIONS)
    assert (audio / "a/a3.ogg.killed-once").exists()  # it did die once
    monkeypatch.undo()
    monkeypatch.setattr(mels, "decode_track", _decode_or_die)
    summary = prepare_mels(audio, out, labels=corpus["labels"], **OPTIONS)
    assert summary["resumed_from"] == 4  # a1 a2 a3 b1
    errors = {line.split("\t")[1]: line for line in (out / "errors.tsv").read_text().splitlines()[1:]}
    assert set(errors) == {"b/b1.mp3", "x/corrupt.mp3", "x/empty.wav"} and summary["failed"] == 3
    assert "\tdecode\tdecoder process died (killed by SIGSEGV) while decoding this file, 2 times" in errors["b/b1.mp3"]
    ref, got = MelDataset(corpus["ref"]), MelDataset(out)
    ref_rows = {p: i for i, p in enumerate(ref.index["path"].to_pylist())}
    assert sorted(got.index["path"].to_pylist()) == sorted(set(ref_rows) - {"b/b1.mp3"})
    for row, path in enumerate(got.index["path"].to_pylist()):  # a3.ogg included
        np.testing.assert_array_equal(got.frames(row), ref.frames(ref_rows[path]))
    assert verify_dataset(out) == []


# ------------------------------------------------------------------ parts and merge

def test_parts_made_on_other_machines_merge_into_the_single_run(corpus, tmp_path):
    """Part 2 is made from a copy of the audio and labels at other paths (another machine's
    mount): the plan is the same, so the parts merge into what one run makes."""
    p1, p2, merged = tmp_path / "p1", tmp_path / "p2", tmp_path / "merged"
    elsewhere = tmp_path / "mnt" / "data"
    shutil.copytree(corpus["audio"], elsewhere / "audio", symlinks=True)
    shutil.copyfile(corpus["labels"], elsewhere / "tags.tsv")
    s1 = prepare_mels(corpus["audio"], p1, labels=corpus["labels"], shard="1/2", workers=2, **OPTIONS)
    s2 = prepare_mels(elsewhere / "audio", p2, labels=elsewhere / "tags.tsv", shard="2/2", **OPTIONS)
    assert s1["tracks_in_part"] + s2["tracks_in_part"] == 14 and s1["written"] + s2["written"] == 12
    rows1 = pq.read_table(p1 / "index.parquet")["plan_row"].to_pylist()
    assert all(r % 2 == 0 for r in rows1)
    with pytest.raises(UsageError, match="parts 1..2"):
        merge_datasets([p1], tmp_path / "half", progress=False)
    # a part whose data-shaping options differ is refused, and the message says which
    other = tmp_path / "p2-other-crop"
    shutil.copytree(p2, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["options"]["crop"] = "center:6"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="other options.*crop 'center:5' -> 'center:6'"):
        merge_datasets([p1, other], tmp_path / "refused", progress=False)

    summary = merge_datasets([p2, p1], merged, progress=False)
    assert summary["verify_problems"] == [] and summary["failed"] == 2
    assert_same_dataset(corpus["ref"], merged)
    inputs = json.loads((merged / "manifest.json").read_text())["merged_from"]["inputs"]
    assert [i["audio_root"] for i in inputs] == [str(corpus["audio"].resolve()), str((elsewhere / "audio").resolve())]


# ------------------------------------------------------------------ command line

def test_cli_run_exit_codes(corpus, tmp_path):
    out = tmp_path / "cli"
    args = ["prepare-mels", str(corpus["audio"]), "--out", str(out), "--labels", str(corpus["labels"]),
            "--crop", "center:5", "--shard-size", "100kB", "--val-fraction", "0.2", "--test-fraction", "0.2",
            "--seed", "3", "--quiet"]
    r = runner.invoke(app, args)
    assert r.exit_code == 1, r.output  # two files could not be decoded
    assert "2 files failed" in r.stderr and "errors.tsv" in r.stderr
    assert_same_dataset(corpus["ref"], out)
    for bad in (["--crop", "middle"], ["--shard-size", "lots"], ["--split-by", "album"], ["--shard", "3/2"],
                ["--val-fraction", "0.6", "--test-fraction", "0.5"]):
        r = runner.invoke(app, ["prepare-mels", str(corpus["audio"]), "--out", str(tmp_path / "x"), *bad])
        assert r.exit_code == 2, (bad, r.output)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    r = runner.invoke(app, ["prepare-mels", str(corpus["audio"]), "--out", str(tmp_path / "foreign")])
    assert r.exit_code == 2 and "not empty" in r.stderr
    assert runner.invoke(app, ["prepare-mels", "--verify", str(tmp_path / "nothing")]).exit_code == 1


# ------------------------------------------------------------------ the throughput benchmark

def test_mels_bench_compares_each_run_with_the_decode_limit_of_its_round(tmp_path):
    """`make bench-mels` on two short files, one round: every figure is a positive rate, the
    shares are the runs' rates over the decode-only rate of the same round, and the datasets it
    made are gone."""
    from maest_cli.bench import mels as mels_bench

    result = mels_bench.run(tmp_path, files=2, repeats=1, workers=[1], formats=["ogg"], seconds=4)
    (row,) = result["rows"]
    assert row["format"] == "ogg" and row["workers"] == 1
    for kind in ("decode", "cold", "warm"):
        assert row[kind]["min"] == row[kind]["median"] == row[kind]["max"] > 0
    assert row["warm_share"]["median"] == pytest.approx(row["warm"]["median"] / row["decode"]["median"])
    assert row["cold_share"]["median"] == pytest.approx(row["cold"]["median"] / row["decode"]["median"])
    assert "| OGG | 1 |" in mels_bench.table(result)
    assert not (tmp_path / "out").exists()
    assert result["seconds_per_file"] == 4 and result["versions"]
