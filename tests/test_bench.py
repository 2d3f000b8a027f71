"""`maest bench`: counted FLOPs, the int8 preset, the report's arithmetic, the plot, the CLI."""

import io
import json
import re
import struct

import numpy as np
import pytest
import torch
from conftest import write_audio
from rich.console import Console
from typer.testing import CliRunner

from maest_cli.bench.throughput import (
    count_gflop,
    effnet_gflop,
    maest_gflop,
    model_gflop,
    n_tokens,
    parse_probe_results,
    print_report,
    run_bench,
)
from maest_cli.cli.app import app
from maest_cli.embed.spec import InferenceSpec
from maest_cli.errors import UsageError
from maest_cli.models.checkpoints import save_checkpoint
from maest_cli.models.maest import MAEST, Patchout, tiny_config
from maest_cli.models.precision import choose_dtype, quantize_linear_int8


@pytest.fixture
def tiny(tmp_path):
    torch.manual_seed(0)
    return str(save_checkpoint(tmp_path / "tiny.safetensors", MAEST(tiny_config(frames=316)),
                               labels=[f"t{i}" for i in range(10)], extra={"name": "tiny-bench"}))


@pytest.fixture
def songs(tmp_path):
    d = tmp_path / "songs"
    d.mkdir()
    write_audio(d / "a.wav", 7.0, sr=16000, seed=1)
    write_audio(d / "b.ogg", 4.0, sr=22050, seed=2)
    return d


def probe_results(path, preset, pr_auc):
    path.write_text(json.dumps({"format": "maest-probe/1", "dataset": {"name": "mtt"}, "preset": preset,
                                "model": "tiny-bench", "test": {"pr_auc": {"mean": pr_auc, "std": None,
                                                                           "values": [pr_auc]},
                                                                "roc_auc": {"mean": 0.9, "std": None,
                                                                            "values": [0.9]}}}))
    return str(path)


# ---------------------------------------------------------------- FLOPs

def test_flop_counter_matches_a_hand_count_of_a_tiny_vit():
    cfg = tiny_config(frames=316)  # width 64, 4 blocks, MLP 128, 9 x 31 patches
    n = 2 + 9 * 31
    conv = 2 * (9 * 31) * 64 * (16 * 16)  # one 16x16 filter per output channel and patch
    linears = 2 * n * (64 * 3 * 64 + 64 * 64 + 64 * 128 + 128 * 64)  # qkv, proj, fc1, fc2
    attention = 2 * (2 * n * n * 64)  # q @ k^T and attn @ v over all heads
    hand = conv + 2 * (linears + attention)
    assert maest_gflop(cfg, 316, 2, None) * 1e9 == pytest.approx(hand, rel=1e-12)
    assert model_gflop(cfg, 316, 2, None) * 1e9 == pytest.approx(hand, rel=1e-12)
    po = Patchout(time_keep_every=3, drop_freq_rows=(0, 8))  # 7 rows x 11 columns
    assert n_tokens(cfg, 316, po) == 2 + 7 * 11
    for block, frames in ((1, 316), (4, 316), (3, 200)):
        assert maest_gflop(cfg, frames, block, po) == pytest.approx(model_gflop(cfg, frames, block, po), rel=1e-12)
    # the head is counted only when all blocks run (block None) and costs one small Linear
    assert maest_gflop(cfg, 316, None, None) == pytest.approx(model_gflop(cfg, 316, 4, None) + 2 * 64 * 10 / 1e9)


def test_effnet_flops_are_torchvisions():
    """EfficientNet-B0 at 224x224 RGB is 0.39 GMAC (torchvision's table); one 30 s segment is 29 patches."""
    from maest_cli.models.effnet import EfficientNetB0, EffNetConfig

    with torch.device("meta"):
        m = EfficientNetB0(EffNetConfig(in_channels=3, n_classes=1000)).eval()
        x = torch.zeros(1, 3, 224, 224)
    assert count_gflop(lambda: m(x)) / 2 == pytest.approx(0.386, abs=0.002)
    per_patch = effnet_gflop(128)
    assert effnet_gflop(1876) == pytest.approx(29 * per_patch)


# ---------------------------------------------------------------- int8

