"""Hugging Face DeepSeek-V2 / V3 (multi-head latent attention; transformers 4.57).

As the attention's forward splits them:

- queries: ``q_proj`` (no ``q_lora_rank``) or ``q_a_proj`` then ``q_b_proj`` (both role ``"q"``);
- ``kv_a_proj_with_mqa`` rows ``[latent (kv_lora_rank) | k (qk_rope_head_dim)]``: the compressed key-value latent, and
  the rotary key shared by all heads;
- ``kv_b_proj`` rows interleaved per head, ``[k (qk_nope_head_dim) | v (v_head_dim)]`` for each of
  ``num_attention_heads``;
- ``o_proj`` the output. ``"qk"`` therefore selects the query projections and the ``k`` blocks of both fused weights.

MLPs (``gate_proj``, ``up_proj``, ``down_proj``: the dense layers, every expert, the shared experts) are ``"mlp"``; the
MoE gate's ``weight`` is the router. Attention logits: the queries and keys (``[q_nope | q_rope]`` against
``[k_nope | k_rope]`` per head) the attention hands to the attention function
(:mod:`lightning_msign.families.hf_attention`).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, is_transformers, linears, rows, weight_of
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe
from lightning_msign.layouts import Layout

_VERSIONS = ("DeepseekV2", "DeepseekV3")


class DeepSeekMLA(Family):
    name = "HF DeepSeek-V2, V3 (MLA)"
    model = 'HF DeepSeek-V2 / V3 (MLA)'
    splits = (
        '`kv_a_proj_with_mqa` rows `[latent \\| k_rope]`; `kv_b_proj` rows `[k_nope \\| v]` per head; `q_proj` '
        'or `q_a_proj` + `q_b_proj` are queries (`"qk"` = those and the two `k` blocks); MoE gate the router'
    )
    read_from = '`kv_lora_rank`, `qk_rope_head_dim`, `qk_nope_head_dim`, `v_head_dim`, `num_attention_heads`'
    attention_classes = ("HF DeepseekV2Attention", "HF DeepseekV3Attention")
    _probed = hf_classes(("deepseek_v2", "DeepseekV2Attention"), ("deepseek_v3", "DeepseekV3Attention"))

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, self._probed, keep=keep)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *(v + "Attention" for v in _VERSIONS)):
            config = getattr(module, "config", None)
            n_head, lora, rope, nope, v = (int_attr(config, a) for a in (
                "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim"))
            kv_a = weight_of(getattr(module, "kv_a_proj_with_mqa", None))
            kv_b = weight_of(getattr(module, "kv_b_proj", None))
            if None in (n_head, lora, rope, nope, v) or kv_a is None or kv_b is None:
                return None
            source = "transformers DeepSeek attention (kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim)"
            found: Found = {
                id(kv_a): ("qkv", rows(source, latent=lora, k=rope)),
                id(kv_b): ("qkv", Layout("heads", (("k", nope), ("v", v)), heads=n_head, source=source)),
            }
            return {**found, **linears(module, "q", "q_proj", "q_a_proj", "q_b_proj"),
                    **linears(module, "attn_out", "o_proj")}
        if is_transformers(module, *(v + "MLP" for v in _VERSIONS)):
            return linears(module, "mlp", "gate_proj", "up_proj", "down_proj")
        if is_transformers(module, "DeepseekV2MoEGate", "DeepseekV3TopkRouter"):
            weight = getattr(module, "weight", None)
            return {} if not isinstance(weight, nn.Parameter) else {id(weight): ("router", None)}
        if is_transformers(module, *(v + "ForCausalLM" for v in _VERSIONS)):
            return linears(module, "lm_head", "lm_head")
        return None
