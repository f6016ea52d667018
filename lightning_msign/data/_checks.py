"""Argument checks of the data modules: the package's one validation layer (:mod:`lightning_msign._validation`)."""

from __future__ import annotations

from typing import Any

from lightning_msign._validation import SEED_BOUND, check_seed
from lightning_msign._validation import check_int as _check_int

__all__ = ["SEED_BOUND", "check_int", "check_seed"]


def check_int(name: str, value: Any, minimum: int) -> None:
    """Raise unless ``value`` is an int (not a bool) ``>= minimum`` (argument order of the data modules)."""
    _check_int(value, name, minimum)
