"""maest probe: dataset adapters, embeddings join, metrics, schedule, training, selection, outputs, CLI."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd  # a dev dependency, the MTT oracle: missing is a failure, not a skip
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from maest_cli.cli.app import app
from maest_cli.embed.reading import describe_embeddings, open_embeddings
from maest_cli.embed.spec import InferenceSpec
from maest_cli.io.config import ConfigError
from maest_cli.probing.data import ProbeError, UsageError, join_tracks, load_annotations
from maest_cli.probing.fit import (
    ProbeConfig,
    ProbeData,
    Protocol,
    SplitData,
    column_stats,
    load_grid,
    logits_of,
    lr_factor,
    train_run,
)
from maest_cli.probing.metrics import fast_macro_roc_auc, macro_scores, per_tag_scores
from maest_cli.probing.run import load_probe, probe

FIX = Path(__file__).parent / "fixtures" / "probe"
META = {"model": "maest-30s-pw", "block": 7, "tokens": ["cls", "dist", "avg"], "preset": "none"}


# ---------------------------------------------------------------- helpers

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_embeddings(directory: Path, paths, x: np.ndarray, root: str = "/data/audio", meta: dict | None = None,
                     segments: list[int] | None = None, name: str = "part-00000.parquet") -> Path:
    """An `extract`-shaped Parquet file: path, root, duration_s, n_segments, embedding[D] (+ segment rows)."""
    directory.mkdir(parents=True, exist_ok=True)
    x = np.asarray(x, np.float32)
    cols = {"path": pa.array(list(paths), pa.string()), "root": pa.array([root] * len(x), pa.string()),
            "duration_s": pa.array(np.full(len(x), 30.0)), "n_segments": pa.array(np.ones(len(x), np.int32))}
    if segments is not None:
        cols["segment"] = pa.array(segments, pa.int32())
        cols["start_s"] = pa.array(np.asarray(segments, float) * 15.0)
        cols["end_s"] = pa.array(np.asarray(segments, float) * 15.0 + 30.0)
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel(), pa.float32()), x.shape[1])
    table = pa.table(cols).replace_schema_metadata({b"maest": json.dumps(meta or META).encode()})
    pq.write_table(table, directory / name)
    return directory


def linear_task(n: int = 2000, dim: int = 32, n_tags: int = 5, seed: int = 0, random_labels: bool = False):
    """Embeddings and tags that are a linear function of them (or independent of them)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32) * 3 + 1  # not standardised on purpose
    if random_labels:
        y = (rng.random((n, n_tags)) < 0.3).astype(np.uint8)
    else:
        z = (x - 1) @ rng.standard_normal((dim, n_tags))
        y = (z > np.quantile(z, 0.7, axis=0)).astype(np.uint8)
    splits = np.array(["train"] * int(n * 0.6) + ["validation"] * int(n * 0.15) + ["test"] * (n - int(n * 0.75)))
    return x, y, splits


def write_custom_task(tmp: Path, x, y, splits, rare_train_tag: bool = True, ext: str = ".mp3"):
    """A custom label TSV + embeddings folder for a task; `rare` is positive only in train (absent elsewhere)."""
    paths = [f"{i % 100:02d}/{i}{ext}" for i in range(len(x))]
    tags = [f"tag{c}" for c in range(y.shape[1])]
    lines = ["path\tsplit\ttags"]
    for i, p in enumerate(paths):
        t = [tags[c] for c in np.flatnonzero(y[i])]
        if rare_train_tag and splits[i] == "train" and i % 10 == 0:
            t.append("rare")
        lines.append(f"{p}\t{splits[i]}\t{'|'.join(t)}")
    (tmp / "labels.tsv").write_text("\n".join(lines) + "\n")
    write_embeddings(tmp / "emb", paths, x)
    return tmp / "labels.tsv", tmp / "emb"


def tiny_grid(tmp: Path, lrs=(3e-3,), dropouts=(0.5,), epochs=(9,), batch=(64,), warmup=2) -> str:
    """A grid file with a small MLP and a short warm-up (the authors' 10 epochs would leave
    these short runs no decay)."""
    p = tmp / "grid.toml"
    p.write_text(f"batch_size = {list(batch)}\nepochs = {list(epochs)}\ndropout = {list(dropouts)}\n"
                 f"lr = {list(lrs)}\n[protocol]\nhidden = 64\nwarmup_epochs = {warmup}\n")
    return str(p)


def run(data, batch, dropout, lr, epochs, seed, protocol):
    return train_run(data, ProbeConfig(batch, epochs, dropout, lr), seed, protocol, torch.device("cpu"))


def make_data(x, y, splits) -> ProbeData:
    mean, std = x[splits == "train"].mean(0), x[splits == "train"].std(0)
    xs = ((x - mean) / std).astype(np.float32)
    sd = {s: SplitData(torch.from_numpy(xs[splits == s]), torch.from_numpy(y[splits == s].astype(np.float32)),
                       y[splits == s], [str(i) for i in np.flatnonzero(splits == s)])
          for s in ("train", "validation", "test")}
    return ProbeData([f"tag{c}" for c in range(y.shape[1])], sd, mean, std)


# ---------------------------------------------------------------- adapters

def test_mtt_top50_and_split_by_directory():
    ann = load_annotations("mtt", FIX / "mtt")
    ref = pd.read_csv(FIX / "mtt" / "annotations_final.csv", sep="\t")
    counts = ref.drop(columns=["clip_id", "mp3_path"]).sum()
    expected = list(counts.sort_values(ascending=False, kind="stable").index[:50])
    assert ann.tags == expected  # by count over the whole file, ties in column order
    assert ann.labels.shape == (len(ref), 50)
    np.testing.assert_array_equal(ann.labels, ref[expected].to_numpy())
    assert ann.paths == list(ref["mp3_path"])  # unquoted
    first = [p[0] for p in ann.paths]
    for p, s in zip(first, ann.splits):
        assert s == ("validation" if p == "c" else "test" if p in "def" else "train")
    assert ann.counts() == {"train": 24, "validation": 3, "test": 6}  # 12:1:3 folders, 2 clips each + 1
    untagged = ann.paths.index("c/silent_artist-no_tags-01-nothing-0-29.mp3")
    assert ann.labels[untagged].sum() == 0  # a clip with no tag stays (as in the authors' split)


