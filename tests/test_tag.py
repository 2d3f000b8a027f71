"""maest tag: labels by name per track, on the extract pipeline (cache folder, resume, --from), on
tiny random models with Discogs-style labels and generated audio, and maest-tiny on a demo clip."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from conftest import write_audio
from typer.testing import CliRunner

import maest_cli
from maest_cli.catalogue.cached import cache_folder, cached_extract
from maest_cli.catalogue.tags import label_style, tag, top_tags
from maest_cli.cli.app import app
from maest_cli.embed.extraction import extract
from maest_cli.embed.spec import InferenceSpec
from maest_cli.errors import UsageError
from maest_cli.io.download import cache_dir
from maest_cli.models.checkpoints import save_checkpoint
from maest_cli.models.maest import MAEST, tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
DISCOGS = ["Rock---Punk", "Rock---Grunge", "Rock---Indie Rock", "Electronic---Techno", "Electronic---House",
           "Jazz---Bop", "Jazz---Swing", "Folk, World, & Country---Fado", "Pop---Ballad", "Pop---Synth-pop"]


@pytest.fixture(scope="module")
def discogs_tiny(tmp_path_factory) -> str:
    """A tiny random MAEST whose 10 outputs carry Discogs-style "Genre---Style" names."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "tiny-discogs.safetensors"
    return str(save_checkpoint(path, MAEST(tiny_config(frames=316, n_classes=10)), labels=DISCOGS,
                               extra={"name": "tiny-discogs"}))


@pytest.fixture(scope="module")
def music(tmp_path_factory) -> Path:
    """Two short clips (one longer than a 5 s segment: several segments averaged) and a bad file."""
    d = tmp_path_factory.mktemp("music")
    write_audio(d / "a.wav", 2.0, seed=1)
    write_audio(d / "b.ogg", 7.0, seed=2)
    (d / "bad.mp3").write_bytes(b"this is not audio")
    return d


def run_options():
    """Decoding in the process and the torch engine: the fastest for tiny models (no OpenVINO conversion)."""
    return {"workers": 0, "progress": False, "engine": "torch"}


def mean_scores(dataset) -> dict[str, np.ndarray]:
    """Per file, the mean of its rows' scores, read straight from the Parquet files."""
    t = pads.dataset(str(dataset)).to_table(columns=["root", "path", "scores"]).to_pylist()
    rows: dict[str, list] = {}
    for r in t:
        rows.setdefault(f"{r['root']}/{r['path']}", []).append(r["scores"])
    return {k: np.mean(np.asarray(v, np.float64), axis=0) for k, v in rows.items()}


# ------------------------------------------------------------------ the ranking rule

def test_top_labels_then_threshold_and_the_genre_summary():
    act = np.array([0.10, 0.80, 0.05, 0.60, 0.70, 0.20, 0.02, 0.30, 0.15, 0.01], np.float32)
    sep, group_title, name_title = label_style(DISCOGS)
    assert (sep, group_title, name_title) == ("---", "genre", "style")
    tags, groups = top_tags(act, DISCOGS, top=3, threshold=0.0, sep=sep)
    assert [t.label for t in tags] == ["Rock---Grunge", "Electronic---House", "Electronic---Techno"]
    assert [(t.group, t.name) for t in tags] == [("Rock", "Grunge"), ("Electronic", "House"), ("Electronic", "Techno")]
    # a genre's activation is its strongest style's, genres ranked by it, top 3 of them
    assert [(g.group, g.name, round(g.activation, 2)) for g in groups] == [
        ("Rock", "Grunge", 0.8), ("Electronic", "House", 0.7), ("Folk, World, & Country", "Fado", 0.3)]
    tags, groups = top_tags(act, DISCOGS, top=5, threshold=0.65, sep=sep)  # top 5, then the weak ones dropped
    assert [t.name for t in tags] == ["Grunge", "House"] and [g.group for g in groups] == ["Rock", "Electronic"]
    tags, groups = top_tags(act, DISCOGS, top=2, threshold=0.9, sep=sep)
    assert tags == [] and groups == []
    # other label kinds: maest-tiny's "facet:value" tags, and plain names (no summary)
    assert label_style(["era:folk", "instrument:guitar"])[1:] == ("facet", "value")
    assert label_style(["tag0", "Rock---Punk"]) == (None, None, "label")
    tags, groups = top_tags(act[:3], ["x", "y", "z"], top=2, threshold=0.0, sep=None)
    assert [(t.label, t.group, t.name) for t in tags] == [("y", None, "y"), ("x", None, "x")] and groups == []


