"""`maest probe DATASET` with nothing else: a dataset laid out as `maest datasets download` leaves it
(MTT's real folder layout and annotations_final.csv columns, MTG-Jamendo's split files and audio-low
names), embedded with a tiny random model, beside the paper's Table 4."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import mtg_mirror_files, mtt_mirror_files, serve_mirror, write_audio
from typer.testing import CliRunner

from maest_cli.cli.app import app
from maest_cli.datasets.layout import DatasetMissing, locate
from maest_cli.errors import UsageError
from maest_cli.probing.data import load_annotations
from maest_cli.probing.downloaded import downloaded_part
from maest_cli.probing.paper import paper_results, paper_rows
from maest_cli.probing.report import paper_lines

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FIX = Path(__file__).parent / "fixtures" / "probe"
# the header of MagnaTagATune's annotations_final.csv: clip_id, its 188 tags in the published order, mp3_path
MTT_HEADER = (FIX / "mtt" / "annotations_final.csv").read_text().splitlines()[0]
MTT_TAGS = [t.strip('"') for t in MTT_HEADER.split("\t")[1:-1]]
FOLDERS = "0123456789abcdef"
runner = CliRunner()


def make_mtt(data: Path, per_folder: int = 3, missing: str = "", empty: str = "6", audio: bool = True,
             counts: dict[str, int] | None = None) -> Path:
    """DATA/mtt as downloaded: annotations_final.csv (tab-separated, quoted, the real columns),
    audio/{0..f}/ARTIST-ALBUM-NN-TITLE-START-END.mp3 (folders in `missing` left out), the first
    clip of each folder in `empty` a zero-byte file (as MagnaTagATune ships three), a manifest.
    `counts`: tag -> number of clips carrying it (in clip order); default: random tags."""
    d = data / "mtt"
    (d / "audio").mkdir(parents=True, exist_ok=True)
    n = per_folder * len(FOLDERS)
    rng = np.random.default_rng(0)
    y = np.zeros((n, len(MTT_TAGS)), int)
    if counts is None:
        y[:, :60] = rng.random((n, 60)) < 0.3
    else:
        for tag, k in counts.items():
            y[:k, MTT_TAGS.index(tag)] = 1
    lines, paths = [MTT_HEADER], []
    for i in range(n):
        folder = FOLDERS[i // per_folder]
        paths.append(f"{folder}/artist_{folder}-album_{i % per_folder}-{i % per_folder + 1:02d}-title_{i}-30-59.mp3")
        lines.append("\t".join(f'"{v}"' for v in [i + 2, *y[i], paths[-1]]))
        if not audio or folder in missing:
            continue
        f = d / "audio" / paths[-1]
        f.parent.mkdir(exist_ok=True)
        if folder in empty and i % per_folder == 0:
            f.write_bytes(b"")
        else:
            write_audio(f, 1.5, sr=16000, seed=i, channels=1)
    (d / "annotations_final.csv").write_text("\n".join(lines) + "\n")
    (d / "manifest.json").write_text(json.dumps({"audio": {"unpacked": True}}))
    return data


def make_mtg_genre(data: Path, tars=("00", "01")) -> Path:
    """DATA/mtg-jamendo: the split-0 genre files of the metadata (PATH NN/ID.mp3) and audio-low/NN/ID.low.mp3
    of the tracks in the tars downloaded; 4 folders of 6 tracks, 3 train, 1 validation, 2 test each."""
    d = data / "mtg-jamendo"
    splits = d / "metadata" / "data" / "splits" / "split-0"
    splits.mkdir(parents=True)
    rows = {s: ["TRACK_ID\tARTIST_ID\tALBUM_ID\tPATH\tDURATION\tTAGS"] for s in ("train", "validation", "test")}
    for folder in range(4):
        for k in range(6):
            tid = 100 * k + folder
            split = "train" if k < 3 else "validation" if k == 3 else "test"
            tags = ["genre---rock", "genre---pop"] if (k + folder) % 2 else ["genre---jazz"]
            rows[split].append(f"track_{tid:07d}\tartist_{k}\talbum_{k}\t{folder:02d}/{tid}.mp3\t30.0\t"
                               + "\t".join(tags))
            if f"{folder:02d}" in tars:
                f = d / "audio-low" / f"{folder:02d}" / f"{tid}.low.mp3"
                f.parent.mkdir(parents=True, exist_ok=True)
                write_audio(f, 1.5, sr=16000, seed=tid, channels=1)
    for s, lines in rows.items():
        (splits / f"autotagging_genre-{s}.tsv").write_text("\r\n".join(lines) + "\r\n")
    (d / "manifest.json").write_text(json.dumps({"quality": "low", "tars_total": 100,
                                                 "tars": {t: {"unpacked": True} for t in tars}}))
    return data


def grid_file(tmp: Path) -> str:
    p = tmp / "grid.toml"
    p.write_text("batch_size = [8]\nepochs = [3]\ndropout = [0.5]\nlr = [1e-3]\n[protocol]\nhidden = 16\n"
                 "warmup_epochs = 1\n")
    return str(p)


def probe_args(data: Path, tmp: Path, model: str, *extra: str) -> list[str]:
    return ["probe", *extra, "--data-root", str(data), "--model", model, "--engine", "torch", "--device", "cpu",
            "--grid", grid_file(tmp), "--seeds", "1"]


# ---------------------------------------------------------------- the split rule, without a model

def test_mtt_split_rule_top50_and_what_was_downloaded(tmp_path):
    """12:1:3 by folder (0-b train, c validation, d-f test); top 50 by count over the whole file,
    ties in column order; the part downloaded is measured per split."""
    # 45 tags on 3 clips, 10 on 2: the 50th place is a tie, broken by column order, not by count alone
    three = MTT_TAGS[140:185]
    two = MTT_TAGS[5:15]
    data = make_mtt(tmp_path, per_folder=2, missing="0123e", audio=True,
                    counts={**{t: 3 for t in three}, **{t: 2 for t in two}})
    located = locate("mtt", data)
    ann = load_annotations("mtt", located.annotations_root)
    assert ann.counts() == {"train": 24, "validation": 2, "test": 6}  # 12 : 1 : 3
    for path, split in zip(ann.paths, ann.splits):
        assert split == {"c": "validation", "d": "test", "e": "test", "f": "test"}.get(path[0], "train")
    assert ann.tags == three + two[:5]
    part = downloaded_part(ann, located.audio_root)
    assert part.labelled == {"train": 24, "validation": 2, "test": 6}
    assert part.downloaded == {"train": 16, "validation": 2, "test": 4}  # folders 0-3 and e are not there
    assert part.annotations.tags == ann.tags  # the vocabulary stays the whole file's
    # a subset without a whole split cannot be probed: said in one line
    with pytest.raises(UsageError, match="none of the 2 validation tracks"):
        downloaded_part(ann, make_mtt(tmp_path / "noc", per_folder=2, missing="c") / "mtt" / "audio")


def test_mtg_downloaded_part_is_the_verified_tars_only(tmp_path):
    """Tracks of a tar the manifest does not record as verified (its unpacking was killed) are not
    counted as downloaded: the coverage text and the tracks probed say the same."""
    data = make_mtg_genre(tmp_path, tars=("00", "01", "02"))
    manifest = data / "mtg-jamendo" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["tars"]["02"]
    manifest.write_text(json.dumps(m))
    located = locate("mtg-jamendo-genre", data)
    assert located.coverage.parts == ("00", "01")
    ann = load_annotations("mtg-jamendo-genre", located.annotations_root)
    part = downloaded_part(ann, located.audio_root, located.coverage.parts)
    assert part.downloaded == {"train": 6, "validation": 2, "test": 4}
    assert {p.split("/")[0] for p in part.annotations.paths} == {"00", "01"}
    assert downloaded_part(ann, located.audio_root).downloaded["train"] == 9  # every folder on disk


def test_paper_table_is_the_issue_s_table_4():
    """Every cell of configs/paper_results.toml against the issue's Table 4, written out here."""
    columns = ("mtg-jamendo-genre", "mtg-jamendo-instrument", "mtg-jamendo-moodtheme", "mtg-jamendo-top50", "mtt")
    table = {  # ROC-AUC / mAP, %, in the column order above
        ("baselines", "effnet-b0"): "87.7/19.9 77.6/19.8 75.6/13.6 83.1/29.7 90.2/37.4",
        ("models", "discogs-maest-10s-pw-129e"): "88.1/21.1 79.7/22.4 77.9/15.1 84.0/31.3 91.8/41.0",
        ("models", "discogs-maest-20s-pw-129e"): "88.1/21.4 79.9/22.6 77.9/15.2 84.1/31.5 91.8/41.0",
        ("models", "discogs-maest-30s-pw-129e"): "88.2/21.6 80.0/22.9 78.1/15.4 84.0/31.5 92.0/41.9",
    }
    data = paper_results()
    assert {(k, n) for k in ("models", "baselines") for n in data[k]} == set(table)
    for (kind, name), cells in table.items():
        expected = {c: dict(zip(("roc_auc", "map"), map(float, cell.split("/"))))
                    for c, cell in zip(columns, cells.split())}
        assert {k: v for k, v in data[kind][name].items() if k != "label"} == expected, name
    assert paper_rows("mtt", "maest-tiny")["no_row_reason"] == "the paper has no row for maest-tiny"
    assert paper_rows("mtt", "discogs-maest-20s-pw-129e")["row"]["label"] == "MAEST-20s"


