"""Hugging Face DBRX (transformers 4.57).

- ``DbrxAttention`` (and its flash / SDPA subclasses): ``Wqkv`` rows ``[q (n_heads head_dim) | k | v
  (kv_n_heads head_dim each)]``, as its forward splits them; ``out_proj`` the output.
- ``DbrxExpertGLU``: every expert's matrix stacked in a 2-D parameter, ``w1``, ``v1``, ``w2`` of shape
  ``(E * ffn_hidden_size, hidden_size)``; the forward takes expert ``e`` as ``w.view(E, ffn_hidden_size, hidden)[e]``,
  so each is cut into ``E`` row blocks ``e0``, ``e1``, ... (role ``"mlp"``): one matrix per expert.
- ``DbrxRouter``: its ``layer`` is the router (signing it would change the routing).
- ``lm_head`` of ``DbrxForCausalLM``.

Attention logits (``DbrxAttention``, ``DbrxSdpaAttention``: their own forward in transformers 4.57;
:class:`DbrxProbe`): the ``Wqkv`` output clamped to ``clip_qkv`` and split as the forward does, rotated by the
``(cos, sin)`` its ``rotary_emb`` returns with the model's ``apply_rotary_pos_emb``; scale ``1 / sqrt(head_dim)``;
the pairs of the 4-D mask the block passes, else causal. Blocks: ``DbrxModel.blocks``; a block's attention
``norm_attn_norm.attn``.

No import of ``transformers`` here: a model's own module is read from ``sys.modules``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

from torch import Tensor, nn

from lightning_msign.families.base import (
    Family,
    Found,
    int_attr,
    is_transformers,
    linears,
    qualified_name,
    rows,
    weight_of,
)
from lightning_msign.families.hf_attention import interface_probe, uses_attention_interface
from lightning_msign.models.base import AttentionProbe, MaskedAttentionProbe, argument, to_compute

_PROBED = tuple(f"transformers.models.dbrx.modeling_dbrx.{c}" for c in ("DbrxAttention", "DbrxSdpaAttention"))


class DbrxProbe(MaskedAttentionProbe):
    """Hooks on an HF ``DbrxAttention``: the fused projection's output, its rotary embedding's ``(cos, sin)``, the
    mask (see the module docstring)."""

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.attn.head_dim)

    def sources(self) -> dict[str, nn.Module]:
        return {"qkv": self.attn.Wqkv, "rotary": self.attn.rotary_emb}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"mask": argument(args, kwargs, 2, "attention_mask")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        attn = self.attn
        qkv = seen["qkv"]
        if attn.clip_qkv is not None:
            qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
        kv = attn.num_key_value_heads * attn.head_dim
        q, k, _ = qkv.split([attn.hidden_size, kv, kv], dim=2)
        B, T = q.shape[:2]
        q = q.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.view(B, T, attn.num_key_value_heads, attn.head_dim).transpose(1, 2)
        cos, sin = seen["rotary"]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        return to_compute(q), to_compute(k)


class DBRX(Family):
    name = "HF DBRX"
    model = 'HF DBRX'
    splits = (
        '`Wqkv` rows `[Q \\| K \\| V]` (GQA); experts stacked in 2-D `w1`, `v1`, `w2` `(E I, H)`: row blocks '
        "`e0`, `e1`, ... one per expert (the forward's `view(E, I, H)[e]`); router `layer` (not `mlp`)"
    )
    read_from = '`num_heads`, `num_key_value_heads`, `head_dim`; `moe_num_experts`, `ffn_hidden_size`'
    attention_classes = ("HF DbrxAttention (eager, SDPA)",)

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        if qualified_name(attn) not in _PROBED:
            return None
        if uses_attention_interface(attn):  # transformers 5
            return interface_probe(attn, _PROBED, keep=keep)
        return DbrxProbe(attn, keep=keep)

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, "DbrxModel") and isinstance(getattr(module, "blocks", None), nn.ModuleList):
            return module.blocks
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, "DbrxBlock"):
            return (block.norm_attn_norm.attn,)
        return None

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "DbrxAttention"):
            hd, n_head, n_kv = (int_attr(module, a) for a in ("head_dim", "num_heads", "num_key_value_heads"))
            qkv = weight_of(getattr(module, "Wqkv", None))
            if None in (hd, n_head, n_kv) or qkv is None:
                return None
            found: Found = {id(qkv): ("qkv", rows("transformers DbrxAttention", q=n_head * hd, k=n_kv * hd,
                                                   v=n_kv * hd))}
            return {**found, **linears(module, "attn_out", "out_proj")}
        if is_transformers(module, "DbrxExpertGLU"):
            n_exp, inter = int_attr(module, "moe_num_experts"), int_attr(module, "ffn_hidden_size")
            if n_exp is None or inter is None:
                return None
            source = "transformers DbrxExpertGLU (moe_num_experts, ffn_hidden_size)"
            experts = rows(source, **{f"e{e}": inter for e in range(n_exp)})
            return {id(p): ("mlp", experts) for p in (module.w1, module.v1, module.w2)}
        if is_transformers(module, "DbrxRouter"):
            return linears(module, "router", "layer")
        if is_transformers(module, "DbrxForCausalLM"):
            return linears(module, "lm_head", "lm_head")
        return None
