"""`maest similar` and `maest index build` on generated audio with a tiny random MAEST: queries from
the dataset and from audio (a re-encoded, trimmed copy finds its original), the stored index, its
rebuild when the dataset changes or a file is corrupt, the ANN against exact search, near-duplicates
and the output formats."""

from __future__ import annotations

import csv
import io
import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_audio
from typer.testing import CliRunner

import maest_cli
from maest_cli.catalogue import index as index_mod
from maest_cli.cli.app import app
from maest_cli.embed.extraction import extract

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()
SR = 22050


def piece(notes: list[float], harmonics: list[float], seconds: float, note_s: float, seed: int) -> np.ndarray:
    """A melody played with a timbre (harmonic weights): two renderings of one piece share `notes`."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(note_s * SR)) / SR
    env = np.minimum(1, t / 0.02) * np.exp(-3 * t)
    out = []
    while sum(map(len, out)) < seconds * SR:
        for f in notes:
            out.append(env * sum(w * np.sin(2 * np.pi * f * (h + 1) * t) for h, w in enumerate(harmonics)))
    x = np.concatenate(out)[:int(seconds * SR)]
    return (0.3 * x / np.abs(x).max() + 0.003 * rng.standard_normal(len(x))).astype(np.float32)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    """A tiny random MAEST and a dataset of 8 generated tracks: pieces a..f, b and c in two renderings
    each (a melody in two timbres and tempi); plus copies of a0 (MP3, trimmed by 1.3 s; Ogg)."""
    from maest_cli.models.checkpoints import save_checkpoint
    from maest_cli.models.maest import MAEST, tiny_config

    root = tmp_path_factory.mktemp("similar")
    torch.manual_seed(0)
    model = str(save_checkpoint(root / "tiny.safetensors", MAEST(tiny_config(frames=316, n_classes=10)),
                                labels=[f"tag{i}" for i in range(10)], extra={"name": "tiny-test"}))
    music = root / "music"
    music.mkdir()
    rng = np.random.default_rng(1)
    melodies = {name: list(rng.uniform(150, 900, 5)) for name in "abcdef"}
    for name, notes in melodies.items():
        sf.write(music / f"{name}0.wav", piece(notes, [1, 0.5, 0.25], 8.0, 0.25, seed=ord(name)), SR)
        if name in "bc":
            sf.write(music / f"{name}1.wav", piece(notes, [0.3, 1, 0.1, 0.6], 8.0, 0.35, seed=ord(name) + 1), SR)
    x = sf.read(music / "a0.wav")[0]
    copies = root / "copies"
    copies.mkdir()
    sf.write(copies / "a0-copy.mp3", x[int(1.3 * SR):], SR, format="MP3", subtype="MPEG_LAYER_III")
    sf.write(copies / "a0.ogg", x, SR, format="OGG", subtype="VORBIS")
    (root / "notes.txt").write_text("not audio\n")
    s = extract([str(music)], root / "emb", model=model, workers=0, progress=False)
    assert (s.n_done, s.n_failed) == (8, 0)
    return {"root": root, "model": model, "music": music, "copies": copies, "emb": root / "emb"}


@pytest.fixture
def dataset(catalogue, tmp_path):
    """A copy of the catalogue's dataset for a test that changes it (indexes, new parts)."""
    return shutil.copytree(catalogue["emb"], tmp_path / "emb")


def test_a_path_in_the_dataset_finds_itself_first(catalogue, dataset):
    table = maest_cli.similar([str(catalogue["music"] / "d0.wav")], dataset, k=3)
    (r,) = table.results
    assert r.source == "dataset" and [n.rank for n in r.neighbours] == [1, 2, 3]
    assert r.neighbours[0].path == str(catalogue["music"] / "d0.wav")
    assert r.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)
    assert r.neighbours[0].similarity > r.neighbours[1].similarity
    assert table.search == "exact" and table.exit_code == 0 and table.tracks == 8


