"""One validation layer: argument checks whose messages name the argument, the valid range and the value."""

from __future__ import annotations

import typing
from typing import Any, Optional


def choices(literal: Any) -> tuple[str, ...]:
    """The values of a ``Literal[...]`` type (the one place a choice list is written is the type itself)."""
    values = typing.get_args(literal)
    if not values:
        raise TypeError(f"{literal!r} is not a Literal type")
    return tuple(values)


def check_choice(value: Any, argument: str, literal: Any) -> Any:
    options = choices(literal)
    if value not in options:
        raise ValueError(f"`{argument}` must be one of {options}, got {value!r}")
    return value


def check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
    return value


def check_optional_positive_int(value: Any, argument: str) -> Optional[int]:
    return None if value is None else check_positive_int(value, argument)


def check_non_negative_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{argument}` must be a non-negative int, got {value!r}")
    return value


def check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be a bool, got {value!r}")
    return value


def check_float(
    value: Any, argument: str, *, above: Optional[float] = None, at_most: Optional[float] = None,
    at_least: Optional[float] = None,
) -> float:
    """A real number with optional bounds (``above`` exclusive, ``at_least`` / ``at_most`` inclusive)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value == value
    ok = ok and (above is None or value > above) and (at_least is None or value >= at_least)
    ok = ok and (at_most is None or value <= at_most)
    if not ok:
        bounds = [f"> {above}" if above is not None else "", f">= {at_least}" if at_least is not None else "",
                  f"<= {at_most}" if at_most is not None else ""]
        where = " and ".join(b for b in bounds if b)
        raise ValueError(f"`{argument}` must be a number{' ' + where if where else ''}, got {value!r}")
    return float(value)
