"""Hugging Face Qwen2-MoE (transformers 4.57), whose attention classes predate the attention-function registry.

- Attention (``Qwen2MoeAttention`` and its ``Sdpa`` / ``FlashAttention2`` subclasses): ``q_proj``, ``k_proj``,
  ``v_proj``, ``o_proj``. Queries and keys (:class:`MaskedRotaryProbe`): the ``q_proj`` / ``k_proj`` outputs split
  into heads of ``head_dim``, rotated by the ``position_embeddings`` the decoder layer passes, with the model's own
  ``apply_rotary_pos_emb``; ``num_key_value_heads`` key groups; scale ``1 / sqrt(head_dim)`` (the eager forward
  divides by it; SDPA's default). The pairs are those of the ``attention_mask`` the layer passes (the model's 4-D
  causal mask, which holds the sliding window of the layers below ``max_window_layers`` and any padding), or all
  causal pairs when it passes none (SDPA's ``is_causal``). In transformers 5 the attention calls the attention
  function and is read there (:mod:`lightning_msign.families.hf_attention`).
- The sparse MoE block: ``gate`` and ``shared_expert_gate`` are routers; the experts and the shared expert are
  ``Qwen2MoeMLP`` (``gate_proj``, ``up_proj``, ``down_proj``: role ``"mlp"``).

No import of ``transformers`` here: a model's own module is read from ``sys.modules``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

from torch import Tensor, nn

from lightning_msign.families.base import Family, Found, is_transformers, linears, qualified_name
from lightning_msign.families.gpt2 import heads
from lightning_msign.families.hf_attention import interface_probe, uses_attention_interface
from lightning_msign.models.base import AttentionProbe, MaskedAttentionProbe, argument, to_compute

_ATTENTION = "Qwen2MoeAttention"  # the Sdpa and FlashAttention2 classes derive from it
_PROBED = tuple(f"transformers.models.qwen2_moe.modeling_qwen2_moe.{c}"
                for c in ("Qwen2MoeAttention", "Qwen2MoeSdpaAttention"))
"""Exact classes probed: FlashAttention2 takes a 2-D padding mask and applies the window itself (not read)."""


class MaskedRotaryProbe(MaskedAttentionProbe):
    """Hooks on an attention that takes ``(hidden_states, attention_mask, ...)`` and ``position_embeddings``: the
    projections' outputs, RoPE, and the pairs of the mask it was passed (see the module docstring)."""

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.attn.head_dim)

    def sources(self) -> dict[str, nn.Module]:
        return {"q": self.attn.q_proj, "k": self.attn.k_proj}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"position_embeddings": argument(args, kwargs, 7, "position_embeddings"),
                "mask": argument(args, kwargs, 1, "attention_mask")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        head_dim = self.attn.head_dim
        q, k = heads(seen["q"], head_dim), heads(seen["k"], head_dim)
        cos, sin = seen["position_embeddings"]
        q, k = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        return to_compute(q), to_compute(k)


class Qwen2MoE(Family):
    name = "HF Qwen2-MoE"
    model = "HF Qwen2-MoE"
    splits = (
        "separate `q_proj`/`k_proj`/`v_proj`/`o_proj`; experts and shared expert `gate_proj`/`up_proj`/`down_proj`;"
        " `gate` and `shared_expert_gate` routers"
    )
    read_from = "the attention, MLP and sparse-MoE classes"
    attention_classes = ("HF Qwen2MoeAttention (eager, SDPA)",)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, _ATTENTION):
            return {**linears(module, "q", "q_proj"), **linears(module, "k", "k_proj"),
                    **linears(module, "v", "v_proj"), **linears(module, "attn_out", "o_proj")}
        if is_transformers(module, "Qwen2MoeMLP"):
            return linears(module, "mlp", "gate_proj", "up_proj", "down_proj")
        if is_transformers(module, "Qwen2MoeSparseMoeBlock"):
            return linears(module, "router", "gate", "shared_expert_gate")
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        if qualified_name(attn) not in _PROBED:
            return None
        if uses_attention_interface(attn):  # transformers 5: it calls the attention function
            return interface_probe(attn, _PROBED, keep=keep)
        return MaskedRotaryProbe(attn, keep=keep)
