"""NuMuon's rank schedule and the per-matrix learning-rate scale of Muon and NuMuon.

A rank fraction is a float in ``(0, 1]`` or a schedule (``{"schedule": "cosine", ...}``): :func:`rank_fraction_at`
gives its value at a step, :func:`rank_of` the rank ``k`` it means for a matrix, :func:`lr_scale` the factor on the
learning rate of a matrix of a shape under ``adjust_lr_fn``.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union

from lightning_msign._validation import check_range

AdjustLR = Literal["match_rms_adamw", "original", "none"]
RankSchedule = Literal["constant", "cosine", "piecewise"]
RankFraction = Union[float, dict[str, Any]]

__all__ = ["AdjustLR", "RankFraction", "RankSchedule", "check_rank_fraction", "lr_scale", "rank_fraction_at", "rank_of"]


def _check_fraction(value: Any, argument: str) -> float:
    return check_range(value, argument, low=0.0, high=1.0, low_open=True)


def check_rank_fraction(value: Any, argument: str = "rank_fraction") -> RankFraction:
    """Validate a rank fraction or schedule (see :class:`NuMuon`); returns it normalised (plain types only)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _check_fraction(value, argument)
    if not isinstance(value, dict):
        raise ValueError(
            f"`{argument}` must be a float in (0, 1] or a schedule dict ({{'schedule': 'cosine', 'start': 1.0,"
            f" 'end': 0.25, 'steps': 1000}} or {{'schedule': 'piecewise', 'start': 1.0, 'milestones': [[500, 0.5]]}}),"
            f" got {value!r}"
        )
    kind = value.get("schedule")
    if kind not in typing.get_args(RankSchedule):
        raise ValueError(f"`{argument}['schedule']` must be one of {typing.get_args(RankSchedule)}, got {kind!r}")
    allowed = {"constant": {"value"}, "cosine": {"start", "end", "steps"}, "piecewise": {"start", "milestones"}}[kind]
    unknown = sorted(set(value) - allowed - {"schedule"})
    if unknown:
        raise ValueError(f"`{argument}`: a {kind!r} schedule takes the keys {sorted(allowed)}, got also {unknown}")
    missing = sorted(k for k in allowed if k not in value and not (kind == "piecewise" and k == "start"))
    if missing:
        raise ValueError(f"`{argument}`: a {kind!r} schedule needs the keys {missing}, got {value!r}")
    if kind == "constant":
        return {"schedule": kind, "value": _check_fraction(value["value"], f"{argument}['value']")}
    if kind == "cosine":
        steps = value["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"`{argument}['steps']` must be a positive int, got {steps!r}")
        return {
            "schedule": kind,
            "start": _check_fraction(value["start"], f"{argument}['start']"),
            "end": _check_fraction(value["end"], f"{argument}['end']"),
            "steps": steps,
        }
    milestones = value["milestones"]
    if not isinstance(milestones, Sequence) or isinstance(milestones, str) or not milestones:
        raise ValueError(f"`{argument}['milestones']` must be a non-empty list of [step, fraction], got {milestones!r}")
    out, previous = [], 0
    for item in milestones:
        if not isinstance(item, Sequence) or isinstance(item, str) or len(item) != 2:
            raise ValueError(f"`{argument}['milestones']` entries must be [step, fraction], got {item!r}")
        step, fraction = item
        if isinstance(step, bool) or not isinstance(step, int) or step <= previous:
            raise ValueError(
                f"`{argument}['milestones']` steps must be ints >= 1 in increasing order, got {step!r} after {previous}"
            )
        out.append([step, _check_fraction(fraction, f"{argument}['milestones']")])
        previous = step
    start = _check_fraction(value.get("start", 1.0), f"{argument}['start']")
    return {"schedule": kind, "start": start, "milestones": out}


def rank_fraction_at(schedule: RankFraction, step: int) -> float:
    """The rank fraction of optimizer step ``step`` (0 for the first step) under ``schedule``.

    A float is constant. ``cosine`` goes from ``start`` at step 0 to ``end`` at ``steps`` (and stays there):
    ``end + (start - end) * (1 + cos(pi * min(step, steps) / steps)) / 2``. ``piecewise`` is ``start`` before
    the first milestone and each milestone's fraction from its step on.
    """
    if not isinstance(schedule, dict):
        return float(schedule)
    kind = schedule["schedule"]
    if kind == "constant":
        return float(schedule["value"])
    if kind == "cosine":
        t = min(step, schedule["steps"]) / schedule["steps"]
        return schedule["end"] + (schedule["start"] - schedule["end"]) * 0.5 * (1.0 + math.cos(math.pi * t))
    fraction = schedule.get("start", 1.0)
    for milestone, value in schedule["milestones"]:
        if step >= milestone:
            fraction = value
    return float(fraction)


def rank_of(fraction: float, shape: Sequence[int]) -> int:
    """``k = ceil(fraction * min(m, n))``, at least 1 (a fraction within 1e-9 of a step rounds down to it)."""
    short = min(int(shape[0]), int(shape[1]))
    return max(1, min(short, math.ceil(fraction * short - 1e-9)))


def lr_scale(adjust_lr_fn: str, shape: Sequence[int]) -> float:
    """The factor on the learning rate of a matrix of ``shape`` (rows, columns); see :class:`NuMuon`."""
    rows, cols = int(shape[0]), int(shape[1])
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    if adjust_lr_fn == "original":
        return math.sqrt(max(1.0, rows / cols))
    return 1.0


