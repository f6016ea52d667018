r"""Hugging Face attention: queries and keys rebuilt from GPT-2 and Llama-family attention modules.

Supported classes (exactly these, not subclasses, which may change the forward), as in transformers 4.57:

- ``GPT2Attention``: the fused ``c_attn`` (``Conv1D``) output split by ``split_size`` into ``q``, ``k``,
  ``v``, heads of ``head_dim``; no positional rotation (GPT-2 adds learned positions to the input).
  Scale :math:`1/\sqrt{d_h}` when ``scale_attn_weights``, times :math:`1/(\text{layer\_idx} + 1)` when
  ``scale_attn_by_inverse_layer_idx`` (``reorder_and_upcast_attn`` computes the same logits in float32).
- ``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention``, ``Qwen3Attention``: the ``q_proj`` /
  ``k_proj`` outputs (Qwen3: the ``q_norm`` / ``k_norm`` outputs, RMS norms over each head) split into
  heads of ``head_dim``, rotated by the ``position_embeddings = (cos, sin)`` the decoder layer passes to
  the attention, with the model's own ``apply_rotary_pos_emb``; ``num_key_value_heads`` key groups
  (grouped-query attention); scale ``module.scaling``. Sliding window: Mistral's
  ``config.sliding_window`` (every layer), Qwen2's / Qwen3's ``module.sliding_window`` (the layers of type
  ``"sliding_attention"``); Llama none.

These do not depend on ``config._attn_implementation``: the logits are rebuilt from the projections,
whatever kernel the model then runs. No import of ``transformers`` here: a model's own module is read
from ``sys.modules``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

from torch import Tensor, nn

from lightning_msign.models.base import AttentionProbe, argument, to_compute

__all__ = ["GPT2AttentionProbe", "HF_ATTENTION_PROBES", "RotaryAttentionProbe", "gpt2_attention_scale"]


def _heads(x: Tensor, head_dim: int) -> Tensor:
    """``(B, T, n * head_dim)`` or ``(B, T, n, head_dim)`` -> ``(B, n, T, head_dim)``."""
    B, T = x.shape[:2]
    return x.reshape(B, T, -1, head_dim).transpose(1, 2)


def gpt2_attention_scale(attn: nn.Module) -> float:
    """The factor GPT-2's attention multiplies ``q @ k.mT`` by (see the module docstring)."""
    scale = 1.0 / math.sqrt(attn.head_dim) if attn.scale_attn_weights else 1.0
    if attn.scale_attn_by_inverse_layer_idx:
        scale /= float(attn.layer_idx + 1)
    return scale


class GPT2AttentionProbe(AttentionProbe):
    """Hooks on an HF ``GPT2Attention`` (self-attention): its ``c_attn`` output gives ``q`` and ``k``."""

    @property
    def scale(self) -> float:
        return gpt2_attention_scale(self.attn)

    def sources(self) -> dict[str, nn.Module]:
        return {"qkv": self.attn.c_attn}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        q, k, _ = seen["qkv"].split(self.attn.split_size, dim=2)
        return to_compute(_heads(q, self.attn.head_dim)), to_compute(_heads(k, self.attn.head_dim))


class RotaryAttentionProbe(AttentionProbe):
    """Hooks on an HF Llama-family attention: projections (or per-head norms), RoPE from the
    ``position_embeddings`` argument, grouped keys (see the module docstring)."""

    normed = False  # Qwen3: q, k after the per-head RMS norms `q_norm`, `k_norm`
    window_from_config = False  # Mistral: `config.sliding_window` on every layer; else `module.sliding_window`

    @property
    def scale(self) -> float:
        return float(self.attn.scaling)

    @property
    def window(self) -> Optional[int]:
        if self.window_from_config:
            return getattr(self.attn.config, "sliding_window", None)
        return getattr(self.attn, "sliding_window", None)

    def sources(self) -> dict[str, nn.Module]:
        if self.normed:
            return {"q": self.attn.q_norm, "k": self.attn.k_norm}
        return {"q": self.attn.q_proj, "k": self.attn.k_proj}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"position_embeddings": argument(args, kwargs, 1, "position_embeddings")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        head_dim = self.attn.head_dim
        q, k = _heads(seen["q"], head_dim), _heads(seen["k"], head_dim)
        cos, sin = seen["position_embeddings"]
        rotate = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
        q, k = rotate(q, k, cos, sin)
        return to_compute(q), to_compute(k)


class _MistralProbe(RotaryAttentionProbe):
    window_from_config = True


class _Qwen3Probe(RotaryAttentionProbe):
    normed = True


HF_ATTENTION_PROBES: dict[str, type[AttentionProbe]] = {
    "transformers.models.gpt2.modeling_gpt2.GPT2Attention": GPT2AttentionProbe,
    "transformers.models.llama.modeling_llama.LlamaAttention": RotaryAttentionProbe,
    "transformers.models.mistral.modeling_mistral.MistralAttention": _MistralProbe,
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention": RotaryAttentionProbe,
    "transformers.models.qwen3.modeling_qwen3.Qwen3Attention": _Qwen3Probe,
}
"""Probe class by the attention's fully qualified class name."""
