"""Hugging Face Falcon, BLOOM and MPT (transformers 4.57): one fused ``query_key_value`` / ``Wqkv`` each, cut as the
attention's own split does.

- Falcon ``query_key_value`` (``FalconAttention._split_heads``): with ``new_decoder_architecture``, rows grouped per key
  head, ``num_kv_heads`` times ``[q (num_heads / num_kv_heads heads) | k (1 head) | v (1 head)]``; with ``multi_query``,
  rows ``[q (num_heads heads) | k (1 head) | v (1 head)]``; else rows interleaved per head, ``[q | k | v]`` of
  ``head_dim`` each. ``dense`` the output; the MLP's ``dense_h_to_4h``, ``dense_4h_to_h``.
- BLOOM ``query_key_value`` (``BloomAttention._reshape``): rows interleaved per head, ``[q | k | v]`` of ``head_dim``
  each; ``dense`` the output; the MLP's ``dense_h_to_4h``, ``dense_4h_to_h``.
- MPT ``Wqkv`` (``chunk(3)`` in the forward): rows ``[q | k | v]`` of ``hidden_size`` each; ``out_proj`` the output;
  the MLP's ``up_proj``, ``down_proj``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, is_transformers, linears, rows, weight_of
from lightning_msign.layouts import Layout


def _heads(n: int, source: str, **sizes: int) -> Layout:
    return Layout("heads", tuple(sizes.items()), heads=n, source=source)


class FalconBloomMPT(Family):
    name = "HF Falcon, BLOOM, MPT"
    model = 'HF Falcon (3 layouts), BLOOM, MPT'
    splits = (
        'Falcon `query_key_value`: per key group `[q.. \\| k \\| v]` (`new_decoder_architecture`), `[Q \\| k \\| '
        'v]` (`multi_query`), or `[q k v]` per head; BLOOM `query_key_value` `[q k v]` per head; MPT `Wqkv` '
        'rows `[Q \\| K \\| V]`'
    )
    read_from = "`num_heads`, `num_kv_heads`, `head_dim`, Falcon's two flags; MPT `hidden_size`"

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "FalconAttention"):
            n_head, hd, n_kv = (int_attr(module, a) for a in ("num_heads", "head_dim", "num_kv_heads"))
            qkv = weight_of(getattr(module, "query_key_value", None))
            if None in (n_head, hd, n_kv) or qkv is None:
                return None
            if getattr(module, "new_decoder_architecture", False):
                layout = _heads(n_kv, "transformers FalconAttention (new_decoder_architecture: per key group)",
                                q=n_head // n_kv * hd, k=hd, v=hd)
            elif getattr(module, "multi_query", False):
                layout = rows("transformers FalconAttention (multi_query)", q=n_head * hd, k=hd, v=hd)
            else:
                layout = _heads(n_head, "transformers FalconAttention (per-head interleaving)", q=hd, k=hd, v=hd)
            return {id(qkv): ("qkv", layout), **linears(module, "attn_out", "dense")}
        if is_transformers(module, "BloomAttention"):
            n_head, hd = int_attr(module, "num_heads"), int_attr(module, "head_dim")
            qkv = weight_of(getattr(module, "query_key_value", None))
            if None in (n_head, hd) or qkv is None:
                return None
            layout = _heads(n_head, "transformers BloomAttention (per-head interleaving)", q=hd, k=hd, v=hd)
            return {id(qkv): ("qkv", layout), **linears(module, "attn_out", "dense")}
        if is_transformers(module, "MptAttention"):
            hidden, qkv = int_attr(module, "hidden_size"), weight_of(getattr(module, "Wqkv", None))
            if hidden is None or qkv is None:
                return None
            return {id(qkv): ("qkv", rows("transformers MptAttention (chunk(3))", q=hidden, k=hidden, v=hidden)),
                    **linears(module, "attn_out", "out_proj")}
        if is_transformers(module, "FalconMLP", "BloomMLP"):
            return linears(module, "mlp", "dense_h_to_4h", "dense_4h_to_h")
        if is_transformers(module, "MptMLP"):
            return linears(module, "mlp", "up_proj", "down_proj")
        if is_transformers(module, "FalconForCausalLM", "BloomForCausalLM", "MptForCausalLM"):
            return linears(module, "lm_head", "lm_head")
        return None
