"""Where the time goes: MAEST-30s (random weights) to block 7, one 30 s segment, per operator class,
torch (bf16 autocast where the CPU has it natively, else fp32) against OpenVINO at the same precision.

Answers why the OpenVINO/torch ratio is what it is on this CPU: the share of the transformer's
linear layers (GEMMs) against attention (QK^T, softmax, AV) and the rest, with the GFLOP/s each
engine reaches on each. README "Engines" quotes its output.

    .venv/bin/python examples/profile_engines.py [ROUNDS] [PRESETS]    # e.g. 5 none,fast
"""

import collections
import json
import sys

import torch

from maest_cli.bench.throughput import n_tokens
from maest_cli.models.engines import convert_module
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.maest import MAEST, VARIANTS
from maest_cli.models.precision import autocast, choose_dtype, machine_info
from maest_cli.models.presets import get_preset

THREADS = 2
BLOCK = 7


def torch_category(name: str) -> str:
    """The class of an aten op, by its own (self) time."""
    if "conv" in name:
        return "patch embedding"
    if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul") or "mkldnn" in name or "onednn" in name:
        return "linear (GEMM)"
    if "scaled_dot_product" in name or name in ("aten::bmm", "aten::baddbmm", "aten::_softmax", "aten::softmax"):
        return "attention"
    if name in ("aten::_to_copy", "aten::copy_", "aten::to", "aten::empty_strided", "aten::contiguous", "aten::clone"):
        return "casts and copies"
    if "layer_norm" in name:
        return "layer norm"
    if name == "aten::gelu":
        return "gelu"
    return "other"


def ov_category(node_type: str) -> str:
    """The class of an OpenVINO CPU node: FullyConnected holds weights, MatMul multiplies activations;
    fused Subgraphs (attention with its element-wise neighbours) count as attention."""
    t = node_type.lower()
    if t == "convolution":
        return "patch embedding"
    if t == "subgraph":  # OpenVINO's fused kernels: attention (MHA) and element-wise chains
        return "attention"
    if t in ("fullyconnected", "gemm"):
        return "linear (GEMM)"
    if "scaleddotproductattention" in t or t in ("matmul", "softmax"):
        return "attention"
    if t in ("reorder", "convert", "transpose", "reshape"):
        return "casts and copies"
    if "normalize" in t or "mvn" in t or "layernorm" in t:
        return "layer norm"
    if "gelu" in t:
        return "gelu"
    return "other"


def flops(cfg, tokens: int) -> dict:
    """GFLOP per call of the linear layers and of attention (QK^T and AV), BLOCK blocks."""
    d = cfg.width
    linear = 2 * tokens * (4 * d * d + 2 * d * cfg.mlp_dim) * BLOCK
    attention = 2 * 2 * tokens * tokens * d * BLOCK
    return {"linear (GEMM)": linear / 1e9, "attention": attention / 1e9}


def profile_torch(model, x, dtype: str, rounds: int, po) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), autocast(torch.device("cpu"), dtype):
        model(x, blocks=[BLOCK], logits=False, patchout=po)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                model(x, blocks=[BLOCK], logits=False, patchout=po)
    ms = collections.Counter()
    for e in prof.key_averages():
        if e.key.startswith("aten::"):
            ms[torch_category(e.key)] += e.self_cpu_time_total / 1000 / rounds
    return dict(ms)


def profile_openvino(model, x, dtype: str, rounds: int, po) -> dict:
    import openvino as ov

    graph = EmbeddingGraph(model, BLOCK, patchout=po)
    precision = ov.Type.bf16 if dtype == "bf16" else ov.Type.f32
    compiled = ov.Core().compile_model(convert_module(graph, x), "CPU", {
        ov.properties.hint.inference_precision: precision, ov.properties.inference_num_threads: THREADS,
        ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
        ov.properties.enable_profiling: True})
    request = compiled.create_infer_request()
    xn = x.numpy()
    request.infer([xn])
    ms = collections.Counter()
    for _ in range(rounds):
        request.infer([xn])
        for info in request.profiling_info:
            ms[ov_category(info.node_type)] += info.real_time.total_seconds() * 1000 / rounds
    return dict(ms)


def main(rounds: int = 5, presets: str = "none,fast") -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = VARIANTS["30s"]
    model = MAEST(cfg).eval()
    x = torch.randn(1, cfg.frames, cfg.n_mels) * 2 - 3
    dtype = choose_dtype("auto", torch.device("cpu")).dtype
    print(json.dumps({"machine": machine_info(), "dtype": dtype, "threads": THREADS, "rounds": rounds}))
    for name in presets.split(","):
        preset = get_preset(name)
        po = None if preset.patchout.is_identity else preset.patchout
        gflop = flops(cfg, n_tokens(cfg, cfg.frames, po))
        results = {"torch": profile_torch(model, x, dtype, rounds, po),
                   "openvino": profile_openvino(model, x, dtype, rounds, po)}
        for engine, ms in results.items():
            total = sum(ms.values())
            row = {"preset": name, "engine": engine, "total_ms": round(total, 1)}
            for cat, t in sorted(ms.items(), key=lambda kv: -kv[1]):
                row[cat] = {"ms": round(t, 1), "share": round(t / total, 3)}
                if cat in gflop and t > 0:
                    row[cat]["gflop_per_s"] = round(gflop[cat] / (t / 1000), 1)
            print(json.dumps(row))


if __name__ == "__main__":
    main(*(int(a) if i == 0 else a for i, a in enumerate(sys.argv[1:])))
