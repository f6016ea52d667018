"""LitGPT's attention: queries and keys rebuilt from the modules of a ``CausalSelfAttention`` (LitGPT 0.5.x)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from litgpt.model import CausalSelfAttention, apply_rope, apply_rope_interleave
from torch import Tensor, nn

from lightning_msign.models.base import AttentionProbe, argument, to_compute

__all__ = ["LitGPTAttentionProbe", "is_litgpt_attention", "litgpt_attention_scale", "litgpt_query_key"]


def is_litgpt_attention(attn: nn.Module) -> bool:
    """Whether ``attn`` is a LitGPT ``CausalSelfAttention`` (not multi-head latent attention)."""
    return isinstance(attn, CausalSelfAttention)


def litgpt_query_key(
    attn: CausalSelfAttention,
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_normed: Optional[Tensor] = None,
    k_normed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Queries ``(B, n_head, T, hs)`` and keys ``(B, n_query_groups, T, hs)`` as LitGPT's attention forms them.

    Follows ``CausalSelfAttention.forward`` (no KV cache): split of the fused ``qkv`` output
    ``(B, T, (n_head + 2 n_query_groups) hs)``, then the query/key norm outputs in place of ``q``/``k``
    when the attention has ``norm_qk`` (``q_normed``/``k_normed``, the outputs of ``attn.norm_q`` /
    ``attn.norm_k``: ``(B, T, n hs)`` for ``"olmo2"``, ``(B, n, T, hs)`` for ``"default"``), then RoPE
    (LitGPT's own ``apply_rope`` / ``apply_rope_interleave``) on the first ``rope_n_elem`` dimensions of
    each head. Keys are returned per group, before LitGPT's ``repeat_interleave`` over the heads of a
    group. Float32 (float64 stays float64).

    Raises:
        ValueError: the attention has ``norm_qk`` and ``q_normed`` or ``k_normed`` is missing.
    """
    config = attn.config
    B, T, _ = qkv.shape
    hs, n_head, n_groups = config.head_size, config.n_head, config.n_query_groups
    q, k, _ = qkv.split((n_head * hs, n_groups * hs, n_groups * hs), dim=-1)
    if config.norm_qk:
        if q_normed is None or k_normed is None:
            raise ValueError("`q_normed` and `k_normed` are needed for an attention with `norm_qk`")
        if config.norm_qk_type == "olmo2":
            q, k = q_normed, k_normed
    q = q.reshape(B, T, n_head, hs).transpose(1, 2)
    k = k.reshape(B, T, n_groups, hs).transpose(1, 2)
    if config.norm_qk and config.norm_qk_type == "default":
        q, k = q_normed, k_normed
    n = config.rope_n_elem
    if n > 0:
        rope = apply_rope_interleave if config.rope_interleave else apply_rope
        q = torch.cat((rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
    return to_compute(q), to_compute(k)


def litgpt_attention_scale(attn: CausalSelfAttention) -> float:
    """The factor LitGPT multiplies ``q @ k.mT`` by: ``mscale**2 / sqrt(attention_scores_scalar or head_size)``.

    ``1 / sqrt(head_size)`` without YaRN and ``attention_scores_scalar``. With
    ``attention_logit_softcapping`` the logits are taken before the cap.
    """
    config = attn.config
    return attn.mscale * attn.mscale / math.sqrt(config.attention_scores_scalar or config.head_size)


class LitGPTAttentionProbe(AttentionProbe):
    """Hooks on a LitGPT ``CausalSelfAttention``: the ``attn.qkv`` output, the ``norm_q``/``norm_k`` outputs
    (with ``norm_qk``) and the RoPE ``cos``/``sin`` passed to the attention give :func:`litgpt_query_key`.

    The window is ``config.sliding_window_size`` on the layers that apply sliding-window attention.
    """

    attn: CausalSelfAttention

    @property
    def scale(self) -> float:
        return litgpt_attention_scale(self.attn)

    @property
    def window(self) -> Optional[int]:
        return self.attn.config.sliding_window_size if self.attn.apply_sliding_window_attention else None

    def sources(self) -> dict[str, nn.Module]:
        out = {"qkv": self.attn.qkv}
        if self.attn.norm_q is not None:
            out.update(q=self.attn.norm_q, k=self.attn.norm_k)
        return out

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"cos": argument(args, kwargs, 1, "cos"), "sin": argument(args, kwargs, 2, "sin")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        return litgpt_query_key(self.attn, seen["qkv"], seen["cos"], seen["sin"], seen.get("q"), seen.get("k"))
