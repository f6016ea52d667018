"""Argument checks shared by the data modules: one place for the int and seed rules and their messages."""

from __future__ import annotations

from typing import Any

#: Any seed of a train order lies in ``[0, 2**63)``.
SEED_BOUND = 2**63


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an int (not a bool) ``>= minimum``; the message names ``name`` and ``value``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")


def check_seed(seed: Any, allow_none: bool = False) -> None:
    """Raise unless ``seed`` is an int in ``[0, 2**63)`` (or ``None`` when ``allow_none``)."""
    if seed is None and allow_none:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_BOUND:
        kind = "None or an int" if allow_none else "an int"
        raise ValueError(f"`seed` must be {kind} in [0, 2**63), got {seed!r}")
