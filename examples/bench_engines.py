"""torch against OpenVINO on MAEST-30s (random weights: the time is the same) to block 7, batch 1,
bf16 where the CPU has it natively, 2 threads: each preset on each engine once per round, rounds
interleaved, median and min-max. JSON lines on stdout (README "Engines" figures).

    .venv/bin/python examples/bench_engines.py [ROUNDS] [PRESETS]   # e.g. 9 none,fast,fastest
"""

import json
import statistics
import sys
import time

import numpy as np
import torch

from maest_cli.models.engines import make_engine
from maest_cli.models.graph import EmbeddingGraph
from maest_cli.models.maest import MAEST, VARIANTS
from maest_cli.models.precision import choose_dtype
from maest_cli.models.presets import get_preset

THREADS = 2


def main(rounds: int = 9, presets: str = "none,fast,fastest") -> None:
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = MAEST(VARIANTS["30s"]).eval()
    x = (np.random.default_rng(0).standard_normal((1, 1876, 96)) * 2 - 3).astype(np.float32)
    cpu = torch.device("cpu")
    runs = {}
    for name in presets.split(","):
        preset = get_preset(name)
        graph = EmbeddingGraph(model, 7, patchout=None if preset.patchout.is_identity else preset.patchout)
        ref = make_engine("torch", graph, cpu, "fp32", THREADS)(x)[0]
        dtype = choose_dtype("auto", cpu, preset.dtype).dtype
        for engine in ("torch", "openvino"):
            dt = "bf16" if engine == "openvino" and dtype == "int8" else dtype  # int8 is torch's path
            t0 = time.perf_counter()
            run = make_engine(engine, graph, cpu, dt, THREADS)
            build = time.perf_counter() - t0
            y = run(x)[0]
            cos = float((y * ref).sum() / np.linalg.norm(y) / np.linalg.norm(ref))
            runs[(name, engine, dt)] = (run, [], cos, build)
    for _ in range(rounds):
        for run, times, _, _ in runs.values():
            run(x)  # warm
            t0 = time.perf_counter()
            run(x)
            times.append(time.perf_counter() - t0)
    for (name, engine, dt), (_, times, cos, build) in runs.items():
        med = statistics.median(times)
        print(json.dumps({"name": name, "engine": engine, "dtype": dt, "median_s": round(med, 4),
                          "min_s": round(min(times), 4), "max_s": round(max(times), 4),
                          "audio_min_per_s": round(30 / 60 / med, 2), "cosine_to_fp32_torch": round(cos, 6),
                          "build_s": round(build, 1)}))


if __name__ == "__main__":
    main(*(int(a) if i == 0 else a for i, a in enumerate(sys.argv[1:])))
