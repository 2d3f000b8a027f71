"""`maest bench`: audio-minutes analysed per second of each preset against EfficientNet-B0.

What one timed call analyses is the same on both sides: one segment of the model (30 s for
MAEST-30s). MAEST takes it whole (batch 1, as extract runs on CPU); EfficientNet-B0 takes the
same frames as Discogs-EffNet does, 128-frame patches with hop 62 (29 for 30 s), in one batch.
Throughput = segment seconds / 60 / seconds per call.

The machine may be shared and noisy, so every contender (each preset, the baseline and a
GEMM probe per dtype) is timed in turn within each repeat, after warm-up, in one process with
the same threads: load drifts hit all of them alike. Figures are medians with min and max;
ratios (to the baseline, to the peak) are of medians measured side by side.

FLOPs are counted from the architecture, not guessed: torch's FlopCounterMode on a real
forward of the same graph (on the meta device: shapes only, no arithmetic), counting the
convolutions, Linear layers and attention (SDPA) matmuls. Efficiency = achieved FLOP/s over
the GEMM probe's rate at the same dtype in the same run: hardware-independent, unlike
audio-min/s. int8 presets do the same arithmetic in int8, so their peak is an int8 GEMM's.

With `--audio DIR`, end-to-end throughput (decode, resample, mel, model) and fidelity (cosine
of track embeddings to preset `none` in fp32) come from `preset_eval.evaluate_presets`, which
runs `extract` per preset; the baseline is run through the same decoder processes.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from maest_cli.audio.decoders import DecoderPool, InlineDecoder, start_early
from maest_cli.audio.frontend import HOP_SIZE, SAMPLE_RATE
from maest_cli.audio.walk import find_audio_files
from maest_cli.bench.fidelity import evaluate_presets, random_weights_model
from maest_cli.embed.spec import InferenceSpec, Resolved, choose_device
from maest_cli.errors import UsageError
from maest_cli.io.artefacts import write_png
from maest_cli.models.checkpoints import PAPER_BLOCK
from maest_cli.models.effnet import (
    PATCH_FRAMES,
    EfficientNetB0,
    calibrate_batchnorm,
    mel_patches,
    n_patches,
    patch_grid_hop,
    to_channels_last,
)
from maest_cli.models.effnet import for_inference as effnet_for_inference
from maest_cli.models.engines import ENGINES, choose_engine, convert_module, make_engine, openvino_compile
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.maest import MAEST, VARIANTS, MaestConfig, Patchout
from maest_cli.models.precision import (
    DTYPES,
    QUANTISED,
    autocast,
    choose_dtype,
    cpu_has_native_bf16,
    for_inference,
    machine_info,
    quantize_linear_int8,
    set_threads,
    torch_threads,
)
from maest_cli.models.presets import get_preset, load_presets
from maest_cli.models.registry import load_model
from maest_cli.probing.report import read_results

FORMAT = "maest-bench/1"
BASELINES = ("effnet-b0", "none")
AUDIO_EXTENSIONS = ["mp3", "ogg", "opus", "flac", "wav"]  # what preset_eval walks: both sides see the same files


# ------------------------------------------------------------------ counting

def count_gflop(fn: Callable[[], object]) -> float:
    """FLOPs (2 per multiply-add) of one call of fn, as torch's FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        fn()
    return counter.get_total_flops() / 1e9


def maest_gflop(cfg: MaestConfig, frames: int, block: int | None, patchout: Patchout | None) -> float:
    """Counted GFLOP of a MAEST forward over `frames` up to `block` (None: all blocks + head)."""
    with torch.device("meta"):
        model = MAEST(cfg).eval()
        x = torch.zeros(1, frames, cfg.n_mels)
    blocks = [] if block is None else [block]
    return count_gflop(lambda: model(x, blocks=blocks, logits=block is None, patchout=patchout))


def effnet_gflop(frames: int) -> float:
    """Counted GFLOP of EfficientNet-B0's embeddings of the patches of `frames` mel frames."""

    with torch.device("meta"):
        model = EfficientNetB0().eval()
        x = torch.zeros(n_patches(frames), 1, PATCH_FRAMES, 96)
    return count_gflop(lambda: model.embed(x))


