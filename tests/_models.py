"""Model code the layout tests run that no installed package ships, and a probe of what a forward computes.

- :class:`GPT` (with :class:`CausalSelfAttention`, :class:`MLP`, :class:`Block`): a faithful copy of nanoGPT's
  ``model.py`` (``c_attn = Linear(C, 3C)``, split in the forward by ``self.n_embd``).
- :class:`MixtralExperts`, :class:`MixtralTopKRouter`, :class:`MixtralSparseMoeBlock`: the transformers-5 mixture
  of experts (every expert in one 3D tensor, ``gate_up_proj (E, 2I, H)`` fused ``[gate | up]``), with the flags
  transformers 5's ``use_experts_implementation`` decorator sets on the instance.
- :class:`TimmAttention`, :class:`MyAttention`, :class:`ToQKVAttention`: user attention modules whose layout no
  reader knows (timm's fused ``qkv``, a ``c_attn`` without ``n_embd``, diffusers-style ``to_q``/``to_k``/``to_v``).
- :func:`true_qkv`: the Q, K and V matrices a model's forward really multiplies by, read from the tensors it hands
  to ``scaled_dot_product_attention`` when the projections' inputs are replaced by the identity.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


# ------------------------------------------------------------------------------------------------- nanoGPT
@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 32
    dropout: float = 0.0
    bias: bool = True


class LayerNorm(nn.Module):
    """nanoGPT's LayerNorm with an optional bias."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention: one ``c_attn`` for queries, keys and values, rows ``[q | k | v]`` of ``n_embd`` each."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.flash = hasattr(torch.nn.functional, "scaled_dot_product_attention")
        if not self.flash:
            mask = torch.tril(torch.ones(config.block_size, config.block_size))
            self.register_buffer("bias", mask.view(1, 1, config.block_size, config.block_size))

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = self.attn_dropout(F.softmax(att, dim=-1))
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's model (token embedding tied to the LM head)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------------------------- transformers-5 experts
@dataclass
class MoEConfig:
    hidden_size: int = 32
    intermediate_size: int = 24
    num_local_experts: int = 4
    num_experts_per_tok: int = 2
    num_hidden_layers: int = 2
    vocab_size: int = 64


def experts_implementation(
    *, is_concatenated: bool = True, is_transposed: bool = False, has_bias: bool = False, has_gate: bool = True
) -> Callable[[type], type]:
    """What transformers 5's ``use_experts_implementation`` does to the layout: set its flags on each instance."""

    def wrap(cls: type) -> type:
        init = cls.__init__

        def __init__(self, config, *args, **kwargs):
            init(self, config, *args, **kwargs)
            self.config = config
            self.has_gate = has_gate
            self.has_bias = has_bias
            self.is_transposed = is_transposed
            self.is_concatenated = is_concatenated

        cls.__init__ = __init__
        return cls

    return wrap


@experts_implementation(is_concatenated=True, is_transposed=False, has_gate=True)
class MixtralExperts(nn.Module):
    """Every expert's weights in two 3D tensors, as transformers 5 stores them."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = nn.SiLU()
        nn.init.normal_(self.gate_up_proj, std=0.2)
        nn.init.normal_(self.down_proj, std=0.2)

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)  # (E, k, S)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert_idx in expert_hit:
            expert_idx = expert_idx[0]
            top_k_pos, token_idx = torch.where(expert_mask[expert_idx])
            current = hidden_states[token_idx]
            gate, up = F.linear(current, self.gate_up_proj[expert_idx]).chunk(2, dim=-1)
            current = F.linear(self.act_fn(gate) * up, self.down_proj[expert_idx])
            current = current * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, current.to(final.dtype))
        return final


class MixtralTopKRouter(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.num_local_experts
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.randn(self.num_experts, self.hidden_dim) * 0.2)

    def forward(self, hidden_states: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = F.linear(hidden_states, self.weight)
        probs = F.softmax(logits.float(), dim=-1)
        top_value, top_index = torch.topk(probs, self.top_k, dim=-1)
        top_value = top_value / top_value.sum(dim=-1, keepdim=True)
        return logits, top_value.to(logits.dtype), top_index


class MixtralSparseMoeBlock(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.gate = MixtralTopKRouter(config)
        self.experts = MixtralExperts(config)

    def forward(self, hidden_states: Tensor) -> Tensor:
        batch, seq, hidden = hidden_states.shape
        hidden_states = hidden_states.view(-1, hidden)
        _, top_k_weights, top_k_index = self.gate(hidden_states)
        return self.experts(hidden_states, top_k_index, top_k_weights).reshape(batch, seq, hidden)


class MoEDecoderLayer(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size)
        self.mlp = MixtralSparseMoeBlock(config)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


class MoEModel(nn.Module):
    """A decoder of transformers-5 sparse-MoE blocks (attention left out: the experts are the point)."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([MoEDecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


