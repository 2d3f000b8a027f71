"""Rich tables of what the commands print: the model registry and a demo corpus."""

from __future__ import annotations

import textwrap

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text


def print_models(rows: list[dict], cache: str, console: Console) -> None:
    """`maest models list`: rows as `models list --json` gives them. Names and aliases are what a
    user types, so they are never cut or wrapped: a console too narrow for the table gets one
    block per model instead, its name on a line of its own."""
    plain = dict(markup=False, highlight=False)
    console.print(f"MAEST models (cache: {cache})", soft_wrap=True, **plain)
    t = Table()
    t.add_column("name", no_wrap=True, min_width=max(len(r["name"]) for r in rows))
    t.add_column("aliases", min_width=max((len(a) for r in rows for a in r["aliases"]), default=0))
    for col in ("segment", "labels", "cached"):
        t.add_column(col, no_wrap=True)
    t.add_column("description")
    for r in rows:
        t.add_row(Text(r["name"] + ("\n(default)" if r["default"] else "")), Text(", ".join(r["aliases"])),
                  Text(r["variant"]), Text(r["labels"]), "yes" if r["cached"] else "no", Text(r["description"]))
    if Measurement.get(console, console.options.update_width(10_000), t).minimum <= console.width:
        console.print(t)
    else:
        for r in rows:
            console.print(r["name"] + (" (default)" if r["default"] else ""), soft_wrap=True, **plain)
            facts = [f"aliases {', '.join(r['aliases'])}" if r["aliases"] else "", f"{r['variant']} segments",
                     f"labels {r['labels']}" if r["labels"] else "", "cached" if r["cached"] else "not cached"]
            for para in ("; ".join(f for f in facts if f), r["description"]):
                console.print(textwrap.fill(para, max(console.width, 24), initial_indent="    ",
                                            subsequent_indent="    ", break_on_hyphens=False), soft_wrap=True, **plain)
    console.print("Weights: CC BY-NC-SA 4.0 (non-commercial use).", **plain)


def print_corpus(m: dict, where: str, console: Console) -> None:
    """`maest corpus info`: a corpus manifest (`demo.corpus.corpus_info`) as tables."""
    s = m["summary"]
    console.print(f"{where}: {s['clips']} clips ({s['hours']} h, {s['audio_bytes'] / 1e6:.0f} MB of "
                  f"{m['audio']['format']} at {m['audio']['sample_rate']} Hz), {s['pieces']} pieces, seed {m['seed']}"
                  + (f", {s['failed']} failed" if s["failed"] else ""), markup=False, highlight=False)
    splits = ("train", "validation", "test")
    t = Table(title="clips per collection and split (pre-training | downstream)")
    t.add_column("collection")
    for pool in ("pretrain", "downstream"):
        for split in splits:
            t.add_column(f"{pool[:4]} {split[:5]}", justify="right")
    t.add_column("licence")
    for c in m["collections"]:
        t.add_row(c["id"], *[str(c["clips"][p][sp]) for p in ("pretrain", "downstream") for sp in splits],
                  c["licence"][:60])
    console.print(t)
    for name, tags in m["tags"].items():
        path = m["files"].get("task:" + name, m["files"].get(name, {})).get("path", "")
        t = Table(title=f"{name}: clips per tag ({path})")
        for col in ("tag", *splits):
            t.add_column(col, justify="left" if col == "tag" else "right")
        for tag, n in tags.items():
            t.add_row(tag, *(str(n[sp]) for sp in splits))
        console.print(t)
    console.print(f"versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items() if 'sha' not in k)}",
                  markup=False, highlight=False)