def test_int8_linears_stay_close_to_fp32():
    torch.manual_seed(0)
    model = MAEST(tiny_config(frames=316)).eval()
    q = quantize_linear_int8(model)
    assert type(q.blocks[0].mlp.fc1).__module__.startswith("torch.ao.nn.quantized")
    assert isinstance(model.blocks[0].mlp.fc1, torch.nn.Linear)  # a copy: the fp32 model is untouched
    x = torch.randn(3, 316, 96)
    with torch.inference_mode():
        ref = model(x, blocks=[4]).embedding(4)
        got = q(x, blocks=[4]).embedding(4)
    cos = torch.nn.functional.cosine_similarity(ref, got)
    assert cos.min() > 0.995, cos
    assert (got - ref).norm() / ref.norm() < 0.1
    assert not torch.equal(got, ref)  # it really computed in int8


def test_int8_is_cpu_only_and_opt_in():
    cpu = torch.device("cpu")
    assert choose_dtype("int8", cpu).dtype == "int8"
    assert choose_dtype("auto", cpu).dtype in ("fp32", "bf16")
    with pytest.raises(UsageError, match="CPU only"):
        choose_dtype("int8", torch.device("cuda"))


def test_extract_runs_the_int8_preset(tiny, songs, tmp_path):
    from maest_cli.bench.fidelity import cosine_to_reference
    from maest_cli.embed.extraction import extract
    from maest_cli.embed.store import read_metadata

    a = extract([str(songs)], tmp_path / "fp32", model=tiny, preset="fast", block=3, workers=0, progress=False)
    b = extract([str(songs)], tmp_path / "int8", model=tiny, preset="fast-int8", block=3, workers=0, progress=False)
    assert a.n_done == b.n_done == 2 and b.dtype == "int8"
    assert read_metadata(tmp_path / "int8")["preset"]["dtype"] == "int8"
    cos = cosine_to_reference(tmp_path / "fp32", tmp_path / "int8")
    assert len(cos) == 2 and cos.min() > 0.99


# ---------------------------------------------------------------- the model stops where it is asked

def test_runner_stops_after_the_block_and_skips_the_head():
    from maest_cli.audio.frontend import OFFICIAL_NORM
    from maest_cli.embed.extraction import ModelRunner
    from maest_cli.models.engines import TorchEngine
    from maest_cli.models.graph import EmbeddingGraph

    model = MAEST(tiny_config(frames=316)).eval()
    ran = []
    for name in ("blocks.1", "blocks.2", "blocks.3", "norm", "head"):
        model.get_submodule(name).register_forward_hook(lambda *a, name=name: ran.append(name))
    x = [np.random.default_rng(0).standard_normal((316, 96)).astype(np.float32)]
    cpu = torch.device("cpu")
    ModelRunner(TorchEngine(EmbeddingGraph(model, 2, ("cls",), None, False, OFFICIAL_NORM), cpu, "fp32"))(x)
    assert ran == ["blocks.1"]
    ran.clear()
    ModelRunner(TorchEngine(EmbeddingGraph(model, 2, ("cls",), None, True, OFFICIAL_NORM), cpu, "fp32"))(x)
    assert ran == ["blocks.1", "blocks.2", "blocks.3", "norm", "head"]  # scores need every block


# ---------------------------------------------------------------- the bench

