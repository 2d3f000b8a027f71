"""Throughput measurements: audio-minutes analysed per second, as ratios within one run.

The machine is shared and noisy, so every figure is the median of several repeats with its
spread, and each is set against a baseline measured in the same run (the peak matmul rate
of this CPU, the exact preset). Nothing here is a test; `maest bench` prints and saves it.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from .frontend import HOP_SIZE, SAMPLE_RATE
from .model import MAEST, MaestConfig, Patchout
from .runtime import DTYPES, autocast


@dataclass
class Timing:
    name: str
    dtype: str
    seconds: list[float]
    audio_s: float  # audio analysed per call
    gflop: float

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Half the range of the repeats, relative to the median."""
        return (max(self.seconds) - min(self.seconds)) / 2 / self.median

    @property
    def audio_min_per_s(self) -> float:
        return self.audio_s / 60 / self.median

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(median_s=self.median, spread=self.spread, audio_min_per_s=self.audio_min_per_s,
                 gflops=self.gflop / self.median)
        return d


def model_gflop(cfg: MaestConfig, frames: int, block: int | None, patchout: Patchout | None) -> float:
    """Multiply-adds x 2 of a forward up to `block` (None: all blocks + head)."""
    f = (cfg.n_mels - cfg.patch) // cfg.stride + 1
    t = (frames - cfg.patch) // cfg.stride + 1
    d, depth = cfg.width, cfg.depth if block is None else block
    po = patchout or Patchout()
    n = 2 + len(po.freq_index(f)) * len(po.time_index(t))
    conv = 2 * f * t * d * cfg.patch * cfg.patch
    per_block = 2 * n * (4 * d * d + 2 * d * cfg.mlp_dim) + 4 * n * n * d
    return (conv + depth * per_block) / 1e9


def peak_matmul_gflops(dtype: str = "fp32", n: int = 1536, repeats: int = 5) -> float:
    """Best matmul rate of this CPU for dtype: the ceiling any model can reach here."""
    a = torch.randn(n, n).to(DTYPES[dtype])
    b = torch.randn(n, n).to(DTYPES[dtype])
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def time_forward(model: MAEST, frames: int, block: int | None, patchout: Patchout | None, dtype: str,
                 repeats: int = 5, warmup: int = 1, batch: int = 1, name: str = "") -> Timing:
    """Seconds per batch of random-input forwards, in inference mode."""
    device = next(model.parameters()).device
    x = torch.randn(batch, frames, model.cfg.n_mels, device=device)
    blocks = [] if block is None else [block]
    secs = []
    with torch.inference_mode(), autocast(device, dtype):
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x, blocks=blocks, logits=block is None, patchout=patchout)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                secs.append(time.perf_counter() - t0)
    audio_s = batch * (frames - 1) * HOP_SIZE / SAMPLE_RATE
    return Timing(name, dtype, secs, audio_s, batch * model_gflop(model.cfg, frames, block, patchout))


def machine_info() -> dict:
    from .runtime import cpu_has_native_bf16

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "native_bf16": cpu_has_native_bf16(), "python": platform.python_version()}


def run_model_bench(model: str | None = None, variant: str = "30s", block: int | None = 7,
                    presets: list[str] | None = None, dtype: str = "auto", repeats: int = 5,
                    console=None) -> dict:
    """Time MAEST forwards per preset on one segment; print a table, return the figures.

    Random weights cost the same time as real ones, so by default no download is needed.
    """
    from rich.console import Console
    from rich.table import Table

    from .model import VARIANTS
    from .presets import get_preset
    from .runtime import UsageError, resolve_device, resolve_dtype

    console = console or Console(stderr=True)
    device = resolve_device("cpu")
    if model:
        from .registry import load_model

        m = load_model(model).model
    else:
        if variant not in VARIANTS:
            raise UsageError(f"--variant {variant!r}: choose from {', '.join(VARIANTS)}")
        m = MAEST(VARIANTS[variant]).eval()
    frames = m.cfg.frames
    rows = []
    for name in presets or ["none"]:
        p = get_preset(name)
        dt = resolve_dtype(p.dtype if dtype == "auto" else dtype, device)
        rows.append(time_forward(m, frames, block, p.patchout, dt, repeats=repeats, name=name))
    peak = peak_matmul_gflops(rows[0].dtype if rows else "fp32")
    base = rows[0].median if rows else 1.0
    t = Table(title=f"MAEST-{variant if not model else model} forward to "
                    f"{'block ' + str(block) if block else 'the head'}, batch 1, {frames} frames")
    for col in ("preset", "dtype", "s/segment", "spread", "audio-min/s", "speed-up", "GFLOP/s", "of peak"):
        t.add_column(col, justify="right")
    for r in rows:
        t.add_row(r.name, r.dtype, f"{r.median:.3f}", f"±{100 * r.spread:.0f}%", f"{r.audio_min_per_s:.2f}",
                  f"{base / r.median:.2f}x", f"{r.gflop / r.median:.0f}", f"{r.gflop / r.median / peak:.0%}")
    console.print(t)
    info = machine_info()
    console.print(f"peak matmul {peak:.0f} GFLOP/s ({rows[0].dtype if rows else 'fp32'}); {info['cpu']}, "
                  f"{info['threads']} threads, native bf16: {info['native_bf16']}")
    return {"machine": info, "peak_matmul_gflops": peak, "block": block, "frames": frames,
            "results": [r.to_dict() for r in rows]}
