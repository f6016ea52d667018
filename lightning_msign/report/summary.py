"""The numbers of the report's summary table, one dict per run."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from lightning_msign.metric_keys import (
    CURV_STABILITY_RATIO,
    DIAG_ATTN_LOGIT_MAX,
    DIAG_JACOBIAN_ALIGNMENT_MAX,
    DIAG_OUTPUT_LOGIT_MAX,
    MSIGN_APPLICATIONS,
    PSS_TRIGGERED,
    SRANK_MIN,
    TRAIN_LOSS,
    VAL_LOSS,
    WARMUP_UNLOCKED,
)
from lightning_msign.report.panels import GRAD_NORM_PANEL
from lightning_msign.report.runs import Run

__all__ = ["LOSS_KEYS", "MSIGN_KEY", "PSS_KEY", "UNLOCK_KEY", "summarize", "verdict"]

#: Logged at each MSign application: the steps of the report's bottom ticks.
MSIGN_KEY = MSIGN_APPLICATIONS
#: 1 at a PSS trigger: the steps of the report's top triangles.
PSS_KEY = PSS_TRIGGERED
#: Logged at each unlock of DepthWarmupCallback: the steps of the report's dotted vertical lines.
UNLOCK_KEY = WARMUP_UNLOCKED
#: The losses whose first non-finite value marks a divergence.
LOSS_KEYS = (TRAIN_LOSS, VAL_LOSS)


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
        (steps with ``pss/triggered == 1``), ``first_nonfinite_loss_step``, ``max_stability_ratio``
        (``curvature/stability_ratio``), ``unlock_steps`` (steps at which ``warmup/unlocked`` was logged).
        Entries are ``None`` when the run did not log the key (the step lists too).

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

    grad_key = run.first_key(GRAD_NORM_PANEL.keys)
    msign = run.series(MSIGN_KEY)
    pss = run.series(PSS_KEY)
    unlocks = run.series(UNLOCK_KEY)
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
        "final_train_loss": last(TRAIN_LOSS),
        "final_val_loss": last(VAL_LOSS),
        "min_srank": extreme(SRANK_MIN, np.min),
        "grad_norm_key": grad_key,
        "max_grad_norm": extreme(grad_key, np.max),
        "max_attn_logit": extreme(DIAG_ATTN_LOGIT_MAX, np.max),
        "max_output_logit": extreme(DIAG_OUTPUT_LOGIT_MAX, np.max),
        "max_jacobian_alignment": extreme(DIAG_JACOBIAN_ALIGNMENT_MAX, np.max),
        "msign_applications": msign_count,
        "msign_steps": None if msign is None else [int(x) for x in msign[0]],
        "pss_trigger_steps": None if pss is None else [int(x) for x in pss[0][pss[1] == 1]],
        "first_nonfinite_loss_step": min(nonfinite) if nonfinite else None,
        "max_stability_ratio": extreme(CURV_STABILITY_RATIO, np.max),
        "unlock_steps": None if unlocks is None else [int(x) for x in unlocks[0]],
    }


def verdict(runs: list[Run]) -> str:
    """One line comparing the last run with the first: final validation (else training) loss, the largest attention
    logit and the MSign applications of each, from what they logged.

    Example: ``guarded vs unguarded: final val loss 2.348 vs 2.522 (0.17 lower); largest attention logit 99.2 vs
    427; MSign applications 460 vs 0``.

    Raises:
        ValueError: fewer than two runs.
    """
    if len(runs) < 2:
        raise ValueError(f"`runs` must hold at least two runs to compare, got {len(runs)}")
    first, last = summarize(runs[0]), summarize(runs[-1])
    parts = []
    key = "final_val_loss" if first["final_val_loss"] is not None and last["final_val_loss"] is not None else (
        "final_train_loss")
    a, b = first[key], last[key]
    if a is not None and b is not None:
        what = "val" if key == "final_val_loss" else "train"
        if np.isfinite(a) and np.isfinite(b):
            diff = b - a
            change = "the same" if abs(diff) < 5e-3 else f"{abs(diff):.2f} {'lower' if diff < 0 else 'higher'}"
            parts.append(f"final {what} loss {b:.3f} vs {a:.3f} ({change})")
        else:
            parts.append(f"final {what} loss {b:.4g} vs {a:.4g}")
    a, b = first["max_attn_logit"], last["max_attn_logit"]
    if a is not None and b is not None:
        parts.append(f"largest attention logit {b:.3g} vs {a:.3g}")
    a, b = first["msign_applications"] or 0, last["msign_applications"] or 0
    if a or b:
        parts.append(f"MSign applications {b} vs {a}")
    return f"{runs[-1].name} vs {runs[0].name}: " + ("; ".join(parts) if parts else "no metric both runs logged")
