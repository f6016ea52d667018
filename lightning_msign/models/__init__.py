"""Model adapters (no Lightning): where a decoder's blocks are, and the probe interface of its attention logits.

The probes of each family live with the family (:mod:`lightning_msign.families`); they are also importable from here.
"""

from typing import Any

from lightning_msign.models.base import (
    BLOCK_PATHS,
    AttentionProbe,
    Decoder,
    attention_module,
    attention_probe,
    block_output,
    find_decoder,
    output_logits,
    supported_attention,
)

_FROM_FAMILIES = {
    "GPT2AttentionProbe": "gpt2", "gpt2_attention_scale": "gpt2", "RotaryAttentionProbe": "llama",
    "LitGPTAttentionProbe": "litgpt", "litgpt_attention_scale": "litgpt", "litgpt_query_key": "litgpt",
}


def __getattr__(name: str) -> Any:
    # the families import this package's base module: theirs are read on first use, not at import
    if name in _FROM_FAMILIES:
        import importlib

        return getattr(importlib.import_module(f"lightning_msign.families.{_FROM_FAMILIES[name]}"), name)
    if name == "SUPPORTED_ATTENTION":
        return supported_attention()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BLOCK_PATHS",
    "SUPPORTED_ATTENTION",
    "AttentionProbe",
    "Decoder",
    "attention_module",
    "attention_probe",
    "block_output",
    "find_decoder",
    "output_logits",
    "supported_attention",
    *_FROM_FAMILIES,
]
