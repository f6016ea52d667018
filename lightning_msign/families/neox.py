"""Hugging Face GPT-NeoX / Pythia (transformers 4.57): ``query_key_value`` rows interleaved per head
(``[q | k | v]`` of ``head_size`` each, ``num_attention_heads`` times), ``dense`` the output; ``GPTNeoXMLP``
``dense_h_to_4h``, ``dense_4h_to_h``; ``embed_out`` the LM head. Attention logits: the queries and keys its attention
hands to the attention function (:mod:`lightning_msign.families.hf_attention`)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, is_transformers, linears, weight_of
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe
from lightning_msign.layouts import Layout


class GPTNeoX(Family):
    name = "HF GPT-NeoX"
    model = 'HF GPT-NeoX / Pythia'
    splits = '`query_key_value` rows `[q_h k_h v_h]` per head'
    read_from = '`head_size`, `num_attention_heads`'
    attention_classes = ("HF GPTNeoXAttention",)
    _probed = hf_classes(("gpt_neox", "GPTNeoXAttention"))

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, self._probed, keep=keep)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "GPTNeoXMLP"):
            return linears(module, "mlp", "dense_h_to_4h", "dense_4h_to_h")
        if is_transformers(module, "GPTNeoXForCausalLM"):
            return linears(module, "lm_head", "embed_out")
        if not is_transformers(module, "GPTNeoXAttention"):
            return None
        hs, n_head = int_attr(module, "head_size"), int_attr(module, "config", "num_attention_heads")
        qkv = weight_of(getattr(module, "query_key_value", None))
        if hs is None or n_head is None or qkv is None:
            return None
        found: Found = {id(qkv): ("qkv", Layout("heads", (("q", hs), ("k", hs), ("v", hs)), heads=n_head,
                                                source="transformers GPTNeoXAttention (per-head interleaving)"))}
        return {**found, **linears(module, "attn_out", "dense")}