def test_bench_end_to_end_on_a_tiny_model(tiny, songs, tmp_path):
    plot = tmp_path / "bench.png"
    probes = [probe_results(tmp_path / "probe.json", "none", 0.41),
              "effnet-b0=" + probe_results(tmp_path / "effnet.json", None, 0.37)]
    r = run_bench(InferenceSpec(model=tiny, block=3, device="cpu"), presets="none,fastest,fast-int8", audio=songs,
                  workers=0, repeats=2, warmup=1, threads=1, probe_results=probes, plot=plot)
    assert r["format"] == "maest-bench/1" and r["threads"] == 1 and r["frames"] == 316
    assert [x["name"] for x in r["results"]] == ["none", "fastest", "fast-int8"]
    auto = choose_dtype("auto", torch.device("cpu")).dtype  # fp32 here, bf16 where the CPU runs it natively
    assert [x["dtype"] for x in r["results"]] == [auto, auto, "int8"]
    base = r["baseline"]
    assert base["name"] == "effnet-b0" and base["patches"] == 4 and "batchnorm folded" in base["tricks"]
    assert set(r["peak"]) == {x["dtype"] for x in [*r["results"], base]}
    for x in [*r["results"], base]:
        assert len(x["seconds"]) == 2 and x["min_s"] <= x["median_s"] <= x["max_s"]
        assert x["audio_s"] == pytest.approx(315 * 256 / 16000)
        assert x["audio_min_per_s"] == pytest.approx(x["audio_s"] / 60 / x["median_s"])
        assert x["audio_min_per_s_min"] <= x["audio_min_per_s"] <= x["audio_min_per_s_max"]
        assert x["ratio_to_baseline"] == pytest.approx(x["audio_min_per_s"] / base["audio_min_per_s"])
        assert x["gflops"] == pytest.approx(x["gflop"] / x["median_s"])
        assert x["efficiency"] == pytest.approx(x["gflops"] / r["peak"][x["dtype"]]["gflops"])
        assert x["e2e_audio_min_per_s"] > 0
    none, fastest, fast_int8 = r["results"]
    assert fastest["gflop"] < none["gflop"] / 3 and fastest["tokens"] == 2 + 5 * 8
    assert none["cosine_mean"] == pytest.approx(1.0) and fast_int8["cosine_mean"] < 1.0
    assert r["end_to_end"]["n_files"] == 2 and r["end_to_end"]["audio_minutes"] == pytest.approx(11 / 60, rel=0.01)
    assert none["probe"]["map"] == 0.41 and base["probe"]["map"] == 0.37
    assert "targets" not in r
    shown = io.StringIO()
    print_report(r, Console(file=shown, width=200))
    assert "cos to none" in shown.getvalue() and "GEMM peak" in shown.getvalue()
    assert not [line for line in shown.getvalue().splitlines() if re.search(r"target|issue", line, re.I)]
    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width > height  # two panels side by side: fidelity and probe mAP

def test_bench_end_to_end_runs_on_each_engine(tiny, songs):
    r = run_bench(InferenceSpec(model=tiny, block=2, device="cpu"), presets="none,fast-int8",
                  engines="torch,openvino", audio=songs, workers=0, repeats=1, warmup=0, threads=1, baseline="none")
    rows = {(x["name"], x["engine"]): x for x in r["results"]}
    assert set(rows) == {("none", "torch"), ("none", "openvino"), ("fast-int8", "torch")}
    assert r["end_to_end"]["engines"] == ["torch", "openvino"]  # int8 presets run on torch, in its pass
    for x in rows.values():
        assert x["e2e_audio_min_per_s"] > 0 and x["n_files_failed"] == 0
    # `none` is the fidelity reference of its own engine (fp32), so its cosine is 1 on both
    assert rows["none", "openvino"]["cosine_min"] > 0.99999 and rows["none", "torch"]["cosine_min"] > 0.99999
    assert rows["fast-int8", "torch"]["cosine_mean"] < 1.0



