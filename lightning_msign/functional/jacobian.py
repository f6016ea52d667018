r"""Top singular triplet of a Jacobian by matrix-free Lanczos bidiagonalization, and the alignment of adjacent layers.

For a function :math:`f` (a transformer block with its weights fixed) applied to a hidden-state
tensor :math:`x` of shape ``(B, T, d)``, the Jacobian :math:`J = \partial f / \partial x` at
:math:`x` is an :math:`N \times N` matrix with :math:`N = B \cdot T \cdot d` (tensors flattened in
row-major order). It is never formed: :func:`jacobian_top_singular` runs Golub-Kahan-Lanczos
bidiagonalization with one Jacobian-vector product (``torch.func.jvp``, forward mode) and one
vector-Jacobian product (``torch.func.vjp``, reverse mode) per iteration, and returns
:math:`\sigma_1(J) = \|J\|_2` with the unit left and right singular vectors :math:`u_1, v_1 \in
\mathbb{R}^N`.

Adjacent blocks. Block :math:`l` maps the hidden state :math:`h_l` to :math:`h_{l+1} = f_l(h_l)`;
its Jacobian :math:`J_l = \partial h_{l+1} / \partial h_l` is taken at the :math:`h_l` of one forward
pass, and :math:`J_{l+1}` at the :math:`h_{l+1}` of the same pass. The left singular vector
:math:`u_1(J_l)` lives in the output space of block :math:`l`, which is the input space of block
:math:`l + 1`, where the right singular vector :math:`v_1(J_{l+1})` lives, so

.. math::

    a_l = \bigl|\langle u_1(J_l),\, v_1(J_{l+1}) \rangle\bigr| \in [0, 1]

(:func:`jacobian_alignment`) is well defined. Since :math:`J_{L-1} \cdots J_0` has norm at most
:math:`\prod_l \sigma_1(J_l)`, attained when every :math:`u_1(J_l)` is
:math:`v_1(J_{l+1})` (up to sign), :math:`a_l \to 1` together with :math:`\sigma_1(J_l) > 1` is the exponential
growth of gradients with depth that the MSign paper (arXiv 2602.01734) attributes to collapsed stable
ranks. Two independent random unit vectors in :math:`\mathbb{R}^N` have
:math:`\mathbb{E}\,|\langle a, b\rangle| \approx \sqrt{2 / (\pi N)}` (0.002 for
:math:`N = 4 \cdot 128 \cdot 256`): that is "not aligned".

The vectors span the whole sampled batch (all ``B * T * d`` coordinates), not one token: the Jacobian
of a causal transformer block couples the positions of a sequence (lower block-triangular in
:math:`T`) and is block-diagonal over the ``B`` sequences, so :math:`\sigma_1` is the largest of the
per-sequence norms and :math:`u_1, v_1` concentrate on that sequence once converged.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_msign._validation import check_positive_int

__all__ = ["jacobian_alignment", "jacobian_top_singular"]


def _unit(x: Tensor) -> Tensor:
    """``x / ||x||`` in float32 at least (float64 stays float64); a zero vector stays zero."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x / x.norm().clamp_min(torch.finfo(x.dtype).tiny)


