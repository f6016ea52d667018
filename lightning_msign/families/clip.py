"""Hugging Face CLIP and SigLIP (text and vision towers, transformers 4.57), and Phi: ``*Attention``'s ``q_proj``,
``k_proj``, ``v_proj`` and output projection (``out_proj``; Phi's ``dense``); the feed-forward ``*MLP``'s ``fc1`` and
``fc2`` (role ``"mlp"``). SigLIP's pooling head is a ``torch.nn.MultiheadAttention`` (its own family) and its
learned query ``probe`` an embedding."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lightning_msign.families.base import Family, Found, is_transformers, linears
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe

_PREFIXES = ("CLIP", "Siglip", "Phi")


def _names(suffix: str) -> tuple[str, ...]:
    return tuple(p + suffix for p in _PREFIXES)


_LOGITS = hf_classes(("clip", "CLIPAttention"), ("siglip", "SiglipAttention"), ("phi", "PhiAttention"))
"""The attention classes whose logits are read where they call the attention function."""


class CLIP(Family):
    name = "HF CLIP, SigLIP, Phi"
    model = "HF CLIP, SigLIP (text and vision), Phi"
    splits = (
        "separate `q_proj`/`k_proj`/`v_proj` and `out_proj` (Phi: `dense`) of `*Attention`; `*MLP`'s `fc1`, `fc2`"
        " are `mlp`"
    )
    read_from = "the attention and MLP classes"
    attention_classes = ("HF CLIPAttention", "HF SiglipAttention", "HF PhiAttention")

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, _LOGITS, keep=keep)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_names("Attention")):
            out = "dense" if is_transformers(module, "PhiAttention") else "out_proj"
            return {**linears(module, "q", "q_proj"), **linears(module, "k", "k_proj"),
                    **linears(module, "v", "v_proj"), **linears(module, "attn_out", out)}
        if is_transformers(module, *_names("MLP")):
            return linears(module, "mlp", "fc1", "fc2")
        if is_transformers(module, "SiglipMultiheadAttentionPoolingHead") and isinstance(module.probe, Tensor):
            return {id(module.probe): ("embedding", None)}  # the pooling's learned query (1, 1, hidden)
        return None

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, "CLIPEncoder", "SiglipEncoder") and isinstance(getattr(module, "layers", None),
                                                                                  nn.ModuleList):
            return module.layers
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, "CLIPEncoderLayer", "SiglipEncoderLayer"):
            return (block.self_attn,)
        return None
