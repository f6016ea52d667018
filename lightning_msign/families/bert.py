"""Hugging Face BERT, RoBERTa and ViT (transformers 4.57): ``*SelfAttention``'s ``query``, ``key``, ``value`` (the SDPA
subclasses included); the attention's output projection is ``*SelfOutput.dense``; the feed-forward is
``*Intermediate.dense`` and ``*Output.dense`` (role ``"mlp"``) -- two ``dense`` layers told apart by their classes,
not their names. ViT's learned class token and positions (``ViTEmbeddings``) are embeddings.

Attention logits. BERT / RoBERTa (their own forward in transformers 4.57; :class:`BertProbe`): the ``query`` and
``key`` outputs split into heads of ``attention_head_size`` as the forward does, scale ``1 / sqrt(head size)``, the
pairs of the mask the layer is passed (the model's extended padding mask; a decoder's causal one), else all pairs (an
encoder) or the causal ones (a decoder's self-attention, as SDPA's ``is_causal``); a cross-attention's keys are those
of the encoder states. Only ``position_embedding_type="absolute"``: the relative types add terms to the logits (not
read). Blocks: ``*Encoder.layer``; a block's attentions: ``attention.self``, and ``crossattention.self`` in a decoder.
ViT: read where it calls the attention function (:mod:`lightning_msign.families.hf_attention`).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor, nn

from lightning_msign.families.base import Family, Found, is_transformers, linears, qualified_name
from lightning_msign.families.gpt2 import heads
from lightning_msign.families.hf_attention import hf_classes, interface_probe, uses_attention_interface
from lightning_msign.models.base import AttentionProbe, MaskedAttentionProbe, argument, to_compute

_PREFIXES = ("Bert", "Roberta", "ViT")


def _names(suffix: str) -> tuple[str, ...]:
    return tuple(p + suffix for p in _PREFIXES)


_LOGITS = hf_classes(("vit", "ViTSelfAttention"), ("vit", "ViTAttention"),  # transformers 4, 5
                     ("bert", "BertSelfAttention"), ("roberta", "RobertaSelfAttention"))
"""The attention classes whose logits are read where they call the attention function (BERT's and RoBERTa's do in
transformers 5)."""


_OWN_FORWARD = tuple(f"transformers.models.{m}.modeling_{m}.{c}" for m, p in (("bert", "Bert"), ("roberta", "Roberta"))
                     for c in (f"{p}SelfAttention", f"{p}SdpaSelfAttention"))
"""The attention classes with their own forward (transformers 4.57), read by :class:`BertProbe`."""


class BertProbe(MaskedAttentionProbe):
    """Hooks on a BERT / RoBERTa ``*SelfAttention``: its ``query`` and ``key`` outputs and the mask (see the module
    docstring)."""

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.attn.attention_head_size)

    def sources(self) -> dict[str, nn.Module]:
        return {"q": self.attn.query, "k": self.attn.key}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"mask": argument(args, kwargs, 1, "attention_mask"),
                "cross": argument(args, kwargs, 3, "encoder_hidden_states") is not None}

    def causal(self, seen: dict[str, Any]) -> bool:
        return bool(self.attn.is_decoder) and not seen["cross"]

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        size = self.attn.attention_head_size
        return to_compute(heads(seen["q"], size)), to_compute(heads(seen["k"], size))


class BERT(Family):
    name = "HF BERT, RoBERTa, ViT"
    model = "HF BERT, RoBERTa, ViT"
    splits = (
        "separate `query`/`key`/`value` of `*SelfAttention`; output `*SelfOutput.dense`; the feed-forward's"
        " `*Intermediate.dense`, `*Output.dense` are `mlp`"
    )
    read_from = "the attention, self-output, intermediate and output classes"
    attention_classes = ("HF BertSelfAttention", "HF RobertaSelfAttention", "HF ViTSelfAttention",
                         "HF ViTAttention (transformers 5)")

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        if getattr(attn, "position_embedding_type", "absolute") != "absolute":
            return None  # relative position scores are added to the logits
        if qualified_name(attn) in _OWN_FORWARD and not uses_attention_interface(attn):
            return BertProbe(attn, keep=keep)
        return interface_probe(attn, _LOGITS, keep=keep)

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, "BertEncoder", "RobertaEncoder") and isinstance(getattr(module, "layer", None),
                                                                                  nn.ModuleList):
            return module.layer
        if is_transformers(module, "ViTEncoder") and isinstance(getattr(module, "layer", None), nn.ModuleList):
            return module.layer  # transformers 4
        if is_transformers(module, "ViTModel") and isinstance(getattr(module, "layers", None), nn.ModuleList):
            return module.layers  # transformers 5: no encoder module
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, "BertLayer", "RobertaLayer"):
            cross = getattr(block, "crossattention", None)
            return (block.attention.self,) + ((cross.self,) if isinstance(cross, nn.Module) else ())
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
