"""Model adapters (no Lightning): where a decoder's blocks are, and how its attention forms queries and keys."""

from lightning_msign.models.base import (
    BLOCK_PATHS,
    SUPPORTED_ATTENTION,
    AttentionProbe,
    Decoder,
    attention_module,
    attention_probe,
    block_output,
    find_decoder,
    output_logits,
)
from lightning_msign.models.hf import GPT2AttentionProbe, RotaryAttentionProbe, gpt2_attention_scale
from lightning_msign.models.litgpt import LitGPTAttentionProbe, litgpt_attention_scale, litgpt_query_key

__all__ = [
    "BLOCK_PATHS",
    "SUPPORTED_ATTENTION",
    "AttentionProbe",
    "Decoder",
    "GPT2AttentionProbe",
    "LitGPTAttentionProbe",
    "RotaryAttentionProbe",
    "attention_module",
    "attention_probe",
    "block_output",
    "find_decoder",
    "gpt2_attention_scale",
    "litgpt_attention_scale",
    "litgpt_query_key",
    "output_logits",
]
