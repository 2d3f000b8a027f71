"""Device and precision choices, made once per run and recorded in outputs."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class UsageError(ValueError):
    """A bad option value; the CLI prints it and exits with code 2."""


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls are fast: AVX512-BF16 or AMX. Elsewhere (e.g. Zen 3, Skylake)
    oneDNN emulates them and bf16 autocast is hundreds of times slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available on this machine")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it (else fp16) and on CPUs with native bf16, else fp32."""
    if dtype == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_native_bf16() else "fp32"
    if dtype not in DTYPES:
        raise UsageError(f"--dtype {dtype!r}: expected auto, fp32, bf16 or fp16")
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 is for GPUs; on CPU use bf16 or fp32")
    return dtype


def autocast(device: torch.device, dtype: str):
    """Mixed-precision context for dtype ('fp32' = none)."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def set_threads(n: int | None) -> None:
    """Intra-op threads for this process (None: torch's default, all cores)."""
    if n:
        torch.set_num_threads(n)


def torch_threads() -> int:
    return torch.get_num_threads() if torch.get_num_threads() else os.cpu_count() or 1
