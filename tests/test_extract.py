"""maest extract: segmentation, the Parquet dataset, bad inputs, resume after SIGKILL, shards, locks, CLI.

Everything runs on a tiny random MAEST (316-frame = 5 s segments) and generated audio in
several formats; subprocess tests run the real `python -m maest_cli extract`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
import soundfile as sf
import torch
from conftest import tone_mix, write_audio
from typer.testing import CliRunner

from maest_cli.audio.decoders import DecoderPool
from maest_cli.audio.frontend import FRONTEND, file_mel, n_frames, normalize
from maest_cli.audio.segments import SegmentCutter, hop_frames, iter_file_segments, segment_starts
from maest_cli.audio.walk import find_audio_files
from maest_cli.cli.app import app
from maest_cli.embed.extraction import extract, output_schema, parse_shard, shard_of
from maest_cli.embed.spec import InferenceSpec
from maest_cli.embed.store import EmbeddingStore, SettingsMismatch, Shard, StoreBusy, read_errors, read_metadata
from maest_cli.errors import UsageError
from maest_cli.models.checkpoints import save_checkpoint, sha256_file
from maest_cli.models.maest import MAEST, Patchout, tiny_config

REPO = Path(__file__).resolve().parents[1]
SEG = 316  # frames per segment of the tiny model
HOP = 158
BLOCK = 2  # the tiny model has 4 blocks
runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    return str(save_checkpoint(path, MAEST(tiny_config(frames=SEG, n_classes=10)),
                               labels=[f"tag{i}" for i in range(10)], extra={"name": "tiny-test"}))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory) -> Path:
    """Five formats, short and long, in nested folders, plus files the walk must skip."""
    d = tmp_path_factory.mktemp("catalogue")
    (d / "b").mkdir()
    sf.write(d / "a.wav", tone_mix(3.0, 16000, seed=1, channels=1), 16000)
    write_audio(d / "b" / "c.flac", 12.0, sr=44100, seed=2)
    write_audio(d / "b" / "d.ogg", 7.0, sr=22050, seed=3, channels=1)
    write_audio(d / "e.mp3", 9.0, sr=44100, seed=4)
    write_audio(d / "f.opus", 6.0, seed=5)
    (d / "cover.jpg").write_bytes(b"\xff\xd8\xff\xe0 not audio")
    sf.write(d / ".hidden.wav", tone_mix(1.0, 16000, channels=1), 16000)
    return d


EXPECTED = ["a.wav", "b/c.flac", "b/d.ogg", "e.mp3", "f.opus"]


def run(paths, out, tiny, **kw):
    kw = {"model": tiny, "block": BLOCK, "workers": 0, "progress": False, **kw}
    return extract(paths, out, **kw)


def table(out, sort=("path",)) -> pa.Table:
    t = pads.dataset(str(out)).to_table()
    return t.sort_by([(c, "ascending") for c in sort])


def embeddings(t: pa.Table, column: str = "embedding") -> np.ndarray:
    return t.column(column).combine_chunks().flatten().to_numpy().reshape(t.num_rows, -1)


def env_for_subprocess(tmp_path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MAEST_OFFLINE="1",
               MAEST_CACHE=str(tmp_path / "cache"))
    return env


# ---------------------------------------------------------------- segmentation rule

def test_segment_starts_rule():
    assert segment_starts(100, SEG, HOP) == [0]  # shorter: one shorter segment
    assert segment_starts(SEG, SEG, HOP) == [0]  # exactly one segment
    assert segment_starts(SEG + 1, SEG, HOP) == [0, 1]  # the last one is aligned to the end
    assert segment_starts(1000, SEG, HOP) == [0, 158, 316, 474, 632, 684]
    assert segment_starts(2 * SEG, SEG, SEG) == [0, SEG]  # full hop tiles exactly
    rng = np.random.default_rng(0)
    for total in [*rng.integers(16, 5000, 200), SEG, SEG + 1, 2 * SEG]:
        for hop in (1, 7, HOP, SEG):
            starts = segment_starts(int(total), SEG, hop)
            ends = [s + min(SEG, total) for s in starts]
            assert starts[0] == 0 and ends[-1] == total and all(e <= total for e in ends)
            assert all(0 < b - a <= hop for a, b in zip(starts, starts[1:]))  # no gap, no repeat
    assert hop_frames("half", 1876) == 938 and hop_frames("full", 1876) == 1876 and hop_frames("15", 1876) == 938


@pytest.mark.parametrize("total", [15, 16, 100, SEG, SEG + 1, 1000, 3001])
@pytest.mark.parametrize("hop", [7, HOP, SEG])
def test_cutter_equals_slicing_the_whole(total, hop):
    rng = np.random.default_rng(total + hop)
    mel = rng.standard_normal((total, 96)).astype(np.float32)
    cutter = SegmentCutter(SEG, hop)
    got, i = [], 0
    while i < total:  # fed in uneven blocks, as the decoder does
        k = int(rng.integers(1, 400))
        got += cutter.feed(mel[i:i + k])
        i += k
    if total < 16:
        with pytest.raises(ValueError):
            cutter.finish()
        return
    got += cutter.finish()
    starts = segment_starts(total, SEG, hop)
    assert [s.start for s in got] == starts and [s.index for s in got] == list(range(len(starts)))
    for s in got:
        np.testing.assert_array_equal(s.frames, mel[s.start:s.start + min(SEG, total)])


@pytest.mark.parametrize("hop", ["half", "full"])
def test_cutter_memory_is_bounded_for_a_60_minute_track(hop):
    """60 minutes of 30 s model frames fed block by block: at most ~2 segments are held."""
    seg = 1876
    h = hop_frames(hop, seg)
    total = n_frames(60 * 60 * 16000)
    block = np.zeros((370, 96), np.float32)  # what one 6 s decode block of 44.1 kHz audio gives
    cutter = SegmentCutter(seg, h)
    n_seg, fed = 0, 0
    while fed < total:
        k = min(len(block), total - fed)
        n_seg += len(cutter.feed(block[:k]))
        fed += k
    n_seg += len(cutter.finish())
    assert n_seg == len(segment_starts(total, seg, h))
    assert cutter.max_buffered <= seg + h + len(block) <= 2 * seg + len(block)


def test_file_segments_stream_with_bounded_memory(tmp_path):
    """A 4-minute file: numpy memory at any time is a few segments, not the whole file."""
    import tracemalloc

    path = tmp_path / "long.wav"
    with sf.SoundFile(path, "w", 16000, 1) as f:
        for i in range(24):
            f.write(tone_mix(10.0, 16000, seed=i, channels=1)[:, 0])
    whole_mel_bytes = n_frames(240 * 16000) * 96 * 4  # 5.8 MB; the decoded audio would be 15 MB
    tracemalloc.start()
    n = sum(1 for _ in iter_file_segments(str(path), SEG, HOP))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == len(segment_starts(n_frames(240 * 16000), SEG, HOP))
    assert peak < 0.6 * whole_mel_bytes, peak


# ---------------------------------------------------------------- the dataset

def test_schema_metadata_and_all_four_readers(catalogue, tiny, tmp_path):
    out = tmp_path / "out"
    s = run([catalogue], out, tiny, scores=True, dtype="fp32")  # auto: see test_dtype_auto_follows_the_cpu
    assert (s.n_files, s.n_done, s.n_failed, s.n_skipped) == (5, 5, 0, 0) and s.exit_code == 0
    assert s.errors_file is None and s.parts_written == 1 and s.audio_seconds == pytest.approx(37.0, abs=0.01)
    json.loads(s.to_json())

    ds = pads.dataset(str(out))
    schema = ds.schema
    assert schema.names == ["path", "root", "duration_s", "n_segments", "embedding", "scores"]
    assert schema.field("embedding").type == pa.list_(pa.float32(), 3 * 64)
    assert schema.field("scores").type == pa.list_(pa.float32(), 10)
    assert schema.field("n_segments").type == pa.int32() and schema.field("duration_s").type == pa.float64()

    t = table(out)
    assert t.column("path").to_pylist() == EXPECTED  # relative, '/'-separated, filtered, hidden skipped
    assert set(t.column("root").to_pylist()) == {str(catalogue)}
    durations = dict(zip(EXPECTED, [3.0, 12.0, 7.0, 9.0, 6.0]))
    for path, dur, nseg in zip(EXPECTED, t.column("duration_s").to_pylist(), t.column("n_segments").to_pylist()):
        assert dur == pytest.approx(durations[path], abs=0.01)
        assert nseg == len(segment_starts(n_frames(round(dur * 16000)), SEG, HOP))
    scores = embeddings(t, "scores")
    assert ((scores > 0) & (scores < 1)).all()

    meta = json.loads(schema.metadata[b"maest"])
    assert meta == read_metadata(out)
    assert meta["model"]["name"] == "tiny-test" and meta["model"]["sha256"] == sha256_file(tiny)
    assert meta["preset"]["name"] == "none" and meta["preset"]["time_keep_every"] == 1
    assert meta["block"] == BLOCK and meta["tokens"] == ["cls", "dist", "avg"] and meta["pool"] == "track"
    assert meta["segment"]["frames"] == SEG and meta["hop"] == {"spec": "half", "frames": HOP, "seconds": HOP * 0.016}
    assert meta["frontend"] == FRONTEND.to_dict() and meta["dtype"] == "fp32" and meta["device"] == "cpu"
    assert {"maest-cli", "torch", "python", "libsndfile"} <= set(meta["versions"])
    assert meta["scores"]["labels"] == [f"tag{i}" for i in range(10)] and meta["scores"]["activation"] == "sigmoid"

    import duckdb
    import pandas as pd
    import polars as pl

    df = pd.read_parquet(out)
    assert sorted(df["path"]) == EXPECTED and len(df["embedding"].iloc[0]) == 192
    pdf = pl.read_parquet(f"{out}/*.parquet")
    assert pdf.height == 5 and pdf["embedding"].dtype == pl.Array(pl.Float32, 192)
    rows = duckdb.sql(f"select count(*), max(len(embedding)) from read_parquet('{out}/*.parquet')").fetchall()
    assert rows == [(5, 192)]
    assert duckdb.sql(f"select count(*) from read_parquet('{out}')").fetchall() == [(5,)]


def test_segment_rows_average_to_the_track_row(catalogue, tiny, tmp_path):
    track = table(run([catalogue], tmp_path / "track", tiny).out)
    seg = table(run([catalogue], tmp_path / "seg", tiny, pool="segment").out, sort=("path", "segment"))
    assert seg.schema.names[:7] == ["path", "root", "duration_s", "n_segments", "segment", "start_s", "end_s"]
    emb = embeddings(seg)
    paths = np.array(seg.column("path").to_pylist())
    for i, path in enumerate(track.column("path").to_pylist()):
        rows = np.flatnonzero(paths == path)
        n = track.column("n_segments")[i].as_py()
        assert len(rows) == n and seg.column("segment").to_numpy()[rows].tolist() == list(range(n))
        np.testing.assert_allclose(emb[rows].astype(np.float64).mean(0), embeddings(track)[i], rtol=0, atol=2e-6)
        dur = track.column("duration_s")[i].as_py()
        starts = segment_starts(n_frames(round(dur * 16000)), SEG, HOP)
        np.testing.assert_allclose(seg.column("start_s").to_numpy()[rows], np.array(starts) * 0.016)
        assert seg.column("end_s").to_numpy()[rows][-1] == pytest.approx(dur, abs=0.02)


def _model_track_rows(tiny, path, patchout=None) -> tuple[np.ndarray, np.ndarray]:
    """What extract must give for one file, computed directly: the mean over its segments of
    the model's embedding and of sigmoid(logits), the model run on the normalised frontend output."""
    from maest_cli.models.checkpoints import build_model, load_checkpoint

    model = build_model(load_checkpoint(tiny)).eval()
    mel = normalize(torch.from_numpy(file_mel(path)))
    embs, scores = [], []
    with torch.inference_mode():
        for s in segment_starts(len(mel), SEG, HOP):
            out = model(mel[s:s + SEG][None], blocks=[BLOCK], logits=True, patchout=patchout)
            embs.append(out.embedding(BLOCK)[0].double())
            scores.append(torch.sigmoid(out.logits.float())[0].double())
    return torch.stack(embs).mean(0).float().numpy(), torch.stack(scores).mean(0).float().numpy()


