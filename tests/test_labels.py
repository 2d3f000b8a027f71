"""maest_cli.mels.labels: the one reader per label-file format shared by prepare-mels and probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from maest_cli.errors import UsageError
from maest_cli.mels.labels import (
    LabelRow,
    audio_key,
    detect_format,
    match_audio,
    merge_rows,
    mtt_directory_split,
    mtt_split_of,
    normalize_path,
    read_label_file,
    read_label_files,
    split_name,
    top_k_tags,
)
from maest_cli.probing.data import load_annotations

PROBE_FIX = Path(__file__).parent / "fixtures" / "probe"
MELS_FIX = Path(__file__).parent / "fixtures" / "mels"


# ---------------------------------------------------------------- paths, splits, rules

def test_audio_key_strips_only_audio_extensions():
    assert audio_key("48/948.mp3") == audio_key("48/948.low.mp3") == audio_key("./48/948.wav") == "48/948"
    assert audio_key("/48/948.FLAC") == audio_key("48\\948.ogg") == audio_key("48//948.low.opus") == "48/948"
    assert audio_key("f/a-b-01-c-0-29.mp3") == "f/a-b-01-c-0-29"
    # not audio extensions: kept, so these stay different tracks
    assert audio_key("live/take.v2") == "live/take.v2" != audio_key("live/take.v3")
    assert audio_key("live/take.v2.wav") == "live/take.v2"
    assert audio_key("x/notes.low") == "x/notes.low" and audio_key("x/.low.mp3") == "x/.low"
    assert audio_key("x/a.txt") == "x/a.txt"


def test_normalize_path_and_split_names():
    assert normalize_path(" ./a/b.mp3 ") == normalize_path("/a/b.mp3") == normalize_path("a\\b.mp3") == "a/b.mp3"
    assert normalize_path(".") == normalize_path("") == ""
    assert [split_name(s) for s in ("train", "Training", "val", "DEV", "valid", "testing", "", "holdout")] == \
        ["train", "train", "validation", "validation", "validation", "test", "", None]


def test_mtt_directory_rule():
    assert [mtt_split_of(f"{c}/clip.mp3") for c in "0123456789abcdef"] == ["train"] * 12 + ["validation"] + \
        ["test"] * 3
    assert mtt_split_of("C/clip.mp3") == "validation" and mtt_split_of("./f/clip.mp3") == "test"
    assert mtt_split_of("ab/clip.mp3") is None and mtt_split_of("clip.mp3") is None and mtt_split_of("g/x.mp3") is None
    assert mtt_directory_split("d/x.mp3") == "test"
    with pytest.raises(UsageError, match="--split-by mtt-directory: 'ab/x.mp3' is not in a one-hex-digit directory"):
        mtt_directory_split("ab/x.mp3")


def test_top_k_by_count_ties_in_column_order():
    rows = [LabelRow("a", ("x", "y")), LabelRow("b", ("y", "z")), LabelRow("c", ("w",))]
    assert top_k_tags(rows, ["w", "x", "z", "y", "v"], 3) == ["y", "w", "x"]
    assert top_k_tags(rows, ["w", "x", "z", "y", "v"], 10) == ["y", "w", "x", "z", "v"]


def test_merge_rows_unites_tags_and_reports_a_second_split():
    rows = [LabelRow("./a.mp3", ("x",), split="train", where="f:2"), LabelRow("a.mp3", ("y", "x"), split="test",
                                                                             where="f:3"),
            LabelRow("b.mp3", (), where="f:4"), LabelRow("b.mp3", ("z",), where="f:5"),
            LabelRow("b.mp3", ("w",), where="g:2")]  # another file (e.g. another task's): merged quietly
    merged, problems = merge_rows(rows)
    assert [(r.path, r.tags, r.split) for r in merged] == [("a.mp3", ("x", "y"), "train"), ("b.mp3", ("z", "w"), "")]
    assert [(p.kind, p.path, p.where) for p in problems] == [("conflicting_rows", "a.mp3", "f:3"),
                                                             ("duplicate_row", "b.mp3", "f:5")]


# ---------------------------------------------------------------- the table format, shared

def test_both_commands_read_the_same_tables(tmp_path):
    """A `rock|pop` or quoted `"rock,pop"` field is two tags for prepare-mels and probe alike,
    in a TSV or a CSV, with or without extra columns."""
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("path\tsplit\ttags\tcomment\na.wav\ttrain\trock|pop\tx\nb.wav\ttrain\trock, jazz\t\n"
                   "c.wav\ttest\tpop\t\n")
    csv_ = tmp_path / "labels.csv"
    csv_.write_text('path,split,tags,comment\na.wav,train,rock|pop,x\nb.wav,train,"rock, jazz",\nc.wav,test,pop,\n')
    for p in (tsv, csv_):
        mels = read_label_files([p])
        assert [(r.path, r.tags, r.split) for r in mels.rows] == [("a.wav", ("rock", "pop"), "train"),
                                                                  ("b.wav", ("rock", "jazz"), "train"),
                                                                  ("c.wav", ("pop",), "test")]
        probe = load_annotations("custom", p)
        assert probe.tags == mels.vocabulary == ["jazz", "pop", "rock"]
        assert probe.labels.tolist() == [[0, 1, 1], [1, 0, 1], [0, 1, 0]]
    # the probe's CSV fixture (extra column, quoted path with a comma, split alias) reads for prepare-mels too
    table = read_label_files([PROBE_FIX / "custom" / "labels.csv"])
    assert table.format == "tsv" and len(table.rows) == 6 and not table.problems
    assert {r.path: r.tags for r in table.rows}["songs/b.wav"] == ("jazz", "piano")


def test_headerless_tables_and_bad_rows(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text('a.wav,"rock,pop",art1\nb.wav\nc.wav,pop,art2,extra\nd.wav,|,\n')
    got = read_label_file(p)
    assert got.columns == ("path", "tags", "artist")
    assert [(r.path, r.tags, r.artist) for r in got.rows] == [("a.wav", ("rock", "pop"), "art1"), ("b.wav", (), ""),
                                                             ("d.wav", (), "")]
    assert [(q.kind, q.path, q.where) for q in got.problems] == [("malformed_row", "c.wav", f"{p}:3")]
    p.write_text("path\ttags\tpath\na.wav\tx\tb.wav\n")
    with pytest.raises(UsageError, match=r"plain.csv:1: the header names the path column twice"):
        read_label_files([p])


@pytest.mark.parametrize("content, line", [
    (b"path\ttags\na.wav\trock\nb\xff.wav\tpop\n", 3),
    (b"\xff\xfep\x00a\x00t\x00h\x00\n\x00", 1),  # UTF-16
    (b"path\ttags\n" + b"x.wav\tok\n" * 3000 + b"caf\xc3.wav\tpop\n", 3002),  # far into the file
])
def test_non_utf8_label_files_are_one_line_errors(tmp_path, content, line):
    p = tmp_path / "tags.tsv"
    p.write_bytes(content)
    with pytest.raises(UsageError, match=rf"tags.tsv:{line}: not UTF-8 text") as e:
        read_label_files([p])
    assert "\n" not in str(e.value)


def test_csv_errors_and_wrong_formats_are_one_line_errors(tmp_path):
    p = tmp_path / "tags.tsv"
    p.write_text('path\ttags\na.wav\trock\n"b.wav"x\tpop\n')
    with pytest.raises(UsageError, match=r"tags.tsv:3: cannot be parsed"):
        read_label_files([p])
    p.write_text("path\ttags\na.wav\trock\x00\n")
    with pytest.raises(UsageError, match=r"tags.tsv:2: cannot be parsed"):
        read_label_files([p])
    with pytest.raises(UsageError, match=r"tags.tsv:1: not MagnaTagATune's annotations_final.csv"):
        read_label_files([p], format="mtt")
    with pytest.raises(UsageError, match=r"annotations_final.csv:1: not an MTG-Jamendo split file"):
        read_label_files([PROBE_FIX / "mtt" / "annotations_final.csv"], format="mtg-jamendo")


def test_bom_files_keep_their_format(tmp_path):
    src = MELS_FIX / "autotagging_top50tags-train.tsv"
    p = tmp_path / "autotagging_top50tags-train.tsv"
    p.write_bytes(b"\xef\xbb\xbf" + src.read_bytes())
    assert detect_format(p) == "mtg-jamendo"
    assert [r.tags for r in read_label_files([p]).rows] == [r.tags for r in read_label_files([src]).rows]


# ---------------------------------------------------------------- formats read alike by both commands

def test_mtt_and_jamendo_vocabularies_agree_between_commands():
    mtt = read_label_files([PROBE_FIX / "mtt" / "annotations_final.csv"], top_k=50)
    assert mtt.vocabulary == load_annotations("mtt", PROBE_FIX / "mtt").tags
    files = [PROBE_FIX / f"mtg-jamendo/data/splits/split-0/autotagging_genre-{s}.tsv"
             for s in ("train", "validation", "test")]
    train_only = read_label_files(files, tags_from="train")
    assert train_only.vocabulary == load_annotations("mtg-jamendo-genre", PROBE_FIX / "mtg-jamendo").tags
    assert "genre---funk" in train_only.unknown_tags  # a test tag outside the train vocabulary
    assert "genre---funk" in read_label_files(files).vocabulary  # every tag, prepare-mels' default


def test_jamendo_and_mtt_bad_rows_are_skipped_with_their_line(tmp_path):
    p = tmp_path / "autotagging_genre-train.tsv"
    p.write_text("TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS\r\nt1\ta1\tb1\t01/1.mp3\t10\tgenre---rock\r\n"
                 "t2\ta1\tb1\r\nt3\ta2\tb2\t03/3.mp3\t10\r\n")
    got = read_label_file(p)
    assert [(r.path, r.tags, r.split, r.artist) for r in got.rows] == [("01/1.mp3", ("genre---rock",), "train", "a1"),
                                                                      ("03/3.mp3", (), "train", "a2")]
    assert [q.where for q in got.problems] == [f"{p}:3"]
    lines = (PROBE_FIX / "mtt" / "annotations_final.csv").read_text().splitlines()
    lines[2] = lines[2].replace('"0"', '"2"', 1)
    (tmp_path / "annotations_final.csv").write_text("\n".join(lines) + "\n")
    got = read_label_file(tmp_path / "annotations_final.csv")
    assert len(got.rows) == len(lines) - 2 and got.problems[0].where.endswith("annotations_final.csv:3")
    assert len(got.tag_columns) == 188


# ---------------------------------------------------------------- matching audio

def test_match_audio_prefers_exact_paths_and_reports_clashes():
    rows = [LabelRow("a.mp3", ("x",), where="f:2"), LabelRow("a.wav", ("y",), where="f:3"),
            LabelRow("b.ogg", (), where="f:4"), LabelRow("live/take.v2", (), where="f:5"),
            LabelRow("live/take.v3", (), where="f:6")]
    m = match_audio(rows, ["a.wav", "b.mp3", "b.wav", "live/take.v2.flac", "live/take.v3.flac"])
    assert dict((a, r.path) for a, r in m.pairs) == {"a.wav": "a.wav", "live/take.v2.flac": "live/take.v2",
                                                     "live/take.v3.flac": "live/take.v3"}
    kinds = {(p.kind, p.path): p.detail for p in m.problems}
    assert "already matched by f:3" in kinds[("conflicting_rows", "a.mp3")]  # the exact row keeps its file
    assert kinds[("label_without_audio", "b.ogg")] == "ambiguous: b.mp3, b.wav"
    assert m.without_audio == 1 and m.audio_without_labels == 2


def test_both_commands_stop_on_an_unreadable_label_file_with_one_line(tmp_path):
    from typer.testing import CliRunner

    from maest_cli.cli.app import app

    bad = tmp_path / "labels.tsv"
    bad.write_bytes(b"path\tsplit\ttags\nx\xff.wav\ttrain\trock\n")
    (tmp_path / "audio").mkdir()
    runner = CliRunner()
    for args in (["prepare-mels", str(tmp_path / "audio"), "--out", str(tmp_path / "ds"), "--labels", str(bad)],
                 ["probe", "custom", "--embeddings", str(tmp_path), "--dataset-root", str(bad)]):
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args[0], r.output)
        assert "labels.tsv:2: not UTF-8 text" in r.output and "Traceback" not in r.output
