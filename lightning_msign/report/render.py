"""``render_report``: lay the runs out (labels, colors, panel titles) and write the figure and the page."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Union

from lightning_msign.report.figure import render_png
from lightning_msign.report.page import render_html
from lightning_msign.report.panels import PANELS, Panel
from lightning_msign.report.runs import Run
from lightning_msign.report.summary import summarize

__all__ = ["render_report"]


def render_report(
    runs: Sequence[Run], out_dir: Union[str, os.PathLike], title: str = "lightning-msign report"
) -> tuple[Path, Path]:
    """Draw the runs side by side and write ``report.png`` and ``report.html`` into ``out_dir``.

    Args:
        runs: runs from :func:`load_run` (one color each, in this order). Runs with equal names are
            told apart by their source and position.
        out_dir: output folder (created, with its parents; existing report files are overwritten).
        title: title of the figure and the page.

    Returns:
        ``(png_path, html_path)``.

    Raises:
        ValueError: ``runs`` is empty or holds something that is not a :class:`Run`; no run logged any
            key of any panel; ``out_dir`` is an existing file; ``title`` is not a string.
    """
    runs = list(runs) if not isinstance(runs, Run) else [runs]
    if not runs:
        raise ValueError("`runs` must hold at least one Run, got none")
    for run in runs:
        if not isinstance(run, Run):
            raise ValueError(f"`runs` must hold Run objects (from load_run), got {run!r}")
    if not isinstance(title, str):
        raise ValueError(f"`title` must be a string, got {title!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"`out_dir` is an existing file, not a folder: {str(out)!r}")
    panels = [p for p in PANELS if any(k in run for run in runs for k in p.all_keys)]
    if not panels:
        wanted = ", ".join(k for p in PANELS for k in p.all_keys)
        raise ValueError(f"`runs` ({', '.join(r.name for r in runs)}) logged none of the report's keys: {wanted}")

    labels = _unique_labels(runs)
    colors = _colors(len(runs))
    summaries = [summarize(run) for run in runs]
    panel_titles = [_panel_title(p, runs, labels) for p in panels]

    out.mkdir(parents=True, exist_ok=True)
    png_path, html_path = out / "report.png", out / "report.html"
    png = render_png(runs, labels, colors, summaries, panels, panel_titles, title)
    png_path.write_bytes(png)
    html = render_html(runs, labels, colors, summaries, panels, panel_titles, title, png)
    html_path.write_text(html, encoding="utf-8")
    return png_path, html_path


def _unique_labels(runs: Sequence[Run]) -> list[str]:
    names = [r.name for r in runs]
    return [f"{r.name} ({r.source} #{i + 1})" if names.count(r.name) > 1 else r.name for i, r in enumerate(runs)]


def _colors(n: int) -> list[str]:
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    if n <= 10:
        cmap = colormaps["tab10"]
        return [to_hex(cmap(i)) for i in range(n)]
    if n <= 20:
        cmap = colormaps["tab20"]
        return [to_hex(cmap(i)) for i in range(n)]
    cmap = colormaps["turbo"]
    return [to_hex(cmap(i / max(n - 1, 1))) for i in range(n)]


def _panel_title(panel: Panel, runs: Sequence[Run], labels: Sequence[str]) -> str:
    parts = []
    lacking = [lab for run, lab in zip(runs, labels) if run.first_key(panel.keys) is None]
    if lacking:
        parts.append(f"no {' / '.join(panel.keys)}: {', '.join(lacking)}")
    fallback = [
        f"{key} for {lab}"
        for run, lab in zip(runs, labels)
        if (key := run.first_key(panel.keys)) is not None and key != panel.keys[0]
    ]
    if fallback:
        parts.append("; ".join(fallback))
    return panel.title + (f" ({'; '.join(parts)})" if parts else "")