def model_gflop(cfg: MaestConfig, frames: int, block: int | None, patchout: Patchout | None) -> float:
    """The same count by hand (multiply-adds x 2 of the patch conv, Linear layers and attention
    matmuls up to `block`); a test holds `maest_gflop` to it."""
    f = (cfg.n_mels - cfg.patch) // cfg.stride + 1
    t = (frames - cfg.patch) // cfg.stride + 1
    d, depth = cfg.width, cfg.depth if block is None else block
    po = patchout or Patchout()
    n = 2 + len(po.freq_index(f)) * len(po.time_index(t))
    conv = 2 * f * t * d * cfg.patch * cfg.patch
    per_block = 2 * n * (4 * d * d + 2 * d * cfg.mlp_dim) + 4 * n * n * d
    return (conv + depth * per_block) / 1e9


def n_tokens(cfg: MaestConfig, frames: int, patchout: Patchout | None) -> int:
    po = patchout or Patchout()
    t = (frames - cfg.patch) // cfg.stride + 1
    return 2 + len(po.freq_index(cfg.f_patches)) * len(po.time_index(t))


# ------------------------------------------------------------------ timing

@dataclass
class Contender:
    """One thing to time: a call, what it analyses and what it computes."""

    name: str
    kind: str  # "maest", "effnet" or "matmul"
    dtype: str
    call: Callable[[], object]
    audio_s: float = 0.0
    gflop: float = 0.0
    info: dict = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)


def time_interleaved(contenders: list[Contender], repeats: int, warmup: int, device: torch.device,
                     progress: Callable[[str], None] | None = None) -> None:
    """Fill each contender's `seconds`: `warmup` untimed calls each, then `repeats` rounds in
    which every contender runs once, in turn."""
    def run(c: Contender) -> float:
        t0 = time.perf_counter()
        c.call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for c in contenders:
        for _ in range(warmup):
            run(c)
    for r in range(repeats):
        for c in contenders:
            c.seconds.append(run(c))
        if progress:
            progress(f"round {r + 1}/{repeats}: " + ", ".join(f"{c.name} {c.seconds[-1]:.3f} s" for c in contenders))


def matmul_probe(dtype: str, device: torch.device, n: int | None = None) -> Contender:
    """A square n x n GEMM at `dtype`: the rate any model at that dtype could reach here. The size
    is fixed (2048 on CPU: large enough for the kernels' full rate, as MAEST's [1685 x 768] x
    [768 x 3072] GEMMs get), not tuned to a timing that load would skew; emulated bf16 gets 256,
    or one call would take a minute. int8 is a dynamically quantised Linear, the int8 presets'
    kernel."""

    if n is None:
        emulated = device.type == "cpu" and dtype == "bf16" and not cpu_has_native_bf16()
        n = 256 if emulated else 2048 if device.type == "cpu" else 8192
    if dtype in QUANTISED:
        lin = quantize_linear_int8(torch.nn.Sequential(torch.nn.Linear(n, n, bias=False)))
        x = torch.randn(n, n)

        def call() -> object:
            with torch.inference_mode():
                return lin(x)
    else:
        a = torch.randn(n, n, device=device).to(DTYPES[dtype])
        b = torch.randn(n, n, device=device).to(DTYPES[dtype])

        def call() -> object:
            return a @ b

    return Contender(f"gemm-{dtype}", "matmul", dtype, call, gflop=2 * n ** 3 / 1e9, info={"n": n})


def maest_contender(name: str, model: torch.nn.Module, cfg: MaestConfig, frames: int, block: int | None,
                    patchout: Patchout | None, dtype: str, device: torch.device, engine: str = "torch",
                    threads: int | None = None) -> Contender:
    """One segment through MAEST at `dtype` on `engine` (int8: `model` is the quantised copy; openvino:
    the EmbeddingGraph to `block`, None meaning every block and the logits, converted and compiled
    once, untimed)."""
    x = torch.randn(1, frames, cfg.n_mels, device=device)
    po = None if patchout is None or patchout.is_identity else patchout
    if engine == "openvino":
        graph = EmbeddingGraph(model, block if block is not None else cfg.depth, patchout=po, scores=block is None)
        run, xn = make_engine("openvino", graph, device, dtype, threads or torch.get_num_threads()), x.cpu().numpy()

        def call() -> object:
            return run(xn)
    else:
        blocks = [] if block is None else [block]

        def call() -> object:
            with torch.inference_mode(), autocast(device, dtype):
                return model(x, blocks=blocks, logits=block is None, patchout=po)

    return Contender(name, "maest", dtype, call, audio_s=(frames - 1) * HOP_SIZE / SAMPLE_RATE,
                     gflop=maest_gflop(cfg, frames, block, po),
                     info={"engine": engine, "time_keep_every": (po or Patchout()).time_keep_every,
                           "drop_freq_rows": list((po or Patchout()).drop_freq_rows),
                           "tokens": n_tokens(cfg, frames, po)})