def test_mtt_malformed_lines_are_skipped_and_reported(tmp_path):
    lines = (FIX / "mtt" / "annotations_final.csv").read_text().splitlines()
    lines[3] = "\t".join(lines[3].split("\t")[:-5])  # truncated row
    lines[4] = lines[4].replace('"f/', '"z/').replace('"0/', '"z/').replace('"1/', '"z/')
    (tmp_path / "annotations_final.csv").write_text("\n".join(lines) + "\n")
    ann = load_annotations("mtt", tmp_path)
    assert len(ann.paths) == len(lines) - 3
    assert any(":4: skipped" in n for n in ann.notes) and any(":5: skipped" in n for n in ann.notes)
    (tmp_path / "annotations_final.csv").write_text("a\tb\n1\t2\n")
    with pytest.raises(UsageError, match="not MagnaTagATune"):
        load_annotations("mtt", tmp_path)


def test_mtg_jamendo_split_files():
    ann = load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo")
    train_tags = set()
    raw = (FIX / "mtg-jamendo/data/splits/split-0/autotagging_genre-train.tsv").read_text().splitlines()[1:]
    for line in raw:
        train_tags |= {t.strip() for t in line.split("\t")[5:] if t.strip()}
    assert ann.tags == sorted(train_tags)  # vocabulary: union over the train file, no CR left
    assert all(not t.endswith("\r") for t in ann.tags)
    assert ann.counts() == {"train": 18, "validation": 6, "test": 5}
    assert ann.paths[0] == "14/214.mp3"
    no_tags = [p for p, row in zip(ann.paths, ann.labels) if row.sum() == 0]
    assert no_tags == ["29/229.mp3", "89/289.mp3"]  # rows with no TAGS field at all
    i = ann.paths.index("92/292.mp3")  # genre---funk + genre---rock: funk is not in train
    assert ann.labels[i].tolist() == [int(t == "genre---rock") for t in ann.tags]
    assert any("genre---funk" in n for n in ann.notes)
    top = load_annotations("mtg-jamendo-top50", FIX / "mtg-jamendo")  # files are named ...top50tags...
    assert "mood/theme---calm" in top.tags and "instrument---guitar" in top.tags
    # the split folder itself, or data/splits, works as root too
    assert load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo/data/splits/split-0").paths == ann.paths
    assert load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo/data/splits").paths == ann.paths


def test_mtg_jamendo_other_split():
    """--split 1 reads split-1's files: another partition of the same tracks, with its own
    train vocabulary; the split-0 folder given as root is not taken for split-1."""
    zero = load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo")
    one = load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo", split=1)
    assert all("split-1" in f for f in one.source) and all("split-0" in f for f in zero.source)
    assert sorted(one.paths) == sorted(zero.paths) and one.counts() == {"train": 21, "validation": 4, "test": 4}
    split_of = dict(zip(one.paths, one.splits))
    assert split_of["14/214.mp3"] == "test" and split_of["26/226.mp3"] == "validation"
    assert "genre---funk" in one.tags and "genre---funk" not in zero.tags  # a train tag in split-1 only
    assert load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo/data/splits/split-1", split=1).paths == one.paths
    with pytest.raises(UsageError, match="no split-1 split files"):
        load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo/data/splits/split-0", split=1)


def test_split_is_refused_where_it_means_nothing(tmp_path):
    with pytest.raises(UsageError, match="--split 1: only the MTG-Jamendo datasets"):
        load_annotations("mtt", FIX / "mtt", split=1)
    with pytest.raises(UsageError, match="--split 0: only the MTG-Jamendo datasets"):
        load_annotations("custom", FIX / "custom" / "labels.csv", split=0)


def test_mtg_jamendo_missing_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="split-2"):
        load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo", split=2)
    with pytest.raises(UsageError, match="autotagging_instrument-train.tsv: no such file"):
        load_annotations("mtg-jamendo-instrument", FIX / "mtg-jamendo")
    with pytest.raises(UsageError, match="no such file or directory"):
        load_annotations("mtg-jamendo-genre", tmp_path / "nope")
    with pytest.raises(UsageError, match="unknown dataset 'msd'"):
        load_annotations("msd", tmp_path)


def test_custom_csv_and_tsv():
    ann = load_annotations("custom", FIX / "custom" / "labels.csv")
    assert ann.paths == ["songs/a.wav", "songs/b.wav", "songs/c, live.flac", "songs/d.mp3", "songs/e.mp3",
                         "songs/f.mp3"]
    assert ann.tags == ["jazz", "piano", "pop", "rock"]
    assert ann.splits.tolist() == ["train"] * 3 + ["validation"] + ["test"] * 2
    assert ann.labels.tolist() == [[0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 1, 0],
                                   [0, 0, 0, 0]]
    assert any("metal" in n for n in ann.notes)
    tsv = load_annotations("custom", FIX / "custom" / "labels.tsv")
    assert tsv.tags == ann.tags and tsv.labels.tolist() == ann.labels[:5].tolist()


