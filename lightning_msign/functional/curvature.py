r"""Curvature of the loss as the optimizer sees it: Hessian-vector products and a preconditioned power iteration.

Plain functions on lists of tensors (one per parameter); no Lightning, no optimizer objects.

*Hessian-vector products.* With the gradient :math:`g = \nabla_\theta L` built with ``create_graph=True``,
:math:`Hv = \nabla_\theta \langle g, v\rangle` is one more backward pass through the double graph
(:func:`hessian_vector_product`), about the cost of 2-3 ordinary backward passes. Attention through
``torch.nn.functional.scaled_dot_product_attention`` must then run its math kernel: the fused CPU kernel has no
double backward (``sdpa_math_kernel``).

*Preconditioned operator.* Adam's step is :math:`\theta_{t+1} = \theta_t - \eta\, P_t^{-1} m_t` with the diagonal
(:func:`adam_preconditioner`)

.. math::

    P_t = (1 - \beta_1^t)\left(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon\right)

(Cohen et al. 2022, "Adaptive gradient methods at the edge of stability", arXiv 2207.14484: the bias corrections
are folded into :math:`P` so that the step is exactly :math:`\eta P^{-1} m_t`). For a diagonal scale
:math:`S` the symmetric operator :math:`A = S H S` has the eigenvalues of :math:`S^2 H`: with
:math:`S = P^{-1/2}` it is the preconditioned Hessian whose top eigenvalue is the *preconditioned sharpness*;
with :math:`S = (\eta / P)^{1/2}` (per-parameter learning rates) it is the curvature of the step itself.
:func:`lanczos` (default) or :func:`power_iteration` estimates the top eigenpair of such an operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from lightning_msign._validation import check_positive_int

__all__ = [
    "EigenEstimate",
    "adam_preconditioner",
    "edge_of_stability",
    "hessian_matrix",
    "hessian_vector_product",
    "lanczos",
    "list_dot",
    "list_norm",
    "power_iteration",
    "random_unit_vector",
    "sdpa_math_kernel",
]

Vector = list[Tensor]


def list_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """:math:`\\sum_i \\langle a_i, b_i\\rangle` of two tensor lists, accumulated in float64 (a 0-dim tensor)."""
    if len(a) != len(b):
        raise ValueError(f"`a` and `b` must have the same number of tensors, got {len(a)} and {len(b)}")
    if not a:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([torch.vdot(x.reshape(-1).double(), y.reshape(-1).double()) for x, y in zip(a, b)]).sum()


def list_norm(a: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of a tensor list taken as one vector (float64, 0-dim)."""
    return list_dot(a, a).clamp_min(0).sqrt()


def random_unit_vector(like: Sequence[Tensor], seed: int) -> Vector:
    """A unit vector (over the whole list) of Gaussian entries, shaped and typed like ``like``.

    Drawn on the CPU from ``torch.Generator().manual_seed(seed)`` and moved: the same on every device and
    every process, and the global RNG is not touched.
    """
    generator = torch.Generator().manual_seed(int(seed))
    vector = [torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.device, t.dtype) for t in like]
    norm = float(list_norm(vector))
    return [v / norm for v in vector]


def adam_preconditioner(
    exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float
) -> Tensor:
    r"""Adam's effective diagonal preconditioner :math:`P_t = (1 - \beta_1^t)(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon)`.

    With it, ``torch.optim.Adam`` / ``AdamW`` take the step :math:`\eta\, P_t^{-1} m_t` (``m_t`` the raw first
    moment): the bias corrections of both moments are inside :math:`P_t` (Cohen et al. 2022's convention).

    Args:
        exp_avg_sq: :math:`v_t`, the optimizer's second moment after step ``t`` (``state["exp_avg_sq"]``, or
            ``max_exp_avg_sq`` with ``amsgrad=True``), any shape.
        step: :math:`t \ge 1`, the number of steps the moment has seen.
        beta1: the optimizer's first-moment coefficient.
        beta2: the optimizer's second-moment coefficient.
        eps: the optimizer's epsilon.

    Returns:
        :math:`P_t`, float32 (or float64 for a float64 moment), the shape of ``exp_avg_sq``, all entries > 0
        when ``eps > 0``.
    """
    if step < 1:
        raise ValueError(f"`step` must be at least 1 (the optimizer must have stepped), got {step!r}")
    v = exp_avg_sq.detach().to(torch.float64 if exp_avg_sq.dtype == torch.float64 else torch.float32)
    correction2 = 1.0 - beta2**step
    correction1 = 1.0 - beta1**step
    return (v / correction2).sqrt_().add_(eps).mul_(correction1)


