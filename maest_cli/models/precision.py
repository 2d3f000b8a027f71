"""Device and precision choices, made once per run and recorded in outputs."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from dataclasses import dataclass

import torch

from maest_cli.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "int8": the Linear layers run as int8 (weights per output channel, activations quantised on the
# fly per tensor), everything else in fp32. CPU only, opt-in: it changes the outputs slightly.
QUANTISED = ("int8",)


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The instruction-set flags /proc/cpuinfo lists (none where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ()
    return tuple(line.split(":", 1)[1].split()) if ":" in line else ()


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """True where bf16 matmuls are fast: AVX512-BF16 or AMX. Elsewhere (e.g. Zen 3, Skylake)
    oneDNN emulates them and bf16 autocast is hundreds of times slower than fp32."""
    return "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()


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


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a run computes in, and the one line that says why when it is not what was asked."""

    dtype: str
    note: str | None = None


EMULATED_BF16 = "this CPU has no native bf16 (AVX512-BF16 or AMX): bf16 is emulated there, hundreds of times slower"


def choose_dtype(requested: str, device: torch.device, default: str = "auto") -> DtypeChoice:
    """The one precision rule of every command. `requested` is the user's --dtype; 'auto' takes
    `default` (a preset's or a recipe's dtype), and an 'auto' default gives bf16 on GPUs that
    support it (else fp16) and on CPUs with native bf16, else fp32 with a note saying why. An
    explicit bf16 on a CPU without native bf16 is a usage error; int8 is CPU-only and opt-in."""
    dtype = default if requested == "auto" else requested
    explicit = requested != "auto"
    if dtype not in (*DTYPES, *QUANTISED, "auto"):
        raise UsageError(f"--dtype {dtype!r}: expected auto, fp32, bf16, fp16 or int8")
    if dtype == "auto":
        if device.type == "cuda":
            return DtypeChoice("bf16" if torch.cuda.is_bf16_supported() else "fp16")
        if cpu_has_native_bf16():
            return DtypeChoice("bf16")
        return DtypeChoice("fp32", f"dtype auto gives fp32: {EMULATED_BF16}")
    if dtype in QUANTISED and device.type != "cpu":
        raise UsageError(f"--dtype {dtype} (dynamic quantisation) runs on CPU only; on GPUs use bf16 or fp16")
    if dtype == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 is for GPUs; on CPU use fp32, bf16 or int8")
    if dtype == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        if explicit:
            raise UsageError(f"--dtype bf16: {EMULATED_BF16}; use --dtype auto or fp32")
        return DtypeChoice("fp32", f"bf16 gives fp32: {EMULATED_BF16}")
    return DtypeChoice(dtype)


def autocast(device: torch.device, dtype: str):
    """Mixed-precision context for dtype ('fp32' and 'int8' = none: a quantised model's other
    layers run in fp32)."""
    if dtype == "fp32" or dtype in QUANTISED:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def quantize_linear_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose nn.Linear layers compute in int8 (dynamic quantisation, fbgemm/x86
    kernels): weights int8 per output channel, each input quantised on the fly. The Linear
    layers hold about 3/4 of MAEST's FLOPs; attention (SDPA), convolutions and norms stay fp32.
    Without VNNI the int8 GEMMs are still about twice the fp32 rate on AVX2."""
    import warnings

    try:
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
    except ImportError:  # torch.ao.quantization is deprecated and will leave torch one day
        raise UsageError(f"--dtype int8 needs torch.ao.quantization.quantize_dynamic, which torch "
                         f"{torch.__version__} lacks; use fp32") from None
    if "x86" not in torch.backends.quantized.supported_engines and \
            "fbgemm" not in torch.backends.quantized.supported_engines and \
            "qnnpack" not in torch.backends.quantized.supported_engines:
        raise UsageError("--dtype int8: this torch build has no quantised CPU kernels; use fp32")
    with warnings.catch_warnings():  # the deprecation notices of torch.ao, once per layer
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, inplace=False)


def for_inference(model: torch.nn.Module, dtype: str) -> torch.nn.Module:
    """The model to run at `dtype`: itself (autocast does bf16/fp16), or its int8 copy."""
    if dtype in QUANTISED:
        return quantize_linear_int8(model.eval())
    return model


def set_threads(n: int | None) -> None:
    """Intra-op threads for this process (None: torch's default, all cores)."""
    if n:
        torch.set_num_threads(n)


def torch_threads() -> int:
    return torch.get_num_threads() if torch.get_num_threads() else os.cpu_count() or 1

def machine_info() -> dict:
    """The CPU, its SIMD flags and torch's threads: what shapes a measured speed."""

    cpu, flags = platform.processor() or platform.machine(), cpu_flags()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "native_bf16": cpu_has_native_bf16(), "cpu_flags": [f for f in wanted if f in flags],
            "quantized_engine": torch.backends.quantized.engine, "python": platform.python_version()}