def test_custom_bad_files(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("name,split,tags\na.mp3,train,rock\n")
    with pytest.raises(UsageError, match="needs a header with columns path, split and tags"):
        load_annotations("custom", p)
    # bad rows are skipped and noted, as in the MTT and MTG-Jamendo files (and prepare-mels)
    p.write_text("path,split,tags\na.mp3,train,rock\nb.mp3,holdout,rock\nc.mp3,,pop\n\"d.mp3\",train,\"x\"y\n")
    with pytest.raises(UsageError, match=r"l.csv:5: cannot be parsed"):  # a broken quote: the file is unreadable
        load_annotations("custom", p)
    p.write_text("path,split,tags\na.mp3,train,rock\nb.mp3,holdout,rock\nc.mp3,,pop\nd.mp3,test,rock,x\n"
                 "e.mp3,validation,rock|pop\n")
    ann = load_annotations("custom", p)
    assert ann.paths == ["a.mp3", "e.mp3"] and ann.tags == ["rock"]
    assert any("l.csv:3: skipped" in n and "holdout" in n for n in ann.notes)
    assert any("l.csv:4: skipped (no split given)" in n for n in ann.notes)
    assert any("l.csv:5: skipped" in n for n in ann.notes)


@pytest.mark.parametrize("content", [b"path\tsplit\ttags\na.mp3\ttrain\trock\nb\xe9.mp3\ttest\trock\n",
                                     "path\tsplit\ttags\na.mp3\ttrain\trock\n".encode("utf-16")])
def test_label_files_that_are_not_utf8_are_one_line_errors(tmp_path, content):
    p = tmp_path / "labels.tsv"
    p.write_bytes(content)
    line = 3 if content.startswith(b"path") else 1
    with pytest.raises(UsageError, match=rf"labels.tsv:{line}: not UTF-8 text") as e:
        load_annotations("custom", p)
    assert "\n" not in str(e.value)
    r = CliRunner().invoke(app, ["probe", "custom", "--embeddings", str(tmp_path), "--dataset-root", str(p)])
    assert r.exit_code == 2 and f"labels.tsv:{line}: not UTF-8" in r.output


def test_bom_and_crlf_label_files(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_bytes("\ufeffpath,split,tags\r\na.mp3,train,rock\r\nb.mp3,test,pop|rock\r\n".encode("utf-8"))
    ann = load_annotations("custom", p)
    assert ann.paths == ["a.mp3", "b.mp3"] and ann.labels.tolist() == [[1], [1]] and ann.tags == ["rock"]
    mtt = tmp_path / "mtt"
    mtt.mkdir()
    (mtt / "annotations_final.csv").write_bytes(b"\xef\xbb\xbf" + (FIX / "mtt" / "annotations_final.csv").read_bytes())
    assert load_annotations("mtt", mtt).paths == load_annotations("mtt", FIX / "mtt").paths


# ---------------------------------------------------------------- embeddings and join

def test_segment_rows_are_averaged_per_track(tmp_path):
    d = tmp_path / "emb"
    x = np.arange(12, dtype=np.float32).reshape(6, 2)
    write_embeddings(d, ["a.mp3", "a.mp3", "b.mp3", "a.mp3", "b.mp3", "a.mp3"], x, segments=[0, 1, 0, 2, 1, 2])
    write_embeddings(d, ["zz.mp3"], np.full((1, 2), 99.0), name="_partial.parquet")  # not data
    emb = open_embeddings(d)
    assert emb.segment_rows and emb.dim == 2 and emb.paths == ["a.mp3", "b.mp3"]
    assert any("duplicate segment" in n for n in emb.notes)  # a.mp3 segment 2 twice: counted once
    m = emb.matrix(np.array([1, 0]))
    np.testing.assert_allclose(m[0], x[[2, 4]].mean(0))
    np.testing.assert_allclose(m[1], x[[0, 1, 3]].mean(0))
    assert describe_embeddings(emb.metadata) == {"model": "maest-30s-pw", "block": 7, "tokens": "cls+dist+avg",
                                                 "preset": "none"}


def test_a_non_finite_segment_row_is_left_out_not_the_track(tmp_path):
    d = tmp_path / "emb"
    x = np.arange(10, dtype=np.float32).reshape(5, 2)
    x[1, 0], x[4, 1] = np.nan, np.inf  # a.mp3 keeps 2 of its 3 rows; c.mp3 keeps none
    write_embeddings(d, ["a.mp3", "a.mp3", "b.mp3", "a.mp3", "c.mp3"], x, segments=[0, 1, 0, 2, 0])
    m = open_embeddings(d).matrix(np.arange(3))
    np.testing.assert_allclose(m[0], x[[0, 3]].mean(0))
    np.testing.assert_allclose(m[1], x[2])
    assert np.isnan(m[2]).all()  # c.mp3's only row is not finite: no embedding, never an inf in a mean


def test_null_embeddings_and_mixed_settings(tmp_path):
    d = tmp_path / "emb"
    d.mkdir()
    emb_col = pa.array([[1.0, 2.0], None, [5.0, 6.0]], type=pa.list_(pa.float32(), 2))
    t = pa.table({"path": ["a.mp3", "b.mp3", "c.mp3"], "root": ["/r"] * 3, "embedding": emb_col})
    pq.write_table(t.replace_schema_metadata({b"maest": json.dumps(META).encode()}), d / "p.parquet")
    emb = open_embeddings(d)
    m = emb.matrix(np.arange(3))
    np.testing.assert_array_equal(m[[0, 2]], [[1, 2], [5, 6]])
    assert np.isnan(m[1]).all()  # no usable row: NaN, left out with a note by prepare_data
    write_embeddings(d, ["d.mp3"], np.ones((1, 2)), meta={**META, "block": 11}, name="q.parquet")
    with pytest.raises(UsageError, match="different settings"):
        open_embeddings(d)


def test_join_matches_changed_extensions_and_extra_folders(tmp_path):
    ann = load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo")
    keep = ann.paths[:-3]  # 3 labelled tracks never extracted
    emb_paths = [f"audio/{p[:-4]}.low.mp3" if i % 2 else p for i, p in enumerate(keep)] + ["00/extra.mp3"]
    write_embeddings(tmp_path / "emb", emb_paths, np.zeros((len(emb_paths), 4)))
    j = join_tracks(ann, open_embeddings(tmp_path / "emb"))
    assert j.n_matched == len(keep) and j.n_labelled == len(ann.paths)
    assert j.report()["labelled_without_embedding"] == 3 and j.n_embeddings_without_label == 1
    assert j.embeddings_without_label == ["/data/audio/00/extra.mp3"]
    assert j.labels_without_embedding == ann.paths[-3:]


def test_embeddings_of_different_sizes_are_refused(tmp_path):
    """Part files of one folder with embeddings of different sizes would be reshaped into the
    wrong columns: refused, naming the files (fixed-size lists when opened, variable-length
    lists row by row when read)."""
    d = tmp_path / "fixed"
    write_embeddings(d, ["a.mp3", "b.mp3"], np.ones((2, 4)), name="part-0.parquet")
    write_embeddings(d, ["c.mp3"], np.ones((1, 6)), name="part-1.parquet")
    with pytest.raises(UsageError, match=r"different sizes: .*part-0.parquet has 4 values per row, "
                                         r".*part-1.parquet has 6"):
        open_embeddings(d)
    d = tmp_path / "variable"
    d.mkdir()
    for name, paths, vecs in (("p0.parquet", ["a.mp3", "b.mp3"], [[1.0] * 4, [2.0] * 4]),
                              ("p1.parquet", ["c.mp3"], [[3.0] * 6])):
        t = pa.table({"path": paths, "embedding": pa.array(vecs, pa.list_(pa.float32()))})
        pq.write_table(t.replace_schema_metadata({b"maest": json.dumps(META).encode()}), d / name)
    emb = open_embeddings(d)
    assert emb.dim == 4
    with pytest.raises(UsageError, match=r"p1.parquet: embeddings of 6 values, expected 4"):
        emb.matrix(np.arange(3))
    with pytest.raises(UsageError, match="p1.parquet"):  # even when none of its tracks is asked for
        emb.matrix(np.array([0, 1]))
    d = tmp_path / "ints"
    write_embeddings(d, ["a.mp3"], np.ones((1, 4)))
    pq.write_table(pa.table({"path": ["x.mp3"], "embedding": pa.array([[1, 2]], pa.list_(pa.int64()))}),
                   d / "part-00001.parquet")
    with pytest.raises(UsageError, match=r"part-00001.parquet: column 'embedding' is list<.*int64>, expected a list of floats"):
        open_embeddings(d)


def test_join_reports_key_clashes_instead_of_choosing(tmp_path):
    """Only audio extensions are ignored: `live/take.v2` and `live/take.v3` stay two tracks.
    Two labelled tracks (or two embeddings) that differ only by their audio extension are a
    clash: reported with examples, left unmatched, never one of them chosen silently."""
    rows = ["path\tsplit\ttags"]
    for i in range(12):
        rows.append(f"n/{i}.mp3\t{('train', 'validation', 'test')[i % 3]}\t{'a' if i % 2 else 'b'}")
    rows += ["live/take.v2\ttrain\ta", "live/take.v3\ttrain\tb",  # no audio extension in the labels
             "x/one.wav\ttrain\ta", "x/one.mp3\ttrain\tb",  # labelled twice, extracted once as .flac
             "y/two.ogg\ttest\ta",  # labelled once, extracted as .wav and .mp3
             "z/three.wav\ttest\ta", "z/three.mp3\ttest\tb"]  # both extracted: exact matches, no clash
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    ann = load_annotations("custom", tmp_path / "labels.tsv")
    emb_paths = ([f"n/{i}.mp3" for i in range(12)] + ["live/take.v2.wav", "live/take.v3.wav", "x/one.flac",
                 "y/two.wav", "y/two.mp3", "z/three.wav", "z/three.mp3"])
    write_embeddings(tmp_path / "emb", emb_paths, np.arange(len(emb_paths) * 2).reshape(-1, 2))
    emb = open_embeddings(tmp_path / "emb")
    j = join_tracks(ann, emb)
    got = {ann.paths[i]: emb.paths[t] for i, t in enumerate(j.track_of_label) if t >= 0}
    assert got["live/take.v2"] == "live/take.v2.wav" and got["live/take.v3"] == "live/take.v3.wav"
    assert got["z/three.wav"] == "z/three.wav" and got["z/three.mp3"] == "z/three.mp3"
    assert not {"x/one.wav", "x/one.mp3", "y/two.ogg"} & got.keys()
    report = j.report()
    assert report["key_clashes"] == 3 and report["matched"] == len(ann.paths) - 3
    text = " ".join(report["examples_key_clashes"])
    assert "'x/one.flac' matches labelled tracks 'x/one.wav', 'x/one.mp3'" in text
    assert "'y/two.ogg' matches embeddings 'y/two.wav', 'y/two.mp3'" in text
    assert report["embeddings_without_label"] == 3  # x/one.flac, y/two.wav, y/two.mp3


def test_join_that_matches_almost_nothing_is_an_error(tmp_path):
    ann = load_annotations("mtt", FIX / "mtt")
    write_embeddings(tmp_path / "emb", [f"clips/{i}.wav" for i in range(20)] + ann.paths[:2], np.zeros((22, 4)))
    with pytest.raises(UsageError) as e:
        join_tracks(ann, open_embeddings(tmp_path / "emb"))
    msg = str(e.value)
    assert "\n" not in msg and "only 2 of 33" in msg
    assert repr(ann.paths[0]) in msg and "'clips/0.wav'" in msg  # examples of both sides


# ---------------------------------------------------------------- metrics and schedule

def test_metrics_by_hand():
    y = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1]])
    s = np.array([[0.9, 0.1, 0.3], [0.8, 0.2, 0.2], [0.4, 0.3, 0.1], [0.1, 0.4, 0.0]])
    # column 0: positives {0.9, 0.4}, negatives {0.8, 0.1}: 3 of 4 pairs ordered -> 0.75;
    # ranking P N P N -> AP = (1/1 + 2/3) / 2. Columns 1 (all 0) and 2 (all 1) are excluded.
    roc, ap = per_tag_scores(y, s)
    assert roc[0] == pytest.approx(0.75) and ap[0] == pytest.approx(5 / 6)
    assert np.isnan(roc[1:]).all() and np.isnan(ap[1:]).all()
    m = macro_scores(y, s)
    assert m["roc_auc"] == pytest.approx(0.75) and m["pr_auc"] == pytest.approx(5 / 6)
    assert m["evaluable"].tolist() == [True, False, False]
    assert fast_macro_roc_auc(y, s) == pytest.approx(0.75)
    # ties count one half: positives {0.5, 0.9} vs negatives {0.5, 0.1}: (0.5 + 1 + 1 + 1) / 4
    assert fast_macro_roc_auc(np.array([[1], [0], [1], [0]]), np.array([[0.5], [0.5], [0.9], [0.1]])) == 0.875
    assert math.isnan(fast_macro_roc_auc(np.zeros((3, 2)), np.ones((3, 2))))