def preset_contenders(plan: Sequence[Resolved], model: torch.nn.Module, cfg: MaestConfig, frames: int,
                      block: int | None, engines: Sequence[str], say: Callable[[str], None]) -> list[Contender]:
    """One contender per preset of `plan` and engine (int8 presets are torch's dynamic int8, whatever
    the engine asked: they are timed once, on torch)."""
    quantised = for_inference(model, "int8") if any(r.dtype == "int8" for r in plan) else None
    contenders, timed = [], set()
    for r in plan:
        for requested in engines:
            engine = "torch" if r.dtype in QUANTISED else choose_engine(requested, r.device, r.dtype).engine
            if (r.preset.name, engine) in timed:
                continue
            timed.add((r.preset.name, engine))
            if engine == "openvino":
                say(f"converting {r.preset.name} for OpenVINO ...")
            contenders.append(maest_contender(r.preset.name, quantised if r.dtype == "int8" else model, cfg, frames,
                                              block, r.preset.patchout, r.dtype, r.device, engine))
    return contenders


def baseline_contenders(frames: int, dtype: str, device: torch.device, engines: Sequence[str],
                        compile_model: bool, say: Callable[[str], None], model=None) -> list[Contender]:
    """EfficientNet-B0 through each engine that MAEST runs on (a fair baseline)."""
    out = []
    for engine in dict.fromkeys(choose_engine(e, device, dtype).engine for e in engines):
        if engine == "openvino":
            out.append(effnet_engine_contender(frames, dtype, torch.get_num_threads(), model=model))
            continue
        if compile_model:
            say("compiling the baseline (torch.compile, inductor): tens of seconds ...")
        c = effnet_contender(frames, dtype, device, compile_model=compile_model, model=model)
        c.info = {"engine": "torch", **c.info}
        out.append(c)
    return out


def effnet_engine_contender(frames: int, dtype: str, threads: int, name: str = "effnet-b0", model=None) -> Contender:
    """effnet_contender's patches through OpenVINO (BatchNorm folded; bf16 where `dtype` is)."""
    run_dtype = "bf16" if dtype == "bf16" else "fp32"
    net = effnet_for_inference(model if model is not None else random_effnet(), fold_bn=True, channels_last=False)

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net.embed(x)

    x = mel_patches(torch.randn(frames, 96))
    compiled = openvino_compile(convert_module(Embed().eval(), x), run_dtype, threads)
    request, xn = compiled.create_infer_request(), x.numpy()
    return Contender(name, "effnet", run_dtype, lambda: request.infer([xn]),
                     audio_s=(frames - 1) * HOP_SIZE / SAMPLE_RATE, gflop=effnet_gflop(frames),
                     info={"engine": "openvino", "patches": n_patches(frames), "batch": n_patches(frames),
                           "tricks": ["batchnorm folded", f"OpenVINO {run_dtype}"]})


def parse_engines(engines: str | Sequence[str]) -> list[str]:
    """'torch,openvino' -> ['torch', 'openvino'] (auto stays: it resolves per preset)."""
    items = [e.strip() for e in (engines.split(",") if isinstance(engines, str) else engines) if e.strip()]
    bad = [e for e in items if e not in ENGINES]
    if not items or bad:
        raise UsageError(f"--engine {','.join(items)!r}: choose one or more of {', '.join(ENGINES)}")
    return list(dict.fromkeys(items))


def random_effnet():
    """EfficientNet-B0 with seeded random weights and BatchNorm statistics set from random input,
    so activations keep a trained network's scale instead of shrinking to ~1e-14 (a step from the
    subnormal floats that x86 computes slowly): the time of real weights."""

    torch.manual_seed(0)
    return calibrate_batchnorm(EfficientNetB0(), mel_patches(torch.randn(1876, 96))).eval()