def jacobian_top_singular(
    f: Callable[[Tensor], Tensor], x: Tensor, num_iters: int = 20, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Estimate :math:`\sigma_1` and the top singular vectors of the Jacobian of ``f`` at ``x``.

    Golub-Kahan-Lanczos bidiagonalization from a deterministic random start :math:`v_1` (a CPU
    generator seeded with ``seed``: the global RNG is not used). Step :math:`j` takes one JVP and one
    VJP,

    .. math::

        \alpha_j u_j = J v_j - \beta_{j-1} u_{j-1}, \qquad \beta_j v_{j+1} = J^\top u_j - \alpha_j v_j,

    with full reorthogonalisation of the :math:`u`'s and :math:`v`'s; after :math:`k` steps
    :math:`J V_k = U_k B_k` with :math:`B_k` upper bidiagonal (:math:`\alpha` on the diagonal,
    :math:`\beta` above it), and the top singular triplet of the small :math:`B_k` gives the Ritz
    estimates :math:`\sigma \le \sigma_1` (a lower bound), :math:`u = U_k p_1`, :math:`v = V_k q_1`.

    Convergence: Lanczos is a Krylov method; for the same number of products it resolves the top
    singular triplet far faster than power iteration when the top singular values are close, which is
    the usual case for a transformer block near initialisation (:math:`J = I + J_{\text{attn}} +
    \dots`, many singular values near one). Measurements (20 steps suffice on small LitGPTs):
    ``docs/diagnostics.md``.

    Cost: one forward pass of ``f`` that records the graph for the VJP (done once), then per
    iteration one JVP (a forward pass with dual numbers, about 2-3 forward passes' time) and one VJP
    (a backward pass, about 2); the reorthogonalisation adds ``O(k N)`` per step. Memory: the
    activations of one forward pass of ``f`` on ``x``, and ``2 k`` vectors of ``N`` entries. No
    gradient reaches ``.grad`` of any parameter ``f`` closes over: only ``x`` is differentiated.

    ``F.scaled_dot_product_attention`` has no forward-mode derivative in its fused kernels, so ``f``
    runs under ``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)`` here (the math kernel; the same
    function, other rounding).

    Args:
        f: a function of one tensor, e.g. ``lambda h: block(h, cos, sin)``; ``f(x)`` may have any
            shape. It must be deterministic (no dropout; call the block in eval mode).
        x: the point, any floating shape (``(B, T, d)`` for a block); it is detached.
        num_iters: Lanczos steps (JVP + VJP pairs), at least 1; at most ``N`` are useful.
        seed: seed of the random start vector.

    Returns:
        ``(sigma, u, v)``: :math:`\sigma` (0-dim), the unit left singular vector estimate ``u``
        (``f(x).numel()``, the output space) and the unit right one ``v`` (``x.numel()``, the input
        space), flattened in row-major order, float32 (float64 for float64 input), on ``x.device``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``num_iters < 1``.

    Example::

        >>> A = torch.diag(torch.tensor([3.0, 1.0, 0.5]))
        >>> sigma, u, v = jacobian_top_singular(lambda h: h @ A.T, torch.zeros(3), num_iters=20)
        >>> round(sigma.item(), 4), round(abs(u[0].item()), 4)
        (3.0, 1.0)
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"`x` must be a floating-point torch.Tensor, got {type(x).__name__}"
                        + (f" of dtype {x.dtype}" if isinstance(x, Tensor) else ""))
    check_positive_int(num_iters, "num_iters")
    x = x.detach()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    start = torch.randn(x.numel(), generator=gen, dtype=torch.float32)  # float32 for any x: one start per seed
    v = start.to(device=x.device, dtype=dtype)
    v = v / v.norm()
    U: list[Tensor] = []  # left Lanczos vectors (output space), flattened
    V: list[Tensor] = [v]  # right Lanczos vectors (input space), flattened
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    with sdpa_kernel(SDPBackend.MATH):
        y, vjp_fn = torch.func.vjp(f, x)
        for _ in range(num_iters):
            _, jv = torch.func.jvp(f, (x,), (V[-1].reshape(x.shape).to(x.dtype),))
            p = jv.reshape(-1).to(dtype)
            for w in U:  # full reorthogonalisation: the bases stay orthonormal in floating point
                p = p - (w @ p) * w
            alpha = p.norm()
            if alpha <= torch.finfo(dtype).tiny:
                break
            U.append(p / alpha)
            alphas.append(alpha)
            (jtu,) = vjp_fn(U[-1].reshape(y.shape).to(y.dtype))
            q = jtu.reshape(-1).to(dtype)
            for w in V:
                q = q - (w @ q) * w
            beta = q.norm()
            if beta <= torch.finfo(dtype).tiny:
                break
            betas.append(beta)
            V.append(q / beta)
    k = len(alphas)
    if k == 0:  # J v = 0 for the start vector: report a zero Jacobian
        return torch.zeros((), dtype=dtype, device=x.device), torch.zeros(y.numel(), dtype=dtype, device=x.device), v
    # J V_k = U_k B_k with the upper-bidiagonal B_k = diag(alpha) + superdiag(beta); the top singular
    # triplet of B_k gives the Ritz approximation of J's.
    B = torch.diag(torch.stack(alphas))
    if k > 1:
        B = B + torch.diag(torch.stack(betas[: k - 1]), 1)
    P, S, Qh = torch.linalg.svd(B)
    u = _unit(torch.stack(U, dim=1) @ P[:, 0])
    v = _unit(torch.stack(V[:k], dim=1) @ Qh[0])
    return S[0], u, v


def jacobian_alignment(u: Tensor, v: Tensor) -> Tensor:
    r"""Alignment :math:`|\langle u, v\rangle|` of two directions in the same space, in ``[0, 1]``.

    For adjacent blocks pass ``u = u_1(J_l)`` and ``v = v_1(J_{l+1})`` from
    :func:`jacobian_top_singular` (see the module docstring for why both live in the space of
    :math:`h_{l+1}`). Both are flattened and normalised here, so the result is the absolute cosine of
    the angle between them (0 when either is zero); singular vectors are defined up to sign, hence the
    absolute value.

    Args:
        u: a tensor, e.g. the left singular vector of block ``l``'s Jacobian.
        v: a tensor with as many elements, e.g. the right singular vector of block ``l + 1``'s.

    Returns:
        A 0-dim float32 (float64 for float64 input) tensor.

    Raises:
        ValueError: ``u`` and ``v`` have different numbers of elements.

    Example::

        >>> jacobian_alignment(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])).item()  # doctest: +ELLIPSIS
        0.7071...
    """
    if u.numel() != v.numel():
        raise ValueError(
            f"`u` and `v` must have as many elements (the same space), got {u.numel()} and {v.numel()}"
        )
    a, b = _unit(u.reshape(-1)), _unit(v.reshape(-1))
    dtype = torch.promote_types(a.dtype, b.dtype)
    return (a.to(dtype) @ b.to(device=a.device, dtype=dtype)).abs().clamp_max(1.0)