def test_fast_auc_equals_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    y = (rng.random((300, 7)) < 0.2).astype(int)
    s = np.round(rng.random((300, 7)) + y * 0.3, 1)  # many ties
    expected = np.mean([roc_auc_score(y[:, c], s[:, c]) for c in range(7)])
    assert fast_macro_roc_auc(y, s) == pytest.approx(expected, abs=1e-12)


def test_column_stats_in_blocks():
    x = np.random.default_rng(0).standard_normal((1000, 7)).astype(np.float32) * 5 + 100
    mean, std = column_stats(x, chunk=64)
    np.testing.assert_allclose(mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.astype(np.float64).std(0), rtol=1e-10)


def test_learning_rate_schedule():
    """The authors' probe (MAEST ex_tl.py): LambdaLR stepped per epoch with PaSST's
    exp_warmup_linear_down(10, E - 10, 10, 1e-7). Values worked out from its definition."""
    p = Protocol()
    assert (p.warmup_epochs, p.hold_epochs, p.lr_last_factor, p.weight_decay) == (10, 0, 1e-7, 1e-3)
    f = [lr_factor(e, 60, p) for e in range(61)]
    assert f[0] == pytest.approx(math.exp(-5 * 0.95 ** 2)) == pytest.approx(0.010970, abs=1e-6)  # epoch clipped to 0.5
    assert f[1] == pytest.approx(math.exp(-5 * 0.9 ** 2)) and f[5] == pytest.approx(math.exp(-1.25))
    assert f[9] == pytest.approx(math.exp(-0.05))
    assert f[10] == 1.0  # e <= start_rampdown: the one epoch at max_lr
    last = 1e-7
    assert f[11] == pytest.approx(last + (1 - last) * 49 / 50) and f[35] == pytest.approx(last + (1 - last) * 25 / 50)
    assert f[59] == pytest.approx(last + (1 - last) / 50)  # the last epoch of a 60-epoch run
    assert f[60] == last  # one past the end
    assert all(a < b for a, b in zip(f[:10], f[1:11])) and all(a > b for a, b in zip(f[10:60], f[11:61]))
    # hold_epochs keeps max_lr before the decay, which then starts at warmup + hold
    held = Protocol(hold_epochs=5)
    g = [lr_factor(e, 30, held) for e in range(30)]
    assert g[:10] == f[:10] and g[10:16] == [1.0] * 6
    assert g[16] == pytest.approx(last + (1 - last) * 14 / 15) and g[29] == pytest.approx(last + (1 - last) / 15)
    # the run sets it once per epoch, as LambdaLR does (recorded per epoch in each grid point)
    x, y, splits = linear_task(n=300, dim=8, n_tags=2)
    r = run(make_data(x, y, splits), 100, 0.5, 1e-3, 12, 0, Protocol(hidden=16, warmup_epochs=4, hold_epochs=2))
    assert r.lr_history == pytest.approx([1e-3 * lr_factor(e, 12, Protocol(warmup_epochs=4, hold_epochs=2))
                                          for e in range(12)])
    name, proto, configs = load_grid("paper")
    assert len(configs) == 3 * 6 * 2 * 4 and proto == Protocol()
    from maest_cli.io.config import read_toml

    assert read_toml("probe.toml")["protocol"] == Protocol().to_dict()  # the shipped table, spelled out
    assert load_grid("none")[2] == [ProbeConfig(128, 60, 0.5, 1e-4)]
    with pytest.raises(UsageError, match="--grid 'huge'"):
        load_grid("huge")