def test_patchout_none_is_exact_for_short_exact_and_long_files(tiny, tmp_path):
    """fp32 track embeddings == the model's forward on the normalised frontend output; the
    same for preset fast == the forward with Patchout(2, (0, 8)) over the same segments."""
    from maest_cli.models.checkpoints import build_model, load_checkpoint

    d = tmp_path / "a"
    d.mkdir()
    lengths = {"short.wav": 3 * 16000, "exact.wav": (SEG - 1) * 256, "long.wav": 12 * 16000 + 77}
    for i, (name, n) in enumerate(lengths.items()):
        sf.write(d / name, tone_mix(n / 16000 + 0.01, 16000, seed=i, channels=1)[:n, 0], 16000, subtype="FLOAT")
    t = table(run([d], tmp_path / "out", tiny, dtype="fp32", engine="torch").out)  # exact: torch's own forward
    model = build_model(load_checkpoint(tiny)).eval()
    got = dict(zip(t.column("path").to_pylist(), embeddings(t)))
    nseg = dict(zip(t.column("path").to_pylist(), t.column("n_segments").to_pylist()))
    assert nseg == {"exact.wav": 1, "long.wav": len(segment_starts(n_frames(12 * 16000 + 77), SEG, HOP)),
                    "short.wav": 1}
    for name in lengths:
        mel = normalize(torch.from_numpy(file_mel(d / name)))
        assert mel.shape[0] == n_frames(lengths[name])
        with torch.inference_mode():
            embs = [model(mel[s:s + SEG][None], blocks=[BLOCK]).embedding(BLOCK)[0].double()
                    for s in segment_starts(len(mel), SEG, HOP)]
        want = torch.stack(embs).mean(0).float().numpy()
        np.testing.assert_array_equal(got[name], want)
    fast = table(run([d], tmp_path / "fast", tiny, preset="fast", dtype="fp32", engine="torch").out)
    assert not np.allclose(embeddings(fast), embeddings(t), atol=1e-3)  # the preset does change things
    meta = read_metadata(tmp_path / "fast")
    assert meta["preset"]["time_keep_every"] == 2 and meta["preset"]["drop_freq_rows"] == [0, 8]
    for name, row in zip(fast.column("path").to_pylist(), embeddings(fast)):
        np.testing.assert_array_equal(row, _model_track_rows(tiny, d / name, Patchout(2, (0, 8)))[0])


