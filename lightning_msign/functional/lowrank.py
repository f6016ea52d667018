"""Top-k singular triplets by randomized block Krylov iteration, optionally warm-started (for rank-k updates).

Plain functions on tensors, no Lightning. The exact reference is ``torch.linalg.svd`` (tests compare).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_msign.functional.precision import as_compute, check_matrix

__all__ = ["block_krylov_topk"]


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

    is orthonormalised block by block (``Q``), and the SVD of the small ``Q^T M`` gives the triplets. This returns
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
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 0:
        raise ValueError(f"`iterations` must be a non-negative int, got {iterations!r}")
    if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
        raise ValueError(f"`oversample` must be a non-negative int, got {oversample!r}")
    X = as_compute(M)
    width = min(k + oversample, min(m, n))
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    omega = torch.randn(n, width, generator=generator, dtype=X.dtype).to(X.device)  # (n, b)
    if start is not None:
        if start.ndim != 2 or start.shape[0] != n:
            raise ValueError(f"`start` must be an (n={n}, j) block, got shape {tuple(start.shape)}")
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
