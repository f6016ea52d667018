"""One validation layer: argument checks whose messages name the argument, the valid range and the value.

Used by every layer (`functional/`, the guards, the optimizers, the module, the data); imports nothing but the
standard library, so `functional/` stays free of Lightning."""

from __future__ import annotations

import math
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
    return check_int(value, argument, 1)


def check_optional_positive_int(value: Any, argument: str) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{argument}` must be None or a positive int, got {value!r}")
    return value


def check_non_negative_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{argument}` must be a non-negative int, got {value!r}")
    return value


def check_betas(value: Any, argument: str = "betas") -> tuple[float, float]:
    """Adam's ``(beta1, beta2)``: two real numbers in ``[0, 1)``; returned as a tuple of floats."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in value)
    if not ok:
        raise ValueError(f"`{argument}` must be two floats in [0, 1), got {value!r}")
    return float(value[0]), float(value[1])


def check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be a bool, got {value!r}")
    return value


def check_range(value: Any, argument: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A finite real number in ``[low, high]`` (``(low, high]`` with ``low_open``); returns it as a float."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    in_range = is_number and (value > low if low_open else value >= low) and value <= high
    if not in_range:
        left = "(" if low_open else "["
        right = ")" if math.isinf(high) else "]"
        high_str = "inf" if math.isinf(high) else f"{high:g}"
        raise ValueError(f"`{argument}` must be a finite float in {left}{low:g}, {high_str}{right}, got {value!r}")
    return float(value)


def check_int(value: Any, argument: str, minimum: int) -> int:
    """An int (not a bool) ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{argument}` must be {kind}, got {value!r}")
    return value


#: Any seed of a train order lies in ``[0, 2**63)``.
SEED_BOUND = 2**63


def check_seed(seed: Any, allow_none: bool = False, argument: str = "seed") -> Optional[int]:
    """An int in ``[0, 2**63)`` (or ``None`` when ``allow_none``)."""
    if seed is None and allow_none:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_BOUND:
        kind = "None or an int" if allow_none else "an int"
        raise ValueError(f"`{argument}` must be {kind} in [0, 2**63), got {seed!r}")
    return seed