@pytest.mark.parametrize("body, message", [
    ('batch_size = [64]\nepochs = [30]\ndropout = [0.5]\nlr = ["fast"]\n', r"lr must be a non-empty list of numbers"),
    ('batch_size = [64]\nepochs = [30]\ndropout = [0.5]\nlr = 1e-4\n', r"lr must be a non-empty list"),
    ('batch_size = [64]\nepochs = [30]\ndropout = [0.5]\n', r"needs lists .* \(no lr\)"),
    ('batch_size = [64.5]\nepochs = [30]\ndropout = [0.5]\nlr = [1e-4]\n', r"batch_size must be whole numbers"),
    ('batch_size = [64]\nepochs = [8]\ndropout = [0.5]\nlr = [1e-4]\n', r"8 epochs leave no decay"),
    ('batch_size = [64]\nepochs = [30]\ndropout = [0.5]\nlr = [1e-4]\n[protocol]\nhidden = "big"\n',
     r"hidden, warmup_epochs, hold_epochs are integers"),
    ('batch_size = [64]\nepochs = [30]\ndropout = [0.5]\nlr = [1e-4]\n[protocol]\nwarmup = 3\n',
     r"invalid \[protocol\]"),
    ('lr = [1e-4', r"invalid TOML"),
])
def test_bad_grid_files_are_config_errors(tmp_path, body, message):
    p = tmp_path / "grid.toml"
    p.write_text(body)
    with pytest.raises(ConfigError, match=message):
        load_grid(str(p))
    r = CliRunner().invoke(app, ["probe", "custom", "--embeddings", str(tmp_path), "--dataset-root",
                                 str(FIX / "custom" / "labels.csv"), "--grid", str(p)])
    assert r.exit_code == 2 and "grid.toml" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------- training

def test_runs_are_reproducible_and_independent():
    """A grid point is one run of its own: the same seed gives the same run whatever ran
    before it (resume per grid point relies on it), another seed another one."""
    x, y, splits = linear_task(n=600, dim=16, n_tags=3)
    data = make_data(x, y, splits)
    proto = Protocol(hidden=32, warmup_epochs=2)
    a = run(data, 50, 0.5, 1e-3, 6, 3, proto)
    run(data, 50, 0.5, 1e-2, 4, 7, proto)  # something else in between
    b = run(data, 50, 0.5, 1e-3, 6, 3, proto)
    c = run(data, 50, 0.5, 1e-3, 6, 4, proto)
    assert a.val_history == b.val_history and a.loss_history == b.loss_history and len(a.val_history) == 6
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    assert c.loss_history != a.loss_history
    assert 1 <= a.best_epoch <= 6 and a.val_roc_auc == max(a.val_history)


@pytest.mark.parametrize("random_labels", [False, True])
def test_probe_learns_linear_tags_and_not_random_ones(tmp_path, random_labels):
    x, y, splits = linear_task(random_labels=random_labels, seed=int(random_labels))
    labels, emb = write_custom_task(tmp_path, x, y, splits)
    res = probe("custom", dataset_root=labels, embeddings=emb, grid=tiny_grid(tmp_path, epochs=(12,)), seeds=2,
                device="cpu", out=tmp_path / "out")
    auc = res["test"]["roc_auc"]["mean"]
    if random_labels:
        assert abs(auc - 0.5) < 0.08
    else:
        assert auc > 0.95 and res["test"]["pr_auc"]["mean"] > 0.8
    assert res["test"]["n_seeds"] == 2 and len(res["test"]["roc_auc"]["values"]) == 2
    # `rare` is positive in train only: excluded from validation and test, reported, no crash
    assert res["excluded_tags"]["test"] == ["rare"] and res["excluded_tags"]["validation"] == ["rare"]
    assert "both macro averages" in res["excluded_tags"]["reason"]
    assert res["test"]["macro_average"].startswith("mean over the tags present in the split")
    rare = next(t for t in res["per_tag"] if t["tag"] == "rare")
    assert rare["test_roc_auc"] is None and rare["n_positive_train"] > 0


