"""The findings as data, Markdown tables and plots: findings.json, findings.md, *.png.

`assemble` turns the pipeline's raw results (probe scores, timings, what the models are)
into one JSON-able record; `write_report` writes it with the Markdown (tables ready for the
README, scores in percent as in the paper) and three PNGs (matplotlib, imported only here).
The observations compare each figure with the paper's claim in plain numbers; reading them
is left to people.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

from maest_cli.io.artefacts import write_atomic, write_json, write_png

PAPER = {
    "blocks": "the best downstream features are in the middle blocks; the default embedding is taken after 7 "
              "of 12 blocks",
    "presets": "even strong inference patchout keeps better downstream mAP than the CNN baseline (EfficientNet-B0) "
               "while raising throughput (section 4.5, Figure 3)",
    "baselines": "training must clearly help (the trained model beats the same architecture "
                 "with random weights on every task)",
}
MODELS = ("maest", "random", "effnet", "mel-stats")


def model_training_facts(metadata: dict) -> dict:
    """What a checkpoint says about its own training (epochs, steps, recipe, validation)."""
    out = {}
    for key in ("epoch", "global_step", "validation", "kind", "train_config", "dataset"):
        raw = metadata.get(key)
        try:
            out[key] = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            out[key] = raw
    tc = out.get("train_config") or {}
    if isinstance(tc, dict) and out.get("global_step") is not None and tc.get("batch_size"):
        out["examples"] = out["global_step"] * tc["batch_size"] * tc.get("accum_steps", 1)
    return out


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _mean(values) -> float | None:
    vals = [v for v in values if _num(v)]
    return sum(vals) / len(vals) if vals and len(vals) == len(list(values)) else None


def _or_nan(v) -> float:
    return v if _num(v) else math.nan


def _pct(v, std=None) -> str:
    if not _num(v):
        return "n/a"
    return f"{100 * v:.1f}" + (f" ± {100 * std:.1f}" if _num(std) and std > 0 else "")


# ------------------------------------------------------------------ the record

def assemble(*, manifest, corpus, tasks, task_files, opts, lm, rnd, eff, effnet_run, block_rows, best, preset_block,
             preset_names, head, timing, sweeps, steps) -> dict:

    depth = lm.config.depth
    maest_rows = [r for r in block_rows if r["model"] == "maest"]
    random_rows = [r for r in block_rows if r["model"] == "random"]

    def per_block(rows, tokens="cls+dist+avg", key="test_map") -> dict[int, dict]:
        out = {}
        for b in range(1, depth + 1):
            cells = {r["task"]: r.get(key) for r in rows if r["block"] == b and r["tokens"] == tokens}
            if cells:  # JSON object keys are strings: the same in memory as after a reload
                out[str(b)] = {**cells, "mean": _mean([cells.get(t) for t in tasks])}
        return out

    stacks = sorted({r["tokens"] for r in maest_rows}, key=lambda s: (s.count("+"), s))
    by_stack = {s: {b: v["mean"] for b, v in per_block(maest_rows, s).items()} for s in stacks}
    test_best = {}
    for t in [*tasks, "mean"]:
        col = {b: v.get(t) for b, v in per_block(maest_rows).items() if _num(v.get(t))}
        test_best[t] = int(max(col, key=lambda b: (col[b], -int(b)))) if col else None

    bench_rows = {r["name"]: r for r in timing["rows"]}
    preset_rows = []
    for p in preset_names:
        scores = {t: head[(f"preset:{p}", t)] for t in tasks}
        b = bench_rows.get(p, {})
        preset_rows.append({"model": lm.name, "preset": p, "engine": b.get("engine"), "dtype": b.get("dtype"),
                            "tokens": b.get("tokens"),
                            "audio_min_per_s": b.get("audio_min_per_s"),
                            "audio_min_per_s_range": [b.get("audio_min_per_s_min"), b.get("audio_min_per_s_max")],
                            "ratio_to_effnet": b.get("ratio_to_effnet"),
                            "gflop_per_audio_min": b.get("gflop_per_audio_min"),
                            "tasks": scores, "mean_map": _mean([s["test_map"] for s in scores.values()]),
                            "mean_roc_auc": _mean([s["test_roc_auc"] for s in scores.values()])})
    e = bench_rows.get("effnet-b0", {})
    e_scores = {t: head[("effnet", t)] for t in tasks}
    effnet_row = {"model": "EfficientNet-B0", "preset": "-", "engine": e.get("engine"), "dtype": e.get("dtype"),
                  "tokens": None,
                  "patches": e.get("patches"), "audio_min_per_s": e.get("audio_min_per_s"),
                  "audio_min_per_s_range": [e.get("audio_min_per_s_min"), e.get("audio_min_per_s_max")],
                  "ratio_to_effnet": 1.0, "gflop_per_audio_min": e.get("gflop_per_audio_min"), "tasks": e_scores,
                  "mean_map": _mean([s["test_map"] for s in e_scores.values()]),
                  "mean_roc_auc": _mean([s["test_roc_auc"] for s in e_scores.values()])}

    base_rows = []
    for t in tasks:
        row = {"task": t, **{m: head[(m, t)] for m in MODELS}}
        tm, rm = row["maest"]["test_map"], row["random"]["test_map"]
        tr, rr = row["maest"]["test_roc_auc"], row["random"]["test_roc_auc"]
        row["trained_minus_random_map"] = tm - rm if _num(tm) and _num(rm) else None
        row["trained_minus_random_roc_auc"] = tr - rr if _num(tr) and _num(rr) else None
        row["trained_beats_random"] = (tm > rm and tr > rr) if all(_num(v) for v in (tm, rm, tr, rr)) else None
        base_rows.append(row)
    means = {m: {"map": _mean([r[m]["test_map"] for r in base_rows]),
                 "roc_auc": _mean([r[m]["test_roc_auc"] for r in base_rows])} for m in MODELS}

    tiny_training = model_training_facts(lm.metadata)
    findings = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "corpus": {"path": str(corpus), "seed": manifest.get("seed"), "created": manifest.get("created"),
                   "clips": manifest.get("counts", {}).get("clips"),
                   "by_split": manifest.get("counts", {}).get("by_split"), "versions": manifest.get("versions")},
        "tasks": {t: {"file": str(task_files[t]), **{k: v for k, v in manifest["tasks"][t].items() if k != "file"}}
                  for t in tasks},
        "options": opts.to_dict(),
        "protocol": {"probe": "maest probe custom (the paper's MLP probe), grid " + opts.grid,
                     "sweep_seeds": opts.sweep_seeds, "seeds": opts.seeds,
                     "scores": "test split, macro ROC-AUC and mAP (average precision) over the task's tags; "
                               "mean over seeds",
                     "selection": "blocks chosen on validation mAP averaged over the tasks (cls+dist+avg tokens)",
                     "embeddings": f"mean over segments of {lm.config.frames} frames, hop {opts.hop}, end-aligned "
                                   "last segment (maest extract's rule)"},
        "models": {
            "maest": {"name": lm.name, "sha256": lm.sha256, "path": lm.path, "config": lm.config.to_dict(),
                      "input_norm": lm.input_norm.to_dict(), "training": tiny_training},
            "random": {"name": rnd.name, "sha256": rnd.sha256, "path": rnd.path,
                       "seed": opts.random_seed, "note": "same architecture and input scaling, random weights"},
            "effnet": {"name": eff.name, "sha256": eff.sha256, "path": eff.path, "training": effnet_run,
                       "input_norm": eff.input_norm.to_dict(),
                       "embedding": "1280-d penultimate layer, mean over 128-frame patches with hop 62"},
            "mel-stats": {"embedding": "mean and std of each of the 96 log-mel bands over the clip (192-d)"},
        },
        "blocks": {"depth": depth, "rows": block_rows, "test_map": per_block(maest_rows),
                   "test_roc_auc": per_block(maest_rows, key="test_roc_auc"),
                   "random_test_map": per_block(random_rows), "mean_test_map_by_stack": by_stack,
                   "best_by_validation": best, "best_by_test": test_best, "paper": PAPER["blocks"]},
        "presets": {"block": preset_block, "rows": preset_rows, "effnet": effnet_row, "paper": PAPER["presets"],
                    "timing": {k: v for k, v in timing.items() if k != "rows"}, "bench_rows": timing["rows"]},
        "baselines": {"blocks": {"maest": best["maest"], "random": best["random"]}, "rows": base_rows, "means": means,
                      "paper": PAPER["baselines"],
                      "trained_beats_random_on": sum(1 for r in base_rows if r["trained_beats_random"]),
                      "tasks_scored": sum(1 for r in base_rows if r["trained_beats_random"] is not None)},
        "sweeps": sweeps,
        "runtime_seconds": steps,
    }
    findings["observations"] = observations(findings, tasks)
    return findings


def observations(f: dict, tasks: list[str]) -> list[str]:
    """Plain statements of what came out, next to the paper's claims (numbers, not verdicts)."""
    out = []
    b = f["blocks"]
    depth, vb = b["depth"], b["best_by_validation"]["maest"]
    tb = b["best_by_test"].get("mean")
    lo, hi = math.floor(depth / 3) + 1, math.ceil(2 * depth / 3)  # the middle third: 5-8 of 12
    middle = lo <= vb <= hi
    out.append(f"Best block on validation (mean over tasks, cls+dist+avg): {vb} of {depth}"
               + (f"; best on test: {tb}" if tb else "") + f". Paper: {PAPER['blocks']}. "
               + (f"{'Agrees' if middle else 'Disagrees'}: block {vb} is {'' if middle else 'not '}in the middle "
                  f"third ({lo}-{hi})."))
    stack_means = {s: max((v for v in col.values() if _num(v)), default=None)
                   for s, col in b["mean_test_map_by_stack"].items()}
    ranked = sorted((s for s in stack_means if _num(stack_means[s])), key=lambda s: -stack_means[s])
    if ranked:
        out.append("Token stacks by their best block's mean test mAP: "
                   + ", ".join(f"{s} {_pct(stack_means[s])}" for s in ranked) + ".")
    p = f["presets"]
    rows = {r["preset"]: r for r in p["rows"]}
    none = rows.get("none")
    if none and _num(none.get("mean_map")) and _num(none.get("audio_min_per_s")):
        parts = []
        for name, r in rows.items():
            if name == "none" or not _num(r.get("mean_map")) or not _num(r.get("audio_min_per_s")):
                continue
            parts.append(f"{name}: {r['audio_min_per_s'] / none['audio_min_per_s']:.1f}x the throughput, "
                         f"{100 * (r['mean_map'] - none['mean_map']):+.1f} mAP points")
        if parts:
            out.append("Presets against none (block " + str(p["block"]) + "): " + "; ".join(parts) + ".")
        e = p["effnet"]
        if _num(e.get("audio_min_per_s")) and _num(e.get("mean_map")):
            faster = [n for n, r in rows.items() if _num(r.get("audio_min_per_s"))
                      and r["audio_min_per_s"] >= e["audio_min_per_s"]]
            better = [n for n, r in rows.items() if _num(r.get("mean_map")) and r["mean_map"] >= e["mean_map"]]
            out.append(f"EfficientNet-B0 (trained here): {e['audio_min_per_s']:.2f} audio-min/s, mean mAP "
                       f"{_pct(e['mean_map'])}; presets at least as fast: {', '.join(faster) or 'none'}; "
                       f"presets with at least its mAP: {', '.join(better) or 'none'}. Paper: {PAPER['presets']}.")
    bl = f["baselines"]
    m = bl["means"]
    out.append(f"Trained {f['models']['maest']['name']} (block {bl['blocks']['maest']}) beats its random-weight twin "
               f"(block {bl['blocks']['random']}) on {bl['trained_beats_random_on']} of {bl['tasks_scored']} tasks "
               f"(ROC-AUC and mAP); mean mAP {_pct(m['maest']['map'])} vs {_pct(m['random']['map'])}, mel statistics "
               f"{_pct(m['mel-stats']['map'])}, EfficientNet-B0 {_pct(m['effnet']['map'])}. "
               f"Paper: {PAPER['baselines']}.")
    losers = [r["task"] for r in bl["rows"] if r["trained_beats_random"] is False]
    if losers:
        out.append(f"Training did not help on: {', '.join(losers)}.")
    below_stats = [r["task"] for r in bl["rows"] if _num(r["maest"]["test_map"]) and _num(r["mel-stats"]["test_map"])
                   and r["maest"]["test_map"] < r["mel-stats"]["test_map"]]
    if below_stats:
        out.append(f"The trained model is below mel statistics on: {', '.join(below_stats)}.")
    return out