# ---------------------------------------------------------------- end to end, tiny model

def test_probe_mtt_as_typed_with_an_empty_clip_and_a_rerun(tmp_path, tiny_model_file, monkeypatch):
    data = make_mtt(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, probe_args(data, tmp_path, tiny_model_file, "mtt"))
    assert r.exit_code == 0, r.output  # the empty clip is a failed file, not a failed probe
    assert "empty file (0 bytes)" in r.stderr and "6/artist_6-album_0-01-title_18-30-59.mp3" in r.stderr
    assert "train: 35 of 36 clips (1 with empty audio)" in r.stdout
    assert "validation: 3 of 3 clips" in r.stdout and "test: 9 of 9 clips" in r.stdout
    assert "paper: EffNet-B0 (Discogs-EffNet baseline)  90.2 / 37.4" in r.stdout
    assert "no published row for tiny-test on mtt" in r.stdout
    out = next(tmp_path.glob("probe-mtt-tiny-*"))
    res = json.loads((out / "results.json").read_text())
    assert res["grid"]["n_points"] == 1 and res["dataset"]["tracks"] == {"train": 35, "validation": 3, "test": 9}
    assert res["empty_audio"] == ["6/artist_6-album_0-01-title_18-30-59.mp3"] and res["extract_failed"] == 0
    assert res["paper"]["row"] is None and res["paper"]["baselines"][0]["name"] == "effnet-b0"
    cache = Path(res["embeddings"]["dir"])
    assert cache.parent == data / "mtt" / "embeddings" and cache.name == out.name.removeprefix("probe-mtt-")
    # a rerun resumes the cache: nothing is embedded again (the empty clip is tried and reported again)
    r = runner.invoke(app, probe_args(data, tmp_path, tiny_model_file, "mtt"))
    assert r.exit_code == 0, r.output
    again = json.loads((out / "results.json").read_text())["embeddings"]["extract"]
    assert again["n_skipped"] == 47 and again["n_done"] == 0
    assert again["n_failed"] == 1