# ------------------------------------------------------------------ from audio, resume, --from

def test_tag_audio_resume_and_from_dataset(music, discogs_tiny):
    table = tag([music], model=discogs_tiny, top=4, **run_options())
    # the cache folder is named by the inputs and the spec, under the user cache
    spec = InferenceSpec(model=discogs_tiny, scores=True)
    assert Path(table.dataset) == cache_folder([music], spec, cache_dir() / "tags")
    assert table.model == "tiny-discogs" and (table.group_title, table.name_title) == ("genre", "style")
    assert [Path(t.path).name for t in table.tracks] == ["a.wav", "b.ogg"]
    assert [(Path(f.path).name, f.stage) for f in table.failures] == [("bad.mp3", "decode")]
    assert table.exit_code == 1 and table.summary.n_done == 2
    # the activations are the mean over the file's segments, as the dataset holds them; strongest first
    means = mean_scores(table.dataset)
    for t in table.tracks:
        act = means[t.path]
        assert [g.label for g in t.labels] == [DISCOGS[i] for i in np.argsort(-act)[:4]]
        assert np.allclose([g.activation for g in t.labels], np.sort(act)[::-1][:4], atol=1e-6)
        assert [g.activation for g in t.groups] == sorted((g.activation for g in t.groups), reverse=True)
        assert t.groups[0].label == t.labels[0].label  # the best genre holds the best style

    again = tag([music], model=discogs_tiny, top=4, **run_options())  # a rerun skips the files done
    assert (again.summary.n_done, again.summary.n_skipped, again.summary.n_failed) == (0, 2, 1)
    assert again.tracks == table.tracks and again.dataset == table.dataset

    read = tag(from_dataset=table.dataset, top=4)  # the dataset itself: same tags, its failure listed
    assert read.tracks == table.tracks and read.summary is None
    assert [Path(f.path).name for f in read.failures] == ["bad.mp3"]

    # tracks are those under the inputs now: a subfolder's tag of the same dataset via --out
    out = Path(table.dataset)
    one = tag([music / "b.ogg"], model=discogs_tiny, top=4, out=out, **run_options())
    assert [Path(t.path).name for t in one.tracks] == ["b.ogg"] and not one.failures


def test_segment_rows_are_averaged_per_track(music, discogs_tiny, tmp_path):
    extract([music / "b.ogg"], tmp_path / "seg", model=discogs_tiny, scores=True, pool="segment", **run_options())
    extract([music / "b.ogg"], tmp_path / "trk", model=discogs_tiny, scores=True, **run_options())
    seg, trk = tag(from_dataset=tmp_path / "seg", top=10), tag(from_dataset=tmp_path / "trk", top=10)
    assert pads.dataset(str(tmp_path / "seg")).count_rows() > 1
    assert [g.label for g in seg.tracks[0].labels] == [g.label for g in trk.tracks[0].labels]
    assert np.allclose([g.activation for g in seg.tracks[0].labels], [g.activation for g in trk.tracks[0].labels],
                       atol=1e-6)


def test_cached_extract_resumes_and_redoes_a_stale_cache(music, discogs_tiny, tmp_path):
    model = tmp_path / "tiny-discogs.safetensors"
    model.write_bytes(Path(discogs_tiny).read_bytes())
    spec = InferenceSpec(model=str(model), scores=True)
    out, s = cached_extract([music / "a.wav"], spec, cache_root=tmp_path / "cache", **run_options())
    assert out.parent == tmp_path / "cache" and out.name.startswith("a.wav-tiny-discogs-") and s.n_done == 1
    assert cache_folder([music / "a.wav"], spec.replace(engine="torch", device="cpu"), tmp_path / "cache") == out
    assert cache_folder([music / "a.wav"], spec.replace(preset="fast"), tmp_path / "cache") != out
    out2, s = cached_extract([music / "a.wav"], spec, cache_root=tmp_path / "cache", **run_options())
    assert out2 == out and (s.n_done, s.n_skipped) == (0, 1)
    # the same file name now holds other weights: the cache is stale and is made again
    torch.manual_seed(2)
    save_checkpoint(model, MAEST(tiny_config(frames=316, n_classes=10)), labels=DISCOGS, extra={"name": "x"})
    out3, s = cached_extract([music / "a.wav"], spec, cache_root=tmp_path / "cache", **run_options())
    assert out3 == out and s.n_done == 1 and "extracted again" in s.warnings[0]


