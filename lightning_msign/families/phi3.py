"""Hugging Face Phi-3 (transformers 4.57): ``qkv_proj`` rows ``[q | k | v]`` with grouped-query sizes, ``o_proj``;
``Phi3MLP``'s ``gate_up_proj`` rows ``[gate | up]`` of ``intermediate_size`` each, ``down_proj``. Queries and keys: the
``qkv_proj`` output cut at ``num_attention_heads * head_dim`` and ``num_key_value_heads * head_dim`` as the forward
cuts it, then the rotary queries and keys of :class:`~lightning_msign.families.llama.RotaryAttentionProbe` (the
model's own ``apply_rotary_pos_emb``, partial rotary included), sliding window ``config.sliding_window``."""

from __future__ import annotations

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
from lightning_msign.families.llama import RotaryAttentionProbe
from lightning_msign.models.base import AttentionProbe

_ATTENTION = "transformers.models.phi3.modeling_phi3.Phi3Attention"


class Phi3AttentionProbe(RotaryAttentionProbe):
    """Hooks on an HF ``Phi3Attention``: the fused ``qkv_proj`` output, cut into ``q`` and ``k`` as the forward does."""

    window_from_config = True

    def sources(self) -> dict[str, nn.Module]:
        return {"qkv": self.attn.qkv_proj}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        q_size = self.attn.config.num_attention_heads * self.attn.head_dim
        k_size = self.attn.num_key_value_heads * self.attn.head_dim
        qkv = seen["qkv"]
        return super().query_key({**seen, "q": qkv[..., :q_size], "k": qkv[..., q_size:q_size + k_size]})


class Phi3(Family):
    name = "HF Phi-3"
    attention_classes = ("HF Phi3Attention",)
    model = 'HF Phi-3'
    splits = '`qkv_proj` rows `[Q \\| K \\| V]` (GQA); `mlp.gate_up_proj` rows `[gate \\| up]`'
    read_from = 'config'

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "Phi3Attention"):
            hd, n_kv = int_attr(module, "head_dim"), int_attr(module, "num_key_value_heads")
            n_head = int_attr(module, "config", "num_attention_heads")
            qkv = weight_of(getattr(module, "qkv_proj", None))
            if None in (hd, n_kv, n_head) or qkv is None:
                return None
            found: Found = {id(qkv): ("qkv", rows("transformers Phi3Attention", q=n_head * hd, k=n_kv * hd,
                                                   v=n_kv * hd))}
            return {**found, **linears(module, "attn_out", "o_proj")}
        if is_transformers(module, "Phi3MLP"):
            inter = int_attr(module, "config", "intermediate_size")
            gate_up = weight_of(getattr(module, "gate_up_proj", None))
            if inter is None or gate_up is None:
                return None
            return {id(gate_up): ("mlp", rows("transformers Phi3MLP", gate=inter, up=inter)),
                    **linears(module, "mlp", "down_proj")}
        if is_transformers(module, "Phi3ForCausalLM"):
            return linears(module, "lm_head", "lm_head")
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        return Phi3AttentionProbe(attn, keep=keep) if qualified_name(attn) == _ATTENTION else None
