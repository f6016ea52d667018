"""Hugging Face BERT, RoBERTa and ViT (transformers 4.57): ``*SelfAttention``'s ``query``, ``key``, ``value`` (the SDPA
subclasses included); the attention's output projection is ``*SelfOutput.dense``; the feed-forward is
``*Intermediate.dense`` and ``*Output.dense`` (role ``"mlp"``) -- two ``dense`` layers told apart by their classes,
not their names. ViT's learned class token and positions (``ViTEmbeddings``) are embeddings."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from lightning_msign.families.base import Family, Found, is_transformers, linears
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe

_PREFIXES = ("Bert", "Roberta", "ViT")


def _names(suffix: str) -> tuple[str, ...]:
    return tuple(p + suffix for p in _PREFIXES)


_LOGITS = hf_classes(("vit", "ViTSelfAttention"), ("vit", "ViTAttention"))  # transformers 4, 5
"""The attention classes whose logits are read where they call the attention function (BERT's and RoBERTa's do not
call one in transformers 4.57)."""


class BERT(Family):
    name = "HF BERT, RoBERTa, ViT"
    model = "HF BERT, RoBERTa, ViT"
    splits = (
        "separate `query`/`key`/`value` of `*SelfAttention`; output `*SelfOutput.dense`; the feed-forward's"
        " `*Intermediate.dense`, `*Output.dense` are `mlp`"
    )
    read_from = "the attention, self-output, intermediate and output classes"
    attention_classes = ("HF ViTSelfAttention", "HF ViTAttention (transformers 5)")

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, _LOGITS, keep=keep)

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, "ViTEncoder") and isinstance(getattr(module, "layer", None), nn.ModuleList):
            return module.layer  # transformers 4
        if is_transformers(module, "ViTModel") and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module.layers  # transformers 5: no encoder module
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, "ViTLayer"):
            inner = getattr(block.attention, "attention", None)  # transformers 4: ViTAttention wraps ViTSelfAttention
            return (inner if isinstance(inner, nn.Module) else block.attention,)
        return None

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_names("SelfAttention")):
            return {**linears(module, "q", "query"), **linears(module, "k", "key"), **linears(module, "v", "value")}
        if is_transformers(module, *_names("SelfOutput")):
            return linears(module, "attn_out", "dense")
        if is_transformers(module, *_names("Intermediate"), *_names("Output")):
            return linears(module, "mlp", "dense")
        if is_transformers(module, "ViTMLP"):  # transformers 5 (its attention has q_proj ... o_proj: read generically)
            return linears(module, "mlp", "fc1", "fc2")
        if is_transformers(module, "ViTEmbeddings"):  # learned vectors (1, n, hidden): embeddings, no matrices
            return _vectors(module, "cls_token", "position_embeddings", "mask_token")
        return None


def _vectors(module: nn.Module, *names: str) -> Found:
    """``{id(p): ("embedding", None)}`` of the named tensors of ``module`` (learned tokens and positions)."""
    return {id(p): ("embedding", None) for p in (getattr(module, n, None) for n in names) if isinstance(p, Tensor)}
