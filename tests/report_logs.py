"""Logs for the report tests: CSV files written like ``CSVLogger``'s, and readers of the report page."""

from __future__ import annotations

import csv
import html
import re
from pathlib import Path


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def csv_series(rows: list[dict[str, str]], key: str) -> tuple[list[int], list[float]]:
    pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
    return [s for s, _ in pairs], [v for _, v in pairs]


def summary_cells(page: str) -> dict[tuple[int, str], str]:
    """``{(run index, key): text}`` of the summary table (``<details>`` lists unfolded)."""
    cells = {}
    for m in re.finditer(r'<td[^>]*data-run="(\d+)" data-key="([a-z_]+)">(.*?)</td>', page, re.S):
        inner = re.sub(r"<summary>.*?</summary>", "", m.group(3), flags=re.S)
        cells[(int(m.group(1)), m.group(2))] = html.unescape(re.sub(r"<[^>]+>", "", inner)).strip()
    return cells


def steps_of(text: str) -> list[int]:
    return [] if text == "none" else [int(x) for x in text.split(", ")]


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([["" if x is None else x for x in row] for row in rows])
    return path


def synthetic_run(path: Path, n: int = 30, diverge_at: int | None = None, diag: bool = False) -> Path:
    """A CSVLogger-like metrics.csv: one row per ``log_metrics`` call, as Lightning writes them."""
    header = ["epoch", "step", "train/loss", "val/loss", "grad_norm/total", "srank/min", "msign/applications"]
    if diag:
        header += ["diag/attn_logit_max", "diag/jacobian_alignment_max"]
    rows = []
    for step in range(n):
        loss = float("nan") if diverge_at is not None and step >= diverge_at else 5.0 - 0.1 * step
        rows.append([0, step, loss, None, 1.0 + step, 10.0 - 0.2 * step, None] + ([None, None] if diag else []))
        if diag:
            rows.append([None, step, None, None, None, None, None, 2.0 + step, 0.5])
        if step % 10 == 9:
            rows.append([None, step, None, None, None, None, (step + 1) // 10] + ([None, None] if diag else []))
    return write_csv(path / "version_0" / "metrics.csv", header, rows).parent
