r"""Hugging Face GPT-2 (transformers 4.57): ``GPT2Attention``'s ``Conv1D`` weights, its logits, the MLP, the blocks.

- ``GPT2Attention``, self-attention: ``c_attn`` is ``(n_embd, 3 n_embd)``, *column* blocks ``[q | k | v]`` of
  ``split_size``; cross-attention (``is_cross_attention``): ``q_attn`` the query, ``c_attn`` columns ``[k | v]``;
  ``c_proj`` the output. Queries and keys: the ``c_attn`` output split by ``split_size``, heads of ``head_dim``, no
  rotation (GPT-2 adds learned positions to the input). Scale :math:`1/\sqrt{d_h}` when ``scale_attn_weights``,
  times :math:`1/(\text{layer\_idx} + 1)` when ``scale_attn_by_inverse_layer_idx`` (``reorder_and_upcast_attn``
  computes the same logits in float32).
- ``GPT2MLP``: ``c_fc``, ``c_proj`` (role ``"mlp"``); ``GPT2LMHeadModel.lm_head`` the LM head.
- ``GPT2Block``: output projections ``attn.c_proj`` (``crossattention.c_proj``) and ``mlp.c_proj``; it returns
  ``(hidden, [self-attention weights, [cross-attention weights]])``.
"""

from __future__ import annotations

import math
import sys
from typing import Any, Optional

from torch import Tensor, nn

from lightning_msign.families.base import (
    HF_TUPLE,
    TENSOR,
    BlockInfo,
    Family,
    Found,
    int_attr,
    is_transformers,
    linears,
    qualified_name,
    weight_of,
)
from lightning_msign.families.qk_norm import SwitchedNorm, norm_projection_heads
from lightning_msign.layouts import Layout
from lightning_msign.models.base import AttentionProbe, to_compute

__all__ = ["GPT2", "GPT2AttentionProbe", "gpt2_attention_scale", "heads"]

_ATTENTION = "transformers.models.gpt2.modeling_gpt2.GPT2Attention"
_BLOCK = "transformers.models.gpt2.modeling_gpt2.GPT2Block"


def heads(x: Tensor, head_dim: int) -> Tensor:
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
        return to_compute(heads(q, self.attn.head_dim)), to_compute(heads(k, self.attn.head_dim))



class GPT2(Family):
    name = "HF GPT-2"
    model = 'HF GPT-2'
    splits = (
        '`attn.c_attn` (`Conv1D`, weight `(in, 3 out)`): *column* blocks `[Q \\| K \\| V]`; cross-attention '
        '`q_attn` + `c_attn` `[K \\| V]`'
    )
    read_from = '`split_size`'
    attention_classes = ("HF GPT2Attention",)
    qk_norm_classes = ("HF GPT2Attention (self-attention)",)

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "GPT2Attention"):
            split = int_attr(module, "split_size")
            c_attn = weight_of(getattr(module, "c_attn", None))
            if split is None or c_attn is None:
                return None
            found: Found = {}
            source = "transformers GPT2Attention (Conv1D columns)"
            if getattr(module, "is_cross_attention", False):
                found[id(c_attn)] = ("qkv", Layout("cols", (("k", split), ("v", split)), source=source))
                found.update(linears(module, "q", "q_attn"))
            else:
                found[id(c_attn)] = ("qkv", Layout("cols", (("q", split), ("k", split), ("v", split)), source=source))
            return {**found, **linears(module, "attn_out", "c_proj")}
        if is_transformers(module, "GPT2MLP"):
            return linears(module, "mlp", "c_fc", "c_proj")
        if is_transformers(module, "GPT2LMHeadModel", "GPT2DoubleHeadsModel"):
            return linears(module, "lm_head", "lm_head")
        return None

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        return GPT2AttentionProbe(attn, keep=keep) if qualified_name(attn) == _ATTENTION else None

    def install_qk_norm(self, attn: nn.Module) -> Optional[tuple[nn.Module, nn.Module]]:
        # qk-norm on GPT-2: the model's own norm class (LayerNorm, `layer_norm_epsilon`) over each head of the query
        # and key column blocks of `c_attn`'s output, where GPT2Attention splits them into heads (no RoPE), as the
        # attention's `q_norm` / `k_norm`, applied by forward hooks on `c_attn`.
        if qualified_name(attn) != _ATTENTION:
            return None
        if getattr(attn, "is_cross_attention", False):
            raise ValueError("GPT2Attention as cross-attention (`q_attn`, `c_attn` [k | v]) has no qk-norm retrofit")
        q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        if not (isinstance(q_norm, SwitchedNorm) and isinstance(k_norm, SwitchedNorm)):
            eps = float(getattr(attn.config, "layer_norm_epsilon", 1e-5))
            weight = attn.c_attn.weight
            q_norm, k_norm = (
                SwitchedNorm(nn.LayerNorm(attn.head_dim, eps=eps).to(device=weight.device, dtype=weight.dtype))
                for _ in range(2)
            )
            attn.q_norm, attn.k_norm = q_norm, k_norm
        split = attn.split_size
        norm_projection_heads(attn.c_attn, q_norm, attn.head_dim, (0, split))
        norm_projection_heads(attn.c_attn, k_norm, attn.head_dim, (split, 2 * split))
        return q_norm, k_norm

    def block(self, block: nn.Module) -> Optional[BlockInfo]:
        if qualified_name(block) != _BLOCK:
            return None
        cross = ("crossattention.c_proj",) if hasattr(block, "crossattention") else ()
        return BlockInfo(("attn.c_proj",) + cross + ("mlp.c_proj",), _block_output(block))


def _block_output(block: nn.Module) -> str:
    """What ``GPT2Block.forward`` returns: a tuple in transformers 4, the hidden state itself from transformers 5 on
    (read from the version of the library the block's class comes from)."""
    library = sys.modules.get(type(block).__module__.split(".")[0])
    version = str(getattr(library, "__version__", "4"))
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 4
    return TENSOR if major >= 5 else HF_TUPLE