def edge_of_stability(beta1: float) -> float:
    r"""Adam's edge of stability for :math:`\lambda_{\max}(\eta P^{-1} H)`: :math:`(2 + 2\beta_1)/(1 - \beta_1)`.

    A quadratic with curvature :math:`\lambda` along an eigenvector, under heavy-ball momentum :math:`\beta_1`
    with the preconditioner frozen, is stable iff :math:`\eta \lambda < (2 + 2\beta_1)/(1 - \beta_1)` (38 for
    :math:`\beta_1 = 0.9`; Cohen et al. 2022).
    """
    if not 0.0 <= beta1 < 1.0:
        raise ValueError(f"`beta1` must be in [0, 1), got {beta1!r}")
    return (2.0 + 2.0 * beta1) / (1.0 - beta1)


def hessian_vector_product(
    grads: Sequence[Tensor], params: Sequence[Tensor], vector: Sequence[Tensor]
) -> Vector:
    r""":math:`Hv = \nabla_\theta \langle g, v\rangle` by a double backward.

    Args:
        grads: :math:`g`, the gradients of a scalar loss w.r.t. ``params``, computed with
            ``torch.autograd.grad(loss, params, create_graph=True)`` (the graph is kept: call again with
            other vectors).
        params: the parameters (leaf tensors) of the gradient.
        vector: :math:`v`, one tensor per parameter, of its shape.

    Returns:
        :math:`Hv`, one tensor per parameter (zeros for a parameter the gradient does not depend on).
    """
    products = torch.autograd.grad(grads, params, grad_outputs=list(vector), retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if hv is None else hv.detach() for hv, p in zip(products, params)]


class EigenEstimate(NamedTuple):
    """What :func:`power_iteration` and :func:`lanczos` return.

    Attributes:
        value: the estimate (a Python float): the Rayleigh quotient :math:`u^\\top A u` of the last iterate
            (power iteration), the top Ritz value (Lanczos).
        vector: the vector to carry to warm-start the next call: :math:`A u / \\|A u\\|` (power iteration), the
            unit Ritz vector (Lanczos).
        residual: :math:`\\|A u - \\lambda u\\| / |\\lambda|` (0 at an exact eigenpair; ``inf`` when
            :math:`\\lambda = 0`).
        products: operator applications spent.
    """

    value: float
    vector: Vector
    residual: float
    products: int


def power_iteration(
    operator: Callable[[Vector], Vector], start: Sequence[Tensor], num_iters: int
) -> EigenEstimate:
    r"""Power iteration on a symmetric operator, started from ``start``; ``num_iters`` applications.

    Iterates :math:`u_{k+1} = A u_k / \|A u_k\|` from :math:`u_0` = ``start`` normalised and returns the last
    Rayleigh quotient :math:`\lambda = u^\top A u` with its residual. It converges to the eigenvalue of largest
    *magnitude* at the rate :math:`|\lambda_2 / \lambda_1|` per application, so a start close to the top
    eigenvector (the previous step's, :func:`adam_preconditioner` changing slowly) needs few applications; the
    estimate is a lower bound of :math:`\lambda_{\max}` in magnitude when the top eigenvalue is positive
    (Rayleigh quotients never exceed it). Arithmetic in the tensors' dtype, inner products in float64.

    Args:
        operator: :math:`v \mapsto A v` on tensor lists (e.g. :math:`S H S v` from
            :func:`hessian_vector_product`).
        start: :math:`u_0`, one tensor per parameter (any nonzero norm).
        num_iters: applications of ``operator``, at least 1.

    Returns:
        An :class:`EigenEstimate`. A non-finite product stops the iteration and returns ``value=nan``.
    """
    check_positive_int(num_iters, "num_iters")
    norm = float(list_norm(start))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"`start` must be a finite nonzero vector, got norm {norm}")
    u = [t / norm for t in start]
    value, residual = math.nan, math.inf
    for k in range(num_iters):
        au = operator(u)
        value = float(list_dot(u, au))
        au_norm = float(list_norm(au))
        if not (math.isfinite(value) and math.isfinite(au_norm)):
            return EigenEstimate(math.nan, u, math.inf, k + 1)
        gap = float(list_norm([a - value * x for a, x in zip(au, u)]))  # ||Au - lambda u||, no cancellation
        residual = gap / abs(value) if value != 0.0 else math.inf
        if au_norm == 0.0:  # u is in the null space: nothing to iterate on
            return EigenEstimate(0.0, u, math.inf, k + 1)
        u = [t / au_norm for t in au]
    return EigenEstimate(value, u, residual, num_iters)


