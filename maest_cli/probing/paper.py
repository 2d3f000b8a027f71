"""The paper's Table 4 (configs/paper_results.toml), to print beside a probe's own result.

A row belongs to a registry model (by its canonical name) or to a baseline; a model given as a
file has a row only when its weights are the published ones (its sha256 is a registry pin).
"""

from __future__ import annotations

from pathlib import Path

from maest_cli.io.config import ConfigError, read_toml

PAPER_FILE = "paper_results.toml"


def paper_results() -> dict:
    """The table as data: {"source", "protocol", "models": {name: row}, "baselines": {name: row}};
    a row is {"label", DATASET: {"roc_auc", "map"}} in percent."""
    data = read_toml(PAPER_FILE)
    for kind in ("models", "baselines"):
        table = data.get(kind, {})
        if not isinstance(table, dict):
            raise ConfigError(f"{PAPER_FILE}: [{kind}] must be a table")
        for name, row in table.items():
            for key, cell in row.items():
                if key != "label" and not (isinstance(cell, dict) and {"roc_auc", "map"} <= cell.keys()):
                    raise ConfigError(f"{PAPER_FILE}: {kind}.{name}.{key} needs roc_auc and map")
    return data


def paper_model_name(model: str | None, sha256: str | None, registry) -> str | None:
    """The registry name whose published row applies to embeddings of `model` (the name or path
    the user gave; None: the registry default) with weights `sha256`; None for another file."""
    key = model or registry.default
    if not Path(key).expanduser().exists() and registry.has(key):
        return registry.get(key).name
    if sha256:
        for entry in registry.models.values():
            pins = {f.sha256.lower() for src in entry.sources for f in (*src.files, *src.alternatives) if f.sha256}
            if sha256.lower() in pins:
                return entry.name
    return None


def protocol_differences(split: int | None, grid: str | None, spec) -> list[str]:
    """How a run's settings differ from those the table was made with ([settings] of the file):
    one phrase each, e.g. "grid quick (the paper's: paper)"; [] for the paper's protocol.
    `spec`: the InferenceSpec the embeddings were made with (None: extract's defaults)."""
    want = paper_results().get("settings", {})
    have = {"split": 0 if split is None else split, "grid": grid}
    if spec is not None:
        overridden = spec.time_keep_every is not None or spec.drop_freq_rows is not None
        have.update(preset=f"{spec.preset} with overrides" if overridden else spec.preset, tokens=list(spec.tokens),
                    hop=spec.hop, block=want.get("block") if spec.block is None else spec.block)
    def show(v):
        return ",".join(v) if isinstance(v, list) else v

    out = []
    for key, value in have.items():
        if key in want and value is not None and value != want[key]:
            out.append(f"{'patchout' if key == 'preset' else key} {show(value)} (the paper's: {show(want[key])})")
    return out


def paper_rows(dataset: str, model_name: str | None, split: int | None = None, grid: str | None = None,
               spec=None) -> dict:
    """What results.json records under "paper": the table's source, the row of `model_name` on
    `dataset` (None when the paper has none, with the reason), the baselines' rows, and how this
    run's split, grid and embedding settings differ from the paper's (`protocol_differences`)."""
    data = paper_results()
    row = (data.get("models", {}).get(model_name) or {}) if model_name else {}
    cell = row.get(dataset)
    if cell is not None:
        why = None
    elif not model_name:
        why = "the model is not a published MAEST model (a file whose weights are not the released ones)"
    elif row:
        why = f"the paper reports no {dataset} result for {model_name}"
    else:
        why = f"the paper has no row for {model_name}"
    baselines = [{"name": name, "label": b.get("label", name), **b[dataset]}
                 for name, b in data.get("baselines", {}).items() if dataset in b]
    return {"source": data.get("source", ""), "dataset": dataset, "model": model_name,
            "row": {"label": row.get("label", model_name), **cell} if cell is not None else None,
            "no_row_reason": why, "baselines": baselines,
            "protocol_differences": protocol_differences(split, grid, spec)}
