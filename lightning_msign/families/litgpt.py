"""LitGPT (0.5.x): its attention's fused ``qkv`` rows, its MLPs and mixture of experts, the LM head, how its
attention forms queries and keys, and its blocks' output projections.

- ``CausalSelfAttention``: ``attn.qkv`` rows ``[q (n_head hs) | k (n_query_groups hs) | v (n_query_groups hs)]``
  from the config (grouped-query aware), ``attn.proj`` the output; queries and keys after the optional
  ``norm_q``/``norm_k`` and RoPE (:func:`litgpt_query_key`).
- ``GptNeoxMLP`` (``fc``, ``proj``), ``LLaMAMLP`` / ``GemmaMLP`` (``fc_1``, ``fc_2``, ``proj``): role ``"mlp"``;
  ``LLaMAMoE``: its ``gate`` is the router, each expert (and the shared experts) an MLP above.
- ``GPT``: ``lm_head`` the LM head (``transformer.wte`` is an embedding).
- ``Block``: output projections ``attn.proj`` and ``mlp.proj`` (every expert's ``proj`` under ``LLaMAMoE``).

- ``MultiheadLatentAttention`` (DeepSeek-style), as its forward splits: ``kv_a_proj_with_mqa`` rows
  ``[latent (kv_lora_rank) | k (qk_rope_head_dim)]``, ``kv_b_proj`` rows per key group ``[k (qk_nope_head_dim) | v
  (v_head_dim)]`` (``view(B, T, n_query_groups, -1)``, then split), ``q_a_proj`` / ``q_b_proj`` queries (``"qk"`` =
  those and the two ``k`` blocks), ``proj`` the output. Its attention logits are not read.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch
from litgpt.model import (
    GPT,
    Block,
    CausalSelfAttention,
    GemmaMLP,
    GptNeoxMLP,
    LLaMAMLP,
    LLaMAMoE,
    MultiheadLatentAttention,
    apply_rope,
    apply_rope_interleave,
)
from torch import Tensor, nn

from lightning_msign.families.base import BlockInfo, Family, Found, int_attr, linears, rows, weight_of
from lightning_msign.families.qk_norm import SwitchedNorm
from lightning_msign.layouts import Layout
from lightning_msign.models.base import AttentionProbe, argument, to_compute

__all__ = ["LitGPT", "LitGPTAttentionProbe", "is_litgpt_attention", "litgpt_attention_scale", "litgpt_query_key"]


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
        # Cut to the probe's sequences and tokens first: RoPE and the norms are then applied to those only.
        b, n = self.batch_size, self.seq_len
        q_normed, k_normed = seen.get("q"), seen.get("k")
        if q_normed is not None and self.attn.config.norm_qk_type != "olmo2":  # (B, heads, T, hs)
            q_normed, k_normed = q_normed[:b, :, :n], k_normed[:b, :, :n]
        elif q_normed is not None:  # (B, T, heads * hs)
            q_normed, k_normed = q_normed[:b, :n], k_normed[:b, :n]
        cos, sin = seen["cos"], seen["sin"]  # (1 or B, T, rope_n_elem)
        return litgpt_query_key(self.attn, seen["qkv"][:b, :n], cos[:b, :n], sin[:b, :n], q_normed, k_normed)


def _projections(block: Block) -> Optional[tuple[str, ...]]:
    names = ["attn.proj"]
    mlp = block.mlp
    if isinstance(mlp, LLaMAMoE):
        names += [f"mlp.experts.{i}.proj" for i in range(len(mlp.experts))]
        if getattr(mlp, "shared_experts", None) is not None:
            names.append("mlp.shared_experts.proj")
    elif hasattr(mlp, "proj"):
        names.append("mlp.proj")
    else:  # an MLP of unknown structure: the warm-up asks for `output_projections`
        return None
    config = block.config
    if getattr(config, "post_attention_norm", False) or getattr(config, "post_mlp_norm", False):
        raise ValueError(
            f"DepthWarmup cannot unlock {type(block).__name__} blocks with a norm after the output projections"
            " (`post_attention_norm` / `post_mlp_norm`): the residual branch norm(0) has a gradient of order"
            " 1/sqrt(eps) at a zeroed projection, so the unlock would not be function-preserving and stable"
        )
    return tuple(names)


class LitGPT(Family):
    name = "LitGPT"
    model = 'LitGPT `GPT` (any config)'
    splits = ('`attn.qkv`: rows `[Q \\| K \\| V]`, grouped-query sizes; latent attention `kv_a_proj_with_mqa` '
              '`[latent \\| k]`, `kv_b_proj` `[k v]` per group; MLPs, MoE router `gate`, `lm_head`')
    read_from = ('`config.n_head`, `n_query_groups`, `head_size` (latent attention: `kv_lora_rank`, '
                 '`qk_rope_head_dim`, `qk_nope_head_dim`, `v_head_dim`)')
    attention_classes = ("litgpt CausalSelfAttention",)
    qk_norm_classes = ("litgpt CausalSelfAttention",)

    def read(self, module: nn.Module) -> Optional[Found]:
        if isinstance(module, CausalSelfAttention):
            config, qkv = module.config, weight_of(module.qkv)
            hs, n_head, n_groups = (int_attr(config, a) for a in ("head_size", "n_head", "n_query_groups"))
            if None in (hs, n_head, n_groups) or qkv is None:
                return None
            found: Found = {id(qkv): ("qkv", rows("LitGPT config", q=n_head * hs, k=n_groups * hs,
                                                   v=n_groups * hs))}
            return {**found, **linears(module, "attn_out", "proj")}
        if isinstance(module, MultiheadLatentAttention):
            config = module.config
            lora, rope, nope, v, groups = (int_attr(config, a) for a in (
                "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_query_groups"))
            kv_a, kv_b = weight_of(module.kv_a_proj_with_mqa), weight_of(module.kv_b_proj)
            if None in (lora, rope, nope, v, groups) or kv_a is None or kv_b is None:
                return None
            source = "LitGPT MultiheadLatentAttention (kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim)"
            found = {id(kv_a): ("qkv", rows(source, latent=lora, k=rope)),
                     id(kv_b): ("qkv", Layout("heads", (("k", nope), ("v", v)), heads=groups, source=source))}
            return {**found, **linears(module, "q", "q_a_proj", "q_b_proj"), **linears(module, "attn_out", "proj")}
        if isinstance(module, (GptNeoxMLP, LLaMAMLP, GemmaMLP)):
            return linears(module, "mlp", "fc", "fc_1", "fc_2", "proj")
        if isinstance(module, LLaMAMoE):
            router = weight_of(module.gate)
            return {} if router is None else {id(router): ("router", None)}
        if isinstance(module, GPT):
            return linears(module, "lm_head", "lm_head")
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        return LitGPTAttentionProbe(attn, keep=keep) if is_litgpt_attention(attn) else None

    def install_qk_norm(self, attn: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
        # LitGPT's own qk-norm (`norm_qk=True`, type "default"): `config.norm_class(head_size)` on q and k of shape
        # (B, heads, T, head_size), after the split into heads and before RoPE, one gain shared by the heads. This
        # attention gets a config of its own with `norm_qk` set, so only it calls the two norms.
        if not is_litgpt_attention(attn):
            return None
        if isinstance(attn.norm_q, SwitchedNorm) and isinstance(attn.norm_k, SwitchedNorm):
            return attn.norm_q, attn.norm_k
        config = attn.config
        if config.norm_qk:
            raise ValueError(
                f"This LitGPT attention normalises q and k already (config.norm_qk=True, {config.norm_qk_type!r}):"
                " there is no qk-norm to retrofit"
            )
        weight = attn.qkv.weight
        norms = []
        for _ in range(2):
            norm = config.norm_class(config.head_size, eps=config.norm_eps)
            norms.append(SwitchedNorm(norm.to(device=weight.device, dtype=weight.dtype)))
        own = copy.copy(config)
        own.norm_qk, own.norm_qk_type = True, "default"
        attn.config = own
        attn.norm_q, attn.norm_k = norms
        return attn.norm_q, attn.norm_k

    def block(self, block: nn.Module) -> Optional[BlockInfo]:
        names = _projections(block) if type(block) is Block else None
        return None if names is None else BlockInfo(names)
