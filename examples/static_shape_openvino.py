"""OpenVINO with a static input shape against the dynamic frames axis the engine compiles: MAEST-30s
(random weights) to block 7, bf16, 2 threads, presets none/fast/fastest, each compiled both ways,
rounds interleaved; median (min, max) seconds per 30 s segment. README "Engines" quotes it (a static
shape was not taken: 0-9% for a second compiled model per setting).

    .venv/bin/python examples/static_shape_openvino.py [ROUNDS]
"""

import statistics
import sys
import time

import torch

from maest_cli.models.engines import convert_module, openvino_compile
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.maest import MAEST, VARIANTS
from maest_cli.models.presets import get_preset

THREADS = 2


def main(rounds: int = 7) -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    cfg = VARIANTS["30s"]
    model = MAEST(cfg).eval()
    x = torch.randn(1, cfg.frames, cfg.n_mels)
    xn = x.numpy()
    requests = {}
    for name in ("none", "fast", "fastest"):
        patchout = get_preset(name).patchout
        graph = EmbeddingGraph(model, 7, patchout=None if patchout.is_identity else patchout)
        for shape in ("dynamic", "static"):
            converted = convert_module(graph, x, dynamic=(0, 1))
            if shape == "static":
                converted.reshape([1, cfg.frames, cfg.n_mels])
            requests[(name, shape)] = openvino_compile(converted, "bf16", THREADS).create_infer_request()
    times = {k: [] for k in requests}
    for _ in range(rounds):
        for k, request in requests.items():
            request.infer([xn])  # warm
            t0 = time.perf_counter()
            request.infer([xn])
            times[k].append(time.perf_counter() - t0)
    for (name, shape), t in times.items():
        print(f"{name:8s} {shape:8s} {statistics.median(t):.4f} ({min(t):.4f}, {max(t):.4f})")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:2]))
