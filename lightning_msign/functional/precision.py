"""The working precision of the math: float32 at least, float64 kept."""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(W: Tensor) -> torch.dtype:
    """The dtype the math runs in for ``W``: float64 for float64 input, float32 for every other dtype."""
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def as_compute(W: Tensor) -> Tensor:
    """``W`` in :func:`compute_dtype` (the same tensor when it already is)."""
    return W.to(compute_dtype(W))


def check_matrix(W: Tensor, name: str = "W") -> None:
    """Raise unless ``W`` is a floating-point tensor of shape ``(..., m, n)``, naming ``name``."""
    if not isinstance(W, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim < 2:
        raise ValueError(f"`{name}` must have at least 2 dimensions (..., m, n), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {W.dtype}")