def test_a_reencoded_trimmed_copy_finds_its_original_and_a_text_query_fails_alone(catalogue, dataset):
    """The done-when check on a small scale, through the command line: the copy (MP3, 1.3 s cut)
    is embedded like the dataset and finds a0 first; notes.txt gets one error line, exit 1."""
    copy, text = catalogue["copies"] / "a0-copy.mp3", catalogue["root"] / "notes.txt"
    r = runner.invoke(app, ["similar", str(copy), str(text), "--dataset", str(dataset), "-k", "3"])
    assert r.exit_code == 1, r.output
    errors = [line for line in r.stderr.splitlines() if line.startswith("maest: error: ")]
    assert len(errors) == 1 and str(text) in errors[0], r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(str(copy)) and "embedded" in lines[0]
    assert lines[1].split()[0] == "1" and lines[1].endswith(str(catalogue["music"] / "a0.wav")), r.stdout
    assert len([line for line in lines if line.startswith("  ")]) == 3


def test_formats_round_trip(catalogue, dataset):
    """JSON and CSV, parsed back, give the API's rows (the same values, as floats)."""
    args = [str(catalogue["copies"] / "a0.ogg"), str(catalogue["music"] / "b1.wav"), "--dataset", str(dataset)]
    api = maest_cli.similar(args[:2], dataset, k=4).rows()
    r = runner.invoke(app, ["similar", *args, "-k", "4", "--format", "json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    rows = [{"query": q["query"], "source": q["source"], **n} for q in got["results"] for n in q["neighbours"]]
    assert rows == api and len(rows) == 8 and got["failures"] == []
    r = runner.invoke(app, ["similar", *args, "-k", "4", "--format", "csv"])
    back = [{**row, "rank": int(row["rank"]), "similarity": float(row["similarity"])}
            for row in csv.DictReader(io.StringIO(r.stdout))]
    assert r.exit_code == 0 and back == api


def test_the_index_is_used_matches_exact_search_and_is_rebuilt_when_the_dataset_changes(catalogue, dataset,
                                                                                           tmp_path):
    queries = [str(catalogue["music"] / f"{n}.wav") for n in ("a0", "b0", "c1", "f0")]
    exact = maest_cli.similar(queries, dataset, k=8)
    r = runner.invoke(app, ["index", "build", str(dataset), "--json", "--connectivity", "8"])
    assert r.exit_code == 0, r.output
    built = json.loads(r.stdout)
    assert built["tracks"] == 8 and built["library"] == "usearch" and built["version"]
    manifest = index_mod.read_manifest(dataset)
    assert manifest["ann"]["library"] == "usearch" and manifest["normalisation"]["kind"] == built["normalisation"]
    approx = maest_cli.similar(queries, dataset, k=8)
    assert approx.search == "usearch" and exact.search == "exact"
    assert [(x["path"], x["rank"]) for x in approx.rows()] == [(x["path"], x["rank"]) for x in exact.rows()]
    np.testing.assert_allclose([x["similarity"] for x in approx.rows()], [x["similarity"] for x in exact.rows()],
                               atol=1e-5)
    assert maest_cli.similar(queries, dataset, k=8, exact=True).search == "exact"

    # a new part file: the dataset changed, the index is rebuilt (one line says so) and finds the new track
    more = tmp_path / "more"
    more.mkdir()
    write_audio(more / "g.wav", 6.0, sr=SR, seed=7)
    extract([str(more)], dataset, model=catalogue["model"], workers=0, progress=False)
    r = runner.invoke(app, ["similar", str(more / "g.wav"), "--dataset", str(dataset), "-k", "2", "--format", "json"])
    assert r.exit_code == 0, r.output
    said = [line for line in r.stderr.splitlines() if "rebuilding" in line]
    assert len(said) == 1 and "changed" in said[0] and "9 tracks" in said[0], r.stderr
    got = json.loads(r.stdout)
    assert got["search"] == "usearch" and got["tracks"] == 9
    assert got["results"][0]["source"] == "dataset" and got["results"][0]["neighbours"][0]["path"] == str(more / "g.wav")
    r = runner.invoke(app, ["similar", str(more / "g.wav"), "--dataset", str(dataset)])
    assert r.exit_code == 0 and "rebuilding" not in r.stderr  # up to date now
    assert index_mod.read_manifest(dataset)["ann"]["params"]["connectivity"] == 8  # kept by the rebuild


def test_a_corrupt_index_is_rebuilt_not_fatal(catalogue, dataset):
    maest_cli.build_index(dataset)
    d = index_mod.index_dir(dataset)
    files = index_mod.read_manifest(dataset)["files"]
    lines: list[str] = []
    for name in ("ann", "vectors", "tracks"):
        (d / files[name]).write_bytes(b"garbage" * 10)
        table = maest_cli.similar([str(catalogue["music"] / "e0.wav")], dataset, k=2, log=lines.append)
        assert table.results[0].neighbours[0].path == str(catalogue["music"] / "e0.wav") and table.search == "usearch"
        files = index_mod.read_manifest(dataset)["files"]
    assert len(lines) == 3 and all("unreadable" in line for line in lines), lines
    (d / index_mod.MANIFEST).write_text("{")
    assert maest_cli.similar([str(catalogue["music"] / "e0.wav")], dataset, k=1).search == "exact"
    assert sorted(p.name.split("-")[0] for p in d.iterdir() if not p.name.startswith(".")) == \
        ["manifest.json", "norm", "tracks", "vectors"]  # the older builds' files are gone


def test_duplicates_are_copies_not_other_renderings(catalogue, tmp_path):
    """a0 and its two copies are reported (3 pairs); b0/b1 and c0/c1, renderings of one melody
    each, are not. The default threshold is measured on maest-tiny (README); this random model
    gets its own: its copies are at cosine >= 0.97, other pairs <= 0.93."""
    from maest_cli.catalogue.similarity import DUPLICATE_THRESHOLDS

    music = tmp_path / "music"
    shutil.copytree(catalogue["music"], music)
    for f in catalogue["copies"].iterdir():
        shutil.copy(f, music / f.name)
    extract([str(music)], tmp_path / "emb", model=catalogue["model"], workers=0, progress=False)
    maest_cli.build_index(tmp_path / "emb")
    table = maest_cli.find_duplicates(tmp_path / "emb", threshold=0.95)
    names = {frozenset((p.a.rsplit("/", 1)[1], p.b.rsplit("/", 1)[1])) for p in table.pairs}
    assert names == {frozenset(p) for p in (("a0.wav", "a0-copy.mp3"), ("a0.wav", "a0.ogg"),
                                            ("a0-copy.mp3", "a0.ogg"))}, table.rows()
    assert table.search == "usearch" and all(p.similarity >= 0.95 for p in table.pairs)
    exact = maest_cli.find_duplicates(tmp_path / "emb", threshold=0.95, exact=True)
    assert [(p.a, p.b) for p in exact.pairs] == [(p.a, p.b) for p in table.pairs] and exact.search == "exact"
    np.testing.assert_allclose([p.similarity for p in exact.pairs], [p.similarity for p in table.pairs], atol=1e-5)
    default = maest_cli.find_duplicates(tmp_path / "emb")  # 11 tracks: too few to whiten, centred
    assert default.normalisation == "centred" and default.threshold == DUPLICATE_THRESHOLDS["centred"]
    r = runner.invoke(app, ["similar", "--duplicates", "--dataset", str(tmp_path / "emb"), "--threshold", "0.95",
                            "--format", "csv"])
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 4, r.output


@pytest.mark.parametrize("spec", [dict(preset="fast", hop="2.5", block=2, tokens="cls,avg"),
                                  dict(preset="none", time_keep_every=2, drop_freq_rows="0"), dict()])
def test_queries_are_embedded_with_the_spec_the_dataset_records(spec, catalogue):
    """dataset_spec(metadata) resolves to the settings that made the dataset (engine, dtype and
    device are left to the query's run)."""
    from maest_cli.catalogue.similarity import dataset_spec
    from maest_cli.embed.spec import InferenceSpec
    from maest_cli.models.maest import tiny_config

    cfg = tiny_config(frames=316, n_classes=10)
    made = InferenceSpec(model=catalogue["model"], **spec).resolve(cfg, 4)
    meta = {**made.metadata(), "model": {"name": "tiny-test", "path": catalogue["model"]}}
    again = dataset_spec(meta, device="cpu").resolve(cfg, 4)
    assert again.settings() == made.settings() and again.spec.model == catalogue["model"]


# ------------------------------------------------------------------ queries embedded: the cache, names on disk

@pytest.fixture
def count_extracts(monkeypatch):
    """The files each extract run of the query cache was asked for."""
    from maest_cli.catalogue import cached

    calls: list[list[str]] = []

    def counted(paths, *args, **kw):
        calls.append([str(p) for p in paths])
        return real(paths, *args, **kw)

    real = cached.extract
    monkeypatch.setattr(cached, "extract", counted)
    return calls


def test_a_query_replaced_under_its_name_is_embedded_again_and_an_asked_one_is_not(catalogue, dataset, tmp_path,
                                                                                   count_extracts):
    import os

    q, other = tmp_path / "q.ogg", tmp_path / "r.wav"
    shutil.copy(catalogue["copies"] / "a0.ogg", q)
    shutil.copy(catalogue["music"] / "f0.wav", other)
    first = maest_cli.similar([str(q)], dataset, k=1)
    assert first.results[0].neighbours[0].path.endswith("/a0.wav") and len(count_extracts) == 1
    both = maest_cli.similar([str(q), str(other)], dataset, k=1)  # q is not embedded again
    assert [r.neighbours[0].path.rsplit("/", 1)[1] for r in both.results] == ["a0.wav", "f0.wav"]
    assert count_extracts[1:] == [[str(other)]]
    x = sf.read(catalogue["music"] / "d0.wav")[0]
    sf.write(q, x, SR, format="OGG", subtype="VORBIS")  # another recording under the same name
    st = os.stat(q)
    os.utime(q, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = maest_cli.similar([str(q)], dataset, k=1)
    assert again.results[0].neighbours[0].path.endswith("/d0.wav") and count_extracts[2:] == [[str(q)]]


def test_hard_linked_and_non_utf8_named_queries_are_answered(catalogue, dataset, tmp_path, count_extracts):
    import os

    q = tmp_path / "q.ogg"
    shutil.copy(catalogue["copies"] / "a0.ogg", q)
    link = tmp_path / "link.ogg"
    os.link(q, link)
    latin = os.path.join(str(tmp_path), os.fsdecode(b"caf\xe9.ogg"))  # a Latin-1 name
    shutil.copy(q, latin)
    table = maest_cli.similar([str(q), str(link), latin], dataset, k=1)
    assert table.failures == [] and len(table.results) == 3, table.failures
    assert all(r.neighbours[0].path.endswith("/a0.wav") and r.source == "audio" for r in table.results)
    assert table.results[2].query.endswith("caf\\xe9.ogg")  # shown as extract records such names
    assert len(count_extracts) == 2  # the hard link is the same file: embedded once
    json.loads(table.to_json())


def test_an_existing_file_is_itself_not_a_dataset_track_at_the_same_relative_path(catalogue, dataset, tmp_path,
                                                                                  monkeypatch):
    """The dataset stores d0.wav relative to its root: a d0.wav in the working directory that is
    another recording is embedded, not answered with the stored d0; a relative path that exists
    nowhere on disk is the dataset's."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(catalogue["music"] / "b0.wav", tmp_path / "d0.wav")
    (r,) = maest_cli.similar(["d0.wav"], dataset, k=1).results
    assert r.source == "audio" and r.neighbours[0].path.endswith("/b0.wav")
    (r,) = maest_cli.similar(["e0.wav"], dataset, k=1).results
    assert r.source == "dataset" and r.neighbours[0].path == str(catalogue["music"] / "e0.wav")


def test_an_ambiguous_relative_path_is_said_to_be_so():
    idx = index_mod.TrackIndex("ds", ["/nowhere/x", "/nowhere/y", "/nowhere/x"], ["s.wav", "s.wav", "t.wav"],
                               np.eye(3, dtype=np.float32), index_mod.Normalisation("raw"), None, {})
    row, why = idx.lookup("s.wav")
    assert row is None and "ambiguous" in why and "/nowhere/x/s.wav" in why and "/nowhere/y/s.wav" in why
    assert idx.lookup("t.wav") == (2, None) and idx.lookup("/nowhere/y/s.wav") == (1, None)
    assert idx.lookup("u.wav") == (None, None)


# ------------------------------------------------------------------ the index on synthetic datasets

def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 3
    return (centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, dim))).astype(np.float32)


def write_dataset(d, x: np.ndarray, root: str = "/music") -> list[str]:
    """An extract-like dataset of one part: track i is root/t{i}.wav with embedding x[i]."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d.mkdir()
    paths = [f"t{i:05d}.wav" for i in range(len(x))]
    emb = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    pq.write_table(pa.table({"root": [root] * len(x), "path": paths, "embedding": emb}), d / "part-00000.parquet")
    return [f"{root}/{p}" for p in paths]


def test_ann_recall_against_exact_search_when_candidates_are_few(tmp_path):
    """600 clustered vectors, 21 candidates per query for k=10: the ANN (re-scored) finds >= 90 % of
    exact search's ten nearest."""
    x = clustered(600, 48, 12, seed=3)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    idx = index_mod.TrackIndex("ds", ["/r"] * len(x), [f"{i}" for i in range(len(x))], x,
                               index_mod.Normalisation("raw"), index_mod.AnnIndex.create(x, connectivity=8,
                                                                                         expansion_search=16), {})
    queries = x[:200] + 0.05 * np.random.default_rng(4).standard_normal((200, 48)).astype(np.float32)
    approx, _ = idx.search(queries, 10)
    exact, _ = idx.search(queries, 10, exact=True)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)])
    assert recall >= 0.9, recall