def test_scores_are_the_mean_of_segment_sigmoids(catalogue, tiny, tmp_path):
    files = [catalogue / "a.wav", catalogue / "b" / "c.flac"]  # one segment, several
    track = table(run(files, tmp_path / "track", tiny, scores=True, dtype="fp32", engine="torch").out)
    for name, emb, sc in zip(track.column("path").to_pylist(), embeddings(track), embeddings(track, "scores")):
        want_emb, want_scores = _model_track_rows(tiny, catalogue / ("b" if name == "c.flac" else "") / name)
        np.testing.assert_array_equal(emb, want_emb)
        np.testing.assert_allclose(sc, want_scores, rtol=0, atol=1e-7)
    seg = table(run(files, tmp_path / "seg", tiny, scores=True, dtype="fp32", pool="segment", engine="torch").out,
                sort=("path", "segment"))
    paths = np.array(seg.column("path").to_pylist())
    for i, name in enumerate(track.column("path").to_pylist()):
        rows = np.flatnonzero(paths == name)
        assert len(rows) == track.column("n_segments")[i].as_py()
        np.testing.assert_allclose(embeddings(seg, "scores")[rows].astype(np.float64).mean(0),
                                   embeddings(track, "scores")[i], rtol=0, atol=1e-7)


@pytest.mark.parametrize("native", [True, False])
def test_dtype_auto_follows_the_cpu_and_emulated_bf16_is_refused(catalogue, tiny, tmp_path, monkeypatch, native):
    """The one precision rule: auto gives bf16 only where it is native, else fp32 with one line
    saying why; an explicit bf16 on a CPU that would emulate it is a usage error (exit 2)."""
    import maest_cli.models.precision as rt

    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: native)
    s = run([catalogue / "a.wav"], tmp_path / "auto", tiny)
    assert s.dtype == read_metadata(s.out)["dtype"] == ("bf16" if native else "fp32") and s.n_done == 1
    why = [w for w in s.warnings if "no native bf16" in w]
    assert len(why) == (0 if native else 1) and (native or why[0].startswith("dtype auto gives fp32"))
    if not native:
        with pytest.raises(UsageError, match="no native bf16.*emulated"):
            run([catalogue / "a.wav"], tmp_path / "bf16", tiny, dtype="bf16")
        r = CliRunner().invoke(app, ["extract", str(catalogue / "a.wav"), "--out", str(tmp_path / "cli"),
                                     "--model", tiny, "--dtype", "bf16", "--quiet"])
        assert r.exit_code == 2 and "emulated" in r.output and not (tmp_path / "cli").exists()


def test_threads_are_set_for_the_run_recorded_and_restored(catalogue, tiny, tmp_path):
    before = torch.get_num_threads()
    s = run([catalogue / "a.wav"], tmp_path / "o", tiny, threads=2)
    assert s.threads == 2 and json.loads(s.to_json())["threads"] == 2 and s.workers == 0
    assert read_metadata(s.out)["runtime"] == {"threads": 2, "decoder_workers": 0}
    assert torch.get_num_threads() == before
    assert run([catalogue / "a.wav"], tmp_path / "o", tiny).n_skipped == 1  # threads do not change settings


@pytest.mark.parametrize("where", ["embedding", "scores"])
def test_non_finite_model_output_fails_the_file_not_the_dataset(catalogue, tiny, tmp_path, monkeypatch, where):
    """A second guard behind the frontend's: NaN/inf from the model (here injected into every
    full-length segment) fails those files at stage "model"; no NaN row is written."""
    import maest_cli.embed.extraction as ex

    real = ex.ModelRunner.__call__

    def poisoned(self, frames):
        emb, scores = real(self, frames)
        for k, f in enumerate(frames):
            if len(f) == SEG:
                (emb if where == "embedding" else scores)[k, 1] = np.nan if where == "embedding" else np.inf
        return emb, scores

    monkeypatch.setattr(ex.ModelRunner, "__call__", poisoned)
    s = run([catalogue], tmp_path / "o", tiny, scores=True)
    assert (s.n_done, s.n_failed) == (1, 4)  # a.wav (3 s) is shorter than a segment
    t = table(s.out)
    assert t.column("path").to_pylist() == ["a.wav"] and np.isfinite(embeddings(t, where)).all()
    errors = read_errors(s.out)
    assert set(errors.column("stage").to_pylist()) == {"model"}
    assert all("not finite" in r for r in errors.column("reason").to_pylist())


def test_expert_overrides_and_tokens(catalogue, tiny, tmp_path):
    s = run([catalogue / "a.wav"], tmp_path / "o", tiny, preset="fast", time_keep_every=3, drop_freq_rows="none",
            tokens="avg", hop="full")
    meta = read_metadata(s.out)
    assert meta["preset"]["name"] == "fast+custom" and meta["preset"]["time_keep_every"] == 3
    assert meta["preset"]["drop_freq_rows"] == [] and meta["hop"]["frames"] == SEG
    assert pads.dataset(s.out).schema.field("embedding").type.list_size == 64
    assert Patchout(3, ()).time_index(10) == [0, 3, 6, 9]


