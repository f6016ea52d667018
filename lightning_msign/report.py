"""Side-by-side report of several runs: ``lightning-msign report RUN_DIR [RUN_DIR ...] --out DIR``.

Reads the logs the suite writes (``CSVLogger``'s ``metrics.csv`` and ``TensorBoardLogger``'s
``events.out.tfevents.*`` files) and writes ``report.png`` and ``report.html`` into one folder. The
HTML page is self-contained: the PNG is embedded as base64, the style is inline, nothing is fetched.

Panels (one per quantity, shared step axis, one color per run in every panel); a panel is drawn
only when at least one run logged its key, and its title names the runs that did not:

==========================  ======================================================================
panel                       keys
==========================  ======================================================================
loss                        ``train/loss`` (line), ``val/loss`` (dashed, circles)
gradient norm               ``grad_norm/total`` (``StableRankMonitor``), else ``pss/grad_norm``
min stable rank             ``srank/min``
attention-logit max         ``diag/attn_logit_max``; ``diag/output_logit_max`` dashed
Jacobian alignment          ``diag/jacobian_alignment_max``
==========================  ======================================================================

Events, in the run's color on every panel: MSign applications (the steps at which
``msign/applications`` was logged) as short ticks along the bottom edge, PSS triggers (steps with
``pss/triggered == 1``) as triangles along the top edge, one lane per run; the first non-finite
``train/loss``/``val/loss`` as a dashed vertical line. Steps are the loggers' step index, the one
``train/loss`` is logged at (``trainer.global_step`` before the optimizer step).

Example::

    lightning-msign report logs/csv/shakespeare-baseline logs/csv/shakespeare-msign --out reports/msign

    from lightning_msign.report import load_run, render_report

    runs = [load_run("logs/csv/shakespeare-baseline"), load_run("logs/tensorboard/shakespeare-msign")]
    png_path, html_path = render_report(runs, "reports/msign", title="MSign vs baseline")
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

__all__ = ["PANELS", "Panel", "Run", "load_run", "render_report", "report_main", "summarize"]

CSV_NAME = "metrics.csv"
EVENTS_MARK = "tfevents"
SEARCH_DEPTH = 4  # subfolder levels searched below a parent folder (logs/ -> csv/<name>/version_N is 3)
_VERSION_RE = re.compile(r"^version_(\d+)$")
_SKIP_DIRS = {"checkpoints", "__pycache__"}

MSIGN_KEY = "msign/applications"
PSS_KEY = "pss/triggered"
LOSS_KEYS = ("train/loss", "val/loss")

Series = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Panel:
    """One panel of the report.

    Args:
        title: panel title.
        ylabel: y-axis label.
        keys: the metric drawn as a line; the first key a run has is used (a fallback chain).
        secondary: an optional second metric drawn dashed with circles in the same color.
        log: ``"positive"``: log scale when every finite value is positive; ``"spread"``: log scale
            when values are positive and span more than two decades; ``"never"``.
    """

    title: str
    ylabel: str
    keys: tuple[str, ...]
    secondary: Optional[str] = None
    log: str = "never"

    @property
    def all_keys(self) -> tuple[str, ...]:
        return self.keys + ((self.secondary,) if self.secondary else ())


PANELS: tuple[Panel, ...] = (
    Panel("Loss", "loss", ("train/loss",), secondary="val/loss", log="spread"),
    Panel("Gradient norm", "gradient norm", ("grad_norm/total", "pss/grad_norm"), log="positive"),
    Panel("Min stable rank", "srank/min", ("srank/min",)),
    Panel("Attention-logit max", "max logit", ("diag/attn_logit_max",), secondary="diag/output_logit_max", log="positive"),
    Panel("Jacobian alignment", "max alignment", ("diag/jacobian_alignment_max",)),
)


@dataclass
class Run:
    """The logged metrics of one run.

    Args:
        name: label used in the legend and the tables.
        path: the folder or file the metrics were read from.
        source: ``"csv"`` or ``"tensorboard"``.
        metrics: ``{key: (steps, values)}``, steps ``int64`` ascending and unique, values ``float64``
            (NaN/Inf kept as logged).
        notes: what the loader chose or dropped (a newest version picked, duplicate steps, ...).
    """

    name: str
    path: Path
    source: str
    metrics: dict[str, Series]
    notes: list[str] = field(default_factory=list)

    def __contains__(self, key: object) -> bool:
        return key in self.metrics

    def series(self, key: str) -> Optional[Series]:
        """``(steps, values)`` of ``key``, or ``None`` when the run did not log it."""
        return self.metrics.get(key)

    def first_key(self, keys: Sequence[str]) -> Optional[str]:
        """The first of ``keys`` this run logged, or ``None``."""
        return next((k for k in keys if k in self.metrics), None)

    @property
    def step_range(self) -> tuple[int, int]:
        """First and last step at which anything was logged."""
        firsts = [int(s[0]) for s, _ in self.metrics.values()]
        lasts = [int(s[-1]) for s, _ in self.metrics.values()]
        return min(firsts), max(lasts)


# --------------------------------------------------------------------------------------------- loading


def load_run(path: Union[str, os.PathLike], label: Optional[str] = None) -> Run:
    """Read the metrics of one run.

    ``path`` may be a ``CSVLogger`` version folder (holding ``metrics.csv``), a ``metrics.csv`` file
    (any ``.csv`` with a ``step`` column), a ``TensorBoardLogger`` version folder or one of its
    ``events.out.tfevents.*`` files, or a parent folder holding exactly one run (searched
    ``SEARCH_DEPTH`` levels deep). When that parent holds several versions of one run
    (``version_0``, ``version_1``, ...) the newest is read and a note says so. A folder holding both
    ``metrics.csv`` and event files is read from the CSV (full precision). All event files of a
    TensorBoard folder are read in name order; CSV rows are sparse (one row per ``log_metrics``
    call) and are merged per key. When a key was logged twice at one step, the last value is kept.

    Args:
        path: folder or file, as above.
        label: name of the run in the report; default: derived from the path
            (``<name>/version_<n>`` for a logger's version folder).

    Returns:
        The :class:`Run`.

    Raises:
        ValueError: ``path`` does not exist, is not a metrics file, holds no run or several runs (the
            message lists them), or holds no metrics; ``label`` is not a non-empty string.
    """
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise ValueError(f"`label` must be a non-empty string or None, got {label!r}")
    given = Path(path)
    if not given.exists():
        raise ValueError(f"`path` does not exist: {str(given)!r}")
    notes: list[str] = []
    if given.is_file():
        kind = _file_kind(given)
        if kind is None:
            raise ValueError(
                f"`path` {str(given)!r} is neither a CSV file ({CSV_NAME}) nor a TensorBoard event file"
                " (events.out.tfevents.*)"
            )
        source_dir, files = given.parent, [given]
        label_path = given.parent
    else:
        kind, source_dir = _find_run_dir(given, notes)
        files = [source_dir / CSV_NAME] if kind == "csv" else _event_files(source_dir)
        label_path = source_dir
    if kind == "csv":
        raw, read_notes = _read_csv(files[0])
    else:
        raw, read_notes = _read_events(files)
    notes.extend(read_notes)
    metrics, duplicates = _finish(raw)
    if duplicates:
        notes.append(f"{duplicates} values logged again at an already logged step were replaced by the later value")
    if not metrics:
        raise ValueError(f"`path` {str(given)!r} holds no logged metrics (read {', '.join(str(f) for f in files)})")
    name = label if label is not None else _default_label(label_path)
    return Run(name=name, path=files[0] if given.is_file() else source_dir, source=kind, metrics=metrics, notes=notes)


def _file_kind(path: Path) -> Optional[str]:
    if path.suffix.lower() == ".csv":
        return "csv"
    if EVENTS_MARK in path.name:
        return "tensorboard"
    return None


def _event_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and EVENTS_MARK in p.name)


def _dir_kind(folder: Path) -> Optional[str]:
    """``"csv"``, ``"tensorboard"`` or ``None`` for the files directly in ``folder``."""
    if (folder / CSV_NAME).is_file():
        return "csv"
    if _event_files(folder):
        return "tensorboard"
    return None


def _find_run_dir(folder: Path, notes: list[str]) -> tuple[str, Path]:
    kind = _dir_kind(folder)
    if kind is not None:
        if kind == "csv" and _event_files(folder):
            notes.append(f"{folder} holds both {CSV_NAME} and TensorBoard event files; read {CSV_NAME}")
        return kind, folder

    found: list[tuple[str, Path]] = []

    def walk(current: Path, depth: int) -> None:
        try:
            children = sorted(p for p in current.iterdir() if p.is_dir())
        except OSError:
            return
        for child in children:
            if child.name in _SKIP_DIRS or child.name.startswith("."):
                continue
            child_kind = _dir_kind(child)
            if child_kind is not None:
                found.append((child_kind, child))
            elif depth < SEARCH_DEPTH:
                walk(child, depth + 1)

    walk(folder, 1)
    if not found:
        raise ValueError(
            f"`path` {str(folder)!r} holds no run: no {CSV_NAME} and no events.out.tfevents.* file in it"
            f" or in its subfolders ({SEARCH_DEPTH} levels searched)"
        )
    groups = {(k, p.parent) for k, p in found}
    if len(groups) > 1:
        listing = "\n".join(f"  {k}: {p}" for k, p in found)
        raise ValueError(
            f"`path` {str(folder)!r} holds {len(found)} runs in {len(groups)} places; pass one of them:\n{listing}"
        )
    kind, chosen = max(found, key=lambda kp: _version_key(*kp))
    if len(found) > 1:
        others = ", ".join(p.name for _, p in found if p != chosen)
        notes.append(f"{chosen.parent} holds {len(found)} versions; read the newest, {chosen.name} (not {others})")
    return kind, chosen


def _version_key(kind: str, folder: Path) -> tuple[int, float]:
    """Newest first by ``version_<n>`` number, then by modification time of the metrics files."""
    match = _VERSION_RE.match(folder.name)
    number = int(match.group(1)) if match else -1
    files = [folder / CSV_NAME] if kind == "csv" else _event_files(folder)
    mtime = max((f.stat().st_mtime for f in files), default=0.0)
    return number, mtime


def _default_label(folder: Path) -> str:
    folder = folder.resolve()
    if _VERSION_RE.match(folder.name) and folder.parent.name:
        return f"{folder.parent.name}/{folder.name}"
    return folder.name or str(folder)


RawMetrics = dict[str, tuple[list[int], list[float]]]


def _read_csv(path: Path) -> tuple[RawMetrics, list[str]]:
    raw: RawMetrics = {}
    no_step = unparsable = 0
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames
            if not columns:
                raise ValueError(f"`path` {str(path)!r} is empty: no header row")
            if "step" not in columns:
                shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
                raise ValueError(
                    f"`path` {str(path)!r} has no 'step' column (columns: {shown}); is it a CSVLogger {CSV_NAME}?"
                )
            for row in reader:
                step_text = row.get("step")
                try:
                    step = int(float(step_text)) if step_text else None
                except ValueError:
                    step = None
                if step is None:
                    no_step += 1
                    continue
                for key, text in row.items():
                    if key is None or key == "step" or not isinstance(text, str) or text == "":
                        continue
                    try:
                        value = float(text)
                    except ValueError:
                        unparsable += 1
                        continue
                    steps, values = raw.setdefault(key, ([], []))
                    steps.append(step)
                    values.append(value)
    except (csv.Error, UnicodeDecodeError) as err:
        raise ValueError(f"`path` {str(path)!r} is not a readable CSV file: {err}") from err
    notes = []
    if no_step:
        notes.append(f"{no_step} CSV rows without a step were skipped")
    if unparsable:
        notes.append(f"{unparsable} CSV cells that are not numbers were skipped")
    return raw, notes


def _read_events(paths: Sequence[Path]) -> tuple[RawMetrics, list[str]]:
    from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader
    from tensorboard.util import tensor_util

    raw: RawMetrics = {}
    for path in paths:
        try:
            for event in LegacyEventFileLoader(str(path)).Load():
                if not event.HasField("summary"):
                    continue
                for value in event.summary.value:
                    kind = value.WhichOneof("value")
                    if kind == "simple_value":
                        number = float(value.simple_value)
                    elif kind == "tensor" and value.metadata.plugin_data.plugin_name == "scalars":
                        array = tensor_util.make_ndarray(value.tensor)
                        if array.size != 1:
                            continue
                        number = float(array.reshape(()))
                    else:  # hparams, histograms, images, text
                        continue
                    steps, values = raw.setdefault(value.tag, ([], []))
                    steps.append(int(event.step))
                    values.append(number)
        except Exception as err:  # the loader raises protobuf/IO errors of several kinds
            raise ValueError(f"`path` {str(path)!r} is not a readable TensorBoard event file: {err}") from err
    return raw, []


def _finish(raw: RawMetrics) -> tuple[dict[str, Series], int]:
    """Sort every key by step and keep the last value logged at each step."""
    metrics: dict[str, Series] = {}
    duplicates = 0
    for key, (steps, values) in raw.items():
        if not steps:
            continue
        s = np.asarray(steps, dtype=np.int64)
        v = np.asarray(values, dtype=np.float64)
        order = np.argsort(s, kind="stable")
        s, v = s[order], v[order]
        last = np.append(s[1:] != s[:-1], True)
        if key != "epoch":  # Lightning adds `epoch` to every log_metrics call, several per step
            duplicates += int((~last).sum())
        metrics[key] = (s[last], v[last])
    return metrics, duplicates


# ------------------------------------------------------------------------------------------- summaries


def summarize(run: Run) -> dict[str, Any]:
    """The numbers of the report's summary table for one run.

    Args:
        run: a loaded :class:`Run`.

    Returns:
        A dict: ``first_step``, ``last_step``, ``final_train_loss``, ``final_val_loss`` (last logged
        values, NaN if that is what was logged), ``min_srank`` (minimum of ``srank/min``),
        ``grad_norm_key`` and ``max_grad_norm``, ``max_attn_logit``, ``max_output_logit``,
        ``max_jacobian_alignment`` (finite values only), ``msign_applications`` (last logged count),
        ``msign_steps`` (steps at which ``msign/applications`` was logged), ``pss_trigger_steps``
        (steps with ``pss/triggered == 1``), ``first_nonfinite_loss_step``. Entries are ``None`` when
        the run did not log the key (``msign_steps`` and ``pss_trigger_steps`` too).

    Raises:
        ValueError: ``run`` is not a :class:`Run`.
    """
    if not isinstance(run, Run):
        raise ValueError(f"`run` must be a Run, got {run!r}")

    def last(key: str) -> Optional[float]:
        s = run.series(key)
        return None if s is None else float(s[1][-1])

    def extreme(key: Optional[str], fn) -> Optional[float]:
        s = run.series(key) if key else None
        if s is None:
            return None
        finite = s[1][np.isfinite(s[1])]
        return float(fn(finite)) if finite.size else None

    grad_key = run.first_key(PANELS[1].keys)
    msign = run.series(MSIGN_KEY)
    pss = run.series(PSS_KEY)
    nonfinite = []
    for key in LOSS_KEYS:
        s = run.series(key)
        if s is not None and not np.isfinite(s[1]).all():
            nonfinite.append(int(s[0][~np.isfinite(s[1])][0]))
    msign_count = None
    if msign is not None:  # the count is restored on resume: the last logged value, not the rows
        counted = msign[1][np.isfinite(msign[1])]
        msign_count = int(counted[-1]) if counted.size else len(msign[0])
    first, last_step = run.step_range
    return {
        "first_step": first,
        "last_step": last_step,
        "final_train_loss": last("train/loss"),
        "final_val_loss": last("val/loss"),
        "min_srank": extreme("srank/min", np.min),
        "grad_norm_key": grad_key,
        "max_grad_norm": extreme(grad_key, np.max),
        "max_attn_logit": extreme("diag/attn_logit_max", np.max),
        "max_output_logit": extreme("diag/output_logit_max", np.max),
        "max_jacobian_alignment": extreme("diag/jacobian_alignment_max", np.max),
        "msign_applications": msign_count,
        "msign_steps": None if msign is None else [int(x) for x in msign[0]],
        "pss_trigger_steps": None if pss is None else [int(x) for x in pss[0][pss[1] == 1]],
        "first_nonfinite_loss_step": min(nonfinite) if nonfinite else None,
    }


# ------------------------------------------------------------------------------------------- rendering


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
    png = _draw(runs, labels, colors, summaries, panels, panel_titles, title)
    png_path.write_bytes(png)
    html_path.write_text(_html(runs, labels, colors, summaries, panels, panel_titles, title, png), encoding="utf-8")
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


def _finite(values: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(values), values, np.nan)


def _draw(runs, labels, colors, summaries, panels, panel_titles, title) -> bytes:
    import io

    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(11, 1.2 + 2.6 * len(panels)), dpi=100, layout="constrained")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    fig.suptitle(title, fontsize=13)
    lane = min(0.06, 0.3 / len(runs))
    starts = [r.step_range[0] for r in runs]
    ends = [r.step_range[1] for r in runs]
    xmin, xmax = min(starts), max(ends)
    pad = max(0.5, 0.01 * (xmax - xmin))

    for ax, panel, panel_title in zip(axes, panels, panel_titles):
        values_seen: list[np.ndarray] = []
        for run, color in zip(runs, colors):
            key = run.first_key(panel.keys)
            if key is not None:
                s, v = run.metrics[key]
                ax.plot(s, _finite(v), color=color, lw=1.3, marker="." if len(s) <= 60 else None, ms=4)
                values_seen.append(v)
            if panel.secondary and panel.secondary in run:
                s, v = run.metrics[panel.secondary]
                ax.plot(s, _finite(v), color=color, lw=1.0, ls="--", marker="o", ms=4, mfc="white")
                values_seen.append(v)
        finite = np.concatenate([v[np.isfinite(v)] for v in values_seen]) if values_seen else np.empty(0)
        log = False
        if finite.size and (finite > 0).all():
            spread = finite.max() / finite.min()
            log = panel.log == "positive" or (panel.log == "spread" and spread > 100)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel(panel.ylabel + (" (log)" if log else ""))
        ax.set_title(panel_title, fontsize=10, loc="left")
        ax.grid(True, which="major", alpha=0.3)
        ax.relim()
        ax.autoscale_view()
        # Bands of their own for the event lanes: MSign ticks at the bottom, PSS triggers at the top.
        bottom = len(runs) * lane if any(x["msign_steps"] for x in summaries) else 0.0
        top = len(runs) * lane if any(x["pss_trigger_steps"] for x in summaries) else 0.0
        data_lim = ax.get_ylim()
        ylim = _widen(data_lim, bottom, top, log)

        # Events, drawn in axes coordinates along y so that they do not move the y limits.
        trans = ax.get_xaxis_transform()
        for i, (summary, color) in enumerate(zip(summaries, colors)):
            if summary["msign_steps"]:
                ax.vlines(summary["msign_steps"], i * lane, (i + 1) * lane, transform=trans, colors=color, lw=1.2)
            if summary["pss_trigger_steps"]:
                steps = summary["pss_trigger_steps"]
                ax.plot(steps, [1 - (i + 0.5) * lane] * len(steps), transform=trans, ls="none", marker="v",
                        ms=6, color=color, clip_on=False)
            if summary["first_nonfinite_loss_step"] is not None:
                ax.axvline(summary["first_nonfinite_loss_step"], color=color, ls="--", lw=1.4)
        ax.set_ylim(ylim)
        if not log and bottom:  # no tick labels in the MSign lane below the data (a stable rank of -10)
            ax.set_yticks([t for t in ax.get_yticks() if data_lim[0] <= t <= ylim[1]])
            ax.set_ylim(ylim)
        if log:  # plain numbers (0.5, 2, 1e+06), and minor labels only when less than a decade is shown
            decades = math.log10(ylim[1] / ylim[0])
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _, few=decades < 1: f"{y:g}" if few else ""))
    axes[-1].set_xlim(xmin - pad, xmax + pad)
    axes[-1].set_xlabel("step")

    handles = [Line2D([], [], color=c, lw=2, label=lab) for c, lab in zip(colors, labels)]
    gray = "0.35"
    if any(x["msign_steps"] for x in summaries):
        handles.append(Line2D([], [], color=gray, marker="|", ls="none", ms=10, mew=1.5, label="MSign application (bottom)"))
    if any(x["pss_trigger_steps"] for x in summaries):
        handles.append(Line2D([], [], color=gray, marker="v", ls="none", ms=6, label="PSS trigger (top)"))
    if any(x["first_nonfinite_loss_step"] is not None for x in summaries):
        handles.append(Line2D([], [], color=gray, ls="--", lw=1.4, label="first non-finite loss"))
    secondary = sorted({p.secondary for p in panels if p.secondary and any(p.secondary in r for r in runs)})
    if secondary:
        handles.append(Line2D([], [], color=gray, ls="--", marker="o", mfc="white", ms=4, label=", ".join(secondary)))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=9, frameon=False)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _widen(limits: tuple[float, float], bottom: float, top: float, log: bool) -> tuple[float, float]:
    """Y limits leaving fractions ``bottom`` and ``top`` of the axes free below and above ``limits``."""
    lo, hi = (math.log10(x) for x in limits) if log else limits
    span = (hi - lo) / max(1.0 - bottom - top, 0.1)
    lo, hi = lo - bottom * span, hi + top * span
    return (10**lo, 10**hi) if log else (lo, hi)


def _fmt(value: Any) -> str:
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
    ("final_train_loss", "final train/loss"),
    ("final_val_loss", "final val/loss"),
    ("first_nonfinite_loss_step", "first non-finite loss step"),
    ("min_srank", "min srank/min"),
    ("max_grad_norm", "max gradient norm"),
    ("max_attn_logit", "max attention logit"),
    ("max_output_logit", "max output logit"),
    ("max_jacobian_alignment", "max Jacobian alignment"),
    ("msign_applications", "MSign applications"),
    ("msign_steps", "MSign steps"),
    ("pss_trigger_steps", "PSS trigger steps"),
)


def _html(runs, labels, colors, summaries, panels, panel_titles, title, png: bytes) -> str:
    e = html.escape
    rows = []
    for i, (run, label, color, summary) in enumerate(zip(runs, labels, colors, summaries)):
        cells = [
            f'<td data-run="{i}" data-key="label"><span class="swatch" style="background:{color}"></span>{e(label)}</td>',
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

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p class="meta">{len(runs)} runs. Step axis: the loggers\' step index (the step of each batch\'s '
        "train/loss). Bottom ticks: MSign applications; top triangles: PSS triggers; dashed line: first "
        "non-finite loss; one lane and one color per run.</p>",
        f'<img alt="{e(title)}: ' + e(", ".join(panel_titles)) + f'" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
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
                    f"<td><code>{e(key)}</code></td>" + "".join(f'<td class="num">{e(_fmt(x))}</td>' for x in stats) + "</tr>"
                )
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lightning-msign report",
        description=(
            "Draw several runs side by side (loss, gradient norm, min stable rank, attention-logit max,"
            " Jacobian alignment, with MSign applications and PSS triggers marked) and write"
            " report.png and a self-contained report.html into --out."
        ),
        epilog=(
            "RUN_DIR: a CSVLogger or TensorBoardLogger version folder, a metrics.csv or"
            " events.out.tfevents.* file, or a folder holding one run (its newest version is read)."
            " Example: lightning-msign report logs/csv/shakespeare-baseline logs/csv/shakespeare-msign"
            " --out reports/msign"
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="log folder or file of a run")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    parser.add_argument(
        "--label",
        action="append",
        metavar="LABEL",
        help="name of a run in the report; give it once per RUN_DIR, in the same order (default: from the path)",
    )
    parser.add_argument("--title", default="lightning-msign report", help="figure and page title")
    return parser


def report_main(argv: Optional[Sequence[str]] = None) -> None:
    """Run ``lightning-msign report``; prints the two written paths.

    Args:
        argv: the arguments after ``report`` (``None``: ``sys.argv[2:]``).

    Returns:
        None (exit status 0).

    Raises:
        SystemExit: status 0 for ``--help``; status 2, after printing the usage and the reason to
            stderr, for bad arguments or input (a missing folder, no metrics, several runs in one folder,
            ``--label`` given a different number of times than there are runs).
    """
    parser = _parser()
    args = parser.parse_args(list(sys.argv[2:] if argv is None else argv))
    if args.label is not None and len(args.label) != len(args.runs):
        parser.error(f"--label was given {len(args.label)} times for {len(args.runs)} runs; give it once per RUN_DIR")
    runs = []
    try:
        for i, path in enumerate(args.runs):
            run = load_run(path, label=None if args.label is None else args.label[i])
            for note in run.notes:
                print(f"lightning-msign report: note: {run.name}: {note}", file=sys.stderr)
            runs.append(run)
        png_path, html_path = render_report(runs, args.out, title=args.title)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    print(png_path)
    print(html_path)