def test_tracks_without_a_finite_embedding_are_named_not_dropped_silently(tmp_path):
    x = clustered(40, 16, 4, seed=5)
    x[7, 3] = np.nan
    where = write_dataset(tmp_path / "emb", x)
    idx = index_mod.open_index(tmp_path / "emb")
    assert len(idx) == 39
    (n,) = idx.notes
    assert "1 track" in n and "no finite embedding" in n and where[7] in n
    assert index_mod.read_manifest(tmp_path / "emb")["notes"] == [n]
    table = maest_cli.similar([where[7], where[8]], tmp_path / "emb", k=2)  # the stored index, opened again
    assert table.notes == [n] and [r.query for r in table.results] == [where[8]]
    (f,) = table.failures
    assert f.query == where[7] and "no finite embedding" in f.reason


def test_the_index_build_holds_the_matrix_once(tmp_path, monkeypatch):
    """The normalised vectors go a chunk at a time into the memory-mapped file that becomes the
    index: what numpy allocates after the fit stays well under one copy of the matrix."""
    import tracemalloc

    x = clustered(8000, 384, 16, seed=6)
    write_dataset(tmp_path / "emb", x)
    monkeypatch.setattr(index_mod, "CHUNK_ROWS", 256)
    fit = index_mod.fit_normalisation

    def fit_then_measure(*a, **kw):
        norm = fit(*a, **kw)
        tracemalloc.reset_peak()
        return norm

    monkeypatch.setattr(index_mod, "fit_normalisation", fit_then_measure)
    tracemalloc.start()
    try:
        idx = index_mod.open_index(tmp_path / "emb", normalisation="centred")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.5 * x.nbytes, (peak, x.nbytes)
    assert isinstance(idx.vectors, np.memmap) and idx.vectors.shape == x.shape
    np.testing.assert_allclose(idx.vectors[:50], index_mod.Normalisation("centred", x.mean(0, dtype=np.float64))
                               .apply(x[:50]), atol=1e-6)


