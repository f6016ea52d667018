"""Hugging Face T5 and mT5 (transformers 4.57): ``T5Attention``'s ``q``, ``k``, ``v``, ``o`` (self-attention of encoder
and decoder, and the decoder's cross-attention, ``EncDecAttention``: the same class); the feed-forward
``DenseReluDense`` (``T5DenseActDense``: ``wi``, ``wo``; ``T5DenseGatedActDense``: ``wi_0``, ``wi_1``, ``wo``) is
``"mlp"`` -- its ``wo`` is not an attention output. ``lm_head`` of ``T5ForConditionalGeneration``."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, is_transformers, linears

_PREFIXES = ("T5", "MT5")


def _names(suffix: str) -> tuple[str, ...]:
    return tuple(p + suffix for p in _PREFIXES)


class T5(Family):
    name = "HF T5, mT5"
    model = 'HF T5, mT5'
    splits = (
        "separate `q`/`k`/`v`/`o` of every `T5Attention` (self and cross); the feed-forward's `wi`(`_0`/`_1`)"
        ' and `wo` are `mlp`'
    )
    read_from = 'the attention and feed-forward classes'

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_names("Attention")):
            return {**linears(module, "q", "q"), **linears(module, "k", "k"), **linears(module, "v", "v"),
                    **linears(module, "attn_out", "o")}
        if is_transformers(module, *_names("DenseActDense"), *_names("DenseGatedActDense")):
            return linears(module, "mlp", "wi", "wi_0", "wi_1", "wo")
        if is_transformers(module, *_names("ForConditionalGeneration")):
            return linears(module, "lm_head", "lm_head")
        return None
