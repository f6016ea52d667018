r"""Logit magnitudes of a causal transformer: the largest attention logit, and output-logit statistics.

Attention logits. A causal self-attention layer with queries :math:`q_{b,h,t}` and keys :math:`k_{b,g,j}`
(head dimension :math:`d_h`; under grouped-query attention, query head :math:`h` reads key group
:math:`g(h) = \lfloor h / (n_\text{head} / n_\text{groups}) \rfloor`) forms the pre-softmax logits

.. math::

    s_{b,h,t,j} = c\,\langle q_{b,h,t},\, k_{b,g(h),j}\rangle, \qquad j \in A(t),

with the scale :math:`c` (usually :math:`1/\sqrt{d_h}`) and the allowed key positions
:math:`A(t) = \{j : j \le t\}`, or :math:`\{j : t - w < j \le t\}` with a sliding window of :math:`w`
tokens. Softmax saturates once these reach tens; a run failing by attention-logit growth shows thousands.

Output logits. The logits :math:`z` of the LM head (what enters the loss): their largest magnitude
:math:`\max |z|` and root mean square :math:`\sqrt{\overline{z^2}}`; growth of these alone is logit
divergence at the head (what a z-loss counters).

Nothing here imports Lightning or knows a model: :mod:`lightning_msign.models` rebuilds ``q`` and ``k``
from a model's modules, :class:`~lightning_msign.guards.diagnostics.Diagnostics` decides when.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lightning_msign._validation import check_optional_positive_int

__all__ = [
    "LogitScratch",
    "attention_logit_max",
    "attention_logit_max_per_head",
    "causal_allowed",
    "output_logit_stats",
]


class LogitScratch:
    """Memory the logits are formed in, kept from one call to the next.

    A probe reading every layer of a forward forms a ``(B, n_head, T, S)`` score tensor per layer; allocated afresh,
    each is new memory the allocator has to map (page faults on every call for a few MiB). One scratch shared by
    the layers holds the largest such tensor once and is overwritten by each call. Not thread-safe: one per reader.
    """

    def __init__(self) -> None:
        self._buffer: Optional[Tensor] = None

    def take(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        """An uninitialised tensor of ``shape`` with ``like``'s dtype and device, in the kept memory (grown when
        too small, replaced when the dtype or device differs)."""
        numel = 1
        for n in shape:
            numel *= n
        buffer = self._buffer
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype or buffer.device != like.device:
            buffer = self._buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buffer[:numel].view(shape)


def causal_allowed(T: int, window: Optional[int] = None, device: Optional[torch.device] = None) -> Tensor:
    """Boolean ``(T, T)`` mask of the (query ``t``, key ``j``) pairs a causal attention reads.

    ``j <= t``; with ``window``, also ``j > t - window`` (the query and the ``window - 1`` keys before it).
    """
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    if window is not None:
        allowed &= torch.ones_like(allowed).triu(diagonal=1 - window)
    return allowed


def attention_logit_max(
    q: Tensor,
    k: Tensor,
    scale: float,
    window: Optional[int] = None,
    allowed: Optional[Tensor] = None,
    scratch: Optional[LogitScratch] = None,
) -> Tensor:
    r"""Largest attention logit in absolute value, :math:`\max_{b,h,t,\,j \in A(t)} |s_{b,h,t,j}|`.

    Args:
        q: queries ``(B, n_head, T, hs)``.
        k: keys ``(B, n_groups, S, hs)``, one per key group (before any ``repeat_interleave``); query head
            ``h`` attends with key group ``h // (n_head // n_groups)``. ``S = T`` unless ``allowed`` is given (a
            cross-attention's ``S`` encoder positions).
        scale: the factor :math:`c` of the logits (``1 / sqrt(hs)`` for most models).
        window: with a sliding window of this many tokens, only keys ``t - window < j <= t`` count.
        allowed: the pairs that count, a boolean tensor broadcastable to ``(B, 1, T, S)`` (for instance the mask a
            model hands its attention kernel, padding included, or all pairs of a bidirectional or cross-attention),
            in place of the causal pairs and ``window``.
        scratch: memory to form the logits in (:class:`LogitScratch`), for callers that reduce many layers in a
            row; ``None``: new memory each call.

    Returns:
        A 0-dim tensor of ``q``'s dtype (compute in float32 by passing float32 ``q``, ``k``). All heads at once
        while ``B * n_head * T * S`` is at most ``2**24`` entries, else one key group at a time (memory
        ``B * (n_head / n_groups) * T * S`` entries).

    Raises:
        ValueError: ``q``/``k`` are not 4-dimensional, disagree in ``B``, ``T`` or ``hs``, ``n_head`` is not
            a multiple of ``n_groups``, ``window`` is not a positive int, or ``allowed`` is not a boolean tensor
            broadcastable to ``(B, 1, T, S)`` or comes with ``window``.

    Example::

        >>> q = torch.tensor([[[[1.0, 0.0], [0.0, 3.0]]]])  # (1, 1, 2, 2)
        >>> attention_logit_max(q, q, scale=0.5).item()  # pair (1, 1): 9 * 0.5; pair (0, 1) is not causal
        4.5
    """
    return attention_logit_max_per_head(q, k, scale, window, allowed, scratch).amax()


def attention_logit_max_per_head(
    q: Tensor,
    k: Tensor,
    scale: float,
    window: Optional[int] = None,
    allowed: Optional[Tensor] = None,
    scratch: Optional[LogitScratch] = None,
) -> Tensor:
    r"""Largest attention logit in absolute value of each query head, :math:`\max_{b,t,\,j \in A(t)} |s_{b,h,t,j}|`.

    The per-head maxima that QK-Clip (Kimi K2, arXiv 2507.20534) rescales by; arguments, checks and memory as
    :func:`attention_logit_max`, whose value is the maximum of this vector.

    Returns:
        A tensor ``(n_head,)`` of ``q``'s dtype.
    """
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"`q` and `k` must be 4-dimensional (B, heads, T, hs), got shapes {tuple(q.shape)} and {tuple(k.shape)}"
        )
    B, n_head, T, hs = q.shape
    n_groups, S = k.shape[1], k.shape[2]
    causal = allowed is None
    if (k.shape[0], k.shape[3]) != (B, hs) or (causal and S != T) or n_groups == 0 or n_head % n_groups != 0:
        raise ValueError(
            "`k` must be (B, n_groups, T, hs) with n_groups dividing n_head (S keys other than T only with `allowed`),"
            f" for `q` of shape {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    check_optional_positive_int(window, "window")
    if not causal:
        shape = tuple(allowed.shape) if isinstance(allowed, Tensor) else None
        fits = (
            shape is not None
            and len(shape) <= 4
            and all(a in (1, b) for a, b in zip(reversed(shape), reversed((B, 1, T, S))))
        )
        if not fits or allowed.dtype != torch.bool or window is not None:
            got = f"{allowed.dtype} of shape {shape}" if shape is not None else type(allowed).__name__
            raise ValueError(
                f"`allowed` must be a boolean tensor broadcastable to (B, 1, T, S) = {(B, 1, T, S)}, without `window`,"
                f" got {got} and window={window!r}"
            )
    per_group = n_head // n_groups
    q = q.reshape(B, n_groups, per_group, T, hs)
    if B * n_head * T * S <= _AT_ONCE:  # every head in one batched product
        scores = _scores(q, k.unsqueeze(2), scratch).reshape(B, n_head, T, S)
        return _largest(scores, allowed, causal, window) * scale
    out = [_largest(_scores(q[:, g], k[:, g, None], scratch), allowed, causal, window) for g in range(n_groups)]
    return torch.cat(out) * scale


def _scores(q: Tensor, k: Tensor, scratch: Optional[LogitScratch]) -> Tensor:
    """``q @ k.mT`` (``k`` broadcast over ``q``'s heads of a group), in ``scratch`` when given."""
    if scratch is None:
        return q @ k.mT
    out = scratch.take((*q.shape[:-1], k.shape[-2]), q)
    if q.shape[-3] == 1:  # one query head per key group: a plain batched product, no broadcast
        T, hs, S = q.shape[-2], q.shape[-1], k.shape[-2]
        torch.bmm(q.reshape(-1, T, hs), k.reshape(-1, S, hs).mT, out=out.view(-1, T, S))
        return out
    return torch.matmul(q, k.mT, out=out)


_AT_ONCE = 1 << 24
"""Logits computed at once (64 MiB in float32); above, one key group at a time."""


def _largest(scores: Tensor, allowed: Optional[Tensor], causal: bool, window: Optional[int]) -> Tensor:
    """Per head (dim 1), the largest ``|score|`` over the counted pairs; ``scores`` is overwritten."""
    if causal:  # in place: no mask is built
        scores.tril_()
        if window is not None:
            scores.triu_(1 - window)
    else:
        scores.masked_fill_(~allowed, 0)  # type: ignore[arg-type]
    dims = (0, 2, 3)
    return torch.maximum(scores.amax(dim=dims), scores.amin(dim=dims).neg())


def output_logit_stats(logits: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\max |z|` and :math:`\sqrt{\overline{z^2}}` over all entries of ``logits`` (any shape).

    Returns:
        Two 0-dim float32 tensors (float64 for float64 input).
    """
    z = logits.detach()
    z = z.double() if z.dtype == torch.float64 else z.float()
    return z.abs().max(), z.square().mean().sqrt()
