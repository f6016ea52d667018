"""The report's HTML page: self-contained (the PNG inline as base64, the style inline, nothing fetched)."""

from __future__ import annotations

import base64
import html
import math
from typing import Any

import numpy as np

from lightning_msign.metric_keys import CURV_STABILITY_RATIO, SRANK_MIN, TRAIN_LOSS, VAL_LOSS


def _fmt(value: Any) -> str:
    """A table cell's text: ``—`` for a missing value, 6 significant digits, step lists comma-separated."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value) if value else "none"
    return str(value)


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; } h3 { font-size: 1em; margin-top: 1.2em; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.4em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.steps { max-width: 28em; word-break: break-word; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin-right: 0.4em; vertical-align: -0.1em; }
.meta, .note { color: #555; font-size: 0.9em; }
""".strip()

_FOLD_STEPS = 30
_SUMMARY_COLUMNS = (
    ("steps", "steps"),
    ("final_train_loss", f"final {TRAIN_LOSS}"),
    ("final_val_loss", f"final {VAL_LOSS}"),
    ("first_nonfinite_loss_step", "first non-finite loss step"),
    ("min_srank", f"min {SRANK_MIN}"),
    ("max_grad_norm", "max gradient norm"),
    ("max_attn_logit", "max attention logit"),
    ("max_output_logit", "max output logit"),
    ("max_jacobian_alignment", "max Jacobian alignment"),
    ("msign_applications", "MSign applications"),
    ("msign_steps", "MSign steps"),
    ("pss_trigger_steps", "PSS trigger steps"),
    ("max_stability_ratio", f"max {CURV_STABILITY_RATIO}"),
    ("unlock_steps", "block unlock steps"),
)


def render_html(runs, labels, colors, summaries, panels, panel_titles, title, png: bytes) -> str:
    """The page: the figure ``png`` inline, the summary table of ``summaries``, the runs with their notes, and
    per-panel statistics of every key drawn."""
    e = html.escape
    rows = []
    for i, (run, label, color, summary) in enumerate(zip(runs, labels, colors, summaries)):
        cells = [
            f'<td data-run="{i}" data-key="label"><span class="swatch" style="background:{color}"></span>'
            f"{e(label)}</td>",
            f'<td data-run="{i}" data-key="source">{e(run.source)}</td>',
        ]
        for key, _ in _SUMMARY_COLUMNS:
            value = summary.get(key)
            if key == "steps":
                text = e(f"{summary['first_step']}–{summary['last_step']}")
            elif isinstance(value, list) and len(value) > _FOLD_STEPS:  # long step lists fold away
                text = f"<details><summary>{len(value)} steps</summary>{e(_fmt(value))}</details>"
            else:
                text = e(_fmt(value))
            css = "steps" if key.endswith("steps") else "num"
            cells.append(f'<td class="{css}" data-run="{i}" data-key="{key}">{text}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    header = "<tr><th>run</th><th>source</th>" + "".join(f"<th>{e(h)}</th>" for _, h in _SUMMARY_COLUMNS) + "</tr>"

    png_base64 = base64.b64encode(png).decode("ascii")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{len(runs)} runs. Step axis: the loggers\' step index (the step of each batch\'s '
        f"{TRAIN_LOSS}). Bottom ticks: MSign applications; top triangles: PSS triggers; dashed line: first "
        "non-finite loss; one lane and one color per run.</p>",
        f'<img alt="{e(title)}: {e(", ".join(panel_titles))}" src="data:image/png;base64,{png_base64}">',
        "<h2>Summary</h2>",
        f'<table class="summary">{header}{"".join(rows)}</table>',
        '<p class="note">Maxima and minima over finite values; final values as last logged. Step lists are the '
        "logged steps (a resumed run's log holds only its own).</p>",
        "<h2>Runs</h2><ul>",
    ]
    for i, (run, label, color) in enumerate(zip(runs, labels, colors)):
        notes = "".join(f"<li>{e(n)}</li>" for n in run.notes)
        parts.append(
            f'<li data-run="{i}"><span class="swatch" style="background:{color}"></span><b>{e(label)}</b>: '
            f"{e(run.source)}, <code>{e(str(run.path))}</code>, {len(run.metrics)} keys"
            + (f"<ul>{notes}</ul>" if notes else "")
            + "</li>"
        )
    parts.append("</ul><h2>Panels</h2>")
    for panel, panel_title in zip(panels, panel_titles):
        parts.append(f"<h3>{e(panel_title)}</h3>")
        parts.append(
            "<table><tr><th>run</th><th>key</th><th>points</th><th>steps</th><th>first</th><th>final</th>"
            "<th>min</th><th>max</th><th>non-finite</th></tr>"
        )
        for run, label, color in zip(runs, labels, colors):
            keys = [k for k in (run.first_key(panel.keys), panel.secondary) if k and k in run]
            if not keys:
                parts.append(
                    f'<tr><td><span class="swatch" style="background:{color}"></span>{e(label)}</td>'
                    f'<td colspan="8">not logged</td></tr>'
                )
            for key in keys:
                s, v = run.metrics[key]
                finite = v[np.isfinite(v)]
                stats = [
                    len(s),
                    f"{int(s[0])}–{int(s[-1])}",
                    float(v[0]),
                    float(v[-1]),
                    float(finite.min()) if finite.size else None,
                    float(finite.max()) if finite.size else None,
                    int((~np.isfinite(v)).sum()),
                ]
                parts.append(
                    f'<tr><td><span class="swatch" style="background:{color}"></span>{e(label)}</td>'
                    f"<td><code>{e(key)}</code></td>"
                    + "".join(f'<td class="num">{e(_fmt(x))}</td>' for x in stats)
                    + "</tr>"
                )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
