"""Training throughput with and without training patchout, measured in one run.

A training step (forward, BCE, backward, AdamW as `maest train` runs it) of a random-weight
MAEST on random normalised input, timed without patchout, with the paper's time patchout
(time columns only: 90 of 187 for 30 s; the headline speed-up), and with the recipe's
(those columns and 3 of 9 frequency rows; a second row, `--drop-freq 0` leaves it out). The
settings alternate repeat by repeat, so drift on a busy machine hits all; the report is the
median of the repeats, their spread, and the ratios. Not a test: the lead runs it on a quiet
machine:

    maest bench train --variant 30s --batch-size 4 --repeats 5 --out bench-train.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from maest_cli.errors import UsageError
from maest_cli.io.artefacts import check_out_file, write_json
from maest_cli.models.maest import MAEST, VARIANTS, random_patchout
from maest_cli.models.precision import (
    autocast,
    choose_dtype,
    machine_info,
    resolve_device,
)
from maest_cli.training.config import PAPER_PATCHOUT_TIME, TrainConfig
from maest_cli.training.loop import make_optimizer


def train_step_seconds(model: MAEST, opt: torch.optim.Optimizer, batch: int, drop_time: int, drop_freq: int,
                       dtype: str, step: int) -> float:
    """Wall time of one optimiser step on random data (patchout drawn for this step)."""
    cfg = model.cfg
    x = torch.randn(batch, cfg.frames, cfg.n_mels)
    y = (torch.rand(batch, cfg.n_classes) < 0.01).float()
    g = torch.Generator().manual_seed(step)
    t0 = time.perf_counter()
    po = random_patchout(cfg.f_patches, cfg.t_patches, drop_time, drop_freq, generator=g) if drop_time or drop_freq \
        else None
    with autocast(torch.device("cpu"), dtype):
        logits = model(x, logits=True, patchout=po).logits
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def bench_settings(drop_time: int, drop_freq: int) -> dict[str, tuple[int, int]]:
    """name -> (time columns, frequency rows) dropped: none, time only (the paper's, the headline
    speed-up), then time and frequency (the recipe's) unless drop_freq is 0."""
    settings = {"no patchout": (0, 0), f"patchout -{drop_time}t": (drop_time, 0)}
    if drop_freq:
        settings[f"patchout -{drop_time}t -{drop_freq}f"] = (drop_time, drop_freq)
    return settings


def run_train_bench(variant: str = "30s", batch_size: int = 4, drop_time: int | None = None, drop_freq: int = 3,
                    dtype: str = "auto", repeats: int = 5, warmup: int = 1, threads: int | None = None,
                    out: str | Path | None = None) -> dict:
    """Samples/s of training steps in each of bench_settings; medians, spreads, speed-ups (the
    headline `speedup`: time columns only); also written to `out` (JSON) when given."""
    check_train_bench(variant, batch_size, drop_time, drop_freq, dtype, repeats, warmup, threads, out)

    if threads:
        torch.set_num_threads(threads)
    device = resolve_device("cpu")
    precision = choose_dtype(dtype, device)
    dt = precision.dtype
    cfg = VARIANTS[variant]
    drop_time = PAPER_PATCHOUT_TIME[variant] if drop_time is None else drop_time
    torch.manual_seed(0)
    model = MAEST(cfg).train()
    opt = make_optimizer(model, TrainConfig(variant=variant))
    settings = bench_settings(drop_time, drop_freq)
    secs: dict[str, list[float]] = {k: [] for k in settings}
    for i in range(warmup + repeats):
        for name, (dt_, df_) in settings.items():
            s = train_step_seconds(model, opt, batch_size, dt_, df_, dt, i)
            if i >= warmup:
                secs[name].append(s)
            print(f"train-bench: {name}: repeat {i + 1 - warmup if i >= warmup else 'warm-up'}: {s:.2f} s",
                  file=sys.stderr, flush=True)
    rows = []
    for name, (dt_, df_) in settings.items():
        med = statistics.median(secs[name])
        kept = (cfg.f_patches - df_) * (cfg.t_patches - dt_)
        rows.append({"setting": name, "drop_time": dt_, "drop_freq": df_, "tokens": 2 + kept, "seconds": secs[name],
                     "median_s": med, "spread": (max(secs[name]) - min(secs[name])) / 2 / med,
                     "samples_per_s": batch_size / med})
    for r in rows:
        r["speedup"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    result = {"variant": variant, "frames": cfg.frames, "batch_size": batch_size, "dtype": dt,
              "dtype_note": precision.note, "repeats": repeats,
              "machine": machine_info(), "results": rows,
              "speedup": rows[1]["speedup"],  # the paper's time patchout: time columns only
              "speedup_time_freq": rows[2]["speedup"] if len(rows) > 2 else None}
    if out:
        write_json(out, result)
    return result


def print_train_bench(result: dict, console) -> None:
    """The table of run_train_bench's result."""
    from rich.table import Table

    t = Table(title=f"MAEST-{result['variant']} training steps, batch {result['batch_size']}, {result['dtype']}")
    for col in ("setting", "tokens", "s/step", "spread", "samples/s", "speed-up"):
        t.add_column(col, justify="right")
    for r in result["results"]:
        t.add_row(r["setting"], str(r["tokens"]), f"{r['median_s']:.2f}", f"±{100 * r['spread']:.0f}%",
                  f"{r['samples_per_s']:.3f}", f"{r['speedup']:.2f}x")
    c = console
    c.print(t)
    m = result["machine"]
    if result.get("dtype_note"):
        c.print(result["dtype_note"], markup=False)
    c.print(f"speed-up with the paper's time patchout: {result['speedup']:.2f}x")
    c.print(f"{m['cpu']}, {m['threads']} threads, native bf16: {m['native_bf16']}, torch {m['torch']}")


def check_train_bench(variant: str = "30s", batch_size: int = 4, drop_time: int | None = None, drop_freq: int = 3,
                      dtype: str = "auto", repeats: int = 5, warmup: int = 1, threads: int | None = None,
                      out: str | Path | None = None) -> None:
    """Refuse options `run_train_bench` cannot run with (and an `out` JSON file that cannot be
    written), in one UsageError naming the option, before a model is built: what `maest bench
    train` checks first."""
    check_out_file(out)
    if variant not in VARIANTS:
        raise UsageError(f"--variant {variant!r}: choose one of {', '.join(VARIANTS)}")
    cfg = VARIANTS[variant]
    for option, value, least in (("--batch-size", batch_size, 1), ("--repeats", repeats, 1),
                                 ("--warmup", warmup, 0), ("--drop-freq", drop_freq, 0)):
        if value < least:
            raise UsageError(f"{option} {value}: at least {least}")
    if drop_time is not None and not 0 <= drop_time < cfg.t_patches:
        raise UsageError(f"--drop-time {drop_time}: MAEST-{variant} has {cfg.t_patches} time columns; drop "
                         f"0..{cfg.t_patches - 1}")
    if drop_freq >= cfg.f_patches:
        raise UsageError(f"--drop-freq {drop_freq}: MAEST-{variant} has {cfg.f_patches} frequency rows; drop "
                         f"0..{cfg.f_patches - 1}")
    if dtype not in ("auto", "fp32", "bf16"):
        raise UsageError(f"--dtype {dtype!r}: expected auto, fp32 or bf16 (training runs on CPU here)")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads {threads}: at least 1")
