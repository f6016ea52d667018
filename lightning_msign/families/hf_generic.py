"""Hugging Face attention and MLP classes of any family with separate projections, recognised by their structure.

Most transformers families (Gemma, OLMo 2, Qwen3-MoE, Granite, ...) write their attention as ``q_proj``,
``k_proj``, ``v_proj``, ``o_proj`` and their gated MLP as ``gate_proj``, ``up_proj``, ``down_proj``. A module of
``transformers.models`` is read here only when its class says so (a class name ending in ``Attention`` or ``MLP``)
*and* its sizes agree with its config: ``q_proj`` has ``num_attention_heads * head_dim`` outputs, ``k_proj`` and
``v_proj`` ``num_key_value_heads * head_dim``, ``o_proj`` takes ``num_attention_heads * head_dim``; the MLP's
``gate_proj`` and ``up_proj`` have the outputs ``down_proj`` takes. A module that does not agree is not read (its
weights get no role from this family). Families with their own module here are asked first.

Attention logits of the classes in :data:`INTERFACE_ATTENTIONS` (whatever their projections): the queries and keys
they hand to the attention function (:mod:`lightning_msign.families.hf_attention`); each is compared with its eager
attention probabilities in the tests.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from lightning_msign.families.base import Family, Found, int_attr, linears
from lightning_msign.families.hf_attention import InterfaceProbe, hf_classes, interface_probe

_INTERFACE = (
    ("gemma2", "Gemma2Attention"), ("gemma3", "Gemma3Attention"), ("olmo", "OlmoAttention"),
    ("cohere", "CohereAttention"), ("granite", "GraniteAttention"), ("starcoder2", "Starcoder2Attention"),
    ("smollm3", "SmolLM3Attention"), ("glm4", "Glm4Attention"),
)
INTERFACE_ATTENTIONS: tuple[str, ...] = hf_classes(*_INTERFACE)
"""The attention classes (transformers 4.57) whose logits are read where they call the attention function."""


def _linear(module: nn.Module, name: str) -> Optional[nn.Linear]:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


def _attention_agrees(module: nn.Module) -> bool:
    q, k, v, o = (_linear(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    config = getattr(module, "config", None)
    n_head = int_attr(config, "num_attention_heads")
    if None in (q, k, v, o) or not n_head:
        return False
    n_kv = int_attr(config, "num_key_value_heads") or n_head
    head_dim = int_attr(module, "head_dim") or int_attr(config, "head_dim")
    if head_dim is None:
        hidden = int_attr(config, "hidden_size")
        head_dim = hidden // n_head if hidden else None
    if not head_dim:
        return False
    return (q.out_features == n_head * head_dim and k.out_features == v.out_features == n_kv * head_dim
            and o.in_features == n_head * head_dim)


def _mlp_agrees(module: nn.Module) -> bool:
    gate, up, down = (_linear(module, n) for n in ("gate_proj", "up_proj", "down_proj"))
    return (None not in (gate, up, down) and gate.out_features == up.out_features == down.in_features
            and gate.in_features == up.in_features == down.out_features)


class HFSeparateProjections(Family):
    name = "HF attention / MLP with separate projections (any family, checked against its config)"
    model = (
        'other HF families with `q_proj`/`k_proj`/`v_proj`/`o_proj` and `gate_proj`/`up_proj`/`down_proj` '
        '(Gemma, OLMo 2, Granite, ...); attention logits of Gemma 2 / 3, OLMo, Cohere, Granite, Starcoder2, '
        'SmolLM3, GLM-4'
    )
    splits = 'separate projections, read only where their sizes agree with the config'
    read_from = '`num_attention_heads`, `num_key_value_heads`, `head_dim`'
    attention_classes = tuple(f"HF {c}" for _, c in _INTERFACE)

    def attention_probe(self, attn: nn.Module, keep: bool = False) -> Optional[InterfaceProbe]:
        return interface_probe(attn, INTERFACE_ATTENTIONS, keep=keep)

    def read(self, module: nn.Module) -> Optional[Found]:
        cls = type(module)
        if not cls.__module__.startswith("transformers.models."):
            return None
        if cls.__name__.endswith("Attention") and _attention_agrees(module):
            return {**linears(module, "q", "q_proj"), **linears(module, "k", "k_proj"),
                    **linears(module, "v", "v_proj"), **linears(module, "attn_out", "o_proj")}
        if cls.__name__.endswith("MLP") and _mlp_agrees(module):
            return linears(module, "mlp", "gate_proj", "up_proj", "down_proj")
        return None
