"""Hugging Face Llama-like decoders (transformers 4.57): separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``,
rotary queries and keys, gated MLPs, the blocks.

- Attention of Llama, Mistral, Qwen2, Qwen3, Mixtral: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``. Queries and keys
  (:class:`RotaryAttentionProbe`: Llama, Mistral, Qwen2, Qwen3, Mixtral, Gemma, OLMo 2, Qwen3-MoE): the ``q_proj`` /
  ``k_proj`` outputs (Qwen3, Qwen3-MoE: the ``q_norm`` / ``k_norm`` outputs, RMS norms over each head; OLMo 2: over all
  heads, before the split) split into heads of ``head_dim``, rotated by the
  ``position_embeddings = (cos, sin)`` the decoder layer passes to the attention, with the model's own
  ``apply_rotary_pos_emb``; ``num_key_value_heads`` key groups (grouped-query attention); scale ``module.scaling``.
  Sliding window: Mistral's and Mixtral's ``config.sliding_window`` (every layer), Qwen2's / Qwen3's
  ``module.sliding_window`` (the
  layers of type ``"sliding_attention"``); Llama none. The logits are rebuilt from the projections, whatever kernel
  ``config._attn_implementation`` then runs.
- MLPs ``gate_proj``, ``up_proj``, ``down_proj`` (role ``"mlp"``); Mixtral's and Qwen3-MoE's sparse MoE block:
  ``gate`` the router; Mixtral's experts' ``w1``, ``w2``, ``w3`` (transformers 4; 5 stores experts in 3-D tensors,
  :mod:`lightning_msign.families.hf_experts`). ``lm_head`` of the ``*ForCausalLM`` model.
- Decoder layers of Llama, Mistral, Qwen2, Qwen3: output projections ``self_attn.o_proj``, ``mlp.down_proj``.

No import of ``transformers`` here: a model's own module is read from ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from torch import Tensor, nn

from lightning_msign.families.base import BlockInfo, Family, Found, is_transformers, linears, qualified_name
from lightning_msign.families.gpt2 import heads
from lightning_msign.families.qk_norm import SwitchedNorm, norm_projection_heads
from lightning_msign.models.base import AttentionProbe, argument, to_compute

__all__ = ["LlamaLike", "RotaryAttentionProbe"]

# (transformers module, class prefix) of the families read here
_MODELS = (("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"), ("mixtral", "Mixtral"))
_ATTENTIONS = tuple(f"{c}Attention" for _, c in _MODELS)
_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_HEADS = tuple(f"{c}ForCausalLM" for _, c in _MODELS)


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
        q, k = heads(seen["q"], head_dim), heads(seen["k"], head_dim)
        cos, sin = seen["position_embeddings"]
        rotate = sys.modules[type(self.attn).__module__].apply_rotary_pos_emb  # the model's own RoPE
        q, k = rotate(q, k, cos, sin)
        return to_compute(q), to_compute(k)


class _MistralProbe(RotaryAttentionProbe):
    window_from_config = True


class _Qwen3Probe(RotaryAttentionProbe):
    normed = True


_PROBES: dict[str, type[AttentionProbe]] = {
    "transformers.models.llama.modeling_llama.LlamaAttention": RotaryAttentionProbe,
    "transformers.models.mistral.modeling_mistral.MistralAttention": _MistralProbe,
    "transformers.models.qwen2.modeling_qwen2.Qwen2Attention": RotaryAttentionProbe,
    "transformers.models.qwen3.modeling_qwen3.Qwen3Attention": _Qwen3Probe,
    "transformers.models.mixtral.modeling_mixtral.MixtralAttention": _MistralProbe,
    "transformers.models.gemma.modeling_gemma.GemmaAttention": RotaryAttentionProbe,
    "transformers.models.olmo2.modeling_olmo2.Olmo2Attention": _Qwen3Probe,  # norms over all heads: same sources
    "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeAttention": _Qwen3Probe,
}
_BLOCKS = tuple(f"transformers.models.{m}.modeling_{m}.{c}DecoderLayer" for m, c in _MODELS if m != "mixtral")
# attentions without qk-norm that get one retrofitted (QKNormRetrofit), with the family's RMS norm class
_RETROFIT = {f"transformers.models.{m}.modeling_{m}.{c}Attention": f"{c}RMSNorm"
             for m, c in _MODELS if m not in ("qwen3",)}
_NORMED = {"transformers.models.qwen3.modeling_qwen3.Qwen3Attention",
           "transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeAttention",
           "transformers.models.olmo2.modeling_olmo2.Olmo2Attention"}


class LlamaLike(Family):
    name = "HF Llama, Mistral, Qwen2, Qwen3, Mixtral"
    model = 'HF Llama, Mistral, Qwen2, Qwen3, Mixtral (transformers 4.x)'
    splits = (
        "separate `q_proj`/`k_proj`/`v_proj`/`o_proj`; experts' `w1`/`w2`/`w3`; router `gate` (in `all_2d`, "
        'not `mlp`)'
    )
    read_from = 'the attention, MLP and MoE classes'
    attention_classes = ("HF LlamaAttention", "HF MistralAttention", "HF Qwen2Attention", "HF Qwen3Attention",
                         "HF MixtralAttention", "HF GemmaAttention", "HF Olmo2Attention", "HF Qwen3MoeAttention")
    qk_norm_classes = ("HF LlamaAttention", "HF MistralAttention", "HF Qwen2Attention", "HF MixtralAttention")

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, *_ATTENTIONS):
            return {**linears(module, "q", "q_proj"), **linears(module, "k", "k_proj"),
                    **linears(module, "v", "v_proj"), **linears(module, "attn_out", "o_proj")}
        if is_transformers(module, *_MLPS, "MixtralBlockSparseTop2MLP"):
            return linears(module, "mlp", "gate_proj", "up_proj", "down_proj", "w1", "w2", "w3")
        if is_transformers(module, "MixtralSparseMoeBlock", "Qwen3MoeSparseMoeBlock"):
            return linears(module, "router", "gate")  # a Linear in transformers 4, a `*TopKRouter` in 5
        if is_transformers(module, *_HEADS):
            return linears(module, "lm_head", "lm_head")
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        probe = _PROBES.get(qualified_name(attn))
        return None if probe is None else probe(attn, keep=keep)

    def block(self, block: nn.Module) -> Optional[BlockInfo]:
        return BlockInfo(("self_attn.o_proj", "mlp.down_proj")) if qualified_name(block) in _BLOCKS else None

    def install_qk_norm(self, attn: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
        # Qwen3's qk-norm on a model without it: the family's own RMS norm over each head of the q_proj / k_proj
        # outputs, before RoPE (Qwen3Attention: `q_norm(q_proj(x).view(..., heads, head_dim))`), as `q_norm` /
        # `k_norm` of the attention (Qwen3's names), applied by forward hooks on the projections.
        name = qualified_name(attn)
        if name in _NORMED:
            raise ValueError(f"{name} normalises q and k already (`q_norm`, `k_norm`): there is no qk-norm to retrofit")
        if name not in _RETROFIT:
            return None
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if not (isinstance(q_norm, SwitchedNorm) and isinstance(k_norm, SwitchedNorm)):
            rms_norm = getattr(sys.modules[type(attn).__module__], _RETROFIT[name])
            eps = float(getattr(attn.config, "rms_norm_eps", 1e-6))
            weight = attn.q_proj.weight
            q_norm, k_norm = (
                SwitchedNorm(rms_norm(attn.head_dim, eps=eps).to(device=weight.device, dtype=weight.dtype))
                for _ in range(2)
            )
            attn.q_norm, attn.k_norm = q_norm, k_norm
        norm_projection_heads(attn.q_proj, q_norm, attn.head_dim)
        norm_projection_heads(attn.k_proj, k_norm, attn.head_dim)
        return q_norm, k_norm
