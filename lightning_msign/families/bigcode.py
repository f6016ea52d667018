"""Hugging Face GPTBigCode (StarCoder; transformers 4.57): ``c_attn`` rows ``[q | k | v]`` with a key and value of one
head's width under multi-query attention, rows interleaved per head otherwise, ``[k | v]`` under cross-attention (with
``q_attn`` the query); ``c_proj`` the output; ``GPTBigCodeMLP`` ``c_fc``, ``c_proj``. Attention logits: the queries and
keys its attention hands to the attention function (:mod:`lightning_msign.families.hf_attention`)."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, is_transformers, linears, rows, weight_of
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe
from lightning_msign.layouts import Layout


class GPTBigCode(Family):
    name = "HF GPTBigCode"
    model = 'HF GPTBigCode (StarCoder)'
    splits = '`c_attn` rows `[Q (C) \\| K (hd) \\| V (hd)]` (multi-query) or `[q_h k_h v_h]` per head (multi-head)'
    read_from = '`multi_query`, `kv_dim`, `head_dim`'
    attention_classes = ("HF GPTBigCodeAttention",)
    _probed = hf_classes(("gpt_bigcode", "GPTBigCodeAttention"))

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, self._probed, keep=keep)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "GPTBigCodeMLP"):
            return linears(module, "mlp", "c_fc", "c_proj")
        if is_transformers(module, "GPTBigCodeForCausalLM"):
            return linears(module, "lm_head", "lm_head")
        if not is_transformers(module, "GPTBigCodeAttention"):
            return None
        e, hd, kv, n_head = (int_attr(module, a) for a in ("embed_dim", "head_dim", "kv_dim", "num_heads"))
        c_attn = weight_of(getattr(module, "c_attn", None))
        if None in (e, hd, kv, n_head) or c_attn is None:
            return None
        found: Found = {}
        if getattr(module, "is_cross_attention", False):
            # key, value = c_attn(encoder_states).split((head_dim, head_dim)) in transformers 4.57
            found[id(c_attn)] = ("qkv", rows("transformers GPTBigCodeAttention (cross)", k=hd, v=hd)
                                 if c_attn.shape[0] == 2 * hd else None)
            found.update(linears(module, "q", "q_attn"))
        elif getattr(module, "multi_query", False):
            found[id(c_attn)] = ("qkv", rows("transformers GPTBigCodeAttention (multi-query)", q=e, k=kv, v=kv))
        else:  # view(B, T, n_head, 3 * head_dim).split(head_dim): rows interleaved per head
            found[id(c_attn)] = ("qkv", Layout("heads", (("q", hd), ("k", hd), ("v", hd)), heads=n_head,
                                               source="transformers GPTBigCodeAttention (multi-head)"))
        return {**found, **linears(module, "attn_out", "c_proj")}
