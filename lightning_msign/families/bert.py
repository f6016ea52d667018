"""Hugging Face BERT and RoBERTa (transformers 4.57): ``*SelfAttention``'s ``query``, ``key``, ``value`` (the SDPA
subclasses included); the attention's output projection is ``*SelfOutput.dense``; the feed-forward is
``*Intermediate.dense`` and ``*Output.dense`` (role ``"mlp"``) -- two ``dense`` layers told apart by their classes,
not their names."""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, is_transformers, linears

_PREFIXES = ("Bert", "Roberta")


def _names(suffix: str) -> tuple[str, ...]:
    return tuple(p + suffix for p in _PREFIXES)


class BERT(Family):
    name = "HF BERT, RoBERTa"
    model = "HF BERT, RoBERTa"
    splits = (
        "separate `query`/`key`/`value` of `*SelfAttention`; output `*SelfOutput.dense`; the feed-forward's"
        " `*Intermediate.dense`, `*Output.dense` are `mlp`"
    )
    read_from = "the attention, self-output, intermediate and output classes"

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_names("SelfAttention")):
            return {**linears(module, "q", "query"), **linears(module, "k", "key"), **linears(module, "v", "value")}
        if is_transformers(module, *_names("SelfOutput")):
            return linears(module, "attn_out", "dense")
        if is_transformers(module, *_names("Intermediate"), *_names("Output")):
            return linears(module, "mlp", "dense")
        return None