def effnet_contender(frames: int, dtype: str, device: torch.device, fold_bn: bool = True,
                     channels_last: bool = True, compile_model: bool = False, name: str = "effnet-b0",
                     model=None) -> Contender:
    """The same segment as Discogs-EffNet patches through EfficientNet-B0's embeddings (`model`,
    default random weights: the time is the same), with every trick the CNN can use here. `compile_model`: torch.compile (inductor
    with freezing) fuses the CNN's many small element-wise ops; it needs a C++ compiler and tens
    of seconds, and falls back to eager (noted) when it fails."""

    model = effnet_for_inference(model if model is not None else random_effnet(), fold_bn=fold_bn,
                                 channels_last=channels_last).to(device)
    x = mel_patches(torch.randn(frames, 96)).to(device)
    if channels_last:
        x = to_channels_last(x)
    run_dtype = "fp32" if dtype in QUANTISED else dtype
    info: dict = {"patches": n_patches(frames), "batch": n_patches(frames)}
    forward, is_compiled = model.embed, False
    if compile_model:
        try:
            compiled = torch.compile(model.embed, options={"freezing": True})
            with torch.inference_mode(), autocast(device, run_dtype):
                compiled(x)  # compiles now, not inside the timed calls
            forward, is_compiled = compiled, True
        except Exception as e:  # noqa: BLE001 - no compiler, unsupported backend...: eager, and say so
            info["compile_error"] = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"

    def call() -> object:
        with torch.inference_mode(), autocast(device, run_dtype):
            return forward(x)

    tricks = [t for t, on in (("batchnorm folded", fold_bn), ("channels_last", channels_last),
                              ("torch.compile", is_compiled)) if on]
    if run_dtype != "fp32":
        tricks.append(f"{run_dtype} autocast")
    info["tricks"] = tricks
    if dtype in QUANTISED:
        info["note"] = ("int8 dynamic quantisation covers Linear layers; EfficientNet-B0's embedding path has "
                        "none (its convolutions would need static quantisation), so it runs in fp32")
    return Contender(name, "effnet", run_dtype, call, audio_s=(frames - 1) * HOP_SIZE / SAMPLE_RATE,
                     gflop=effnet_gflop(frames), info=info)


def summarise(c: Contender) -> dict:
    med, lo, hi = statistics.median(c.seconds), min(c.seconds), max(c.seconds)
    row = {"name": c.name, "model": c.kind, "dtype": c.dtype, **c.info, "seconds": c.seconds, "median_s": med,
           "min_s": lo, "max_s": hi, "spread": (hi - lo) / 2 / med, "gflop": c.gflop, "gflops": c.gflop / med}
    if c.audio_s:
        row.update(audio_s=c.audio_s, audio_min_per_s=c.audio_s / 60 / med,
                   audio_min_per_s_min=c.audio_s / 60 / hi, audio_min_per_s_max=c.audio_s / 60 / lo,
                   gflop_per_audio_min=c.gflop * 60 / c.audio_s)
    return row


# ------------------------------------------------------------------ end to end (baseline)