def test_duplicates_on_a_large_dataset_build_the_ann_and_say_so(catalogue, dataset, monkeypatch):
    from maest_cli.catalogue import similarity

    monkeypatch.setattr(similarity, "DUPLICATE_ANN_ABOVE", 5)
    lines: list[str] = []
    table = maest_cli.find_duplicates(dataset, threshold=0.999, log=lines.append)
    assert table.search == "usearch" and index_mod.read_manifest(dataset)["ann"]["library"] == "usearch"
    assert len(lines) == 1 and "building" in lines[0] and "8 tracks" in lines[0], lines
    monkeypatch.setattr(similarity, "DUPLICATE_ANN_ABOVE", 20_000)
    assert maest_cli.find_duplicates(dataset, threshold=0.999, exact=True).search == "exact"


def test_a_dataset_whose_every_file_failed_says_so(catalogue, tmp_path):
    extract([str(catalogue["root"] / "notes.txt")], tmp_path / "emb", model=catalogue["model"], workers=0,
            progress=False)
    for args in (["similar", str(catalogue["music"] / "a0.wav"), "--dataset", str(tmp_path / "emb")],
                 ["index", "build", str(tmp_path / "emb")]):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, r.output
        assert "every file failed" in r.stderr and "_errors" in r.stderr and "no Parquet" not in r.stderr