def test_subset_coverage_against_what_was_downloaded(tmp_path, tiny_model_file, monkeypatch):
    """Folders 0-7 and e missing: 20 of 48 clips downloaded (< --min-match 0.5 of all), probed; the
    share is measured against the downloaded part, where a mismatch is still refused."""
    data = make_mtt(tmp_path / "data", missing="01234567e", empty="8")
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, probe_args(data, tmp_path, tiny_model_file, "mtt", "--min-match", "0.9"))
    assert r.exit_code == 0, r.output
    on_disk = "21 of the 48 annotated clips of mp3.zip.001-003 on disk"
    assert f"train: 11 of 36 clips (12 downloaded: {on_disk}, 1 with empty audio)" in r.stdout
    assert f"test: 6 of 9 clips (6 downloaded: {on_disk})" in r.stdout
    assert "this run's test split is 6 of 9 tracks" in r.stdout
    # all 21 downloaded clips asked for, one is empty: refused, naming the counts inside the downloaded part
    r = runner.invoke(app, probe_args(data, tmp_path, tiny_model_file, "mtt", "--min-match", "1"))
    assert r.exit_code == 2 and "only 20 of 21 labelled tracks (mtt) have an embedding" in r.stderr


def test_mtg_jamendo_subset_of_tars(tmp_path, tiny_model_file, monkeypatch):
    data = make_mtg_genre(tmp_path / "data", tars=("00", "01"))
    killed = data / "mtg-jamendo" / "audio-low" / "02" / "2.low.mp3"  # a track of a tar whose unpacking was killed
    killed.parent.mkdir()
    shutil.copy(data / "mtg-jamendo" / "audio-low" / "00" / "0.low.mp3", killed)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, probe_args(data, tmp_path, tiny_model_file, "mtg-jamendo-genre"))
    assert r.exit_code == 0, r.output
    assert "coverage:\n" in r.stdout
    assert "test: 4 of 8 tracks (4 downloaded: tars 0-1 of 0-99 (2/100, low quality))" in r.stdout
    assert "paper: EffNet-B0 (Discogs-EffNet baseline)  87.7 / 19.9" in r.stdout
    res = json.loads(next(tmp_path.glob("probe-mtg-jamendo-genre-tiny-*")).joinpath("results.json").read_text())
    assert res["dataset"]["split"] == 0 and res["dataset"]["coverage"]["complete"] is False
    assert res["dataset"]["coverage"]["splits"]["train"] == {"labelled": 12, "downloaded": 6, "embedded": 6,
                                                            "empty_audio": 0}