def effnet_end_to_end(paths: list[str], segment_frames: int, dtype: str, device: torch.device,
                      workers: int = 1) -> dict:
    """EfficientNet-B0 on decoded files: extract's decoder processes cut each file into segments
    on one hop-62 patch grid, the main process runs the patches and pools a mean embedding per
    file. Throughput counts each file's duration once, from its first decoded segment to the
    last file done (extract's steady state)."""
    import numpy as np


    model = effnet_for_inference(random_effnet()).to(device)
    run_dtype = "fp32" if dtype in QUANTISED else dtype
    tasks = list(enumerate(paths))
    if workers > 0:
        start_early()
        source = DecoderPool(tasks, workers, segment_frames, patch_grid_hop(segment_frames))
    else:
        source = InlineDecoder(tasks, segment_frames, patch_grid_hop(segment_frames))
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    closed: set[int] = set()
    audio_s, failed, t_first = 0.0, 0, None
    try:
        while len(closed) < len(tasks):
            msg = source.get()
            if msg is None:
                if source.exhausted:
                    raise RuntimeError(f"the decoders stopped with {len(tasks) - len(closed)} files unaccounted for")
                continue
            t_first = t_first or time.perf_counter()
            kind, fid = msg[0], msg[1]
            if kind == "seg":
                x = mel_patches(torch.from_numpy(np.ascontiguousarray(msg[4]))).to(device)
                with torch.inference_mode(), autocast(device, run_dtype):
                    emb = model.embed(to_channels_last(x)).float().sum(0)
                sums[fid] = sums.get(fid, 0) + emb
                counts[fid] = counts.get(fid, 0) + x.shape[0]
            elif kind == "done":
                audio_s += msg[3] / SAMPLE_RATE
                sums.pop(fid, None)  # the embedding itself is not kept: only its cost matters here
                closed.add(fid)
            elif kind == "error":
                failed += 1
                closed.add(fid)
            elif kind == "retry":
                sums.pop(fid, None)
                counts.pop(fid, None)
    finally:
        source.close(abort=len(closed) < len(tasks))
    seconds = time.perf_counter() - t_first if t_first else 0.0
    return {"audio_s": audio_s, "seconds": seconds, "n_files": len(tasks) - failed, "n_failed": failed,
            "patches": sum(counts.values()), "audio_min_per_s": audio_s / 60 / seconds if seconds else None}


# ------------------------------------------------------------------ the run


def resolve_presets(presets: str | list[str] | None) -> list:
    """'all' / None -> every preset of configs/presets.toml; a list or 'a,b' -> those, checked."""

    table = load_presets()
    if presets is None or presets == "all" or presets == ["all"]:
        return list(table.values())
    names = [p.strip() for p in (presets.split(",") if isinstance(presets, str) else presets) if p.strip()]
    if not names:
        raise UsageError("--presets: give preset names or 'all'")
    return [get_preset(n, presets=table) for n in dict.fromkeys(names)]


def parse_probe_results(specs: list[str] | None) -> dict[str, dict]:
    """['results.json', 'effnet-b0=other.json'] -> {row name: results}; a file's own `preset`
    names its row unless NAME= is given."""

    out: dict[str, dict] = {}
    for spec in specs or []:
        name, _, path = spec.rpartition("=") if "=" in spec and not Path(spec).exists() else ("", "", spec)
        res = read_results(path)
        key = name or res.get("preset")
        if not key:
            raise UsageError(f"--probe {spec}: the file names no preset; write NAME={path}")
        if (res.get("test", {}).get("pr_auc") or {}).get("mean") is None:
            raise UsageError(f"--probe {spec}: no test mAP in this results file")
        out[str(key)] = res
    return out


