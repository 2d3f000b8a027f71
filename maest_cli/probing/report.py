"""Probe results as tables: one run (`maest probe`), several side by side (`--compare`).

Scores are shown in percent like the paper's tables (ROC-AUC / mAP, mean ± sample std over
seeds). Reading a results file checks that it is one, so a wrong file is a one-line error.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.table import Table

from maest_cli.errors import UsageError


def read_results(path: str | Path) -> dict:
    """A results.json of `maest probe`, checked for what the tables read: a wrong or damaged
    file is a one-line UsageError naming it, not a traceback halfway through a table."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{p}: not JSON ({e})") from None
    if not isinstance(data, dict) or not str(data.get("format", "")).startswith("maest-probe/"):
        raise UsageError(f"{p}: not a `maest probe` results.json")
    problem = _shape_problem(data)
    if problem:
        raise UsageError(f"{p}: incomplete `maest probe` results.json ({problem})")
    return data


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _shape_problem(data: dict) -> str | None:
    """What is missing or mistyped among the keys the tables use; None if all is there."""
    dataset = data.get("dataset")
    if not isinstance(dataset, dict) or not isinstance(dataset.get("name"), str):
        return "no dataset.name"
    test = data.get("test")
    if not isinstance(test, dict):
        return "no test scores"
    for key in ("roc_auc", "pr_auc"):
        stat = test.get(key)
        if stat is None:
            continue
        if not isinstance(stat, dict) or not (stat.get("mean") is None or _is_number(stat.get("mean"))) or \
                not (stat.get("std") is None or _is_number(stat.get("std"))) or \
                not isinstance(stat.get("values", []), list):
            return f"test.{key} is not {{mean, std, values}}"
    if test.get("n_seeds") is not None and not isinstance(test.get("n_seeds"), int):
        return "test.n_seeds is not a number"
    for key in ("selected", "grid"):
        if data.get(key) is not None and not isinstance(data[key], dict):
            return f"{key} is not an object"
    val = (data.get("selected") or {}).get("val_roc_auc")
    if val is not None and not _is_number(val):
        return "selected.val_roc_auc is not a number"
    return None


def _pct(stat: dict | None, key: str = "mean") -> str:
    if not stat or stat.get(key) is None:
        return "n/a"
    text = f"{100 * stat['mean']:.1f}"
    if stat.get("std") is not None and len(stat.get("values", [])) > 1:
        text += f" ± {100 * stat['std']:.1f}"
    return text


def _cell(v) -> str:
    return "-" if v is None else str(v)


def results_table(results: dict) -> Table:
    """The headline of one probe: what was probed, with what, and the test scores."""
    sel = results.get("selected", {})
    test = results.get("test", {})
    n = test.get("n_seeds", 0)
    t = Table(title=f"maest probe: {results['dataset']['name']} (test split, {n} seed{'' if n == 1 else 's'}, "
                    f"grid {results.get('grid', {}).get('name')})")
    for col in ("dataset", "model", "block", "tokens", "preset", "selected", "val ROC-AUC", "ROC-AUC", "mAP"):
        t.add_column(col, justify="right" if "AUC" in col or col == "mAP" else "left")
    val = sel.get("val_roc_auc")
    t.add_row(results["dataset"]["name"], _cell(results.get("model")), _cell(results.get("block")),
              _cell(results.get("tokens")), _cell(results.get("preset")), _cell(sel.get("key")),
              "n/a" if val is None else f"{100 * val:.1f}", _pct(test.get("roc_auc")), _pct(test.get("pr_auc")))
    return t


def compare_table(named: list[tuple[str, dict]]) -> Table:
    """Several results side by side; differences are against the first file."""
    t = Table(title="maest probe: comparison (test split; Δ against the first file)")
    for col in ("file", "dataset", "model", "block", "tokens", "preset", "seeds", "ROC-AUC", "mAP",
                "Δ ROC-AUC", "Δ mAP"):
        t.add_column(col, justify="right" if col in ("seeds", "ROC-AUC", "mAP", "Δ ROC-AUC", "Δ mAP") else "left")
    base = named[0][1].get("test", {}) if named else {}

    def delta(r: dict, key: str) -> str:
        a, b = (r.get("test", {}).get(key) or {}).get("mean"), (base.get(key) or {}).get("mean")
        if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)):
            return "n/a"
        return f"{100 * (a - b):+.1f}"

    for name, r in named:
        test = r.get("test", {})
        same = r["dataset"]["name"] == named[0][1]["dataset"]["name"]
        t.add_row(name, r["dataset"]["name"], _cell(r.get("model")), _cell(r.get("block")), _cell(r.get("tokens")),
                  _cell(r.get("preset")), _cell(test.get("n_seeds")), _pct(test.get("roc_auc")),
                  _pct(test.get("pr_auc")), delta(r, "roc_auc") if same else "(other dataset)",
                  delta(r, "pr_auc") if same else "")
    return t


def paper_lines(results: dict) -> list[str]:
    """For a downloaded dataset: which part of each split was probed, and the result beside
    the paper's Table 4 row of the same model and the baseline's (or why there is no row)."""
    lines = []
    cov = (results.get("dataset") or {}).get("coverage")
    if cov:
        partial = any(v.get("downloaded") != v.get("labelled") for v in (cov.get("splits") or {}).values())
        lines.append("coverage:" if partial else f"coverage ({cov.get('of')}):")  # a subset: said on each line
        lines += [f"  {line}" for line in cov.get("lines", [])]
    paper = results.get("paper")
    if not paper:
        return lines
    test = results.get("test", {})
    n = test.get("n_seeds", 0)
    mine = f"{_pct(test.get('roc_auc'))} / {_pct(test.get('pr_auc'))}"
    rows = [(f"this run ({results.get('model')}, {n} seed{'' if n == 1 else 's'})", mine)]
    if paper.get("row"):
        rows.append((f"paper: {paper['row']['label']} ({paper['model']})",
                     f"{paper['row']['roc_auc']:.1f} / {paper['row']['map']:.1f}"))
    rows += [(f"paper: {b['label']}", f"{b['roc_auc']:.1f} / {b['map']:.1f}") for b in paper.get("baselines", [])]
    width = max(len(r[0]) for r in rows)
    lines.append(f"beside the paper's Table 4 ({paper['dataset']}, test ROC-AUC / mAP, %):")
    lines += [f"  {name:<{width}}  {score}" for name, score in rows]
    if not paper.get("row"):
        lines.append(f"  no published row for {results.get('model')} on {paper['dataset']}: {paper['no_row_reason']}")
    if paper.get("protocol_differences"):
        lines.append(f"  not the paper's protocol: {'; '.join(paper['protocol_differences'])}; its figures are "
                     f"shown for reference, not as a target")
    test_cov = ((cov or {}).get("splits") or {}).get("test", {})
    if test_cov and test_cov.get("embedded") != test_cov.get("labelled"):
        lines.append(f"  (this run's test split is {test_cov.get('embedded')} of {test_cov.get('labelled')} tracks, "
                     f"{cov.get('of')}; the paper's figures are on all of it)")
    return lines
