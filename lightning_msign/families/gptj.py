"""Hugging Face GPT-J (transformers 4.57): ``GPTJAttention``'s ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``; the
MLP's ``fc_in``, ``fc_out`` (role ``"mlp"``); ``lm_head`` found by ``get_output_embeddings``.

Attention logits (:class:`GPTJProbe`): the ``q_proj`` / ``k_proj`` outputs cut by the attention's own ``_split_heads``,
rotated as its forward does (the sinusoids of ``embed_positions`` gathered at the ``position_ids`` passed, the model's
``apply_rotary_pos_emb`` -- every-two interleaving -- on the first ``rotary_dim`` dimensions of each head), scale
``1 / scale_attn`` (``1 / sqrt(head_dim)``), the pairs of the 4-D mask the block passes, else causal.

No import of ``transformers`` here: a model's own module is read from ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_msign.families.base import Family, Found, is_transformers, linears, qualified_name
from lightning_msign.families.hf_attention import interface_probe, uses_attention_interface
from lightning_msign.models.base import AttentionProbe, MaskedAttentionProbe, argument, to_compute

_ATTENTION = "transformers.models.gptj.modeling_gptj.GPTJAttention"  # not the FlashAttention2 subclass


class GPTJProbe(MaskedAttentionProbe):
    """Hooks on an HF ``GPTJAttention`` (see the module docstring)."""

    @property
    def scale(self) -> float:
        return 1.0 / float(self.attn.scale_attn)

    def sources(self) -> dict[str, nn.Module]:
        return {"q": self.attn.q_proj, "k": self.attn.k_proj}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"mask": argument(args, kwargs, 2, "attention_mask"), "position_ids": argument(args, kwargs, 3,
                                                                                            "position_ids")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        attn, positions = self.attn, seen["position_ids"]
        q = attn._split_heads(seen["q"], attn.num_attention_heads, attn.head_dim, True)  # (B, T, heads, head_dim)
        k = attn._split_heads(seen["k"], attn.num_attention_heads, attn.head_dim, True)
        table = attn._get_embed_positions(positions)
        sincos = torch.gather(table, 1, positions.unsqueeze(-1).repeat(1, 1, table.shape[-1])).to(k.dtype)
        sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        n = attn.rotary_dim
        if n is not None:
            q = torch.cat([rotate(q[..., :n], sin, cos), q[..., n:]], dim=-1)
            k = torch.cat([rotate(k[..., :n], sin, cos), k[..., n:]], dim=-1)
        else:
            q, k = rotate(q, sin, cos), rotate(k, sin, cos)
        return to_compute(q.permute(0, 2, 1, 3)), to_compute(k.permute(0, 2, 1, 3))


class GPTJ(Family):
    name = "HF GPT-J"
    model = "HF GPT-J"
    splits = "separate `q_proj`/`k_proj`/`v_proj`/`out_proj`; the MLP's `fc_in`, `fc_out` are `mlp`"
    read_from = "the attention and MLP classes"
    attention_classes = ("HF GPTJAttention",)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "GPTJAttention"):
            return {**linears(module, "q", "q_proj"), **linears(module, "k", "k_proj"),
                    **linears(module, "v", "v_proj"), **linears(module, "attn_out", "out_proj")}
        if is_transformers(module, "GPTJMLP"):
            return linears(module, "mlp", "fc_in", "fc_out")
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        if qualified_name(attn) != _ATTENTION:
            return None
        if uses_attention_interface(attn):  # a later transformers
            return interface_probe(attn, (_ATTENTION,), keep=keep)
        return GPTJProbe(attn, keep=keep)
