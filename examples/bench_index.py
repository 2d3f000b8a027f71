"""Approximate-index libraries for `maest similar` (issue 17, item 3): usearch, faiss-cpu and hnswlib, HNSW, fp32 and
fp16, on synthetic embeddings shaped like stacked MAEST tokens, mean-centred and L2-normalised (cosine = inner product).

Each library/dtype is built in its own subprocess (peak memory: VmHWM over the RSS before the build; vectors
are streamed in chunks so the figure is the index's own), then reloaded from disk in another subprocess (memory-mapped
where the library can). Configurations are interleaved round by round; the report gives median and min-max.
ef_search is the smallest of --efs whose recall@10 against exact search (numpy BLAS) reaches --target.

    .venv/bin/pip install usearch faiss-cpu hnswlib
    .venv/bin/python examples/bench_index.py --work /tmp/ibench --n 100000 --dim 2304 --pca 256 --rounds 3 \\
        --out bench_index.json --md bench_index.md
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

K = 10
CHUNK = 10_000
TOKENS = 3  # cls, dist, avg: the three stacked tokens of the official embeddings


# ---------------------------------------------------------------- data

def mixture(dim: int, seed: int, clusters: int = 256, latent: int = 128) -> dict:
    """A Gaussian mixture in a shared low-rank subspace: clusters of Zipf-like sizes, each with its own anisotropic
    (per-axis log-normal) spread, the three token blocks sharing loadings, isotropic noise, and a large common mean
    (stacked tokens are far from zero-mean: raw cosines of unrelated vectors are high)."""
    rng = np.random.default_rng(seed)
    tokens = TOKENS if dim % TOKENS == 0 else 1
    tok = dim // tokens
    shared = rng.standard_normal((latent, tok))
    basis = np.concatenate([shared + 0.5 * rng.standard_normal((latent, tok)) for _ in range(tokens)], axis=1)
    basis /= np.linalg.norm(basis, axis=1, keepdims=True)
    spectrum = (1.0 + np.arange(latent)) ** -0.6
    centres = rng.standard_normal((clusters, latent)) * spectrum
    spread = 0.45 * spectrum * rng.lognormal(0.0, 0.6, (clusters, latent))
    within = float((spread ** 2).sum(axis=1).mean())
    noise = np.sqrt(0.4 * within / dim)
    total = float((spectrum ** 2).sum()) + within + noise ** 2 * dim
    mean_tok = rng.standard_normal(tok)
    mean = np.concatenate([mean_tok * s for s in (1.0, 0.8, 1.2)[:tokens]]) + 0.3 * rng.standard_normal(dim)
    mean *= np.sqrt(2.5 * total) / np.linalg.norm(mean)
    weights = (1.0 + np.arange(clusters)) ** -0.8
    return {"seed": seed, "basis": basis, "centres": centres, "spread": spread, "noise": noise, "mean": mean,
            "p": weights / weights.sum()}


def sample(model: dict, stream: int, index: int, rows: int) -> np.ndarray:
    """Raw (uncentred) rows of one chunk; deterministic in (seed, stream, index), so the 100 k set is the 1 M set's
    prefix and any chunk can be regenerated alone."""
    rng = np.random.default_rng([model["seed"], stream, index])
    c = rng.choice(len(model["p"]), rows, p=model["p"])
    z = model["centres"][c] + rng.standard_normal((rows, model["basis"].shape[0])) * model["spread"][c]
    x = z @ model["basis"] + model["mean"]
    x += model["noise"] * rng.standard_normal(x.shape)
    return x.astype(np.float32)


def normalise(x: np.ndarray, centre: np.ndarray) -> np.ndarray:
    x = x - centre
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def read_rows(path: Path, dim: int, dtype: str, start: int, stop: int) -> np.ndarray:
    """Plain reads, not a memory map, so a child's RSS counts only what it keeps."""
    item = np.dtype(dtype).itemsize
    with open(path, "rb") as f:
        f.seek(start * dim * item)
        return np.fromfile(f, dtype=dtype, count=(stop - start) * dim).reshape(-1, dim).astype(np.float32)


