"""``torch.nn.MultiheadAttention``: the fused ``in_proj_weight`` (rows ``[q | k | v]`` of ``embed_dim`` each) or the
separate ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` (``kdim``/``vdim`` differ), and ``out_proj``."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, rows


class TorchMultiheadAttention(Family):
    name = "torch.nn.MultiheadAttention"
    model = '`torch.nn.MultiheadAttention`'
    splits = '`in_proj_weight` rows `[Q \\| K \\| V]`'
    read_from = '`embed_dim`'

    def read(self, module: nn.Module) -> Optional[Found]:
        if not isinstance(module, nn.MultiheadAttention):
            return None
        found: Found = {}
        if module.in_proj_weight is not None:
            e = module.embed_dim
            found[id(module.in_proj_weight)] = ("qkv", rows("nn.MultiheadAttention", q=e, k=e, v=e))
        for role, p in (("q", module.q_proj_weight), ("k", module.k_proj_weight), ("v", module.v_proj_weight)):
            if p is not None:
                found[id(p)] = (role, None)
        found[id(module.out_proj.weight)] = ("attn_out", None)
        return found
