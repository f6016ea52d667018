"""Parametric Singularity Smoothing (PSS, arXiv 2602.01308): dominant directions and smoothing functions.

PSS protects a weight matrix ``W`` whose spectrum is dominated by a few singular values. It takes the
top-``k`` singular triplets ``(U_k, sigma, V_k)`` (Dominant Direction Decomposition, here a seeded
randomized range finder with power iterations, Halko et al. 2011: no full SVD), applies a smoothing
function ``f`` to ``sigma`` and reparameterizes

.. math::

    W^* = W - U_k \\operatorname{diag}(\\sigma - f(\\sigma)) V_k^\\top ,

so the part of ``W`` outside the span of the top-``k`` directions is unchanged exactly (whatever the
accuracy of the decomposition), and within it the singular values become ``f(sigma)``.

Every smoothing function here maps a non-increasing, non-negative ``sigma`` (length ``k``) to a
non-increasing, non-negative ``f(sigma)`` with ``f(sigma)_1 <= sigma_1`` and a dominance that never
grows, dominance being ``sigma_1``'s share of the top-``k`` sum: ``f_1 / sum(f) <= sigma_1 / sum(sigma)``.
``softmax`` and ``softplus`` also never increase any ratio ``sigma_1 / sigma_j``; ``conv`` can (it
moves mass from ``sigma_2`` to ``sigma_3`` too). ``conv`` and ``softmax`` keep the sum of the ``k`` values.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_msign._validation import check_positive_int
from lightning_msign.functional.precision import as_compute, check_matrix

Smoothing = Literal["softplus", "softmax", "conv"]
SMOOTHINGS: tuple[str, ...] = typing.get_args(Smoothing)


def smooth_conv(sigma: Tensor, weight: float = 0.25, passes: int = 1) -> Tensor:
    """Convolution with the kernel ``[a, 1 - 2a, a]`` and reflecting edges, applied ``passes`` times.

    .. math::

        f(\\sigma)_i = a\\,\\sigma_{i-1} + (1 - 2a)\\,\\sigma_i + a\\,\\sigma_{i+1},
        \\quad \\sigma_0 := \\sigma_1,\\ \\sigma_{k+1} := \\sigma_k .

    The operator is doubly stochastic, so the sum is kept; with ``0 < a <= 1/2`` a non-increasing input
    stays non-increasing and ``f_1 = (1 - a)\\sigma_1 + a\\sigma_2 <= \\sigma_1``. A single value is
    returned unchanged (nothing to average with).

    Args:
        sigma: ``(..., k)`` singular values in non-increasing order.
        weight: ``a`` in ``(0, 0.5]``.
        passes: number of applications (a wider kernel), at least 1.
    """
    if not (0.0 < weight <= 0.5):
        raise ValueError(f"`weight` must be in (0, 0.5], got {weight!r}")
    check_positive_int(passes, "passes")
    out = sigma
    for _ in range(passes):
        left = torch.cat([out[..., :1], out[..., :-1]], dim=-1)
        right = torch.cat([out[..., 1:], out[..., -1:]], dim=-1)
        out = weight * left + (1 - 2 * weight) * out + weight * right
    return out


def smooth_softmax(sigma: Tensor, temperature: float = 1.0) -> Tensor:
    """Sum-preserving softmax with a temperature relative to ``sigma_1``.

    .. math::

        f(\\sigma)_i = \\Big(\\sum_j \\sigma_j\\Big)
        \\frac{\\exp(\\sigma_i / (T\\sigma_1))}{\\sum_j \\exp(\\sigma_j / (T\\sigma_1))}.

    Ratios become ``f_1 / f_j = exp((1 - r_j) / T)`` with ``r_j = sigma_j / sigma_1``; since
    ``exp(1 - r) <= 1 / r`` on ``(0, 1]``, dominance never grows for ``T >= 1`` (larger ``T``: flatter).

    Args:
        sigma: ``(..., k)`` singular values, non-increasing.
        temperature: ``T >= 1``.
    """
    if not temperature >= 1.0:
        raise ValueError(f"`temperature` must be >= 1 (so dominance cannot grow), got {temperature!r}")
    top = sigma[..., :1].clamp_min(torch.finfo(sigma.dtype).tiny)
    return sigma.sum(dim=-1, keepdim=True) * torch.softmax(sigma / (temperature * top), dim=-1)


def smooth_softplus(sigma: Tensor, cap: float = 1.0, sharpness: float = 4.0) -> Tensor:
    """Soft cap of the large singular values with a softplus, exact at zero.

    .. math::

        f(\\sigma) = \\frac{c}{\\beta}\\Big[\\operatorname{softplus}(\\beta)
        - \\operatorname{softplus}\\big(\\beta (1 - \\sigma / c)\\big)\\Big],
        \\qquad c = \\text{cap} \\cdot \\operatorname{mean}(\\sigma).

    ``f(0) = 0``, ``f' = \\operatorname{sigmoid}(\\beta(1 - \\sigma / c)) \\in (0, 1)`` and ``f`` is
    concave: order is kept, values stay non-negative, ``f(sigma) <= sigma``, ``f(sigma) / sigma``
    decreases (dominance never grows), and values far above ``c`` approach
    ``c * softplus(beta) / beta``. The sum is not kept (it decreases).

    Args:
        sigma: ``(..., k)`` singular values, non-increasing.
        cap: the cap as a multiple of the geometric mean of the ``k`` values, > 0.
        sharpness: ``beta`` > 0; larger is closer to a hard ``min(sigma, c)``.
    """
    if not cap > 0:
        raise ValueError(f"`cap` must be > 0, got {cap!r}")
    if not sharpness > 0:
        raise ValueError(f"`sharpness` must be > 0, got {sharpness!r}")
    tiny = torch.finfo(sigma.dtype).tiny
    c = (cap * sigma.clamp_min(tiny).log().mean(dim=-1, keepdim=True).exp()).clamp_min(tiny)
    sp = torch.nn.functional.softplus
    return c / sharpness * (sp(torch.full_like(c, sharpness)) - sp(sharpness * (1 - sigma / c)))


_SMOOTHERS = {"conv": smooth_conv, "softmax": smooth_softmax, "softplus": smooth_softplus}


def smooth_singular_values(sigma: Tensor, smoothing: Smoothing = "softplus", **kwargs: Any) -> Tensor:
    """Apply the smoothing function named ``smoothing`` (with its keyword arguments) to ``sigma``."""
    if smoothing not in _SMOOTHERS:
        raise ValueError(f"`smoothing` must be one of {SMOOTHINGS}, got {smoothing!r}")
    return _SMOOTHERS[smoothing](sigma, **kwargs)


def top_singular_triplets(
    W: Tensor, k: int, oversample: int = 8, power_iters: int = 4, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of a matrix by a seeded randomized range finder (no full SVD).

    ``Q = orth((W W^T)^q W Omega)`` with a Gaussian ``Omega`` of ``k + oversample`` columns drawn from a
    CPU generator seeded with ``seed`` (the same on every process and every resume), re-orthonormalized
    after each product; then the SVD of the small ``(k + p) x n`` matrix ``Q^T W``. Costs
    ``O(mn(k + p)(2q + 2))``. Accuracy improves with ``power_iters`` and with the gap
    ``sigma_k / sigma_{k+p+1}``.

    Args:
        W: ``(m, n)`` floating matrix (computed in float32 at least).
        k: number of triplets, ``1 <= k <= min(m, n)``.
        oversample: extra random directions ``p``.
        power_iters: power iterations ``q``.
        seed: seed of the random test matrix.

    Returns:
        ``(U_k, sigma, V_k)`` of shapes ``(m, k)``, ``(k,)``, ``(n, k)``; sigma non-increasing.
    """
    check_matrix(W)
    if W.ndim != 2:
        raise ValueError(f"`W` must be a matrix (m, n), got shape {tuple(W.shape)}")
    m, n = W.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"`k` must be an int in [1, {min(m, n)}] for a {m}x{n} matrix, got {k!r}")
    X = as_compute(W)
    width = min(k + oversample, min(m, n))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, width, generator=gen, dtype=X.dtype).to(X.device)  # (n, k + p)
    Q = torch.linalg.qr(X @ omega).Q  # (m, k + p)
    for _ in range(power_iters):
        Q = torch.linalg.qr(X.mT @ Q).Q  # (n, k + p)
        Q = torch.linalg.qr(X @ Q).Q  # (m, k + p)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)  # (k+p, k+p), (k+p,), (k+p, n)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].mT