def exact_topk(queries: np.ndarray, path: Path, n: int, dim: int, dtype: str) -> np.ndarray:
    best_s = np.full((len(queries), K), -np.inf, np.float32)
    best_i = np.zeros((len(queries), K), np.int64)
    for a in range(0, n, 5 * CHUNK):
        b = min(n, a + 5 * CHUNK)
        s = queries @ read_rows(path, dim, dtype, a, b).T
        s = np.concatenate([best_s, s], axis=1)
        i = np.concatenate([best_i, np.arange(a, b)[None].repeat(len(queries), 0)], axis=1)
        top = np.argpartition(-s, K - 1, axis=1)[:, :K]
        best_s, best_i = np.take_along_axis(s, top, 1), np.take_along_axis(i, top, 1)
    order = np.argsort(-best_s, axis=1)
    return np.take_along_axis(best_i, order, 1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k; ids that are not results (-1 padding) never match."""
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k].tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def prepare(work: Path, n: int, dim: int, pca: int, queries: int, seed: int, store: str) -> dict:
    """Writes base.{store}, queries.f32 and exact top-10 (and the PCA copies), once per work dir and settings."""
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "data.json"
    want = {"n": n, "dim": dim, "pca": pca, "queries": queries, "seed": seed, "store": store}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if {k: meta.get(k) for k in want} == want:
            return meta
    t0 = time.perf_counter()
    model = mixture(dim, seed)
    head = np.concatenate([sample(model, 0, i, CHUNK) for i in range(min(10, -(-n // CHUNK)))])
    centre = head.mean(axis=0)  # the catalogue's mean (first 100 k rows), as the index would store it
    rng = np.random.default_rng(seed + 1)
    pick = rng.choice(len(head), (2, 2000))
    raw_cos = float(np.mean(np.sum(normalise(head[pick[0]], 0) * normalise(head[pick[1]], 0), axis=1)))
    centred_cos = float(np.mean(np.sum(normalise(head[pick[0]], centre) * normalise(head[pick[1]], centre), axis=1)))
    with open(work / f"base.{store}", "wb") as f:
        for i in range(-(-n // CHUNK)):
            rows = min(CHUNK, n - i * CHUNK)
            normalise(sample(model, 0, i, rows), centre).astype(store).tofile(f)
    q = normalise(sample(model, 1, 0, queries), centre)
    q.tofile(work / "queries.f32")
    truth = exact_topk(q, work / f"base.{store}", n, dim, store)
    np.save(work / "truth.npy", truth)
    meta = dict(want, centre_from_rows=len(head), raw_cosine_random_pairs=round(raw_cos, 3),
                centred_cosine_random_pairs=round(centred_cos, 3))
    if pca:
        fit = normalise(head[: 20_000], centre)
        mu = fit.mean(axis=0)
        _, sv, vt = np.linalg.svd(fit - mu, full_matrices=False)
        comps = vt[:pca].T.astype(np.float32)
        meta["pca_explained_variance"] = round(float((sv[:pca] ** 2).sum() / (sv ** 2).sum()), 4)
        with open(work / "base_pca.f32", "wb") as f:
            for a in range(0, n, 5 * CHUNK):
                x = read_rows(work / f"base.{store}", dim, store, a, min(n, a + 5 * CHUNK))
                normalise((x - mu) @ comps, np.zeros(pca, np.float32)).tofile(f)
        qp = normalise((q - mu) @ comps, np.zeros(pca, np.float32))
        qp.tofile(work / "queries_pca.f32")
        truth_pca = exact_topk(qp, work / "base_pca.f32", n, pca, "float32")
        np.save(work / "truth_pca.npy", truth_pca)
        meta["pca_exact_recall_at_10"] = round(recall_at_k(truth_pca, truth), 4)
    meta["prepare_s"] = round(time.perf_counter() - t0, 1)
    meta_path.write_text(json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------- the libraries

class Usearch:
    mmap = True

    def __init__(self, dim, dtype, m, efc, threads):
        from usearch.index import Index
        self.threads = threads
        self.index = Index(ndim=dim, metric="ip", dtype=dtype, connectivity=m, expansion_add=efc)

    def add(self, x, start):
        self.index.add(np.arange(start, start + len(x), dtype=np.uint64), x, threads=self.threads)

    def set_ef(self, ef):
        self.index.expansion_search = ef

    def search(self, q, threads):
        return self.index.search(q, K, threads=threads).keys.astype(np.int64).reshape(len(q), -1)

    def save(self, path):
        self.index.save(str(path))

    @classmethod
    def load(cls, path, dim, dtype, mmap):
        from usearch.index import Index
        self = cls.__new__(cls)
        self.index = Index.restore(str(path), view=mmap)
        return self


class Faiss:
    mmap = True

    def __init__(self, dim, dtype, m, efc, threads):
        import faiss
        faiss.omp_set_num_threads(threads)
        if dtype == "f32":
            self.index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        else:
            self.index = faiss.IndexHNSWSQ(dim, faiss.ScalarQuantizer.QT_fp16, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = efc

    def add(self, x, start):
        if not self.index.is_trained:
            self.index.train(x)
        self.index.add(x)

    def set_ef(self, ef):
        self.index.hnsw.efSearch = ef

    def search(self, q, threads):
        import faiss
        faiss.omp_set_num_threads(threads)
        return self.index.search(q, K)[1]

    def save(self, path):
        import faiss
        faiss.write_index(self.index, str(path))

    @classmethod
    def load(cls, path, dim, dtype, mmap):
        import faiss
        self = cls.__new__(cls)
        self.index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0)
        return self


class Hnswlib:
    mmap = False

    def __init__(self, dim, dtype, m, efc, threads, n=0):
        import hnswlib
        if dtype != "f32":
            raise SystemExit("hnswlib stores float32 only")
        self.threads = threads
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.init_index(max_elements=n, ef_construction=efc, M=m, random_seed=0)

    def add(self, x, start):
        self.index.add_items(x, np.arange(start, start + len(x)), num_threads=self.threads)

    def set_ef(self, ef):
        self.index.set_ef(ef)

    def search(self, q, threads):
        return self.index.knn_query(q, K, num_threads=threads)[0].astype(np.int64)

    def save(self, path):
        self.index.save_index(str(path))

    @classmethod
    def load(cls, path, dim, dtype, mmap):
        import hnswlib
        self = cls.__new__(cls)
        self.index = hnswlib.Index(space="ip", dim=dim)
        self.index.load_index(str(path))
        return self


LIBS = {"usearch": Usearch, "faiss": Faiss, "hnswlib": Hnswlib}
DTYPES = {"usearch": ("f32", "f16"), "faiss": ("f32", "f16"), "hnswlib": ("f32",)}


def rss_kib(field: str = "VmRSS") -> int:
    """VmHWM is the peak: ru_maxrss would do, but Linux carries it over exec from the forking parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def latencies(index, q: np.ndarray) -> dict:
    index.search(q[:20], 1)  # warm
    times = []
    for row in q:
        t0 = time.perf_counter()
        index.search(row[None], 1)
        times.append(time.perf_counter() - t0)
    ms = np.array(times) * 1e3
    return {"p50_ms": round(float(np.percentile(ms, 50)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3)}


def child(cfg: dict) -> dict:
    """One build (or one reload) of one configuration; prints a JSON line."""
    work = Path(cfg["work"])
    suffix = "_pca" if cfg["pca"] else ""
    dim, n = cfg["dim"], cfg["n"]
    base, store = (work / "base_pca.f32", "float32") if cfg["pca"] else (work / f"base.{cfg['store']}", cfg["store"])
    q = np.fromfile(work / f"queries{suffix}.f32", dtype=np.float32).reshape(-1, dim)
    truth = np.load(work / "truth.npy")
    cls = LIBS[cfg["lib"]]
    path = work / f"{cfg['lib']}_{cfg['dtype']}{suffix}_{n}.index"
    out = {}
    rss0 = rss_kib()
    if cfg["mode"] == "build":
        kw = {"n": n} if cls is Hnswlib else {}
        index = cls(dim, cfg["dtype"], cfg["m"], cfg["efc"], cfg["threads"], **kw)
        build = read = cpu = 0.0  # cpu: all threads, less sensitive than wall time to others' load
        added = 0
        for a in range(0, n, CHUNK):
            t0 = time.perf_counter()
            x = read_rows(base, dim, store, a, min(n, a + CHUNK))
            t1, c1 = time.perf_counter(), time.process_time()
            index.add(x, a)
            build += time.perf_counter() - t1
            cpu += time.process_time() - c1
            read += t1 - t0
            added = min(n, a + CHUNK)
            if cfg["max_build_s"] and build > cfg["max_build_s"]:
                break
        del x
        out.update(build_s=round(build, 2), build_cpu_s=round(cpu, 2), read_s=round(read, 2), added=added,
                   build_rate_per_s=round(added / build, 1))
        out["peak_build_mib"] = round((rss_kib("VmHWM") - rss0) / 1024, 1)
        if added < n:
            print(json.dumps(out), flush=True)
            return out
        index.save(path)
        out["disk_mib"] = round(path.stat().st_size / 2 ** 20, 1)
        # a PCA index is tuned against exact search in its own space (the full-dim figure has the PCA's ceiling)
        own = np.load(work / "truth_pca.npy") if cfg["pca"] else truth
        sweep = {}
        for ef in cfg["efs"]:
            index.set_ef(ef)
            found = index.search(q, cfg["threads"])
            sweep[ef] = round(recall_at_k(found, own), 4)
            if sweep[ef] >= cfg["target"]:
                break
        ef = next((e for e, r in sweep.items() if r >= cfg["target"]), max(sweep))
        index.set_ef(ef)
        out.update(recall_sweep=sweep, ef_search=ef, recall_at_10=round(recall_at_k(index.search(q, 1), truth), 4))
        if cfg["pca"]:
            out["recall_vs_pca_exact"] = sweep[ef]
        out.update(latencies(index, q))
    else:
        t0 = time.perf_counter()
        index = cls.load(path, dim, cfg["dtype"], cfg["mmap"])
        out["load_s"] = round(time.perf_counter() - t0, 3)
        out["rss_after_load_mib"] = round((rss_kib() - rss0) / 1024, 1)
        index.set_ef(cfg["ef"])
        out.update(latencies(index, q))
        out["recall_at_10"] = round(recall_at_k(index.search(q, 1), truth), 4)
        out["rss_after_queries_mib"] = round((rss_kib() - rss0) / 1024, 1)
    out["peak_mib"] = round((rss_kib("VmHWM") - rss0) / 1024, 1)
    print(json.dumps(out), flush=True)
    return out


# ---------------------------------------------------------------- driver

def run_child(cfg: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), OPENBLAS_NUM_THREADS=str(cfg["threads"]),
               MKL_NUM_THREADS=str(cfg["threads"]))
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True, env=env)
    if p.returncode:
        return {"error": (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def spread(values: list) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def summarise(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    out = {}
    for key in ("build_s", "build_cpu_s", "build_rate_per_s", "load_avg", "peak_build_mib", "peak_mib", "p50_ms",
                "p99_ms", "recall_at_10", "disk_mib", "ef_search", "recall_vs_pca_exact", "load_s",
                "rss_after_load_mib", "rss_after_queries_mib", "added"):
        vals = [r[key] for r in ok if key in r]
        if vals:
            out[key] = spread(vals)
    out["runs"] = len(ok)
    out["recall_sweep"] = ok[0].get("recall_sweep")
    return out


def environment() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    versions = {}
    for mod in ("usearch", "faiss", "hnswlib", "numpy"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            versions[mod] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "avx512": "avx512f" in flags, "load_avg": os.getloadavg(),
            "python": platform.python_version(), "versions": versions,
            "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def table(result: dict) -> str:
    """Median (min-max) over rounds; latencies are single queries, one thread, in RAM after the build and again
    after reloading from disk (memory-mapped where the library can)."""
    rows = ["| library | dtype | dims | build s | build CPU s | load avg | peak build MiB | disk MiB | ef_search "
            "| recall@10 | p50 / p99 ms | reloaded p50 / p99 ms | RSS reloaded / after 1000 q MiB | mmap |",
            "|---" * 14 + "|"]

    def f(s, key, digits=1):
        v = s.get(key)
        if not v:
            return "-"
        if v["min"] == v["max"]:
            return f"{v['median']:.{digits}f}"
        return f"{v['median']:.{digits}f} ({v['min']:.{digits}f}-{v['max']:.{digits}f})"

    for name, s in result["configs"].items():
        lib, dtype, dims = name.split("/")
        if "error" in s:
            rows.append(f"| {lib} | {dtype} | {dims} | error: {s['error']} |" + " |" * 10)
            continue
        load = s.get("load", {})
        recall = f(s, "recall_at_10", 3)
        if "recall_vs_pca_exact" in s:
            recall += f"; {f(s, 'recall_vs_pca_exact', 3)} vs exact at {dims}"
        rows.append(f"| {lib} | {dtype} | {dims} | {f(s, 'build_s')} | {f(s, 'build_cpu_s')} | {f(s, 'load_avg')} | "
                    f"{f(s, 'peak_build_mib', 0)} | {f(s, 'disk_mib', 0)} | {f(s, 'ef_search', 0)} | {recall} | "
                    f"{f(s, 'p50_ms', 2)} / {f(s, 'p99_ms', 1)} | {f(load, 'p50_ms', 2)} / {f(load, 'p99_ms', 1)} | "
                    f"{f(load, 'rss_after_load_mib', 0)} / {f(load, 'rss_after_queries_mib', 0)} | "
                    f"{'yes' if LIBS[lib].mmap else 'no'} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", default="/tmp/bench_index")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=2304)
    ap.add_argument("--pca", type=int, default=0, help="also index a PCA-reduced copy with this many dims")
    ap.add_argument("--pca-only", action="store_true", help="index only the PCA copy")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--store", default="", help="float32 or float16 on disk (default: float16 above 200 k rows)")
    ap.add_argument("--libs", default="usearch,faiss,hnswlib")
    ap.add_argument("--dtypes", default="f32,f16")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--efc", type=int, default=128)
    ap.add_argument("--efs", default="16,24,32,48,64,96,128,192,256,384,512")
    ap.add_argument("--target", type=float, default=0.95)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-build-s", type=float, default=0, help="stop a build after this long: a partial build rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-log", help="report from the JSON lines a run printed (same options)")
    ap.add_argument("--out")
    ap.add_argument("--md")
    a = ap.parse_args()
    if a.child:
        child(json.loads(a.child))
        return
    store = a.store or ("float16" if a.n > 200_000 else "float32")
    if a.from_log:
        meta, runs, loads = from_log(a.from_log)
        write_report(a, meta, store, runs, loads)
        return
    work = Path(a.work)
    meta = prepare(work, a.n, a.dim, a.pca, a.queries, a.seed, store)
    print(json.dumps({"data": meta}), flush=True)
    configs = []
    for pca in ([a.pca] if a.pca_only else [0, a.pca] if a.pca else [0]):
        for lib in a.libs.split(","):
            for dtype in a.dtypes.split(","):
                if dtype in DTYPES[lib]:
                    configs.append((lib, dtype, pca))
    runs = {c: [] for c in configs}
    loads = {c: [] for c in configs}
    for r in range(a.rounds):
        for lib, dtype, pca in configs:
            cfg = {"work": str(work), "lib": lib, "dtype": dtype, "pca": pca, "dim": pca or a.dim, "n": a.n,
                   "store": store, "m": a.m, "efc": a.efc, "efs": [int(e) for e in a.efs.split(",")],
                   "target": a.target, "threads": a.threads, "max_build_s": a.max_build_s, "mode": "build"}
            res = run_child(cfg)
            res.update(round=r, load_avg=round(os.getloadavg()[0], 2))
            runs[(lib, dtype, pca)].append(res)
            print(json.dumps({"config": [lib, dtype, pca or a.dim], **res}), flush=True)
            if "error" in res or "ef_search" not in res:
                continue
            back = run_child(dict(cfg, mode="load", ef=res["ef_search"], mmap=LIBS[lib].mmap))
            loads[(lib, dtype, pca)].append(back)
            print(json.dumps({"config": [lib, dtype, pca or a.dim], "reload": back}), flush=True)
    write_report(a, meta, store, runs, loads)


def from_log(path: str) -> tuple[dict, dict, dict]:
    """The driver's JSON lines, so an interrupted run (e.g. out of time before the last round) still reports."""
    meta, runs, loads = {}, {}, {}
    for line in Path(path).read_text().splitlines():
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if "data" in rec:
            meta = rec["data"]
        elif "config" in rec:
            lib, dtype, dims = rec.pop("config")
            key = (lib, dtype, 0 if dims == meta["dim"] else dims)
            runs.setdefault(key, [])
            loads.setdefault(key, [])
            if "reload" in rec:
                loads[key].append(rec["reload"])
            else:
                runs[key].append(rec)
    return meta, runs, loads


def write_report(a, meta: dict, store: str, runs: dict, loads: dict) -> None:
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "environment": environment(),
              "settings": {k: v for k, v in vars(a).items() if k not in ("child", "out", "md")} | {"store": store},
              "data": meta, "configs": {}, "runs": {}}
    for c in runs:
        name = f"{c[0]}/{c[1]}/{c[2] or meta['dim']}"
        result["configs"][name] = summarise(runs[c]) | {"load": summarise(loads[c]) if loads[c] else {}}
        result["runs"][name] = {"build": runs[c], "reload": loads[c]}
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    md = table(result)
    if a.md:
        Path(a.md).write_text(md)
    print(md)

if __name__ == "__main__":
    main()
