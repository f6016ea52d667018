"""Hugging Face Phi-3 (transformers 4.57): ``qkv_proj`` rows ``[q | k | v]`` with grouped-query sizes, ``o_proj``;
``Phi3MLP``'s ``gate_up_proj`` rows ``[gate | up]`` of ``intermediate_size`` each, ``down_proj``."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, is_transformers, linears, rows, weight_of


class Phi3(Family):
    name = "HF Phi-3"
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
