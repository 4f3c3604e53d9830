"""Writing measured tables: JSON (with the budget that produced them), CSV and a text table."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from legrace.train import jsonable


def write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")
    return path


def write_csv(path: Path, rows: Sequence[dict], columns: Sequence[str]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _cell(row.get(k)) for k in columns})
    return path


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"  # (inf and -inf print as such)
    return str(v)


def text_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A plain fixed-width table (also valid Markdown) of `columns` of `rows`."""
    def show(v) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.4g}"  # (inf and -inf print as such)
        return str(v)

    cells = [[show(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |" for line in cells]
    return "\n".join(lines)
