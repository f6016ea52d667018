"""The report's figure: one matplotlib panel per quantity on a shared step axis, with the event lanes.

Events, in the run's color on every panel: MSign applications as short ticks along the bottom
edge, PSS triggers as triangles along the top edge, one lane per run; the first non-finite loss
as a dashed vertical line; blocks unlocked by architecture warm-up as dotted vertical lines. A
panel's threshold (the curvature's edge of stability) is a dotted gray horizontal line. Each lane band
gets room of its own below or above the data.
"""

from __future__ import annotations

import math

import numpy as np


def _finite(values: np.ndarray) -> np.ndarray:
    """``values`` with Inf as NaN, so that a line breaks there instead of leaving the axis."""
    return np.where(np.isfinite(values), values, np.nan)


def render_png(runs, labels, colors, summaries, panels, panel_titles, title) -> bytes:
    """The PNG of the figure: one axis per panel (titled ``panel_titles``), one color per run, the events of
    ``summaries`` (from :func:`~lightning_msign.report.summary.summarize`), a legend below."""
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
            for step in summary.get("unlock_steps") or ():
                ax.axvline(step, color=color, ls=":", lw=1.1)
        if panel.reference is not None and (not log or panel.reference > 0):
            ax.axhline(panel.reference, color="0.25", ls=(0, (1, 2)), lw=1.2)
            lo, hi = ylim
            ylim = (min(lo, panel.reference), max(hi, panel.reference))
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
        tick = Line2D([], [], color=gray, marker="|", ls="none", ms=10, mew=1.5, label="MSign application (bottom)")
        handles.append(tick)
    if any(x["pss_trigger_steps"] for x in summaries):
        handles.append(Line2D([], [], color=gray, marker="v", ls="none", ms=6, label="PSS trigger (top)"))
    if any(x["first_nonfinite_loss_step"] is not None for x in summaries):
        handles.append(Line2D([], [], color=gray, ls="--", lw=1.4, label="first non-finite loss"))
    if any(x.get("unlock_steps") for x in summaries):
        handles.append(Line2D([], [], color=gray, ls=":", lw=1.1, label="blocks unlocked (architecture warm-up)"))
    for panel in panels:
        if panel.reference is not None:
            handles.append(Line2D([], [], color="0.25", ls=(0, (1, 2)), lw=1.2, label=panel.reference_label))
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