def pss_rank(W: Tensor, sigma_1: Tensor | float, max_rank: int | None = None) -> int:
    """``k = max(2, floor(srank(W)))`` from a given ``sigma_1``, capped by ``min(m, n)`` and ``max_rank``.

    The paper uses ``floor(srank)``; at least two values are kept because a sum-preserving smoothing of a
    single value is the identity, and a collapsed matrix has ``srank < 2``.
    """
    fro2 = float(torch.linalg.matrix_norm(as_compute(W)).square())
    s1 = float(sigma_1)
    k = int(math.floor(fro2 / (s1 * s1))) if s1 > 0 else 1
    limit = min(W.shape[-2:]) if max_rank is None else min(min(W.shape[-2:]), max_rank)
    return max(1, min(max(2, k), limit))


def protection_seed(protection: int, index: int) -> int:
    """Seed of the range finder for target ``index`` at the ``protection``-th protection (1-based).

    It depends only on the two counts, so every process and every resumed run draws the same test matrix.
    """
    return protection * 7919 + index


def pss_smooth(
    W: Tensor,
    k: int,
    smoothing: Smoothing = "softplus",
    smoothing_kwargs: dict[str, Any] | None = None,
    oversample: int = 8,
    power_iters: int = 4,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Smooth the top-``k`` singular values of ``W``: ``W - U_k diag(sigma - f(sigma)) V_k^T``.

    Args:
        W: ``(m, n)`` matrix, any floating dtype.
        k: dominant directions to smooth (see :func:`pss_rank`).
        smoothing: ``"softplus"``, ``"softmax"`` or ``"conv"``; ``smoothing_kwargs`` go to it.
        oversample: of :func:`top_singular_triplets`.
        power_iters: of :func:`top_singular_triplets`.
        seed: of :func:`top_singular_triplets`.

    Returns:
        ``(W_star, sigma, f(sigma))``: the new matrix in ``W``'s dtype (computed in float32 at least)
        and the ``k`` singular values before and after.
    """
    X = as_compute(W)
    U, sigma, V = top_singular_triplets(X, k, oversample=oversample, power_iters=power_iters, seed=seed)
    new = smooth_singular_values(sigma, smoothing, **(smoothing_kwargs or {}))
    W_star = X - (U * (sigma - new)) @ V.mT  # (m, n)
    return W_star.to(W.dtype), sigma, new