def lanczos(operator: Callable[[Vector], Vector], start: Sequence[Tensor], num_iters: int) -> EigenEstimate:
    r"""The largest (algebraic) eigenvalue of a symmetric operator by ``num_iters`` Lanczos steps from ``start``.

    Builds an orthonormal basis :math:`q_1 = u_0 / \|u_0\|, \dots, q_k` of the Krylov space
    :math:`\mathcal{K}_k(A, u_0) = \mathrm{span}(u_0, A u_0, \dots, A^{k-1} u_0)` with full
    reorthogonalisation (one operator application per step) and returns the top Ritz pair of
    :math:`T_k = Q_k^\top A Q_k`: :math:`\theta = \max_{y \in \mathcal{K}_k} y^\top A y / y^\top y`.

    Compared with :func:`power_iteration` on the same applications: power iteration's Rayleigh quotient is that
    of :math:`A^{k-1} u_0 \in \mathcal{K}_k`, so :math:`\theta` is never below it, and :math:`\theta` converges
    to the largest *algebraic* eigenvalue even when a negative eigenvalue has a larger magnitude (where power
    iteration converges to that negative one). It is a lower bound of :math:`\lambda_{\max}`.

    Memory: the ``num_iters`` basis vectors (each the size of ``start``). Arithmetic in the tensors' dtype, inner
    products and the small eigenproblem in float64.

    Args:
        operator: :math:`v \mapsto A v` on tensor lists.
        start: :math:`u_0`, one tensor per parameter (any nonzero norm): a warm start (the previous Ritz vector)
            makes few steps enough.
        num_iters: applications of ``operator`` (the Krylov dimension), at least 1.

    Returns:
        An :class:`EigenEstimate`: ``value`` :math:`\theta`, ``vector`` the unit Ritz vector (carry it to warm-start
        the next call), ``residual`` :math:`|\beta_k s_k| / |\theta|` (:math:`= \|A y - \theta y\| / |\theta|` in
        exact arithmetic; 0 when the Krylov space is invariant), ``products``. A non-finite product stops the
        iteration and returns ``value=nan``.
    """
    check_positive_int(num_iters, "num_iters")
    norm = float(list_norm(start))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError(f"`start` must be a finite nonzero vector, got norm {norm}")
    basis: list[Vector] = [[t / norm for t in start]]
    alphas: list[float] = []
    betas: list[float] = []
    beta = 0.0
    products = 0
    for k in range(num_iters):
        w = operator(basis[-1])
        products += 1
        alpha = float(list_dot(basis[-1], w))
        if not math.isfinite(alpha):
            return EigenEstimate(math.nan, basis[0], math.inf, products)
        alphas.append(alpha)
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            for q in basis:
                c = float(list_dot(q, w))
                w = [wi - c * qi for wi, qi in zip(w, q)]
        beta = float(list_norm(w))
        if not math.isfinite(beta):
            return EigenEstimate(math.nan, basis[0], math.inf, products)
        if k == num_iters - 1 or beta <= 1e-12 * max(abs(a) for a in alphas):
            break  # the last step, or an invariant subspace (the Ritz values are exact)
        betas.append(beta)
        basis.append([wi / beta for wi in w])
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(T)
    theta, s = float(values[-1]), vectors[:, -1]
    ritz = [torch.zeros_like(t) for t in basis[0]]
    for coefficient, q in zip(s.tolist(), basis):
        ritz = [r + coefficient * qi for r, qi in zip(ritz, q)]
    ritz = unit(ritz) or basis[0]
    residual = abs(beta * float(s[-1])) / abs(theta) if theta != 0.0 else math.inf
    return EigenEstimate(theta, ritz, residual, products)


def hessian_matrix(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> Tensor:
    """The dense Hessian of ``loss_fn()`` w.r.t. ``params`` flattened and concatenated (the slow exact reference).

    One Hessian-vector product per coordinate: for tiny models in tests only. Returns ``(n, n)`` float64.
    """
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for i in range(flat.numel()):
        row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if r is None else r).reshape(-1) for p, r in zip(params, row)]))
    return torch.stack(rows).double()


@contextmanager
def sdpa_math_kernel() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on its math kernel, the one with a double backward.

    The fused CPU kernel (``_scaled_dot_product_flash_attention_for_cpu``) has no derivative of its backward in
    torch 2.13; neither do the flash and memory-efficient CUDA kernels. The math kernel computes the same
    attention from differentiable primitives (more memory: the ``(T, T)`` scores are materialised).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def scaled(vector: Sequence[Tensor], scale: Sequence[Tensor], inverse: bool = False) -> Vector:
    """``vector * scale`` (or ``/ scale``) elementwise, tensor by tensor."""
    if inverse:
        return [v / s for v, s in zip(vector, scale)]
    return [v * s for v, s in zip(vector, scale)]


def unit(vector: Sequence[Tensor]) -> Optional[Vector]:
    """``vector`` normalised, or ``None`` when its norm is zero or not finite."""
    norm = float(list_norm(vector))
    if not math.isfinite(norm) or norm == 0.0:
        return None
    return [v / norm for v in vector]