def test_no_scores_and_no_labels_are_usage_errors(music, discogs_tiny, tmp_path):
    extract([music / "a.wav"], tmp_path / "plain", model=discogs_tiny, **run_options())
    with pytest.raises(UsageError, match="no scores"):
        tag(from_dataset=tmp_path / "plain")
    torch.manual_seed(0)
    unlabelled = save_checkpoint(tmp_path / "nolabels.safetensors", MAEST(tiny_config(frames=316, n_classes=4)))
    with pytest.raises(UsageError, match="no label names"):
        tag([music / "a.wav"], model=str(unlabelled), **run_options())
    assert not (cache_dir() / "tags").exists()  # refused before anything was embedded
    for bad in ({"top": 0}, {"threshold": 1.5}):
        with pytest.raises(UsageError):
            tag([music / "a.wav"], model=discogs_tiny, **bad)


# ------------------------------------------------------------------ the command

def test_cli_json_and_csv_give_the_values_of_the_table(music, discogs_tiny):
    api = tag([music], model=discogs_tiny, top=3, threshold=0.1, **run_options())
    r = runner.invoke(app, ["tag", str(music), "--model", discogs_tiny, "--top", "3", "--threshold", "0.1",
                            "--format", "json", "--workers", "0", "--quiet"])
    assert r.exit_code == 1, r.output  # the bad file
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error: ")]
    assert len(errors) == 1 and "bad.mp3" in errors[0], r.stderr
    parsed = json.loads(r.stdout)
    assert parsed["tracks"] == json.loads(api.to_json())["tracks"]
    assert [[(g["label"], g["activation"]) for g in t["labels"]] for t in parsed["tracks"]] == \
        [[(g.label, g.activation) for g in t.labels] for t in api.tracks]

    r = runner.invoke(app, ["tag", "--from", api.dataset, "--top", "3", "--threshold", "0.1", "--format", "csv"])
    assert r.exit_code == 1 and len([x for x in r.stderr.splitlines() if x.startswith("maest: error:")]) == 1
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [(x["path"], x["kind"], x["label"], x["group"], x["name"], float(x["activation"])) for x in rows] == \
        [(x["path"], x["kind"], x["label"], x["group"], x["name"], x["activation"]) for x in api.rows()]

    r = runner.invoke(app, ["tag", str(music / "b.ogg"), "--model", discogs_tiny, "--workers", "0"])
    assert r.exit_code == 0, r.output
    best = api.tracks[1].labels[0]
    assert "b.ogg" in r.stdout and "style" in r.stdout and "genre summary" in r.stdout
    assert best.name in r.stdout and f"{best.activation:.3f}" in r.stdout
    assert "1 tracks tagged" in r.stderr


def test_maest_tiny_tags_a_demo_clip_sensibly(tmp_path):
    """The bundled model on a choir clip of the demo corpus it never heard in training: voices first."""
    table = maest_cli.tag(REPO / "examples" / "music" / "monteverdi-madrigals-madrigal.3.2-r3.ogg",
                          model="maest-tiny", top=3, out=tmp_path / "tags", **run_options())
    (track,) = table.tracks
    assert (table.group_title, table.name_title) == ("facet", "value")
    assert {"family:voices", "instrument:choir"} <= {g.label for g in track.labels}
    assert {g.group for g in track.groups} >= {"family", "instrument"}


def test_when_every_file_fails_the_failures_are_the_answer(music, discogs_tiny):
    table = tag([music / "bad.mp3"], model=discogs_tiny, **run_options())
    assert table.tracks == [] and [Path(f.path).name for f in table.failures] == ["bad.mp3"] and table.exit_code == 1
    assert json.loads(table.to_json())["failures"][0]["stage"] == "decode"
    assert tag(from_dataset=table.dataset).failures == table.failures  # an extract folder with no rows yet


def test_a_file_replaced_under_its_name_is_tagged_anew(discogs_tiny, tmp_path):
    """The cache folder of a file named as input is keyed by its size and modification time too:
    other audio under the same name is embedded again, not answered from the old rows."""
    import os

    clip = tmp_path / "clip.wav"
    write_audio(clip, 2.0, seed=1)
    before = tag([clip], model=discogs_tiny, top=10, **run_options())
    write_audio(clip, 3.0, seed=9)
    st = os.stat(clip)
    os.utime(clip, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = tag([clip], model=discogs_tiny, top=10, **run_options())
    assert after.summary.n_done == 1 and after.dataset != before.dataset
    assert after.tracks[0].labels != before.tracks[0].labels
    assert np.allclose(sorted(g.activation for g in after.tracks[0].labels),
                       sorted(mean_scores(after.dataset)[str(clip)]), atol=1e-6)