def test_workers_and_batches_give_the_same_rows(catalogue, tiny, tmp_path):
    ref = table(run([catalogue], tmp_path / "ref", tiny).out)
    s = run([catalogue], tmp_path / "pool", tiny, workers=2, batch_size=3)
    assert s.n_done == 5 and s.decoder_peak_rss_mb > 0
    got = table(s.out)
    assert got.column("path").to_pylist() == ref.column("path").to_pylist()
    np.testing.assert_allclose(embeddings(got), embeddings(ref), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- bad inputs

def _bad_catalogue(d: Path) -> dict[str, str]:
    """Every bad-input kind next to good files; returns name -> expected words of its reason."""
    d.mkdir()
    write_audio(d / "good1.mp3", 4.0, seed=1)
    sf.write(d / "good2.wav", tone_mix(2.0, 16000, channels=1), 16000)
    (d / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    (d / "empty.mp3").write_bytes(b"")
    whole = Path(write_audio(d / "whole.mp3", 10.0, seed=2)).read_bytes()
    (d / "whole.mp3").unlink()
    (d / "truncated.mp3").write_bytes(whole[: len(whole) // 2])
    (d / "text.flac").write_text("this is not audio\n" * 50)
    nan = tone_mix(2.0, 16000, channels=1)
    nan[8000:8010] = np.nan
    sf.write(d / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(d / "huge.wav", tone_mix(2.0, 16000, channels=1) * np.float32(1e30), 16000, subtype="FLOAT")
    sf.write(d / "tiny.wav", tone_mix(0.1, 16000, channels=1), 16000)
    os.mkfifo(d / "fifo.wav")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(d / "s.ogg"))
    sock.close()
    os.symlink(d / "gone.wav", d / "dangling.mp3")
    (d / "dir.mp3").mkdir()  # a directory with an audio name is walked, not decoded
    sf.write(d / "dir.mp3" / "inner.wav", tone_mix(1.0, 16000, channels=1), 16000)
    return {"corrupt.wav": "not a decodable", "empty.mp3": "empty", "truncated.mp3": "truncated",
            "text.flac": "not a decodable", "nan.wav": "NaN", "huge.wav": "out of range", "tiny.wav": "too short",
            "fifo.wav": "FIFO",
            "s.ogg": "socket", "dangling.mp3": "dangling symlink"}


@pytest.mark.parametrize("workers", [0, 1])
def test_every_bad_input_is_recorded_and_the_run_goes_on(tiny, tmp_path, workers):
    bad = _bad_catalogue(tmp_path / "in")
    s = run([tmp_path / "in"], tmp_path / "out", tiny, workers=workers)
    assert (s.n_files, s.n_done, s.n_failed) == (len(bad) + 3, 3, len(bad)) and s.exit_code == 1
    t = table(s.out)
    assert t.column("path").to_pylist() == ["dir.mp3/inner.wav", "good1.mp3", "good2.wav"]
    assert np.isfinite(embeddings(t)).all()
    import pandas as pd

    errors = pd.read_parquet(Path(s.out) / "_errors")  # the whole folder: every shard's file
    assert list(errors.columns) == ["path", "root", "stage", "reason"] and s.errors_file.endswith(".parquet")
    by_path = {r.path: r for r in errors.itertuples()}
    assert set(by_path) == set(bad) and set(errors.root) == {str(tmp_path / "in")}
    for name, words in bad.items():
        assert words in by_path[name].reason, (name, by_path[name].reason)
        assert by_path[name].stage in ("open", "decode", "mel", "segment")
    assert by_path["tiny.wav"].stage == "segment" and by_path["fifo.wav"].stage == "open"
    assert by_path["huge.wav"].stage == "mel"  # finite samples whose mel overflows: never a NaN row
    import polars as pl

    assert pl.read_parquet(f"{s.out}/*.parquet").height == 3  # the errors do not join the embeddings


def test_unreadable_file_and_directory_permissions(tiny, tmp_path):
    """chmod 000 is only a failure for a non-root user; as root the same PermissionErrors are
    injected where the walk lists a directory and where the decoder opens a file."""
    d = tmp_path / "in"
    (d / "locked").mkdir(parents=True)
    sf.write(d / "ok.wav", tone_mix(1.0, 16000, channels=1), 16000)
    sf.write(d / "locked" / "x.wav", tone_mix(1.0, 16000, channels=1), 16000)
    sf.write(d / "noread.wav", tone_mix(1.0, 16000, channels=1), 16000)
    if os.geteuid() != 0:
        os.chmod(d / "noread.wav", 0)
        os.chmod(d / "locked", 0)
        try:
            s = run([d], tmp_path / "out", tiny)
        finally:
            os.chmod(d / "noread.wav", 0o644)
            os.chmod(d / "locked", 0o755)
    else:  # root reads everything: the PermissionErrors a user would meet are injected
        import maest_cli.audio.decode as audio
        import maest_cli.audio.walk as walk

        real_scandir, real_soundfile = os.scandir, audio.sf.SoundFile

        def scandir(path):
            if str(path).endswith("locked"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_scandir(path)

        def soundfile(path, *args, **kw):
            if os.fsdecode(path).endswith("noread.wav"):
                raise PermissionError(13, "Permission denied", os.fsdecode(path))
            return real_soundfile(path, *args, **kw)

        mp = pytest.MonkeyPatch()
        mp.setattr(walk.os, "scandir", scandir)
        mp.setattr(audio.sf, "SoundFile", soundfile)
        try:
            s = run([d], tmp_path / "out", tiny)
        finally:
            mp.undo()
    errors = {r["path"]: r for r in read_errors(s.out).to_pylist()}
    assert set(errors) == {"locked", "noread.wav"} and s.n_failed == 2 and s.n_done == 1 and s.exit_code == 1
    assert (errors["noread.wav"]["stage"], errors["noread.wav"]["reason"]) == ("open", "permission denied")
    assert errors["locked"]["stage"] == "walk"
    assert errors["locked"]["reason"].lower() == "cannot read directory (permission denied)"


def test_walk_order_filter_hidden_and_symlink_loops(tmp_path):
    d = tmp_path / "lib"
    for rel in ["z.mp3", "a/b.MP3", "a/a.wav", "a.mp3", "m/n/o.flac", ".git/x.mp3", "a/._a.mp3", "notes.txt"]:
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(b"x")
    os.symlink(d, d / "m" / "n" / "loop")  # back to the root: a loop
    os.symlink(d / "a", d / "m" / "alias")  # the same folder twice
    files, problems = find_audio_files([d])
    assert [f.path for f in files] == ["a.mp3", "a/a.wav", "a/b.MP3", "m/n/o.flac", "z.mp3"]
    assert sorted(p.path for p in problems) == ["m/alias", "m/n/loop"] and not any(p.failed for p in problems)
    only_mp3, _ = find_audio_files([d], ["mp3"])
    assert [f.path for f in only_mp3] == ["a.mp3", "a/b.MP3", "z.mp3"]
    again, _ = find_audio_files([d / "z.mp3", d, d / "notes.txt"])  # files named explicitly are taken
    assert again[0].path == "z.mp3" and again[-1].path == "notes.txt" and len(again) == 6
    from maest_cli.errors import UsageError

    with pytest.raises(UsageError, match="no such file"):
        find_audio_files([d / "missing"])


def test_overlapping_paths_give_each_file_once(catalogue, tiny, tmp_path):
    """`extract lib lib/b`, or a link to the same folder: each file (device, inode) once, from
    the first PATH, with one warning per later PATH; hard links inside one PATH stay."""
    link = tmp_path / "alias"
    os.symlink(catalogue, link)
    files, problems = find_audio_files([catalogue, catalogue / "b", link, catalogue / "a.wav"])
    assert [f.path for f in files] == EXPECTED and {f.root for f in files} == {str(catalogue)}
    assert [(p.root, p.failed) for p in problems] == [(str(catalogue / "b"), False), (str(link), False)]
    assert problems[0].reason == f"2 files already found under {catalogue} (overlapping PATHs): each is taken once"
    assert problems[1].reason.startswith("5 files already found under")
    hard = tmp_path / "hard"
    hard.mkdir()
    os.link(catalogue / "a.wav", hard / "one.wav")
    os.link(catalogue / "a.wav", hard / "two.wav")
    assert [f.path for f in find_audio_files([hard])[0]] == ["one.wav", "two.wav"]
    s = run([catalogue, catalogue / "b"], tmp_path / "out", tiny)
    assert (s.n_files, s.n_done) == (5, 5) and table(s.out).column("path").to_pylist() == EXPECTED
    assert [w for w in s.warnings if "already found under" in w]


def test_no_audio_files_is_a_warning_not_an_error(tiny, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "song.m4a").write_bytes(b"x")
    (d / "notes.txt").write_text("x")
    s = run([d], tmp_path / "out", tiny)
    assert (s.n_files, s.exit_code) == (0, 0)
    (w,) = [w for w in s.warnings if "no audio files" in w]
    assert w.startswith(f"no audio files found under {d}") and "1 .m4a" in w and "--ext" in w


def _latin1_catalogue(d: Path) -> None:
    d.mkdir()
    sf.write(d / "plain.wav", tone_mix(1.0, 16000, channels=1), 16000)
    os.rename(d / "plain.wav", os.path.join(d, os.fsdecode(b"caf\xe9.wav")))  # a Latin-1 name
    (d / os.fsdecode(b"bad\xff.mp3")).write_bytes(b"")


def test_names_that_are_not_utf8_are_recorded_escaped(tiny, tmp_path):
    _latin1_catalogue(tmp_path / "latin1")
    files, _ = find_audio_files([tmp_path / "latin1"])
    assert [f.path for f in files] == ["bad\\xff.mp3", "caf\\xe9.wav"]
    assert os.path.exists(files[1].full_path)  # the real name is kept for opening
    s = run([tmp_path / "latin1"], tmp_path / "out", tiny)
    assert s.n_done + s.n_failed == 2
    assert read_errors(s.out).column("path").to_pylist() == ["bad\\xff.mp3"]


def test_the_errors_file_reads_back_names_with_quotes_tabs_and_newlines(tiny, tmp_path):
    """Parquet, not TSV: every name comes back exactly; shards write their own file in
    DIR/_errors/, read together; an unsharded rerun replaces them all."""
    d = tmp_path / "in"
    d.mkdir()
    names = ['say "hi".wav', "tab\there.mp3", "new\nline.flac", "quote's, comma.ogg"]
    for name in names:
        (d / name).write_bytes(b"not audio at all" * 20)
    sf.write(d / "fine.wav", tone_mix(1.0, 16000, channels=1), 16000)
    s = run([d], tmp_path / "out", tiny)
    errors = read_errors(s.out)
    assert sorted(errors.column("path").to_pylist()) == sorted(names) and s.n_failed == 4
    import pandas as pd

    assert sorted(pd.read_parquet(s.errors_file)["path"]) == sorted(names)
    out = tmp_path / "sharded"
    shards = [run([d], out, tiny, shard=f"{i}/2") for i in range(2)]
    assert sorted(p.name for p in (out / "_errors").iterdir()) == [f"errors-s{i}of2.parquet" for i in range(2)
                                                                  if shards[i].n_failed]
    assert sorted(read_errors(out).column("path").to_pylist()) == sorted(names)
    again = run([d], out, tiny)
    assert again.n_failed == 4 and [p.name for p in (out / "_errors").iterdir()] == ["errors.parquet"]


def test_a_failed_write_names_the_file_and_leaves_no_temporary(catalogue, tiny, tmp_path, monkeypatch):
    """Disk full while writing a part: one line naming the file, exit 1, no .tmp left (no
    second attempt at the end), the finished files stay staged and the rerun completes."""
    import maest_cli.embed.store as es

    def disk_full(table, where, **kw):
        where.write(b"PAR1 half a part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(es.pq, "write_table", disk_full)
    out = tmp_path / "out"
    r = runner.invoke(app, ["extract", str(catalogue), "--out", str(out), "--model", tiny, "--block", str(BLOCK),
                            "--workers", "0", "--files-per-part", "2", "-q"])
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("maest: error:")]
    assert line.startswith(f"maest: error: {out}/part-all-") and line.endswith(
        ".parquet: cannot write (No space left on device)")
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    assert len(list(out.glob(".staging-all/*.arrow"))) == 2 and not list(out.glob("part-*"))
    monkeypatch.undo()
    s = run([catalogue], out, tiny)
    assert (s.n_skipped, s.n_done) == (2, 3) and table(out).column("path").to_pylist() == EXPECTED


def test_names_that_are_not_utf8_are_embedded_and_resume(tiny, tmp_path):
    _latin1_catalogue(tmp_path / "latin1")
    s = run([tmp_path / "latin1"], tmp_path / "out", tiny)
    assert (s.n_done, s.n_failed) == (1, 1)
    assert table(s.out).column("path").to_pylist() == ["caf\\xe9.wav"]
    assert run([tmp_path / "latin1"], tmp_path / "out", tiny).n_skipped == 1


def test_a_corrupt_part_file_is_set_aside_and_its_files_redone(catalogue, tiny, tmp_path):
    out = tmp_path / "out"
    run([catalogue], out, tiny, files_per_part=2)
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    parts[0].write_bytes(parts[0].read_bytes()[:100])  # e.g. a power cut without fsync
    s = run([catalogue], out, tiny)
    assert (s.n_done, s.n_skipped) == (2, 3) and any("unreadable part file" in w for w in s.warnings)
    assert table(out).column("path").to_pylist() == EXPECTED
    assert [p.name for p in out.glob("_corrupt-*")] == [f"_corrupt-{parts[0].name}.bad"]


# ---------------------------------------------------------------- resume, locks, shards

def test_rerun_skips_mismatch_refuses_overwrite_restarts(catalogue, tiny, tmp_path):
    out = tmp_path / "out"
    first = run([catalogue], out, tiny)
    again = run([catalogue], out, tiny)
    assert (again.n_done, again.n_skipped, again.parts_written) == (0, 5, 0)
    extra = tmp_path / "more"
    extra.mkdir()
    sf.write(extra / "new.wav", tone_mix(2.0, 16000, channels=1), 16000)
    more = run([catalogue, extra], out, tiny)
    assert (more.n_done, more.n_skipped) == (1, 5)
    t = table(out)
    assert t.num_rows == 6 and len(set(zip(t.column("root").to_pylist(), t.column("path").to_pylist()))) == 6
    with pytest.raises(SettingsMismatch, match="block: DIR has 2, this run 1"):
        run([catalogue], out, tiny, block=1)
    r = runner.invoke(app, ["extract", str(catalogue), "--out", str(out), "--model", tiny, "--block", "1",
                            "--workers", "0", "-q"])
    assert r.exit_code == 2 and "--overwrite" in r.output and "Traceback" not in r.output
    redo = run([catalogue], out, tiny, block=1, overwrite=True)
    assert redo.n_done == 5 and table(out).num_rows == 5 and read_metadata(out)["block"] == 1
    assert first.model_sha256 == redo.model_sha256


def test_a_second_run_on_the_same_dir_is_refused(catalogue, tiny, tmp_path):
    out = tmp_path / "out"
    s = run([catalogue / "a.wav"], out, tiny)  # creates DIR and its manifest
    schema = pads.dataset(s.out).schema.remove_metadata()
    manifest = json.loads((out / "_maest_extract.json").read_text())

    def hold(shard=None) -> EmbeddingStore:  # another run, holding DIR as `extract` does
        return EmbeddingStore(out, schema, manifest["settings"], manifest["metadata"], shard=shard).open()

    holder = hold()
    try:
        with pytest.raises(StoreBusy, match="another `maest extract`"):
            run([catalogue], out, tiny)
        with pytest.raises(StoreBusy, match="an unsharded"):
            run([catalogue], out, tiny, shard="0/2")
    finally:
        holder.close()
    shard0 = hold(Shard(0, 2))
    try:
        assert run([catalogue], out, tiny, shard="1/2").n_failed == 0  # the other shard of the same run
        with pytest.raises(StoreBusy, match="already running"):
            run([catalogue], out, tiny, shard="0/2")
        with pytest.raises(StoreBusy, match="with 2 shards"):
            run([catalogue], out, tiny, shard="0/3")
        with pytest.raises(StoreBusy, match="another `maest extract`"):
            run([catalogue], out, tiny)
    finally:
        shard0.close()
    done = run([catalogue], out, tiny)  # free again: the rest of shard 0's files
    assert done.n_skipped + done.n_done == 5 and table(out).num_rows == 5


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(x) for x in (task / "children").read_text().split()]
            except OSError:
                continue
            out.update(kids)
            todo.extend(kids)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigkill_at_any_moment_then_rerun_gives_each_file_once_and_identical(tiny, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(14):
        sf.write(audio / f"t{i:02d}.wav", tone_mix(6.0, 16000, seed=i, channels=1), 16000)
    hop = "0.08"  # 5-frame hop: ~30 segments per file, so a run lasts long enough to be killed in
    ref = table(run([audio], tmp_path / "ref", tiny, hop=hop).out)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "maest_cli", "extract", str(audio), "--out", str(out), "--model", tiny,
           "--block", str(BLOCK), "--hop", hop, "--files-per-part", "3", "--workers", "1", "--quiet"]
    env = env_for_subprocess(tmp_path)

    # 1: kill the main process only, once a part file is committed; its decoders must die too
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        kids = _descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert kids, "the run had no decoder process"
    deadline = time.monotonic() + 15
    while any(_alive(k) for k in kids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(k) for k in kids), "orphaned decoder processes after SIGKILL"
    partial = table(out)  # readable, whole files only
    assert 0 < partial.num_rows < 14
    rows = {p: i for i, p in enumerate(ref.column("path").to_pylist())}
    np.testing.assert_array_equal(embeddings(partial), embeddings(ref)[[rows[p] for p in partial.column("path").to_pylist()]])

    # 2: kill the whole job at a random moment (maybe during start-up, maybe mid-write)
    delay = float(np.random.default_rng(int(time.time())).uniform(0.2, 5.0))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    time.sleep(delay)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    # 3: run to the end
    done = subprocess.run([*cmd, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"second kill after {delay:.2f} s", done.stderr)
    summary = json.loads(done.stdout)
    assert summary["n_files"] == 14 and summary["n_failed"] == 0
    final = table(out)
    assert final.column("path").to_pylist() == ref.column("path").to_pylist()  # each file exactly once
    np.testing.assert_array_equal(embeddings(final), embeddings(ref))
    leftovers = [p.name for p in out.iterdir() if ".tmp" in p.name or p.name.startswith(".staging")]
    assert not leftovers


def test_two_shard_processes_union_equals_a_single_run(tiny, tmp_path):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(10):
        sf.write(audio / f"s{i}.wav", tone_mix(2.5, 16000, seed=i, channels=1), 16000)
    ref = table(run([audio], tmp_path / "ref", tiny).out)
    out = tmp_path / "out"
    env = env_for_subprocess(tmp_path)
    base = [sys.executable, "-m", "maest_cli", "extract", str(audio), "--out", str(out), "--model", tiny,
            "--block", str(BLOCK), "--quiet", "--json"]
    procs = [subprocess.Popen([*base, "--shard", "0/2", "--workers", "0"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True),  # and as torchrun launches a worker:
             subprocess.Popen([*base, "--workers", "1"], env=env | {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    summaries = [json.loads(r[0]) for r in results]
    files, _ = find_audio_files([audio])
    for i, s in enumerate(summaries):
        assert s["shard"] == f"{i}/2" and s["n_done"] == sum(shard_of(f, 2) == i for f in files)
    assert sum(s["n_done"] for s in summaries) == 10
    union = table(out)
    assert union.column("path").to_pylist() == ref.column("path").to_pylist()
    np.testing.assert_array_equal(embeddings(union), embeddings(ref))
    assert {p.name.split("-")[1] for p in out.glob("part-*.parquet")} == {"s0of2", "s1of2"}
    assert run([audio], out, tiny).n_skipped == 10  # an unsharded rerun sees the union as done


def test_shard_parsing_and_torchrun_environment(monkeypatch):
    assert parse_shard("1/4") == Shard(1, 4) and parse_shard((0, 1)) is None
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    assert parse_shard(None) == Shard(2, 3)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert parse_shard(None) is None
    from maest_cli.errors import UsageError

    for bad in ("2/2", "a/b", "1", "-1/2"):
        with pytest.raises(UsageError):
            parse_shard(bad)


def _collect(pool: DecoderPool, n_files: int, deadline: float, each=None) -> tuple[dict, dict, list]:
    """Read a pool's messages to the end: last message per file, segments since its last
    ("retry"), and the retries seen. `each()` runs before every read (to kill workers)."""
    ends, segs, retries = {}, {}, []
    while len(ends) < n_files and time.monotonic() < deadline:
        if each:
            each()
        msg = pool.get()
        if msg is None:
            continue
        kind, fid = msg[0], msg[1]
        if kind == "seg":
            segs[fid] = segs.get(fid, 0) + 1
        elif kind == "retry":
            segs[fid] = 0
            retries.append(fid)
        else:
            ends[fid] = msg
    return ends, segs, retries


def _wait_for(condition, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_decoder_crash_blames_the_file_being_decoded_not_one_still_in_its_outbox(tmp_path):
    """The worker runs ahead: A is decoded whole (its segments and "done" wait in the worker's
    outbox, the pipe being full) and B is under way when the worker dies. B is the culprit, A is
    not failed: both are decoded again (A innocent, B alone, for a second chance) and come whole."""
    seg, hop = 1876, 938  # 30 s segments: 0.7 MB messages, so A's ~6 MB cannot fit in the pipe
    a, b = tmp_path / "A.wav", tmp_path / "B.wav"
    sf.write(a, tone_mix(150.0, 16000, seed=1, channels=1), 16000)
    sf.write(b, tone_mix(240.0, 16000, seed=2, channels=1), 16000)
    n_a = len(segment_starts(n_frames(150 * 16000), seg, hop))
    # room in the outbox for all of A and a little of B: the worker then blocks inside B
    pool = DecoderPool([(0, str(a)), (1, str(b))], 1, seg, hop, ahead=n_a + 2)
    try:
        (worker,) = pool._workers.values()
        _wait_for(lambda: worker.current.value == 1)  # the main process has read nothing yet
        os.kill(worker.proc.pid, signal.SIGKILL)
        ends, segs, retries = _collect(pool, 2, time.monotonic() + 60)
    finally:
        pool.close()
    assert ends[0][0] == ends[1][0] == "done", ends
    assert sorted(retries) == [0, 1] and ends[0][2] == n_a
    assert segs == {0: ends[0][2], 1: ends[1][2]}  # after its retry, each file came whole


def test_a_file_that_kills_its_decoder_twice_fails_the_others_are_done(tmp_path):
    long = tmp_path / "long.wav"
    sf.write(long, tone_mix(60.0, 16000, channels=1), 16000)
    oks = [tmp_path / f"ok{i}.wav" for i in range(2)]
    for p in oks:
        sf.write(p, tone_mix(2.0, 16000, channels=1), 16000)
    pool = DecoderPool([(0, str(long)), (1, str(oks[0])), (2, str(oks[1]))], 1, SEG, HOP, ahead=1)
    killed: list[int] = []

    def kill_while_decoding_long() -> None:  # a stand-in for a decoder that crashes on this file
        for w in list(pool._workers.values()):
            if len(killed) < 2 and w.current.value == 0 and w.proc.pid not in killed:
                os.kill(w.proc.pid, signal.SIGKILL)
                killed.append(w.proc.pid)

    try:
        ends, segs, retries = _collect(pool, 3, time.monotonic() + 60, kill_while_decoding_long)
    finally:
        pool.close()
    assert len(killed) == 2 and retries[0] == 0
    assert ends[0][0] == "error" and "decoder process died (killed by SIGKILL) while decoding this file, 2 times" \
        in ends[0][3]
    assert ends[1][0] == ends[2][0] == "done" and segs[1] == ends[1][2] and segs[2] == ends[2][2]


def _die_at_once(*args) -> None:
    """A decoder process that dies before decoding anything (a broken install, no memory)."""
    os._exit(3)


def test_decoders_that_keep_dying_stop_the_run_with_one_line(catalogue, tiny, tmp_path, monkeypatch):
    """WorkersDied (an OSError) from the pool: exit code 1 and one line, not a traceback or a spin."""
    import functools

    import maest_cli.embed.extraction as ex

    monkeypatch.setattr(ex, "DecoderPool", functools.partial(DecoderPool, worker_main=_die_at_once))
    r = runner.invoke(app, ["extract", str(catalogue), "--out", str(tmp_path / "o"), "--model", tiny, "--block", "2",
                            "--workers", "1", "-q"])
    assert r.exit_code == 1 and "maest: error: decoder processes keep dying (exit code 3" in r.output
    assert "Traceback" not in r.output


class _Scripted:
    """A decoder source (as InlineDecoder) that sends `prefix` before the real messages."""

    def __init__(self, prefix, inner):
        self.messages = iter([*prefix, *iter(lambda: inner.get(), None)])
        self.inner, self.peak_rss_mb, self.exhausted = inner, 0.0, False

    def get(self, block=True):
        msg = next(self.messages, None)
        self.exhausted = msg is None
        return msg

    def close(self, abort=False):
        self.inner.close(abort)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_retried_file_forgets_the_segments_it_had_sent(catalogue, tiny, tmp_path, monkeypatch, batch_size):
    """Garbage segments, then ("retry"), then the real stream: the rows equal a clean run's
    (whether the garbage was already through the model or still waiting in a batch)."""
    import maest_cli.embed.extraction as ex
    from maest_cli.audio.decoders import InlineDecoder

    ref = table(run([catalogue / "b" / "c.flac"], tmp_path / "ref", tiny, scores=True).out)
    junk = np.full((SEG, 96), 7.0, np.float32)
    prefix = [("seg", 0, 0, 0, junk), ("seg", 0, 1, HOP, junk), ("retry", 0)]
    monkeypatch.setattr(ex, "InlineDecoder", lambda *a: _Scripted(prefix, InlineDecoder(*a)))
    got = table(run([catalogue / "b" / "c.flac"], tmp_path / "got", tiny, scores=True, batch_size=batch_size).out)
    assert got.column("n_segments").to_pylist() == ref.column("n_segments").to_pylist()
    np.testing.assert_allclose(embeddings(got), embeddings(ref), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(embeddings(got, "scores"), embeddings(ref, "scores"), rtol=1e-5, atol=1e-6)


def test_a_source_that_ends_early_is_an_error_not_a_spin(catalogue, tiny, tmp_path, monkeypatch):
    import maest_cli.embed.extraction as ex

    class Empty:
        exhausted, peak_rss_mb = True, 0.0

        def get(self, block=True):
            return None

        def close(self, abort=False):
            pass

    monkeypatch.setattr(ex, "InlineDecoder", lambda *a: Empty())
    with pytest.raises(RuntimeError, match="5 files unaccounted for"):
        run([catalogue], tmp_path / "o", tiny)


def test_a_stuck_decoder_is_killed_and_only_its_file_fails(tmp_path):
    """SIGSTOP the decoder (a stand-in for one looping on a hostile file or a hung mount)."""
    files = [tmp_path / f"f{i}.wav" for i in range(3)]
    for p in files:  # 60 s: ~24 segments, far more than the pipe holds, so it is stopped mid-file
        sf.write(p, tone_mix(60.0, 16000, channels=1), 16000)
    pool = DecoderPool([(i, str(p)) for i, p in enumerate(files)], 1, SEG, HOP, ahead=1, stall_seconds=1.0)
    try:
        deadline = time.monotonic() + 60
        first = None
        while first is None and time.monotonic() < deadline:
            first = pool.get()
        (worker,) = pool._workers.values()
        while worker.conn.poll():  # drain what it sent, so it is not blocked on us
            pool.get(block=False)
        os.kill(worker.proc.pid, signal.SIGSTOP)
        ends = {}
        while len(ends) < 3 and time.monotonic() < deadline:
            msg = pool.get()
            if msg and msg[0] in ("done", "error"):
                ends[msg[1]] = msg
    finally:
        pool.close(abort=True)
    assert ends[0][0] == "error" and "stalled" in ends[0][3]
    assert ends[1][0] == ends[2][0] == "done"


# ---------------------------------------------------------------- the command line

def test_cli_exit_codes_and_json(catalogue, tiny, tmp_path):
    r = runner.invoke(app, ["extract", str(catalogue), "--out", str(tmp_path / "o"), "--model", tiny, "--block", "2",
                            "--workers", "0", "--json"])
    assert r.exit_code == 0, r.output
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    assert len(line) == 1 and json.loads(line[0])["n_done"] == 5
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.wav").write_bytes(b"RIFF nonsense")
    r = runner.invoke(app, ["extract", str(bad), str(catalogue / "a.wav"), "--out", str(tmp_path / "b"),
                            "--model", tiny, "--block", "2", "--workers", "0"])
    assert r.exit_code == 1 and "x.wav" in r.output and "_errors/errors.parquet" in r.output


@pytest.mark.parametrize("args, words", [
    (["--shard", "2/2"], "--shard"),
    (["--hop", "soon"], "--hop"),
    (["--hop", "60"], "--hop"),
    (["--hop", "nan"], "--hop"),
    (["--hop", "inf"], "--hop"),
    (["--hop", "1e400"], "--hop"),
    (["--threads", "0"], "--threads"),
    (["--patchout", "warp"], "unknown patchout preset"),
    (["--tokens", "cls,cls"], "--tokens"),
    (["--pool", "album"], "--pool"),
    (["--block", "9"], "--block"),
    (["--drop-freq-rows", "0,12"], "do not exist"),
    (["--overwrite", "--shard", "0/2"], "--overwrite"),
    (["--dtype", "fp64"], "--dtype"),
])
def test_cli_usage_errors_exit_2_without_traceback(catalogue, tiny, tmp_path, args, words):
    out = tmp_path / "o"
    r = runner.invoke(app, ["extract", str(catalogue), "--out", str(out), "--model", tiny, "--workers", "0",
                            "--block", "2", *args])  # a later --block wins
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output
    assert not out.exists()  # nothing written on a usage error


def test_missing_default_model_says_how_to_get_it(catalogue, tmp_path):
    r = runner.invoke(app, ["extract", str(catalogue), "--out", str(tmp_path / "o"), "-q"])
    assert r.exit_code == 2 and "maest models download discogs-maest-30s-pw-129e" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "o").exists()
    r = runner.invoke(app, ["extract", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no such file or directory" in r.output


def test_output_schema_shapes():
    s = output_schema("segment", 12, None)
    assert s.names == ["path", "root", "duration_s", "n_segments", "segment", "start_s", "end_s", "embedding"]
    assert output_schema("track", 12, 3).field("scores").type.list_size == 3


# ---------------------------------------------------------------- measurement helpers

def test_synthesizer_is_deterministic_and_fidelity_runs(tiny, tmp_path):
    from maest_cli.audio.synth import random_song, render, write_corpus
    from maest_cli.bench.fidelity import evaluate_presets

    spec = random_song(3, 4.0, 5.0)
    x = render(spec, 16000)
    assert x.shape[1] == 2 and abs(len(x) / 16000 - spec.duration_s) < 0.01 and 0.5 < np.abs(x).max() <= 0.9
    np.testing.assert_array_equal(x, render(random_song(3, 4.0, 5.0), 16000))
    paths = write_corpus(tmp_path / "corpus", 2, min_s=4.0, max_s=6.0)
    assert [p.suffix for p in paths] == [".mp3", ".ogg"]
    report = evaluate_presets(tmp_path / "corpus", InferenceSpec(model=str(tiny), block=BLOCK, device="cpu"),
                              ["fastest"], workers=0, work_dir=tmp_path / "work", timing=False, progress=False,
                              threads=[1])
    none, fastest = report["results"]  # the reference `none` is always added, first
    assert none["cosine_min"] == pytest.approx(1.0) and -1 <= fastest["cosine_mean"] < 1.0
    assert none["n_files"] == fastest["n_files"] == 2 and none["threads"] == fastest["threads"] == 1
    assert read_metadata(tmp_path / "work" / "none-t1")["dtype"] == "fp32"


def test_preset_eval_reference_is_always_fp32(monkeypatch):
    import maest_cli.models.precision as rt
    from maest_cli.bench.fidelity import preset_spec

    cpu = torch.device("cpu")
    cfg = tiny_config(frames=316)
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)
    for asked in ("auto", "bf16"):
        assert preset_spec(InferenceSpec(dtype=asked), "none").resolve(cfg, 2, cpu).dtype == "fp32"
    assert preset_spec(InferenceSpec(), "fast").resolve(cfg, 2, cpu).dtype == "bf16"  # its own dtype, resolved
    assert preset_spec(InferenceSpec(dtype="fp32"), "fast").resolve(cfg, 2, cpu).dtype == "fp32"  # explicit wins


# ---------------------------------------------------------------- slow: a real 60-minute file

@pytest.mark.slow
def test_peak_rss_of_a_60_minute_mp3_stays_under_2_gb(tmp_path):
    """The full-size 30 s model (random weights) at preset none on one 60-minute MP3.
    MAEST_LONG_MINUTES shortens it for a quick look."""
    from maest_cli.models.maest import VARIANTS

    minutes = float(os.environ.get("MAEST_LONG_MINUTES", "60"))
    model = save_checkpoint(tmp_path / "maest30s-random.safetensors", MAEST(VARIANTS["30s"]), labels=None)
    long = tmp_path / "long.mp3"
    with sf.SoundFile(long, "w", 44100, 2, format="MP3") as f:
        for i in range(int(minutes * 6)):
            f.write(tone_mix(10.0, 44100, seed=i))
    cmd = [sys.executable, "-m", "maest_cli", "extract", str(long), "--out", str(tmp_path / "out"), "--model",
           str(model), "--patchout", "none", "--dtype", "fp32", "--json", "--quiet"]
    done = subprocess.run(cmd, env=env_for_subprocess(tmp_path) | {"OMP_NUM_THREADS": str(os.cpu_count())},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    import resource

    children_max = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS: main {s['peak_rss_mb']:.0f} MB, decoder {s['decoder_peak_rss_mb']:.0f} MB, "
          f"largest child {children_max:.0f} MB, {s['n_segments']} segments in {s['wall_seconds']:.0f} s")
    assert s["audio_seconds"] == pytest.approx(minutes * 60, abs=1.0)
    assert s["peak_rss_mb"] + s["decoder_peak_rss_mb"] < 2048