def test_bench_cli_json_model_only(tiny, tmp_path):
    r = CliRunner().invoke(app, ["bench", "--model", tiny, "--block", "2", "--presets", "none,fast", "--baseline",
                                 "none", "--repeats", "1", "--warmup", "0", "--json", "--out",
                                 str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report == json.loads((tmp_path / "b.json").read_text())
    assert report["baseline"] is None and [x["name"] for x in report["results"]] == ["none", "fast"]
    assert "ratio_to_baseline" not in report["results"][0] and report["end_to_end"] is None


def test_bench_engines_interleaved_rows_carry_the_engine(tiny):
    """Each preset on each engine (int8 presets on torch only), EfficientNet-B0 on each engine, and
    the figure at extract's protocol (hop half: every second embedded twice)."""
    r = CliRunner().invoke(app, ["bench", "--model", tiny, "--block", "2", "--presets", "none,fast-int8",
                                 "--engine", "torch,openvino", "--repeats", "1", "--warmup", "0", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [(x["name"], x["engine"]) for x in report["results"]] == [
        ("none", "torch"), ("none", "openvino"), ("fast-int8", "torch")]
    assert [(b["name"], b["engine"]) for b in report["baselines"]] == [("effnet-b0", "torch"),
                                                                       ("effnet-b0", "openvino")]
    for row in report["results"]:
        assert row["median_s"] > 0 and row["audio_min_per_s"] > 0
        assert row["extract_audio_min_per_s"] == pytest.approx(row["audio_min_per_s"] * 158 / 315)
    with pytest.raises(UsageError, match="--engine"):
        run_bench(InferenceSpec(model=tiny, device="cpu"), engines="torch,onnx")


@pytest.mark.parametrize("args, words", [
    (["--presets", "nope"], "unknown patchout preset"),
    (["--baseline", "resnet"], "--baseline"),
    (["--plot", "x.png"], "--plot needs"),
    (["--block", "9"], "--block 9"),
    (["--repeats", "0"], "--repeats"),
    (["--probe", "missing.json"], "no such file"),
])
def test_bench_usage_errors(tiny, tmp_path, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["bench", "--model", tiny, "--repeats", "1", *args])
    assert r.exit_code == 2 and words in r.output and "Traceback" not in r.output, r.output


def test_emulated_bf16_is_refused(monkeypatch):
    import maest_cli.models.precision as rt

    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(UsageError, match="no native bf16.*emulated"):
        run_bench(InferenceSpec(dtype="bf16", device="cpu"), variant="5s", repeats=1)


def test_probe_results_need_a_name_and_a_map(tmp_path):
    good = probe_results(tmp_path / "p.json", "fast", 0.3)
    assert set(parse_probe_results([good, f"effnet-b0={good}"])) == {"fast", "effnet-b0"}
    with pytest.raises(UsageError, match="names no preset"):
        parse_probe_results([probe_results(tmp_path / "q.json", None, 0.3)])


def test_train_bench_prints_figures_not_criteria(capsys):
    from rich.console import Console

    from maest_cli.bench.training import print_train_bench
    from maest_cli.models.precision import machine_info

    rows = [{"setting": name, "tokens": t, "median_s": s, "spread": 0.01, "samples_per_s": 4 / s, "speedup": 2.0 / s}
            for name, t, s in (("no patchout", 100, 2.0), ("patchout -3t", 60, 1.0))]
    print_train_bench({"variant": "5s", "batch_size": 4, "dtype": "fp32", "results": rows, "speedup": 2.0,
                       "machine": machine_info()}, Console(stderr=True))
    err = capsys.readouterr().err
    assert "2.00x" in err and not re.search(r"target|issue", err, re.I)


@pytest.mark.slow
def test_compiled_baseline_gives_the_same_embeddings():
    """torch.compile (inductor: needs a C++ compiler, tens of seconds) of the baseline."""
    from maest_cli.bench.throughput import effnet_contender

    eager = effnet_contender(316, "fp32", torch.device("cpu"))
    compiled = effnet_contender(316, "fp32", torch.device("cpu"), compile_model=True)
    assert "compile_error" not in compiled.info and "torch.compile" in compiled.info["tricks"]
    torch.testing.assert_close(compiled.call(), eager.call(), rtol=1e-4, atol=1e-4)


def test_attention_runs_the_flash_kernel_on_cpu():
    """The CPU flash kernel is ~4x faster than the math path at MAEST's sizes (same result to 1e-6):
    the model must not fall off it (e.g. through a mask or a non-default scale)."""
    from torch.profiler import profile

    model = MAEST(tiny_config(frames=316)).eval()
    with torch.inference_mode(), profile() as prof:
        model(torch.randn(1, 316, 96), blocks=[1])
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names, sorted(n for n in names if "attention" in n)


def test_baseline_end_to_end_through_decoder_processes(songs, tmp_path):
    from maest_cli.bench.throughput import effnet_end_to_end

    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"not audio at all" * 100)
    paths = sorted(str(p) for p in songs.iterdir()) + [str(bad)]
    r = effnet_end_to_end(paths, 316, "fp32", torch.device("cpu"), workers=1)
    assert r["n_files"] == 2 and r["n_failed"] == 1
    assert r["audio_s"] == pytest.approx(11.0, abs=0.01)
    # a.wav, 7 s = 439 frames: segments at 0 and 123 (end-aligned), 4 patches each; b.ogg, 4 s = 251 frames: 2
    assert r["patches"] == 4 + 4 + 2
    assert r["audio_min_per_s"] == pytest.approx(r["audio_s"] / 60 / r["seconds"])