def test_cli_mtg_jamendo_split_1(tmp_path):
    """--split N end to end: the split-N files are read, recorded, and --split is refused
    for a dataset without numbered splits."""
    ann = load_annotations("mtg-jamendo-genre", FIX / "mtg-jamendo", split=1)
    rng = np.random.default_rng(0)
    write_embeddings(tmp_path / "emb", [f"audio/{p[:-4]}.low.mp3" for p in ann.paths],
                     rng.standard_normal((len(ann.paths), 8)) + ann.labels[:, :1])
    out = tmp_path / "res"
    common = ["--embeddings", str(tmp_path / "emb"), "--grid", tiny_grid(tmp_path, epochs=(4,), batch=(8,)),
              "--seeds", "1", "--device", "cpu", "--out", str(out)]
    r = CliRunner().invoke(app, ["probe", "mtg-jamendo-genre", "--dataset-root", str(FIX / "mtg-jamendo"),
                                 "--split", "1", *common])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["dataset"]["split"] == 1 and all("/split-1/" in f for f in res["dataset"]["files"])
    assert res["dataset"]["tracks"] == {"train": 21, "validation": 4, "test": 4}
    assert "genre---funk" in [t["tag"] for t in res["per_tag"]]
    assert [f["sha256"] for f in res["dataset"]["label_files"]] == [
        sha256_of(FIX / f"mtg-jamendo/data/splits/split-1/autotagging_genre-{s}.tsv")
        for s in ("train", "validation", "test")]
    r = CliRunner().invoke(app, ["probe", "mtt", "--dataset-root", str(FIX / "mtt"), "--split", "1", *common])
    assert r.exit_code == 2 and "--split 1: only the MTG-Jamendo datasets" in r.output