def run_bench(spec: InferenceSpec | None = None, *, presets: str | list[str] | None = "all", variant: str = "30s",
              full_model: bool = False, baseline: str = "effnet-b0", threads: int | None = None,
              audio: str | Path | None = None, workers: int = 1, repeats: int = 5, warmup: int = 1,
              probe_results: list[str] | None = None, plot: str | Path | None = None,
              compile_baseline: bool = False, console=None, engines: str | Sequence[str] = "torch") -> dict:
    """Time every preset (on each of `engines`) and the baseline (on each engine) side by side; return the report (`print_report` shows
    it; `plot` gets `plot_report`'s PNG). `spec` is what each preset varies: its model (None:
    random weights of `variant`, which take the same time), block (None: the model's default),
    device, dtype and, for `audio`, extract's hop. `full_model`: all blocks and the classifier head."""
    from rich.console import Console

    spec = spec or InferenceSpec(device="cpu")
    console = console or Console(stderr=True, highlight=False)
    say = (lambda m: console.print(m, markup=False, soft_wrap=True))
    # -- options, all checked before anything slow
    if repeats < 1 or warmup < 0:
        raise UsageError("--repeats must be >= 1 and --warmup >= 0")
    if baseline not in BASELINES:
        raise UsageError(f"--baseline {baseline!r}: choose {' or '.join(BASELINES)}")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be >= 1")
    if workers < 0:
        raise UsageError("--workers must be >= 0")
    if spec.model is None and variant not in VARIANTS:
        raise UsageError(f"--variant {variant!r}: choose from {', '.join(VARIANTS)}")
    dev = choose_device(spec.device)
    engine_names = parse_engines(engines)
    specs = [spec.replace(preset=p.name) for p in resolve_presets(presets)]
    base_precision = choose_dtype(spec.dtype, dev)
    probes = parse_probe_results(probe_results)
    audio_paths: list[str] = []
    if audio is not None:
        found, _ = find_audio_files([audio], AUDIO_EXTENSIONS)
        audio_paths = [f.full_path for f in found]
        if not audio_paths:
            raise UsageError(f"--audio {audio}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    if plot is not None:
        import importlib.util

        if not audio_paths and not probes:
            raise UsageError("--plot needs fidelity (--audio DIR) or probe results (--probe results.json)")
        if importlib.util.find_spec("matplotlib") is None:
            raise UsageError("--plot needs matplotlib: pip install 'maest-cli[bench]' (or pip install matplotlib)")
        if not Path(plot).parent.is_dir():
            raise UsageError(f"--plot {plot}: no such directory {Path(plot).parent}")

    threads_before = torch_threads()
    work = tempfile.TemporaryDirectory(prefix="maest-bench-") if audio_paths else None
    try:
        set_threads(threads)
        # -- the model: given, or random weights of a variant (the time is the same)
        model, model_path, sha = spec.model, None, None
        random_weights = model is None
        if random_weights and audio_paths:  # extract needs a weights file
            model = random_weights_model(variant, Path(work.name))
        if model is not None:
            lm = load_model(model, device=str(dev))
            net, name, model_path, sha = lm.model.eval(), lm.name, lm.path, lm.sha256
            default = lm.default_block
        else:
            torch.manual_seed(0)
            net, name = MAEST(VARIANTS[variant]).to(dev).eval(), f"maest-{variant}-random"
            default = PAPER_BLOCK
        if random_weights:
            name = f"maest-{variant}-random"
        cfg = net.cfg
        frames = cfg.frames
        plan = [s.resolve(cfg, default, dev) for s in specs]
        for note in dict.fromkeys(r.dtype_note for r in [*plan] if r.dtype_note):
            say(f"maest bench: {note}")
        if base_precision.note and not any(r.dtype_note for r in plan):
            say(f"maest bench: {base_precision.note}")
        base_dtype = base_precision.dtype
        block = None if full_model else plan[0].block

        # -- contenders, timed side by side
        contenders = preset_contenders(plan, net, cfg, frames, block, engine_names, say)
        if baseline != "none":
            contenders += baseline_contenders(frames, base_dtype, dev, engine_names, compile_baseline, say)
        gemms = {dt: matmul_probe(dt, dev) for dt in sorted({c.dtype for c in contenders})}
        contenders += gemms.values()
        load_before = os.getloadavg()
        say(f"maest bench: {len(contenders)} contenders x ({warmup} warm-up + {repeats} repeats), "
            f"{torch.get_num_threads()} threads, load average {load_before[0]:.2f}")
        time_interleaved(contenders, repeats, warmup, dev, progress=say)
        load_after = os.getloadavg()

        peak = {dt: summarise(g) for dt, g in gemms.items()}
        rows = [summarise(c) for c in contenders if c.kind == "maest"]
        bases = {c.info["engine"]: summarise(c) for c in contenders if c.kind == "effnet"}
        base = next(iter(bases.values()), None)  # the first engine's; the others are in "baselines"
        hop_s = plan[0].hop_frames * HOP_SIZE / SAMPLE_RATE
        for r in [*rows, *bases.values()]:
            r["efficiency"] = r["gflops"] / peak[r["dtype"]]["gflops"]
            b = bases.get(r["engine"], base)
            if b:
                r["ratio_to_baseline"] = r["audio_min_per_s"] / b["audio_min_per_s"]
            if r["model"] == "maest":  # extract's protocol: one segment per hop of audio
                r["extract_audio_min_per_s"] = hop_s / 60 / r["median_s"]

        # -- end to end and fidelity, from decoded files
        e2e = None
        if audio_paths:

            presets_of: dict[str, list[str]] = {}  # engine -> its presets (int8 rows are torch's)
            for r in rows:
                presets_of.setdefault(r["engine"], []).append(r["name"])
            e2e_engines = list(presets_of)
            say(f"end to end: {len(audio_paths)} files from {audio}, {workers} decoder workers, hop {spec.hop}, "
                f"engines {', '.join(e2e_engines)} ...")
            for eng, names in presets_of.items():
                ev = evaluate_presets(audio, spec.replace(model=model, block=block or cfg.depth, device=str(dev),
                                                          engine=eng),
                                      names, workers=workers, work_dir=Path(work.name) / f"extract-{eng}",
                                      timing=False, progress=False, threads=[threads])
                by_name = {r["preset"]: r for r in ev["results"]}
                for r in rows:
                    e = by_name.get(r["name"]) if r["engine"] == eng else None
                    if e:
                        r.update(e2e_dtype=e["dtype"], e2e_audio_min_per_s=e["e2e_audio_min_per_s"],
                                 cosine_mean=e["cosine_mean"], cosine_min=e["cosine_min"], n_files_failed=e["n_failed"])
            e2e = {"audio": str(audio), "n_files": len(audio_paths), "audio_minutes": ev["corpus_audio_minutes"],
                   "workers": workers, "hop": spec.hop, "engines": e2e_engines,
                   "fidelity_reference": "preset none in fp32, same engine"}
            if base:
                b = effnet_end_to_end(audio_paths, frames, base_dtype, dev, workers)
                base.update(e2e_audio_min_per_s=b["audio_min_per_s"], e2e_patches=b["patches"],
                            n_files_failed=b["n_failed"])
        for r in [*rows, *([base] if base else [])]:
            res = probes.get(r["name"])
            if res:
                r["probe"] = {"dataset": res["dataset"]["name"], "map": res["test"]["pr_auc"]["mean"],
                              "roc_auc": (res["test"].get("roc_auc") or {}).get("mean"), "model": res.get("model")}
    finally:
        set_threads(threads_before)
        if work is not None:
            work.cleanup()

    seg_s = (frames - 1) * HOP_SIZE / SAMPLE_RATE
    counting = (f"one timed call = one {seg_s:g} s segment ({frames} mel frames): MAEST takes it whole (batch 1); "
                f"EfficientNet-B0 takes the same frames as Discogs-EffNet patches (128 frames, hop 62) in one batch; "
                f"audio-min/s = {seg_s:g} s / 60 / seconds per call; extract audio-min/s: at extract's hop "
                f"({spec.hop}: a segment every {plan[0].hop_frames * HOP_SIZE / SAMPLE_RATE:g} s), "
                "what a catalogue costs the model")
    if audio_paths:
        counting += (f". End to end counts each file's duration once; extract with hop {spec.hop} analyses "
                     f"{'every second twice' if spec.hop == 'half' else 'segments at that hop'}, the baseline takes one "
                     "hop-62 patch grid per file")
    report = {
        "format": FORMAT, "machine": machine_info(), "device": str(dev), "threads": torch.get_num_threads()
        if threads is None else threads,
        "model": {"name": name, "path": model_path, "sha256": sha, "random_weights": random_weights,
                  "config": cfg.to_dict()},
        "block": block, "frames": frames, "segment_s": seg_s, "repeats": repeats, "warmup": warmup,
        "counting": counting, "load_average": {"before": load_before[0], "after": load_after[0]},
        "peak": peak, "results": rows, "baseline": base, "baselines": list(bases.values()) if baseline != "none"
        else [], "end_to_end": e2e, "engines": engine_names,
    }
    if plot is not None:
        plot_report(report, plot)
    return report


# ------------------------------------------------------------------ reading the figures

def print_report(report: dict, console) -> None:
    from rich.table import Table

    m = report["machine"]
    what = f"to block {report['block']}" if report["block"] else "all blocks + head"
    t = Table(title=f"maest bench: {report['model']['name']} ({report['segment_s']:g} s segments, {what}), "
                    f"{report['threads']} threads, {report['repeats']} repeats")
    cols = ["model", "engine", "dtype", "tokens", "s/call (min-max)", "audio-min/s", "extract audio-min/s",
            "vs EffNet", "GFLOP/audio-min", "GFLOP/s", "of peak"]
    if report.get("end_to_end"):
        cols += ["e2e audio-min/s", "cos to none"]
    if any(r.get("probe") for r in [*report["results"], report.get("baseline") or {}]):
        cols.append("probe mAP")
    for c in cols:
        t.add_column(c, justify="left" if c == "model" else "right")
    bases = report.get("baselines") or ([report["baseline"]] if report.get("baseline") else [])
    for r in [*report["results"], *bases]:
        ext = r.get("extract_audio_min_per_s")
        cells = [r["name"], r.get("engine", "torch"), r["dtype"], str(r.get("tokens", f"{r.get('patches')} patches")),
                 f"{r['median_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f})", f"{r['audio_min_per_s']:.2f}",
                 f"{ext:.2f}" if ext else "-",
                 f"{r['ratio_to_baseline']:.2f}x" if r.get("ratio_to_baseline") is not None else "-",
                 f"{r['gflop_per_audio_min']:.1f}", f"{r['gflops']:.0f}", f"{r['efficiency']:.0%}"]
        if report.get("end_to_end"):
            e2e = r.get("e2e_audio_min_per_s")
            cells += [f"{e2e:.2f}" if e2e else "-",
                      f"{r['cosine_mean']:.4f}" if r.get("cosine_mean") is not None else "-"]
        if "probe mAP" in cols:
            cells.append(f"{100 * r['probe']['map']:.1f}" if r.get("probe") else "-")
        t.add_row(*cells)
    console.print(t)
    peaks = ", ".join(f"{dt} {p['gflops']:.0f} GFLOP/s (best {p['gflop'] / p['min_s']:.0f}, n={p['n']})"
                      for dt, p in report["peak"].items())
    console.print(f"GEMM peak (median): {peaks}; {m['cpu']}, {m['cores']} cores, native bf16: {m['native_bf16']}, "
                  f"flags: {' '.join(m['cpu_flags'])}; load average {report['load_average']['before']:.2f} -> "
                  f"{report['load_average']['after']:.2f}", markup=False, soft_wrap=True)
    console.print(f"counting: {report['counting']}", markup=False, soft_wrap=True)
    if report["model"]["random_weights"] and report.get("end_to_end"):
        console.print("fidelity is measured on random weights: it says little about a trained model",
                      markup=False, soft_wrap=True)


def plot_report(report: dict, path: str | Path) -> None:
    """Throughput vs fidelity to `none` (and vs probe mAP when given), like the paper's Fig. 3."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure


    rows, base = report["results"], report.get("baseline")
    panels = []
    if any(r.get("cosine_mean") is not None for r in rows):
        panels.append(("cosine_mean", "fidelity: cosine to preset none (track embeddings)"))
    if any(r.get("probe") for r in [*rows, base or {}]):
        panels.append(("probe", "probe mAP (test)"))
    if not panels:
        raise UsageError("--plot: nothing to plot against throughput (no fidelity, no probe results)")
    fig = Figure(figsize=(6.4 * len(panels), 4.8))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        for r in rows:
            y = r.get("cosine_mean") if key == "cosine_mean" else (r.get("probe") or {}).get("map")
            if y is None:
                continue
            x = r["audio_min_per_s"]
            ax.errorbar([x], [y], xerr=[[x - r["audio_min_per_s_min"]], [r["audio_min_per_s_max"] - x]],
                        fmt="o" if r["dtype"] != "int8" else "s", color="tab:blue" if r["dtype"] != "int8" else
                        "tab:purple", capsize=3)
            ax.annotate(f"{r['name']} ({r['dtype']})", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if base:
            bx = base["audio_min_per_s"]
            by = (base.get("probe") or {}).get("map") if key == "probe" else None
            if by is None:
                ax.axvline(bx, color="tab:red", linestyle="--")
                ax.annotate(f"EfficientNet-B0 ({base['dtype']})", (bx, 0.02), xycoords=("data", "axes fraction"),
                            rotation=90, color="tab:red", fontsize=8, xytext=(-10, 0), textcoords="offset points")
            else:
                ax.plot([bx], [by], "D", color="tab:red")
                ax.annotate("EfficientNet-B0", (bx, by), textcoords="offset points", xytext=(5, -12),
                            color="tab:red", fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("audio-minutes per second (model only, median, min-max)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    m = report["machine"]
    title = (f"{report['model']['name']}, block {report['block']}, {report['threads']} threads, {m['cpu']}"
             + (" (random weights: fidelity means little)" if report["model"]["random_weights"] else ""))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    write_png(path, fig)
