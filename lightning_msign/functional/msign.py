"""Matrix sign (orthogonal polar factor) of weight matrices, and the MSign restoration step.

The matrix sign of ``W = U S V^T`` (thin SVD) is ``msign(W) = U V^T``: every non-zero singular value
is replaced by one while the row and column spaces are kept. Three backends compute it:

``"svd"``
    Exact reference: thin SVD in float32 (float64 input stays float64). Singular values below
    ``max(m, n) * eps(dtype) * sigma_max`` count as zero, so a rank-``r`` input gives a rank-``r``
    output with exactly ``r`` unit singular values (the sign of zero is zero). LAPACK's divide-and-
    conquer SVD occasionally fails to converge on matrices with many repeated singular values (seen
    once on a matrix signed 18 times); it is then retried in float64, and if that fails too, computed
    by 20 Polar Express steps with a ``RuntimeWarning`` rather than stopping the run.
``"polar_express"``
    Polar Express (Amsel et al., 2025): odd quintic polynomial iterations with per-step optimal
    coefficients, input normalised by ``1.01 * ||W||_F``. After ``k`` steps every singular value with
    ``sigma / ||W||_F >= l_k`` lies within ``1e-3`` of one (``l_8 = 4.1e-4``, ``l_10 = 1.2e-4``,
    ``l_12 = 3.4e-5``, ``l_16 = 2.8e-6``; float32 rounding adds ~1e-6); smaller singular values are
    mapped monotonically into ``[0, 1)`` rather than lifted to one. Default 10 steps.
``"newton_schulz"``
    Muon's quintic Newton-Schulz iteration (coefficients 3.4445, -4.7750, 2.0315), input normalised
    by ``||W||_F``. It is *not* the sign: it returns something like ``U S' V^T`` with ``S'`` in
    ``[0.68, 1.21]`` for every ``sigma >= 1e-2 ||W||_F`` (and smaller ones shrunk towards zero),
    and never converges further. Default 5 steps. Relative error against ``"svd"`` is about 0.2-0.35.

All three raise the stable rank of a collapsed matrix by orders of magnitude, which is what MSign
needs; only ``"svd"`` is the exact operation of the paper. On a GPU the polynomial backends are
matrix multiplications only (fast, shardable); on a CPU LAPACK's SVD is usually as fast or faster.
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_msign.functional.precision import as_compute, check_matrix
from lightning_msign.functional.spectral import finite_matrices, stable_rank

Backend = Literal["svd", "polar_express", "newton_schulz"]
BACKENDS: tuple[str, ...] = typing.get_args(Backend)
DEFAULT_STEPS: dict[str, int] = {"polar_express": 10, "newton_schulz": 5}

# Polar Express coefficients (a, b, c) of p(x) = a x + b x^3 + c x^5, one triple per iteration; the last
# triple repeats. All but the last are divided by (1.01, 1.01^3, 1.01^5) for numerical safety.
_POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5)
    for a, b, c in (
        (8.28721, -23.5959, 17.3004),
        (4.10706, -2.94785, 0.54484),
        (3.94869, -2.90890, 0.55182),
        (3.31842, -2.48849, 0.51005),
        (2.30065, -1.66890, 0.41881),
        (1.89130, -1.26800, 0.37680),
    )
) + ((1.875, -1.25, 0.375),)
_NEWTON_SCHULZ_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


# Polar Express steps of the fallback when LAPACK's SVD fails: 20 steps lift every sigma >= 2.2e-7 ||W||_F.
_FALLBACK_STEPS = 20


def _msign_svd(X: Tensor) -> Tensor:
    try:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)  # (..., m, k), (..., k), (..., k, n)
    except torch.linalg.LinAlgError as err:
        # gesdd can fail to converge on matrices with many repeated singular values (for instance a
        # matrix MSign signed before): retry in float64, then fall back to a long Polar Express run.
        if X.dtype != torch.float64:
            return _msign_svd(X.double()).to(X.dtype)
        warnings.warn(
            f"msign: the SVD failed ({err}); using {_FALLBACK_STEPS} Polar Express steps instead", RuntimeWarning
        )
        return _polar_express(X, _FALLBACK_STEPS)
    tol = S.amax(dim=-1, keepdim=True) * (max(X.shape[-2:]) * torch.finfo(X.dtype).eps)
    keep = (S > tol).to(X.dtype)  # the sign of a zero singular value is zero
    return (U * keep.unsqueeze(-2)) @ Vh


def _polynomial_iteration(X: Tensor, coeffs: list[tuple[float, float, float]], norm_scale: float) -> Tensor:
    """Odd quintic iterations ``X <- a X + (b A + c A^2) X`` with ``A = X X^T`` on the short side."""
    transpose = X.shape[-2] > X.shape[-1]
    if transpose:
        X = X.mT  # (..., n, m) with n < m: A is the smaller Gram matrix
    X = X / (norm_scale * torch.linalg.matrix_norm(X, keepdim=True) + 1e-30)
    for a, b, c in coeffs:
        A = X @ X.mT  # (..., short, short)
        B = torch.addmm(A, A, A, beta=b, alpha=c) if A.ndim == 2 else b * A + c * (A @ A)
        X = torch.addmm(X, B, X, beta=a) if X.ndim == 2 else a * X + B @ X
    return X.mT if transpose else X


def _polar_express(X: Tensor, steps: int) -> Tensor:
    n = len(_POLAR_EXPRESS_COEFFS)
    return _polynomial_iteration(X, [_POLAR_EXPRESS_COEFFS[min(i, n - 1)] for i in range(steps)], norm_scale=1.01)


def msign(W: Tensor, backend: Backend = "svd", steps: int | None = None) -> Tensor:
    """Matrix sign ``U V^T`` of ``W = U S V^T``.

    Args:
        W: a ``(m, n)`` matrix or a batch ``(..., m, n)`` of matrices, any floating dtype.
        backend: ``"svd"`` (exact), ``"polar_express"`` or ``"newton_schulz"`` (see the module
            docstring for what each one really returns).
        steps: iterations of a polynomial backend (default 10 for ``"polar_express"``, 5 for
            ``"newton_schulz"``); must be ``None`` for ``"svd"``.

    Returns:
        A tensor of the shape and dtype of ``W``, computed in float32 (float64 for float64 input).
        A zero matrix maps to zero. Non-finite input gives an error (``"svd"``) or non-finite output.

    Raises:
        ValueError: unknown ``backend``, bad ``steps``, or a tensor with fewer than 2 dimensions.
    """
    check_matrix(W)
    if backend not in BACKENDS:
        raise ValueError(f"`backend` must be one of {BACKENDS}, got {backend!r}")
    if backend == "svd":
        if steps is not None:
            raise ValueError(f"`steps` must be None for backend 'svd' (it is exact), got {steps!r}")
    elif steps is None:
        steps = DEFAULT_STEPS[backend]
    elif isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"`steps` must be a positive int or None, got {steps!r}")

    X = as_compute(W)
    if backend == "svd":
        out = _msign_svd(X)
    elif backend == "polar_express":
        out = _polar_express(X, steps)
    else:
        out = _polynomial_iteration(X, [_NEWTON_SCHULZ_COEFFS] * steps, norm_scale=1.0)
    return out.to(W.dtype)


def msign_restore(W: Tensor, backend: Backend = "svd", steps: int | None = None) -> Tensor:
    """The MSign update of the paper (Algorithm 1): ``(||W||_F / ||msign(W)||_F) * msign(W)``.

    For the exact backend ``||U V^T||_F = sqrt(rank(W))``; for the polynomial backends the norm of the
    returned matrix is used, so the Frobenius norm of the result equals that of ``W`` whatever the
    backend. A zero matrix is returned unchanged. Batched input is rescaled matrix by matrix.

    Args:
        W: ``(m, n)`` or ``(..., m, n)`` floating tensor.
        backend: as in :func:`msign`.
        steps: as in :func:`msign`.

    Returns:
        A new tensor of the shape and dtype of ``W`` (computed in float32 at least).
    """
    X = as_compute(W)
    return _with_norm_of(X, msign(X, backend=backend, steps=steps)).to(W.dtype)


def _with_norm_of(X: Tensor, sign: Tensor) -> Tensor:
    """``sign`` rescaled matrix by matrix to the Frobenius norm of ``X``; a zero ``X`` is returned as it is."""
    w_norm = torch.linalg.matrix_norm(X, keepdim=True)  # (..., 1, 1)
    o_norm = torch.linalg.matrix_norm(sign, keepdim=True)
    scale = torch.where(o_norm > 0, w_norm / o_norm.clamp_min(torch.finfo(X.dtype).tiny), torch.zeros_like(o_norm))
    return torch.where(w_norm > 0, sign * scale, X)


@dataclass
class SignedBatch:
    """What :func:`sign_and_restore` returns for a batch of ``G`` matrices.

    Attributes:
        matrices: ``(G, m, n)`` results in the compute dtype; rows that were not ``written`` hold the input.
        written: ``(G,)`` bool, True where the input and the result are finite.
        srank_before, srank_after: ``(G,)`` exact stable ranks of input and result (zeros when not asked for).
    """

    matrices: Tensor
    written: Tensor
    srank_before: Tensor
    srank_after: Tensor


def sign_and_restore(
    X: Tensor, backend: Backend = "svd", steps: int | None = None, stable_ranks: bool = True
) -> SignedBatch:
    """The MSign update of a batch of matrices, never producing a non-finite result, with stable ranks.

    Each finite ``X[i]`` becomes :func:`msign_restore` of it; a matrix holding NaN/Inf, or whose result is
    not finite, is marked not ``written`` and returned unchanged. With ``stable_ranks`` the exact stable
    ranks before and after are returned too. For the ``"svd"`` backend they come from the one singular
    value decomposition that computes the sign (``srank_before = sum(s^2) / s_1^2``; after, every kept
    singular value is equal, so ``srank_after`` is their count); polynomial backends pay for one
    singular-value computation of each input and result.

    Args:
        X: ``(G, m, n)`` floating tensor (computed in float32 at least).
        backend: as in :func:`msign`.
        steps: as in :func:`msign`.
        stable_ranks: compute ``srank_before`` / ``srank_after``.
    """
    check_matrix(X, "X")
    if X.ndim != 3:
        raise ValueError(f"`X` must be a batch (G, m, n) of matrices, got shape {tuple(X.shape)}")
    X = as_compute(X)
    finite = finite_matrices(X)  # (G,)
    all_finite = bool(finite.all())
    safe = X if all_finite else torch.where(finite[:, None, None], X, torch.zeros((), dtype=X.dtype, device=X.device))
    zeros = torch.zeros(X.shape[0], dtype=X.dtype, device=X.device)
    before = after = zeros
    if backend == "svd":
        if steps is not None:
            raise ValueError(f"`steps` must be None for backend 'svd' (it is exact), got {steps!r}")
        sign, S = _msign_svd_with_values(safe)
        if stable_ranks:
            top = S[:, 0]
            tol = top * (max(X.shape[-2:]) * torch.finfo(X.dtype).eps)
            before = torch.where(top > 0, S.square().sum(-1) / top.square().clamp_min(torch.finfo(X.dtype).tiny), zeros)
            after = (S > tol[:, None]).sum(-1).to(X.dtype)
    else:
        sign = msign(safe, backend=backend, steps=steps)
    new = _with_norm_of(safe, sign)
    written = finite & finite_matrices(new)
    if not bool(written.all()):
        new = torch.where(written[:, None, None], new, X)
    if stable_ranks and backend != "svd":
        before, after = stable_rank(safe), stable_rank(torch.where(written[:, None, None], new, safe))
    return SignedBatch(new, written, torch.where(written, before, zeros), torch.where(written, after, zeros))


def _msign_svd_with_values(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(U V^T, singular values)`` of a batch by one SVD (falls back as :func:`msign` does on LAPACK failure)."""
    try:
        U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    except torch.linalg.LinAlgError:
        if X.dtype != torch.float64:
            sign, S = _msign_svd_with_values(X.double())
            return sign.to(X.dtype), S.to(X.dtype)
        return _msign_svd(X), torch.linalg.svdvals(X)
    tol = S.amax(dim=-1, keepdim=True) * (max(X.shape[-2:]) * torch.finfo(X.dtype).eps)
    keep = (S > tol).to(X.dtype)
    return (U * keep.unsqueeze(-2)) @ Vh, S
