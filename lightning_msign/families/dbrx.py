"""Hugging Face DBRX (transformers 4.57).

- ``DbrxAttention`` (and its flash / SDPA subclasses): ``Wqkv`` rows ``[q (n_heads head_dim) | k | v
  (kv_n_heads head_dim each)]``, as its forward splits them; ``out_proj`` the output.
- ``DbrxExpertGLU``: every expert's matrix stacked in a 2-D parameter, ``w1``, ``v1``, ``w2`` of shape
  ``(E * ffn_hidden_size, hidden_size)``; the forward takes expert ``e`` as ``w.view(E, ffn_hidden_size, hidden)[e]``,
  so each is cut into ``E`` row blocks ``e0``, ``e1``, ... (role ``"mlp"``): one matrix per expert.
- ``DbrxRouter``: its ``layer`` is the router (signing it would change the routing).
- ``lm_head`` of ``DbrxForCausalLM``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, is_transformers, linears, rows, weight_of


class DBRX(Family):
    name = "HF DBRX"
    model = 'HF DBRX'
    splits = (
        '`Wqkv` rows `[Q \\| K \\| V]` (GQA); experts stacked in 2-D `w1`, `v1`, `w2` `(E I, H)`: row blocks '
        "`e0`, `e1`, ... one per expert (the forward's `view(E, I, H)[e]`); router `layer` (not `mlp`)"
    )
    read_from = '`num_heads`, `num_key_value_heads`, `head_dim`; `moe_num_experts`, `ffn_hidden_size`'

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
