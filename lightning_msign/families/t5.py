"""Hugging Face T5 and mT5 (transformers 4.57): ``T5Attention``'s ``q``, ``k``, ``v``, ``o`` (self-attention of encoder
and decoder, and the decoder's cross-attention, ``EncDecAttention``: the same class); the feed-forward
``DenseReluDense`` (``T5DenseActDense``: ``wi``, ``wo``; ``T5DenseGatedActDense``: ``wi_0``, ``wi_1``, ``wo``) is
``"mlp"`` -- its ``wo`` is not an attention output. ``lm_head`` of ``T5ForConditionalGeneration``.

Attention logits (:class:`T5Probe`): the ``q`` and ``k`` outputs split into heads of ``d_kv`` as the forward does (a
cross-attention's keys from the encoder states), unscaled (T5 folds the scale into its initialisation); the pairs are
those the ``position_bias`` the attention returns lets through (it holds the mask: padding, and causality in the
decoder). The logits are ``q k^T`` without that relative position bias, which is a learned per-head offset (as
ALiBi's). Blocks: the encoder's and the decoder's ``T5Stack.block``; a decoder block's cross-attention counts with
its self-attention. transformers 5's T5 calls the attention function with the mask inside its bias argument: not read
there (refused).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_msign.families.base import Family, Found, is_transformers, linears
from lightning_msign.families.gpt2 import heads
from lightning_msign.families.hf_attention import uses_attention_interface
from lightning_msign.models.base import AttentionProbe, allowed_from_mask, to_compute

_PREFIXES = ("T5", "MT5")


def _names(suffix: str) -> tuple[str, ...]:
    return tuple(p + suffix for p in _PREFIXES)


class T5Probe(AttentionProbe):
    """Hooks on an HF ``T5Attention``: its ``q`` and ``k`` outputs and the position bias it returns (see the module
    docstring). With ``keep``, :attr:`bias` is that bias (mask included), for comparing with the model."""

    bias: Optional[Tensor] = None

    @property
    def scale(self) -> float:
        return 1.0

    def sources(self) -> dict[str, nn.Module]:
        return {"q": self.attn.q, "k": self.attn.k}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        size = self.attn.key_value_proj_dim
        return to_compute(heads(seen["q"], size)), to_compute(heads(seen["k"], size))

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        seen, self._seen = self._seen, {}
        with torch.no_grad(), torch.autocast(self._device_type(), enabled=False):
            q, k = self.query_key(seen)
            bias = output[1].detach() if isinstance(output, tuple) and len(output) > 1 else None
            allowed = allowed_from_mask(bias, k.shape[2])  # (B, heads, T, S): the mask is the same for every head
            allowed = None if allowed is None else allowed[:, :1]
            if allowed is None:
                raise RuntimeError("T5Attention returned no position bias: its pairs cannot be read")
            self.record(q, k, self.scale, allowed=allowed)
            if self.keep:
                b, n = self.batch_size, self.seq_len
                self.bias = bias[:b, :, :n, :n] if bias.shape[0] > 1 else bias[:, :, :n, :n]


class T5(Family):
    name = "HF T5, mT5"
    model = 'HF T5, mT5'
    splits = (
        "separate `q`/`k`/`v`/`o` of every `T5Attention` (self and cross); the feed-forward's `wi`(`_0`/`_1`)"
        ' and `wo` are `mlp`'
    )
    read_from = 'the attention and feed-forward classes'
    attention_classes = ("HF T5Attention",)

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        if not is_transformers(attn, *_names("Attention")) or getattr(attn, "pruned_heads", None):
            return None
        if uses_attention_interface(attn):  # transformers 5: the mask travels in the bias argument (not read yet)
            return None
        return T5Probe(attn, keep=keep)

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, *_names("Stack")) and isinstance(getattr(module, "block", None), nn.ModuleList):
            return module.block
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, *_names("Block")):
            attns = (block.layer[0].SelfAttention,)
            return attns + ((block.layer[1].EncDecAttention,) if getattr(block, "is_decoder", False) else ())
        return None

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_names("Attention")):
            return {**linears(module, "q", "q"), **linears(module, "k", "k"), **linears(module, "v", "v"),
                    **linears(module, "attn_out", "o")}
        if is_transformers(module, *_names("DenseActDense"), *_names("DenseGatedActDense")):
            return linears(module, "mlp", "wi", "wi_0", "wi_1", "wo")
        if is_transformers(module, *_names("ForConditionalGeneration")):
            return linears(module, "lm_head", "lm_head")
        return None
