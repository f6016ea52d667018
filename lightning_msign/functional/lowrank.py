"""Top-k singular triplets by randomized block Krylov iteration, optionally warm-started (for rank-k updates).

Plain functions on tensors, no Lightning. The exact reference is ``torch.linalg.svd`` (tests compare).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from lightning_msign._validation import check_non_negative_int
from lightning_msign.functional.precision import as_compute, check_matrix

__all__ = ["LowRankSign", "block_krylov_topk", "rank_k_sign"]


def block_krylov_topk(
    M: Tensor,
    k: int,
    iterations: int = 2,
    oversample: int = 8,
    start: Optional[Tensor] = None,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Top-``k`` singular triplets of ``M`` from a randomized block Krylov space (Musco & Musco 2015).

    With a start block :math:`\Omega` of ``b = k + oversample`` columns (``n x b``: the given ``start`` columns
    first, e.g. the previous call's :math:`V_k`, completed with seeded Gaussian columns), the Krylov basis

    .. math::

        K = [M\Omega,\ (MM^\top) M\Omega,\ \dots,\ (MM^\top)^{q} M\Omega] \in \mathbb{R}^{m \times (q+1) b}

    is orthonormalised block by block (``Q``), and the SVD of the small ``Q^T M`` gives the triplets. When
    ``(q + 1) b >= min(m, n)`` the space would be all of it, and the exact SVD is returned instead. This returns
    the best rank-``k`` approximation of ``M`` within ``range(Q)``: exact when ``rank(M) <= (q + 1) b``, otherwise
    accurate to a factor that falls with the gap :math:`\sigma_k / \sigma_{(q+1)b+1}` and with ``q``. Computed in
    float32 at least (:func:`~lightning_msign.functional.precision.as_compute`). Cost:
    :math:`O(mn\,(q+1)\,b)` for the products plus QR of ``m x (q+1)b``.

    Args:
        M: ``(m, n)`` matrix.
        k: number of triplets, ``1 <= k <= min(m, n)``.
        iterations: ``q``, Krylov iterations (``q = 0`` is a plain randomized range finder).
        oversample: extra columns ``p`` of the start block.
        start: optional ``(n, j)`` block of directions to start from (warm start; ``j <= k + p`` columns used).
        seed: seed of the Gaussian columns (a CPU generator: the same on every process and device).

    Returns:
        ``(U_k, S_k, V_k)``: ``(m, k)``, ``(k,)`` non-increasing, ``(n, k)``, in the compute dtype.
    """
    check_matrix(M)
    if M.ndim != 2:
        raise ValueError(f"`M` must be a matrix (m, n), got shape {tuple(M.shape)}")
    m, n = M.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= min(m, n):
        raise ValueError(f"`k` must be an int in [1, {min(m, n)}] for a {m}x{n} matrix, got {k!r}")
    check_non_negative_int(iterations, "iterations")
    check_non_negative_int(oversample, "oversample")
    if start is not None and (start.ndim != 2 or start.shape[0] != n):
        raise ValueError(f"`start` must be an (n={n}, j) block, got shape {tuple(start.shape)}")
    X = as_compute(M)
    width = min(k + oversample, min(m, n))
    if (iterations + 1) * width >= min(m, n):
        # The Krylov space would be the whole space (and its basis could not stay orthonormal in R^m): the
        # exact SVD is cheaper and exact.
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
        return U[:, :k], S[:k], Vh[:k].mT
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, width, generator=generator, dtype=X.dtype).to(X.device)  # (n, b)
    if start is not None:
        j = min(start.shape[1], width)
        omega[:, :j] = start[:, :j].to(X.dtype)
    blocks = []
    block = X @ omega  # (m, b)
    for i in range(iterations + 1):
        if blocks:
            # Block Gram-Schmidt, twice: project out the earlier blocks, orthonormalise within the block, and
            # again. Once is not enough: a block nearly inside the earlier space (the top directions already
            # found) has tiny singular values, and its QR amplifies the rounding left in that space.
            basis = torch.cat(blocks, dim=1)
            for _ in range(2):
                block = block - basis @ (basis.mT @ block)
                block = torch.linalg.qr(block).Q
        else:
            block = torch.linalg.qr(block).Q
        blocks.append(block)
        if i < iterations:
            block = X @ (X.mT @ block)  # (m, b)
    Q = torch.cat(blocks, dim=1)  # (m, (q+1) b)
    Ub, S, Vh = torch.linalg.svd(Q.mT @ X, full_matrices=False)
    return (Q @ Ub)[:, :k], S[:k], Vh[:k].mT


@dataclass
class LowRankSign:
    """What :func:`rank_k_sign` returns.

    Attributes:
        sign: ``U_k V_k^T`` (``(m, n)``, compute dtype): rank ``<= k``, every non-zero singular value 1.
        right: ``V_k`` (``(n, k)``), the start block of the next call (warm start).
        values: ``S_k`` (``(k,)``), the top singular values found.
        captured: ``||S_k||^2 / ||M||_F^2``, the share of ``M``'s energy in the directions kept (1 for zero ``M``).
        rank: how many of the ``k`` directions were kept (singular values above the zero threshold).
    """

    sign: Tensor
    right: Tensor
    values: Tensor
    captured: float
    rank: int


def rank_k_sign(
    M: Tensor,
    k: int,
    iterations: int = 2,
    oversample: int = 8,
    start: Optional[Tensor] = None,
    seed: int = 0,
) -> LowRankSign:
    r"""The rank-``k`` matrix sign :math:`U_k V_k^\top` of ``M``: its top-``k`` singular directions, unit values.

    This is the update direction of a rank-``k`` Muon step (NuMuon): the maximiser of
    :math:`\langle M, X\rangle` over :math:`\|X\|_2 \le 1,\ \|X\|_* \le k`. The top-``k`` triplets come from
    :func:`block_krylov_topk` (``iterations``, ``oversample``, ``start``, ``seed`` as there). Singular values
    at or below ``max(m, n) * eps * sigma_1`` count as zero and their directions are dropped, as in
    :func:`~lightning_msign.functional.msign` (the sign of zero is zero): a matrix of rank below ``k`` gives
    an update of its own rank, and a zero matrix a zero update. With ``k = min(m, n)`` and a block that
    spans the whole space the result is the exact sign.

    Args:
        M: ``(m, n)`` matrix (any float dtype; computed in float32 at least).
        k: directions kept, ``1 <= k <= min(m, n)``.

    Returns:
        A :class:`LowRankSign`.
    """
    U, S, V = block_krylov_topk(M, k, iterations=iterations, oversample=oversample, start=start, seed=seed)
    m, n = M.shape
    tol = S[0] * (max(m, n) * torch.finfo(S.dtype).eps)  # S holds k >= 1 values, largest first
    keep = S > tol
    kept = int(keep.sum())
    sign = (U * keep.to(U.dtype)) @ V.mT
    total = float(as_compute(M).square().sum())
    captured = float(S.square().sum()) / total if total > 0 else 1.0  # above 1 only by rounding
    return LowRankSign(sign, V, S, captured, kept)