# ------------------------------------------------------------------------------------ unknown user layouts
class TimmAttention(nn.Module):
    """timm's ViT attention: ``qkv = Linear(C, 3C)`` reshaped to ``(B, N, 3, heads, head_dim)``; no ``n_embd``."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MyAttention(nn.Module):
    """A user's attention with a fused ``c_attn`` whose rows interleave per head, and no ``n_embd`` to read."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, self.heads, -1).transpose(1, 2).chunk(3, dim=-1)
        return self.c_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


class ToQKVAttention(nn.Module):
    """diffusers-style projections ``to_q``, ``to_k``, ``to_v``, ``to_out`` (no name a preset knows)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
        return self.to_out[1](self.to_out[0](y))


class Blocks(nn.Module):
    """``blocks.<i>.attn`` over any attention modules, with pre-norms and a head: a tiny model around them."""

    def __init__(self, *attentions: nn.Module, dim: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(dim), "attn": a}) for a in attentions])
        self.head = nn.Linear(dim, 8)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            h = block["norm"](x)
            x = x + (block["attn"](h, h, h, need_weights=False)[0] if isinstance(block["attn"], nn.MultiheadAttention)
                     else block["attn"](h))
        return self.head(x)


# ---------------------------------------------------------------------------------------------- the probe
@contextmanager
def _sdpa_calls() -> Iterator[list[tuple[Tensor, Tensor, Tensor]]]:
    """Record ``(q, k, v)`` of every ``F.scaled_dot_product_attention`` call (each ``(B, heads, T, head_dim)``)."""
    calls: list[tuple[Tensor, Tensor, Tensor]] = []
    original = F.scaled_dot_product_attention

    def record(q, k, v, *args, **kwargs):
        calls.append((q.detach().clone(), k.detach().clone(), v.detach().clone()))
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = record
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = original


@dataclass(frozen=True)
class Projection:
    """Where one attention call's query, key or value comes from.

    Attributes:
        call: index of the ``scaled_dot_product_attention`` call (its attention layer, in forward order).
        tag: ``"q"``, ``"k"`` or ``"v"``.
        heads: the number of heads of this projection (key/value heads under GQA / MQA).
        module: name of the module whose input the projection multiplies (its input is replaced by the identity).
        target: the name the package should give this matrix.
    """

    call: int
    tag: str
    heads: int
    module: str
    target: str


@torch.no_grad()
def true_qkv(model: nn.Module, forward: Callable[[nn.Module, int], object], projections: Sequence[Projection],
             width: int) -> dict[str, Tensor]:
    """The Q, K, V matrices the model's forward multiplies by, keyed by ``Projection.target``.

    Every module named in ``projections`` gets the identity ``(1, width, width)`` in place of each of its
    positional inputs of width ``width`` (biases must be zero), so the queries, keys and values handed to
    ``scaled_dot_product_attention`` are the weights themselves: ``y = I W^T`` for ``nn.Linear`` (returned as
    ``W``, ``(out, in)``) and ``y = I W`` for ``Conv1D`` (returned as ``W``'s column block, ``(in, out)``).
    Repeated key/value heads (GQA expanded for the attention kernel) are taken once. Rotary embeddings must be
    the identity (position 0), so queries and keys are not rotated.

    ``forward(model, seq_len)`` runs the model on a sequence of ``width`` tokens.
    """
    modules = dict(model.named_modules())
    eye = torch.eye(width, dtype=next(model.parameters()).dtype)[None]  # (1, T, C) with T = C

    def replace(module: nn.Module, args: tuple) -> tuple:
        return tuple(eye if isinstance(a, Tensor) and a.ndim == 3 and a.shape[-1] == width else a for a in args)

    handles = [modules[name].register_forward_pre_hook(replace) for name in {p.module for p in projections}]
    try:
        with _sdpa_calls() as calls:
            forward(model, width)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for p in projections:
        x = calls[p.call]["qkv".index(p.tag)][0]  # (heads as given to the kernel, T, hd)
        x = x[:: x.shape[0] // p.heads]  # GQA / MQA heads repeated for the kernel: each once
        y = x.transpose(0, 1).reshape(width, -1)  # (T, heads * hd) = I @ W^T, or I @ W for Conv1D
        out[p.target] = y if isinstance(modules[p.module], Conv1D) else y.T
    return out