# ------------------------------------------------------------------ Markdown

def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines


def markdown(f: dict) -> str:
    tasks = list(f["tasks"])
    b, p, bl = f["blocks"], f["presets"], f["baselines"]
    mm = f["models"]
    tr = mm["maest"].get("training") or {}
    et = mm["effnet"].get("training") or {}
    maest = (f"{mm['maest']['name']} (`{(mm['maest']['sha256'] or '')[:12]}`, width {mm['maest']['config']['width']}, "
             f"{b['depth']} blocks, {mm['maest']['config']['frames']}-frame segments"
             + (f", {tr['examples']} training examples" if tr.get("examples") else "") + ")")
    effnet = ("EfficientNet-B0 trained here on the same pre-training clips"
              + (f" ({et.get('epochs')} epochs, {et.get('examples')} examples, {et.get('seconds', 0) / 60:.0f} min)"
                 if et.get("epochs") else ""))
    task_list = ", ".join(f"`{t}`" + ("" if f["tasks"][t].get("seen_in_pretraining", True) else "*") for t in tasks)
    lines = ["## What the tool finds on the demo corpus", "",
             f"`maest findings` on the demo corpus ({f['corpus']['clips']} clips, seed {f['corpus']['seed']}): "
             f"{maest}, {effnet}. Probe: {f['protocol']['probe']}; scores in percent ({f['protocol']['scores']}). "
             f"Tasks: {task_list} (* = tags pre-training never saw).", ""]

    lines += [f"### 1. Where are the best features? (test mAP, cls+dist+avg, {f['protocol']['sweep_seeds']} seed)", ""]
    rows = []
    for blk, cells in sorted(b["test_map"].items(), key=lambda kv: int(kv[0])):
        mark = " (val best)" if int(blk) == b["best_by_validation"]["maest"] else ""
        rnd = b["random_test_map"].get(blk, {}).get("mean")
        rows.append([f"{blk}{mark}", *[_pct(cells.get(t)) for t in tasks], _pct(cells.get("mean")), _pct(rnd)])
    lines += _table(["block", *tasks, "mean", "random weights (mean)"], rows)
    lines += ["", "Mean test mAP over the tasks per token stack:", ""]
    stacks = list(b["mean_test_map_by_stack"])
    blocks = sorted({int(k) for col in b["mean_test_map_by_stack"].values() for k in col})
    lines += _table(["block", *stacks], [[str(k), *[_pct(b["mean_test_map_by_stack"][s].get(str(k))) for s in stacks]]
                                         for k in blocks])

    lines += ["", f"### 2. Inference patchout: throughput vs mAP (block {p['block']}, "
                  f"{f['protocol']['seeds']} seeds)", ""]
    hdr = ["model", "preset", "engine", "dtype", "tokens", "audio-min/s", "vs EffNet", *tasks, "mean mAP",
           "mean ROC-AUC"]
    rows = []
    for r in [*p["rows"], p["effnet"]]:
        rows.append([r["model"], r["preset"], str(r.get("engine") or "-"), str(r.get("dtype") or "-"),
                     str(r.get("tokens") or (f"{r.get('patches')} patches" if r.get("patches") else "-")),
                     f"{r['audio_min_per_s']:.2f}" if _num(r.get("audio_min_per_s")) else "n/a",
                     f"{r['ratio_to_effnet']:.2f}x" if _num(r.get("ratio_to_effnet")) else "n/a",
                     *[_pct(r["tasks"][t]["test_map"]) for t in tasks], _pct(r["mean_map"]), _pct(r["mean_roc_auc"])])
    lines += _table(hdr, rows)
    t = p["timing"]
    lines += ["", f"Model-only throughput, median of {t.get('repeats')} rounds, {t.get('threads')} threads, "
                  f"{(t.get('machine') or {}).get('cpu', '?')}; load average {t['load_average']['before']:.2f} -> "
                  f"{t['load_average']['after']:.2f}. {t.get('counting', '')}. Plot: `presets.png`."]

    lines += ["", f"### 3. Does training help? (test mAP / ROC-AUC, mean ± std over "
                  f"{f['protocol']['seeds']} seeds)", ""]
    names = {"maest": f"{mm['maest']['name']} (block {bl['blocks']['maest']})",
             "random": f"random weights (block {bl['blocks']['random']})", "effnet": "EfficientNet-B0",
             "mel-stats": "mel statistics"}
    hdr = ["task", *[names[m] for m in MODELS]]
    rows = []
    for r in bl["rows"]:
        rows.append([r["task"], *[f"{_pct(r[m]['test_map'], r[m]['test_map_std'])} / "
                                  f"{_pct(r[m]['test_roc_auc'], r[m]['test_roc_auc_std'])}" for m in MODELS]])
    rows.append(["mean", *[f"{_pct(bl['means'][m]['map'])} / {_pct(bl['means'][m]['roc_auc'])}" for m in MODELS]])
    lines += _table(hdr, rows)
    lines += ["", "### Observations", "", *[f"- {o}" for o in f["observations"]], ""]
    rt = f.get("runtime_seconds", {}).get("seconds_total", {})
    if rt:
        lines += ["Runtime per step (s, this work directory): " + ", ".join(f"{k} {v:g}" for k, v in rt.items()
                                                                         if _num(v)) + ".", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ plots

def _save(fig, path: Path) -> None:
    write_png(path, fig)


def plot_blocks(f: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    tasks, b = list(f["tasks"]), f["blocks"]
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 2, 1)
    blocks = sorted(int(k) for k in b["test_map"])
    for t in tasks:
        ax.plot(blocks, [_or_nan(b["test_map"][str(k)].get(t)) for k in blocks], marker="o", label=t)
    rb = sorted(int(k) for k in b["random_test_map"])
    ax.plot(rb, [_or_nan(b["random_test_map"][str(k)].get("mean")) for k in rb], "k--", label="random weights (mean)")
    ax.axvline(b["best_by_validation"]["maest"], color="grey", alpha=0.4)
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test mAP (cls+dist+avg)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    for s, col in b["mean_test_map_by_stack"].items():
        ks = sorted(int(k) for k in col)
        ax.plot(ks, [_or_nan(col[str(k)]) for k in ks], marker="o", label=s)
    ax.set_xlabel("block")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("mean test mAP over tasks")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.suptitle(f"{f['models']['maest']['name']}: probe mAP per block", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_presets(f: dict, path: Path) -> None:
    """Throughput vs probe mAP / ROC-AUC (mean over tasks), MAEST presets and EfficientNet-B0: Figure 3."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = f["presets"]
    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    for i, (key, label) in enumerate((("mean_map", "mean test mAP"), ("mean_roc_auc", "mean test ROC-AUC"))):
        ax = fig.add_subplot(1, 2, i + 1)
        for r in [*p["rows"], p["effnet"]]:
            x, y = r.get("audio_min_per_s"), r.get(key)
            if not (_num(x) and _num(y)):
                continue
            lo, hi = r.get("audio_min_per_s_range") or [x, x]
            is_eff = r["model"] == "EfficientNet-B0"
            ax.errorbar([x], [y], xerr=[[x - (lo if _num(lo) else x)], [(hi if _num(hi) else x) - x]],
                        fmt="D" if is_eff else ("s" if r.get("dtype") == "int8" else "o"),
                        color="tab:red" if is_eff else ("tab:purple" if r.get("dtype") == "int8" else "tab:blue"),
                        capsize=3)
            ax.annotate("EfficientNet-B0" if is_eff else f"{r['preset']} ({r.get('dtype')})", (x, y),
                        textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("audio-minutes per second (model only, median, min-max)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{f['models']['maest']['name']} block {p['block']} presets vs EfficientNet-B0 (trained here)",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def plot_baselines(f: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    bl = f["baselines"]
    tasks = [r["task"] for r in bl["rows"]]
    labels = {"maest": f["models"]["maest"]["name"], "random": "random weights", "mel-stats": "mel statistics",
              "effnet": "EfficientNet-B0"}
    fig = Figure(figsize=(max(6.0, 1.4 * len(tasks) + 2), 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(MODELS)
    for i, m in enumerate(MODELS):
        ys = [r[m]["test_map"] if _num(r[m]["test_map"]) else 0.0 for r in bl["rows"]]
        errs = [r[m]["test_map_std"] if _num(r[m]["test_map_std"]) else 0.0 for r in bl["rows"]]
        ax.bar([k + (i - (len(MODELS) - 1) / 2) * width for k in range(len(tasks))], ys, width, yerr=errs,
               capsize=2, label=labels[m])
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks)
    ax.set_ylabel("test mAP")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle("trained vs random weights vs mel statistics vs EfficientNet-B0", fontsize=10)
    fig.tight_layout()
    _save(fig, path)


def write_report(f: dict, out: Path) -> None:
    """findings.json, findings.md and the three PNGs in `out`, each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    f["files"] = {"json": "findings.json", "markdown": "findings.md",
                  "plots": ["blocks.png", "presets.png", "baselines.png"]}
    write_json(out / "findings.json", f)
    write_atomic(out / "findings.md", markdown(f))
    plot_blocks(f, out / "blocks.png")
    plot_presets(f, out / "presets.png")
    plot_baselines(f, out / "baselines.png")


__all__ = ["assemble", "markdown", "write_report", "observations", "PAPER"]
