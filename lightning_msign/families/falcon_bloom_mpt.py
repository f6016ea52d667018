"""Hugging Face Falcon, BLOOM and MPT (transformers 4.57): one fused ``query_key_value`` / ``Wqkv`` each, cut as the
attention's own split does.

- Falcon ``query_key_value`` (``FalconAttention._split_heads``): with ``new_decoder_architecture``, rows grouped per key
  head, ``num_kv_heads`` times ``[q (num_heads / num_kv_heads heads) | k (1 head) | v (1 head)]``; with ``multi_query``,
  rows ``[q (num_heads heads) | k (1 head) | v (1 head)]``; else rows interleaved per head, ``[q | k | v]`` of
  ``head_dim`` each. ``dense`` the output; the MLP's ``dense_h_to_4h``, ``dense_4h_to_h``.
- BLOOM ``query_key_value`` (``BloomAttention._reshape``): rows interleaved per head, ``[q | k | v]`` of ``head_dim``
  each; ``dense`` the output; the MLP's ``dense_h_to_4h``, ``dense_4h_to_h``.
- MPT ``Wqkv`` (``chunk(3)`` in the forward): rows ``[q | k | v]`` of ``hidden_size`` each; ``out_proj`` the output;
  the MLP's ``up_proj``, ``down_proj``.

Attention logits of Falcon with rotary positions (``alibi=False``, Falcon-7B/40B/180B; :class:`FalconProbe`): the
``query_key_value`` output cut by the attention's own ``_split_heads`` and reshaped as its forward does, rotated by
the ``position_embeddings`` the layer passes with the model's ``apply_rotary_pos_emb``; scale ``inv_norm_factor``
(``1 / sqrt(head_dim)``, SDPA's default too); the pairs of the 4-D mask the layer passes, else causal. In
transformers 5 Falcon's forward inlines the split and calls the attention function, where it is read instead
(:mod:`lightning_msign.families.hf_attention`). ALiBi Falcon (``alibi=True``) is not read.

BLOOM (:class:`BloomProbe`): the ``query_key_value`` output cut by the attention's own ``_reshape``, scale
``inv_norm_factor``, the pairs of the additive mask it is passed. MPT (:class:`MptProbe`): the ``Wqkv`` output
clamped to ``clip_qkv`` and ``chunk(3)``-ed, scale ``softmax_scale``; its boolean mask marks the pairs *masked*
(``masked_fill``), so the pairs read are its complement (all pairs when it is passed none, as its forward). Both add
ALiBi, a fixed per-head linear position bias, to ``scale * q k^T``: the logits read are without it (as T5's relative
bias; with ``keep`` the probes keep it in ``bias`` for comparing with the model).

No import of ``transformers`` here: a model's own module is read from ``sys.modules``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import Tensor, nn

from lightning_msign.families.base import (
    Family,
    Found,
    int_attr,
    is_transformers,
    linears,
    qualified_name,
    rows,
    weight_of,
)
from lightning_msign.families.hf_attention import interface_probe, uses_attention_interface
from lightning_msign.layouts import Layout
from lightning_msign.models.base import AttentionProbe, MaskedAttentionProbe, argument, to_compute

_FALCON = "transformers.models.falcon.modeling_falcon.FalconAttention"
_BLOOM = "transformers.models.bloom.modeling_bloom.BloomAttention"
_MPT = "transformers.models.mpt.modeling_mpt.MptAttention"


def _heads(n: int, source: str, **sizes: int) -> Layout:
    return Layout("heads", tuple(sizes.items()), heads=n, source=source)


class FalconProbe(MaskedAttentionProbe):
    """Hooks on a rotary HF ``FalconAttention``: the fused projection's output, the model's own split and RoPE, the
    mask it was passed (see the module docstring)."""

    @property
    def scale(self) -> float:
        return float(self.attn.inv_norm_factor)

    def sources(self) -> dict[str, nn.Module]:
        return {"qkv": self.attn.query_key_value}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"position_embeddings": argument(args, kwargs, 9, "position_embeddings"),
                "mask": argument(args, kwargs, 2, "attention_mask")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        attn = self.attn
        q, k, _ = attn._split_heads(seen["qkv"])  # (B, T, heads, head_dim), as the forward splits it
        n_kv = attn.num_heads if attn.new_decoder_architecture else attn.num_kv_heads
        B, T = q.shape[:2]
        q = q.transpose(1, 2).reshape(B, attn.num_heads, T, attn.head_dim)
        k = k.transpose(1, 2).reshape(B, n_kv, T, attn.head_dim)
        cos, sin = seen["position_embeddings"]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)
        return to_compute(q), to_compute(k)


class BloomProbe(MaskedAttentionProbe):
    """Hooks on an HF ``BloomAttention`` (see the module docstring)."""

    bias: Optional[Tensor] = None

    @property
    def scale(self) -> float:
        return float(self.attn.inv_norm_factor)

    def sources(self) -> dict[str, nn.Module]:
        return {"qkv": self.attn.query_key_value}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        seen = {"mask": argument(args, kwargs, 3, "attention_mask")}
        if self.keep:
            seen["alibi"] = argument(args, kwargs, 2, "alibi")
        return seen

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        q, k, _ = self.attn._reshape(seen["qkv"])  # (B, heads, T, head_dim), as the forward cuts it
        if self.keep:  # (B heads, 1, S) -> (B, heads, 1, S), times the forward's beta
            alibi = seen["alibi"].detach()
            bias = alibi.view(q.shape[0], q.shape[1], 1, -1) * self.attn.beta
            self.bias = bias[: self.batch_size, :, :, : self.seq_len]
        return to_compute(q), to_compute(k)


class MptProbe(AttentionProbe):
    """Hooks on an HF ``MptAttention`` (see the module docstring)."""

    bias: Optional[Tensor] = None

    @property
    def scale(self) -> float:
        return float(self.attn.softmax_scale)

    def sources(self) -> dict[str, nn.Module]:
        return {"qkv": self.attn.Wqkv}

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        return {"mask": argument(args, kwargs, 3, "attention_mask"), "bias": argument(args, kwargs, 1, "position_bias")}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        attn, qkv = self.attn, seen["qkv"]
        if attn.clip_qkv:
            qkv = qkv.clamp(min=-attn.clip_qkv, max=attn.clip_qkv)
        q, k, _ = qkv.chunk(3, dim=2)
        B, T = q.shape[:2]
        q = q.reshape(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        k = k.reshape(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)
        return to_compute(q), to_compute(k)

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        seen, self._seen = self._seen, {}
        with torch.no_grad(), torch.autocast(self._device_type(), enabled=False):
            q, k = self.query_key(seen)
            mask = seen.get("mask")
            if isinstance(mask, Tensor) and mask.ndim == 4:
                allowed = ~mask[:, :, :, : k.shape[2]].detach().bool()  # True marks a masked pair
            else:  # the forward masks nothing
                allowed = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            self.record(q, k, self.scale, allowed=allowed)
            bias = seen.get("bias")
            if self.keep and isinstance(bias, Tensor):  # (heads, 1, S), sliced to the keys as the forward does
                T, S = q.shape[2], k.shape[2]
                self.bias = bias.detach()[:, max(0, bias.shape[1] - T):, max(0, bias.shape[2] - S):].unsqueeze(0)


class FalconBloomMPT(Family):
    name = "HF Falcon, BLOOM, MPT"
    model = 'HF Falcon (3 layouts), BLOOM, MPT'
    splits = (
        'Falcon `query_key_value`: per key group `[q.. \\| k \\| v]` (`new_decoder_architecture`), `[Q \\| k \\| '
        'v]` (`multi_query`), or `[q k v]` per head; BLOOM `query_key_value` `[q k v]` per head; MPT `Wqkv` '
        'rows `[Q \\| K \\| V]`'
    )
    read_from = "`num_heads`, `num_kv_heads`, `head_dim`, Falcon's two flags; MPT `hidden_size`"
    attention_classes = ("HF FalconAttention (rotary)", "HF BloomAttention", "HF MptAttention")

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[AttentionProbe]:
        if qualified_name(attn) == _BLOOM and not uses_attention_interface(attn):
            return BloomProbe(attn, keep=keep)
        if qualified_name(attn) == _MPT and not uses_attention_interface(attn):
            return MptProbe(attn, keep=keep)
        if qualified_name(attn) != _FALCON or getattr(attn.config, "alibi", True):
            return None
        if uses_attention_interface(attn):  # transformers 5: the split is inlined, the attention function called
            return interface_probe(attn, (_FALCON,), keep=keep)
        return FalconProbe(attn, keep=keep)

    def stack(self, module: nn.Module) -> Optional[nn.ModuleList]:
        if is_transformers(module, "MptModel") and isinstance(getattr(module, "blocks", None), nn.ModuleList):
            return module.blocks
        return None

    def block_attentions(self, block: nn.Module) -> Optional[tuple[nn.Module, ...]]:
        if is_transformers(block, "FalconDecoderLayer", "BloomBlock"):
            return (block.self_attention,)
        if is_transformers(block, "MptBlock"):
            return (block.attn,)
        return None

    def read(self, module: nn.Module) -> Optional[Found]:
        if is_transformers(module, "FalconAttention"):
            n_head, hd, n_kv = (int_attr(module, a) for a in ("num_heads", "head_dim", "num_kv_heads"))
            qkv = weight_of(getattr(module, "query_key_value", None))
            if None in (n_head, hd, n_kv) or qkv is None:
                return None
            if getattr(module, "new_decoder_architecture", False):
                layout = _heads(n_kv, "transformers FalconAttention (new_decoder_architecture: per key group)",
                                q=n_head // n_kv * hd, k=hd, v=hd)
            elif getattr(module, "multi_query", False):
                layout = rows("transformers FalconAttention (multi_query)", q=n_head * hd, k=hd, v=hd)
            else:
                layout = _heads(n_head, "transformers FalconAttention (per-head interleaving)", q=hd, k=hd, v=hd)
            return {id(qkv): ("qkv", layout), **linears(module, "attn_out", "dense")}
        if is_transformers(module, "BloomAttention"):
            n_head, hd = int_attr(module, "num_heads"), int_attr(module, "head_dim")
            qkv = weight_of(getattr(module, "query_key_value", None))
            if None in (n_head, hd) or qkv is None:
                return None
            layout = _heads(n_head, "transformers BloomAttention (per-head interleaving)", q=hd, k=hd, v=hd)
            return {id(qkv): ("qkv", layout), **linears(module, "attn_out", "dense")}
        if is_transformers(module, "MptAttention"):
            hidden, qkv = int_attr(module, "hidden_size"), weight_of(getattr(module, "Wqkv", None))
            if hidden is None or qkv is None:
                return None
            return {id(qkv): ("qkv", rows("transformers MptAttention (chunk(3))", q=hidden, k=hidden, v=hidden)),
                    **linears(module, "attn_out", "out_proj")}
        if is_transformers(module, "FalconMLP", "BloomMLP"):
            return linears(module, "mlp", "dense_h_to_4h", "dense_4h_to_h")
        if is_transformers(module, "MptMLP"):
            return linears(module, "mlp", "up_proj", "down_proj")
        if is_transformers(module, "FalconForCausalLM", "BloomForCausalLM", "MptForCausalLM"):
            return linears(module, "lm_head", "lm_head")
        return None
