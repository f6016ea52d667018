"""Spectral quantities of weight matrices: stable rank, exact and by warm-started power iteration.

The stable rank of a matrix is

.. math::

    \\operatorname{srank}(W) = \\frac{\\lVert W \\rVert_F^2}{\\lVert W \\rVert_2^2}
    = \\frac{\\sum_i \\sigma_i^2}{\\sigma_1^2} \\in [1, \\operatorname{rank}(W)],

a smooth lower bound of the rank. Its collapse towards one in attention projections precedes the
training failures that MSign (arXiv 2602.01734) repairs. By convention the zero matrix has stable
rank 0 here.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_msign._validation import check_positive_int
from lightning_msign.functional.precision import as_compute, check_matrix, compute_dtype


def stable_rank(W: Tensor) -> Tensor:
    """Exact stable rank ``||W||_F^2 / ||W||_2^2`` (spectral norm from singular values).

    Args:
        W: ``(m, n)`` or ``(..., m, n)`` floating tensor.

    Returns:
        A float32 (float64 for float64 input) tensor of shape ``W.shape[:-2]``; 0 for a zero matrix.
    """
    check_matrix(W)
    X = as_compute(W)
    fro2 = torch.linalg.matrix_norm(X).square()
    spec2 = torch.linalg.matrix_norm(X, ord=2).square()
    return torch.where(spec2 == 0, torch.zeros_like(fro2), fro2 / spec2.clamp_min(torch.finfo(X.dtype).tiny))


def finite_matrices(X: Tensor) -> Tensor:
    """``(...,)`` bool: which matrices of ``X`` (``(..., m, n)``) hold only finite values (two reductions, no mask)."""
    return torch.isfinite(X.amax(dim=(-2, -1))) & torch.isfinite(X.amin(dim=(-2, -1)))


def _normalize(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)


def initial_vector(W: Tensor, seed: int = 0) -> Tensor:
    """A deterministic random unit start vector ``(..., n)`` for :func:`spectral_norm_estimate`.

    Drawn from a CPU generator seeded with ``seed``, so every process and every resume gets the same
    vector for the same shape.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(*W.shape[:-2], W.shape[-1], generator=gen, dtype=compute_dtype(W))
    return _normalize(v).to(W.device)


def spectral_norm_estimate(W: Tensor, v: Tensor | None = None, num_iters: int = 1) -> tuple[Tensor, Tensor]:
    """Estimate ``sigma_1 = ||W||_2`` by power iteration on ``W^T W``, warm-started from ``v``.

    Each iteration costs two matrix-vector products: ``u = W v / ||W v||``, ``v = W^T u``,
    ``sigma = ||v||``, ``v <- v / sigma``. The estimate never exceeds the true ``sigma_1`` and
    converges to it at rate ``(sigma_2 / sigma_1)^2`` per iteration; when the weights move little
    between training steps, one iteration from last step's vector tracks ``sigma_1`` closely.

    Args:
        W: ``(m, n)`` or ``(..., m, n)`` floating tensor.
        v: ``(..., n)`` start vector (the second output of the previous call), or ``None`` for a
            deterministic random start (:func:`initial_vector`; use more iterations then, e.g. 20).
        num_iters: power iterations, at least 1.

    Returns:
        ``(sigma, v)``: the estimate, shape ``W.shape[:-2]``, and the unit right singular vector
        estimate ``(..., n)`` to pass back next time; both float32 at least.

    Raises:
        ValueError: ``num_iters < 1`` or a ``v`` whose shape does not fit ``W``.
    """
    check_matrix(W)
    check_positive_int(num_iters, "num_iters")
    X = as_compute(W)
    expected = (*X.shape[:-2], X.shape[-1])
    if v is None:
        v = initial_vector(X)
    elif tuple(v.shape) != expected:
        raise ValueError(f"`v` must have shape {expected} to fit `W` of shape {tuple(W.shape)}, got {tuple(v.shape)}")
    v = _normalize(v.to(device=X.device, dtype=X.dtype))
    sigma = torch.zeros(X.shape[:-2], dtype=X.dtype, device=X.device)
    for _ in range(num_iters):
        # Row-vector products (v^T X^T, u^T X): faster on CPU than X @ v columns (overhead.py --only guards).
        u = _normalize((v.unsqueeze(-2) @ X.mT).squeeze(-2))  # (..., m)
        v = (u.unsqueeze(-2) @ X).squeeze(-2)  # (..., n)
        sigma = v.norm(dim=-1)
        v = _normalize(v)
    return sigma, v


def stable_rank_estimate(W: Tensor, v: Tensor | None = None, num_iters: int = 1) -> tuple[Tensor, Tensor]:
    """Stable rank from the power-iteration estimate of ``||W||_2``: ``||W||_F^2 / sigma_est^2``.

    Because ``sigma_est <= sigma_1`` the estimate is an upper bound of :func:`stable_rank`, tight once
    the iteration has converged. Arguments and the returned vector are those of
    :func:`spectral_norm_estimate`. A zero matrix gives 0.
    """
    sigma, v = spectral_norm_estimate(W, v, num_iters)
    fro2 = torch.linalg.matrix_norm(W.to(sigma.dtype)).square()
    s2 = sigma.square()
    # A NaN estimate stays NaN (a matrix holding NaN/Inf must not read as the zero matrix).
    srank = torch.where(s2 == 0, torch.zeros_like(fro2), fro2 / s2.clamp_min(torch.finfo(s2.dtype).tiny))
    return srank, v


def spectral_norm_from_stable_rank(fro_norm: float, srank: float) -> float:
    """``||W||_2 = ||W||_F / sqrt(srank(W))`` (0 for a zero matrix, whose stable rank is 0 here)."""
    return fro_norm / srank**0.5 if srank > 0 else 0.0 if srank == 0 else float("nan")