def sha256_of(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_selection_uses_validation_only(tmp_path):
    """Inverting the test labels turns the best test setting into the worst. The selected
    setting and every validation score must not move; only the test scores may."""
    x, y, splits = linear_task(n=1500, seed=4)
    grid = tiny_grid(tmp_path, lrs=(1e-5, 3e-4, 1e-2), dropouts=(0.5,), epochs=(6, 9))
    runs = []
    for name, flip in (("a", False), ("b", True)):
        yy = y.copy()
        if flip:
            yy[splits == "test"] = 1 - yy[splits == "test"]
        d = tmp_path / name
        d.mkdir()
        labels, emb = write_custom_task(d, x, yy, splits, rare_train_tag=False)
        runs.append(probe("custom", dataset_root=labels, embeddings=emb, grid=grid, seeds=1, device="cpu"))
    a, b = runs
    assert a["selected"]["key"] == b["selected"]["key"]
    assert [p["val_roc_auc_per_epoch"] for p in a["grid"]["points"]] == \
        [p["val_roc_auc_per_epoch"] for p in b["grid"]["points"]]
    assert b["test"]["roc_auc"]["mean"] == pytest.approx(1 - a["test"]["roc_auc"]["mean"], abs=1e-9)
    # the check has teeth: scored on the inverted test labels, another setting would have won
    data = make_data(x, np.where((splits == "test")[:, None], 1 - y, y), splits)
    _, proto, configs = load_grid(grid)
    test_auc = {}
    for c in configs:
        r = train_run(data, c, 0, proto, torch.device("cpu"))
        test_auc[c.key()] = fast_macro_roc_auc(data.splits["test"].y_np, logits_of(r.state, data.splits["test"].x))
    assert max(test_auc, key=test_auc.get) != b["selected"]["key"]


def test_diverging_runs_are_reported_not_fatal(tmp_path):
    x, y, splits = linear_task(n=600, seed=1)
    labels, emb = write_custom_task(tmp_path, x, y, splits)
    res = probe("custom", dataset_root=labels, embeddings=emb, grid=tiny_grid(tmp_path, lrs=(3e-3, 1e30), epochs=(6,)),
                seeds=1, device="cpu")
    bad = res["grid"]["points"][1]
    assert bad["diverged"] and bad["val_roc_auc"] is None and bad["best_epoch"] == 0
    assert res["selected"]["lr"] == 3e-3
    with pytest.raises(ProbeError, match="every run of the grid diverged"):
        probe("custom", dataset_root=labels, embeddings=emb, grid=tiny_grid(tmp_path, lrs=(1e30,), epochs=(3,)),
              seeds=1, device="cpu")


def test_outputs_weights_resume_and_compare(tmp_path):
    x, y, splits = linear_task(n=1200, seed=2)
    labels, emb = write_custom_task(tmp_path, x, y, splits)
    grid = tiny_grid(tmp_path, lrs=(3e-4, 1e-3), epochs=(6,))
    out = tmp_path / "out"
    full = probe("custom", dataset_root=labels, embeddings=emb, grid=grid, seeds=1, device="cpu", out=out,
                 threads=2)
    assert torch.get_num_threads() == 1  # --threads does not leak into the caller's process
    assert full["environment"]["threads"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["probe.safetensors", "results.json"]  # no temp/state left
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(full))
    assert len(saved["grid"]["points"]) == 2 and all("val_roc_auc" in p for p in saved["grid"]["points"])
    assert saved["model"] == "maest-30s-pw" and saved["block"] == 7 and saved["preset"] == "none"
    assert saved["dataset"]["join"]["matched"] == len(x)
    assert len(saved["per_tag"]) == 6 and saved["embeddings"]["dim"] == 32
    # the saved probe holds the train-split statistics and reproduces the test score from raw embeddings
    trained = load_probe(out)
    train = splits == "train"
    np.testing.assert_allclose(trained.mean.numpy(), x[train].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(trained.std.numpy(), x[train].std(0), rtol=1e-5)
    assert trained.tags == ["rare"] + [f"tag{c}" for c in range(5)]
    test = splits == "test"
    yt = np.concatenate([np.zeros((len(y), 1), np.uint8), y], 1)[test]  # `rare` is never positive in test
    assert macro_scores(yt, trained.predict(x[test]))["roc_auc"] == pytest.approx(full["test"]["roc_auc"]["mean"],
                                                                                  abs=1e-6)
    # interrupted after the first group of runs: the rerun skips it and ends the same
    out2 = tmp_path / "out2"
    calls = []

    def stop_after_first_group(msg):
        calls.append(msg)
        if msg.startswith("[1/2]"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        probe("custom", dataset_root=labels, embeddings=emb, grid=grid, seeds=1, device="cpu", out=out2,
              log=stop_after_first_group)
    state_dir = out2 / ".probe-state"
    assert (state_dir / "state.json").is_file() and (state_dir / "best.safetensors").is_file()
    # the state of another tool version is not reused, nor silently thrown away
    import maest_cli.probing.run as probe_module

    real_version = probe_module._tool_version
    probe_module._tool_version = lambda: "0.0.0-other"
    try:
        with pytest.raises(UsageError, match="interrupted probe of other inputs"):
            probe("custom", dataset_root=labels, embeddings=emb, grid=grid, seeds=1, device="cpu", out=out2)
    finally:
        probe_module._tool_version = real_version
    # killed between writing the best weights and state.json: the weights do not match the
    # checksum state.json gives, so they are not trusted (retrained); finished points are kept
    saved_state = json.loads((state_dir / "state.json").read_text())
    assert saved_state["best_key"] and len(saved_state["best_sha256"]) == 64
    from safetensors.torch import load_file, save_file

    w = load_file(str(state_dir / "best.safetensors"))
    save_file({k: torch.zeros_like(v) for k, v in w.items()}, str(state_dir / "best.safetensors"))
    logs = []
    again = probe("custom", dataset_root=labels, embeddings=emb, grid=grid, seeds=1, device="cpu", out=out2,
                  log=logs.append)
    assert any(m.startswith("resuming: 1 grid points") for m in logs)
    assert not any(m.startswith("[1/2]") for m in logs)
    assert again["grid"]["points"] == full["grid"]["points"] and again["test"] == full["test"]
    assert not (out2 / ".probe-state").exists()
    # results.json names the weights next to it by checksum
    from maest_cli.io.artefacts import sha256_file

    assert again["weights_sha256"] == sha256_file(out2 / "probe.safetensors")
    # a state is only reused for the very same inputs: touching an embeddings file invalidates it
    from maest_cli.probing.run import _fingerprint

    part = next(emb.glob("*.parquet"))
    before = _fingerprint("x", [part])
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 1000))
    assert _fingerprint("x", [part]) != before
    # --compare
    r = CliRunner().invoke(app, ["probe", "--compare", str(out / "results.json"), str(out2 / "results.json")])
    assert r.exit_code == 0, r.output
    assert "comparison" in r.output and "+0.0" in r.output
    r = CliRunner().invoke(app, ["probe", "--compare", str(labels)])
    assert r.exit_code == 2 and "not JSON" in r.output
    for broken, why in (({k: v for k, v in saved.items() if k != "dataset"}, "no dataset.name"),
                        ({**saved, "test": {"roc_auc": 0.9}}, "test.roc_auc is not")):
        (tmp_path / "broken.json").write_text(json.dumps(broken))
        r = CliRunner().invoke(app, ["probe", "--compare", str(out / "results.json"), str(tmp_path / "broken.json")])
        assert r.exit_code == 2 and "broken.json: incomplete" in r.output and why in r.output, r.output


def test_results_of_other_inputs_are_never_replaced(tmp_path, monkeypatch):
    """Probing embeddings A then B of one dataset: the default folders differ; pointing B at
    A's folder is refused unless --overwrite; the same inputs again simply remake them."""
    monkeypatch.chdir(tmp_path)
    x, y, splits = linear_task(n=400, dim=8, seed=8)
    labels, emb_a = write_custom_task(tmp_path, x, y, splits)
    emb_b = write_embeddings(tmp_path / "emb-b", [f"{i % 100:02d}/{i}.mp3" for i in range(len(x))], x[:, ::-1])
    grid = tiny_grid(tmp_path, epochs=(4,))
    common = ["--dataset-root", str(labels), "--grid", grid, "--seeds", "1", "--device", "cpu"]
    runner = CliRunner()
    for emb in (emb_a, emb_b):
        r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb), *common])
        assert r.exit_code == 0, r.output
    a_dir, b_dir = tmp_path / "probe-custom-emb", tmp_path / "probe-custom-emb-b"
    assert (a_dir / "results.json").is_file() and (b_dir / "results.json").is_file()
    before = (a_dir / "results.json").read_bytes(), (a_dir / "probe.safetensors").read_bytes()
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb_b), *common, "--out", str(a_dir)])
    assert r.exit_code == 2 and "holds the results of another probe" in r.output and "--overwrite" in r.output
    assert ((a_dir / "results.json").read_bytes(), (a_dir / "probe.safetensors").read_bytes()) == before
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb_a), *common, "--seeds", "2"])
    assert r.exit_code == 2, r.output  # other seeds: other results, refused too
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb_a), *common])
    assert r.exit_code == 0, r.output  # the same inputs: made again
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb_b), *common, "--out", str(a_dir),
                            "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads((a_dir / "results.json").read_text())["embeddings"]["dir"] == str(emb_b)