def test_no_dataset_is_one_line_naming_the_download(tmp_path, monkeypatch):
    monkeypatch.setenv("MAEST_DATA", str(tmp_path / "nothing"))
    r = runner.invoke(app, ["probe", "mtt"])
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [f"maest: error: mtt: not found under {tmp_path / 'nothing'}; run "
                                             f"`maest datasets download mtt`"]
    with pytest.raises(DatasetMissing, match="maest datasets download mtg-jamendo"):
        from maest_cli import probe

        probe("mtg-jamendo-top50")


def test_paper_row_beside_another_protocol_says_so():
    from maest_cli.embed.spec import InferenceSpec

    m = "discogs-maest-30s-pw-129e"
    assert paper_rows("mtt", m, None, "paper", InferenceSpec())["protocol_differences"] == []
    assert paper_rows("mtg-jamendo-genre", m, 0, "paper", InferenceSpec(block=7))["protocol_differences"] == []
    spec = InferenceSpec(preset="fast", block=11, tokens="cls", hop="full")
    rows = paper_rows("mtg-jamendo-genre", m, 2, "quick", spec)
    assert rows["protocol_differences"] == [
        "split 2 (the paper's: 0)", "grid quick (the paper's: paper)", "patchout fast (the paper's: none)",
        "tokens cls (the paper's: cls,dist,avg)", "hop full (the paper's: half)", "block 11 (the paper's: 7)"]
    assert rows["row"]["roc_auc"] == 88.2  # still shown, for reference
    lines = paper_lines({"dataset": {"name": "mtg-jamendo-genre"}, "model": m, "test": {}, "paper": rows})
    assert any(line.startswith("  paper: MAEST-30s (discogs-maest-30s-pw-129e)") and line.endswith("88.2 / 21.6")
               for line in lines)
    assert lines[-1] == ("  not the paper's protocol: split 2 (the paper's: 0); grid quick (the paper's: paper); "
                         "patchout fast (the paper's: none); tokens cls (the paper's: cls,dist,avg); hop full (the "
                         "paper's: half); block 11 (the paper's: 7); its figures are shown for reference, not as a "
                         "target")
    overridden = InferenceSpec(time_keep_every=2)
    assert paper_rows("mtt", m, None, "paper", overridden)["protocol_differences"] == [
        "patchout none with overrides (the paper's: none)"]


def test_paper_lines_without_coverage_or_paper():
    assert paper_lines({"dataset": {"name": "custom"}, "test": {}}) == []


# ---------------------------------------------------------------- loopback: `maest datasets download`, then the probe

EMPTY_CLIP = "6/artist_6-album_0-01-title_60-30-59.mp3"


def place_registry_model(tmp_path, weights: str, monkeypatch) -> None:
    """A registry whose discogs-maest-30s-pw-129e is a tiny model already in the cache (unpinned, as
    tests/test_registry.py places weights): a published model name without its 344 MB."""
    cache = Path(os.environ["MAEST_CACHE"]) / "discogs-maest-30s-pw-129e"
    cache.mkdir(parents=True)
    shutil.copy(weights, cache / "model.safetensors")
    (tmp_path / "models.toml").write_text('default = "discogs-maest-30s-pw-129e"\n'
                                          '[models.discogs-maest-30s-pw-129e]\naliases = ["maest-30s"]\n'
                                          'variant = "30s"\ngithub_file = "model.safetensors"\n')
    monkeypatch.setenv("MAEST_REGISTRY", str(tmp_path / "models.toml"))


