"""What `tag` and `similar` share in their outputs: the formats and the CSV writer."""

from __future__ import annotations

import csv
import io

FORMATS = ("table", "csv", "json")


def write_csv(rows: list[dict], columns: tuple[str, ...]) -> str:
    """CSV text of `rows` with a header; floats as repr (the value exactly, as the JSON has it),
    None as an empty cell."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: repr(v) if isinstance(v, float) else "" if v is None else v for k, v in r.items()})
    return buf.getvalue()