def test_cli_probe_and_errors(tmp_path):
    x, y, splits = linear_task(n=800, seed=5)
    labels, emb = write_custom_task(tmp_path, x, y, splits)
    grid = tiny_grid(tmp_path, epochs=(6,))
    runner = CliRunner()
    out = tmp_path / "res"
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb), "--dataset-root", str(labels),
                            "--grid", grid, "--seeds", "2", "--device", "cpu", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "maest-30s-pw" in r.output and "ROC-AUC" in r.output and "±" in r.output
    assert (out / "results.json").is_file() and (out / "probe.safetensors").is_file()
    base = ["--embeddings", str(emb), "--dataset-root", str(labels), "--grid", grid, "--out", str(out)]
    r = runner.invoke(app, ["probe", "msd", *base])
    assert r.exit_code == 2 and "unknown dataset 'msd'" in r.output
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(emb), "--dataset-root", str(tmp_path / "no.tsv")])
    assert r.exit_code == 2 and "no.tsv" in r.output
    r = runner.invoke(app, ["probe", "mtt", "--embeddings", str(emb), "--dataset-root", str(FIX / "mtt")])
    assert r.exit_code == 2 and "labelled tracks (mtt) have an embedding" in r.output
    r = runner.invoke(app, ["probe", "custom", *base, "--grid", "huge"])
    assert r.exit_code == 2
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.parquet").write_bytes(b"not parquet at all")
    r = runner.invoke(app, ["probe", "custom", "--embeddings", str(tmp_path / "broken"), "--dataset-root",
                            str(labels), "--grid", grid, "--out", str(out)])
    assert r.exit_code == 1 and "broken" in r.output


# ---------------------------------------------------------------- --audio-root (extract first)

def test_audio_root_runs_extract_into_the_cache(tmp_path, monkeypatch):
    """A stand-in for `maest_cli.embed.extraction.extract` with its agreed signature: probe must call it
    on the audio root with the paper's pooling, then read what it wrote."""
    x, y, splits = linear_task(n=800, seed=6)
    paths = [f"{i % 100:02d}/{i}.wav" for i in range(len(x))]
    labels, _ = write_custom_task(tmp_path, x, y, splits, ext=".wav")
    audio = tmp_path / "audio"
    audio.mkdir()
    calls = []
    from maest_cli.embed.extraction import ExtractSummary

    failures = [0]

    def fake_extract(paths_arg, out, spec, *, workers=1, batch_size=1, threads=None, extensions=None,
                     overwrite=False, shard=None, progress=True, registry=None, files_per_part=512):
        calls.append(dict(paths=paths_arg, out=out, model=spec.model, preset=spec.preset, block=spec.block,
                          tokens=spec.tokens, pool=spec.pool, hop=spec.hop, overwrite=overwrite))
        write_embeddings(Path(out), paths, x, root=str(paths_arg[0]),
                         meta={"model": spec.model, "block": spec.block, "tokens": list(spec.tokens),
                               "preset": spec.preset})
        return ExtractSummary(out=out, n_files=len(paths) + failures[0], n_done=len(paths), n_failed=failures[0],
                              errors_file=str(Path(out) / "errors.tsv") if failures[0] else None)

    monkeypatch.setattr("maest_cli.probing.run.extract", fake_extract)
    r = CliRunner().invoke(app, ["probe", "custom", "--audio-root", str(audio), "--dataset-root", str(labels),
                                 "--grid", tiny_grid(tmp_path, epochs=(6,)), "--seeds", "1", "--device", "cpu",
                                 "--out", str(tmp_path / "res"), "--model", "tiny.safetensors", "--block", "5"])
    assert r.exit_code == 0, r.output
    assert calls == [dict(paths=[str(audio)], out=str(tmp_path / "res" / "embeddings"), model="tiny.safetensors",
                          preset="none", block=5, tokens=("cls", "dist", "avg"), pool="track", hop="half",
                          overwrite=False)]
    res = json.loads((tmp_path / "res" / "results.json").read_text())
    assert res["model"] == "tiny.safetensors" and res["block"] == 5
    assert res["dataset"]["join"]["matched"] == len(x)
    assert res["extract_failed"] == 0 and res["embeddings"]["extract"]["n_done"] == len(x)
    # files extract could not embed: the probe runs on the others, records them, and exits 1
    failures[0] = 2
    r = CliRunner().invoke(app, ["probe", "custom", "--audio-root", str(audio), "--dataset-root", str(labels),
                                 "--grid", tiny_grid(tmp_path, epochs=(6,)), "--seeds", "1", "--device", "cpu",
                                 "--out", str(tmp_path / "res2")])
    assert r.exit_code == 1, r.output
    assert "2 files failed" in r.output and "2 audio files could not be embedded" in r.output
    res = json.loads((tmp_path / "res2" / "results.json").read_text())
    assert res["extract_failed"] == 2 and res["embeddings"]["extract"]["n_failed"] == 2
    assert (tmp_path / "res2" / "probe.safetensors").is_file()


def test_audio_root_with_the_real_extract(tmp_path, tiny_model_file):
    """End to end with the real `maest extract` (probing.run imports it) and a tiny random model."""
    from conftest import write_audio

    audio = tmp_path / "audio"
    rows = ["path\tsplit\ttags"]
    for i in range(12):
        (audio / f"{i % 3}").mkdir(parents=True, exist_ok=True)
        write_audio(audio / f"{i % 3}" / f"{i}.wav", 2.0, sr=16000, seed=i)
        split = "train" if i < 6 else "validation" if i < 9 else "test"
        rows.append(f"{i % 3}/{i}.mp3\t{split}\t{'a' if i % 2 else 'b'}")
    (tmp_path / "labels.tsv").write_text("\n".join(rows) + "\n")
    (audio / "0" / "broken.wav").write_bytes(b"RIFF\x00\x01\x00\x00WAVEfmt not really")  # fails to decode
    res = probe("custom", dataset_root=tmp_path / "labels.tsv", audio_root=audio, out=tmp_path / "res",
                grid=tiny_grid(tmp_path, epochs=(3,), batch=(4,)), seeds=1, device="cpu",
                spec=InferenceSpec(model=str(tiny_model_file), block=2, device="cpu"),
                extract_options={"progress": False})
    assert res["dataset"]["join"]["matched"] == 12 and res["extract_failed"] == 1
    assert res["embeddings"]["dim"] == 3 * 64 and res["block"] == 2


def test_probe_bench_runs_the_probe_on_its_synthetic_dataset(tmp_path):
    out = tmp_path / "bench.json"
    grid = tiny_grid(tmp_path, lrs=(3e-3,), epochs=(20,))
    r = CliRunner().invoke(app, ["bench", "probe", "--tracks", "1000", "--dim", "16", "--tags", "4", "--grid", grid,
                                 "--seeds", "1", "--work", str(tmp_path / "w"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["tracks"] == 1000 and report["grid_points"] == 1 and report["timing_s"]["total"] > 0
    assert report["test_roc_auc"]["mean"] > 0.6  # the tags follow the embeddings: the probe learns them