@pytest.mark.usefixtures("loopback_only")
def test_download_then_probe_mtt_end_to_end(http_server, tmp_path, tiny_model_file, monkeypatch):
    serve_mirror(http_server, mtt_mirror_files(seconds=1.5, empty=(EMPTY_CLIP,)), tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["datasets", "download", "mtt"])
    assert r.exit_code == 0, r.output
    args = ["--engine", "torch", "--device", "cpu", "--grid", grid_file(tmp_path), "--seeds", "1"]
    r = runner.invoke(app, ["probe", "mtt", "--model", tiny_model_file, *args])
    assert r.exit_code == 0, r.output
    assert "ROC-AUC" in r.stdout and "mAP" in r.stdout
    assert "train: 23 of 24 clips (1 with empty audio)" in r.stdout and "validation: 3 of 3 clips" in r.stdout
    assert "paper: EffNet-B0 (Discogs-EffNet baseline)  90.2 / 37.4" in r.stdout
    assert "no published row for tiny-test on mtt" in r.stdout
    assert EMPTY_CLIP in r.stderr
    # a model the paper reports: its MTT row beside the result
    place_registry_model(tmp_path, tiny_model_file, monkeypatch)
    r = runner.invoke(app, ["probe", "mtt", "--model", "maest-30s", *args])
    assert r.exit_code == 0, r.output
    assert "paper: MAEST-30s (discogs-maest-30s-pw-129e)  92.0 / 41.9" in r.stdout
    assert "no published row" not in r.stdout
    assert "not the paper's protocol: grid grid (the paper's: paper)" in r.stdout
    res = json.loads(next(tmp_path.glob("probe-mtt-discogs-maest-30s-pw-129e-*/results.json")).read_text())
    assert res["paper"]["row"] == {"label": "MAEST-30s", "roc_auc": 92.0, "map": 41.9}
    assert res["model"] == "discogs-maest-30s-pw-129e" and res["extract_failed"] == 0


@pytest.mark.usefixtures("loopback_only")
def test_a_corrupt_archive_never_reaches_the_probe(http_server, tmp_path, monkeypatch):
    files = mtt_mirror_files()
    part = bytearray(files["/mtt/mp3.zip.002"])
    part[len(part) // 2:len(part) // 2 + 64] = bytes(64)  # inside a member: its CRC fails
    files["/mtt/mp3.zip.002"] = bytes(part)
    serve_mirror(http_server, files, tmp_path, monkeypatch)
    r = runner.invoke(app, ["datasets", "download", "mtt"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error:")]
    assert len(errors) == 1 and errors[0].startswith("maest: error: mp3.zip.001-003: ")
    assert errors[0].endswith("(fetched twice; both copies fail the check)")
    r = runner.invoke(app, ["probe", "mtt"])
    assert r.exit_code == 2
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 1 and "run `maest datasets download mtt`" in errors[0]


@pytest.mark.usefixtures("loopback_only")
def test_download_a_subset_of_tars_then_probe_it(http_server, tmp_path, tiny_model_file, monkeypatch):
    serve_mirror(http_server, mtg_mirror_files(seconds=1.5), tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)
    r = runner.invoke(app, ["datasets", "download", "mtg-jamendo", "--tars", "14-35,68-74,86-92"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["probe", "mtg-jamendo-genre", "--model", tiny_model_file, "--engine", "torch",
                            "--device", "cpu", "--grid", grid_file(tmp_path), "--seeds", "1"])
    assert r.exit_code == 0, r.output
    assert "train: 8 of 18 tracks (8 downloaded: tars 14-35,68-74,86-92 of 0-99" in r.stdout
    assert "validation: 3 of 6 tracks (3 downloaded: tars 14-35" in r.stdout
    assert "test: 3 of 5 tracks (3 downloaded: tars 14-35" in r.stdout
    assert "this run's test split is 3 of 5 tracks" in r.stdout
    assert "paper: EffNet-B0 (Discogs-EffNet baseline)  87.7 / 19.9" in r.stdout
