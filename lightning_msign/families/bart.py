"""Hugging Face BART, mBART, Marian, Whisper and OPT (transformers 4.57): the fairseq layout. ``*Attention``'s
``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (encoder and decoder self-attention and the decoder's cross-attention
``encoder_attn``: the same class); the feed-forward is ``fc1`` and ``fc2`` of the layer itself (``*EncoderLayer``,
``*DecoderLayer``: role ``"mlp"``). The output head (``lm_head``, Whisper's ``proj_out``) is found by the model's
``get_output_embeddings``. The blocks are the encoder's and then the decoder's ``layers``; a decoder block's logits
are the larger of its self- and its cross-attention's."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, is_transformers, linears
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe

_PREFIXES = ("Bart", "MBart", "Marian", "Whisper", "OPT")


def _names(*suffixes: str) -> tuple[str, ...]:
    return tuple(p + s for p in _PREFIXES for s in suffixes)


_LOGITS = hf_classes(("bart", "BartAttention"), ("mbart", "MBartAttention"), ("marian", "MarianAttention"),
                     ("whisper", "WhisperAttention"), ("opt", "OPTAttention"))
"""The attention classes whose logits are read where they call the attention function."""


class BART(Family):
    name = "HF BART, mBART, Marian, Whisper, OPT"
    model = "HF BART, mBART, Marian, Whisper, OPT"
    splits = (
        "separate `q_proj`/`k_proj`/`v_proj`/`out_proj` of every `*Attention` (self and cross); the layer's own"
        " `fc1`, `fc2` are `mlp`"
    )
    read_from = "the attention and layer classes"
    attention_classes = tuple(f"HF {p}Attention" for p in _PREFIXES)

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, _LOGITS, keep=keep)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_names("Attention")):
            return {**linears(module, "q", "q_proj"), **linears(module, "k", "k_proj"),
                    **linears(module, "v", "v_proj"), **linears(module, "attn_out", "out_proj")}
        if is_transformers(module, *_names("EncoderLayer", "DecoderLayer")):
            return linears(module, "mlp", "fc1", "fc2")
        return None

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, *_names("Encoder", "Decoder")) and isinstance(getattr(module, "layers", None),
                                                                                nn.ModuleList):
            return module.layers
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, *_names("EncoderLayer", "DecoderLayer")):
            return tuple(m for m in (getattr(block, "self_attn", None), getattr(block, "encoder_attn", None))
                         if isinstance(m, nn.Module))
        return None
