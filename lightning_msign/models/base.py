r"""Transformers as the diagnostics see them: the model to call, its blocks, its limits, its output.

Recognised layouts: the stacks of blocks a model family names (:meth:`~lightning_msign.families.Family.stack`: the
encoder's and decoder's layers of HF BART / mBART / Marian / Whisper / OPT, CLIP / SigLIP and ViT encoders), the
blocks of all of them in model order; else the first module, in ``module.modules()`` order, with a non-empty
``nn.ModuleList`` of blocks at one of :data:`BLOCK_PATHS`:

- ``transformer.h``: LitGPT's ``GPT`` and Hugging Face GPT-2 (``GPT2LMHeadModel``);
- ``model.layers``: Hugging Face Llama-family models (``LlamaForCausalLM``, Mistral, Qwen2, Qwen3, Gemma, Phi, ...);
- ``gpt_neox.layers``: Hugging Face GPT-NeoX / Pythia;
- ``model.decoder.layers``: Hugging Face OPT.

Attention logits need an :class:`AttentionProbe` for the blocks' attention class, which the model families of
:mod:`lightning_msign.families` provide (:func:`attention_probe`); output logits and Jacobians work on any
recognised decoder. No Lightning import.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msign.functional.attention import LogitScratch, attention_logit_max, causal_allowed
from lightning_msign.targets import unwrap_module

BLOCK_PATHS: tuple[str, ...] = ("transformer.h", "model.layers", "gpt_neox.layers", "model.decoder.layers")
"""Where the blocks of a recognised decoder live, tried in this order."""

MAX_LENGTH_ATTRIBUTES: tuple[str, ...] = ("n_positions", "max_position_embeddings", "block_size")
"""``config`` attributes holding the maximum sequence length (HF GPT-2, HF Llama family, LitGPT)."""


@dataclass
class Decoder:
    """A transformer found in a module: the module to call and its blocks (a decoder's, or an encoder's and a
    decoder's).

    Attributes:
        model: the module called with token ids ``(B, T)`` (and whose forward brackets a training forward).
        blocks: its blocks, in order (an encoder's, then a decoder's).
        blocks_path: where the blocks are (one of :data:`BLOCK_PATHS`, or the stacks' paths joined by ``", "``).
        max_length: the longest sequence it accepts (LitGPT ``max_seq_length``, else ``config`` attributes
            :data:`MAX_LENGTH_ATTRIBUTES`), ``None`` if it tells none.
        call_kwargs: keyword arguments of every call (``use_cache=False`` where the forward takes it, so no
            KV cache is built and the blocks can be called again with the arguments they received).
    """

    model: nn.Module
    blocks: list[nn.Module]
    blocks_path: str
    max_length: Optional[int]
    call_kwargs: dict[str, Any] = field(default_factory=dict)
    n_stacks: int = 1
    """How many stacks of blocks (2 for an encoder-decoder)."""
    takes_ids: bool = True
    """Whether the model's forward takes token ids (not so a vision or speech encoder's)."""

    def __call__(self, input_ids: Tensor) -> Any:
        if not self.takes_ids:
            raise ValueError(
                f"{type(self.model).__name__}'s forward takes no token ids, so no second forward can be run on them:"
                " read its attention logits in the training forward (MSign(max_attn_logit=...,"
                " logits_from='training_forward'), the default)"
            )
        # `_call_impl`, not `__call__`: runs the module's hooks (FSDP2's included) but never a
        # torch.compile-d version (`nn.Module.compile`), which hooks would force to recompile.
        return self.model._call_impl(input_ids, **self.call_kwargs)

    def attentions(self, index: int) -> tuple[nn.Module, ...]:
        """The attention modules whose logits count for block ``index`` (:func:`block_attention_modules`)."""
        return block_attention_modules(self.blocks[index])


def block_attention_modules(block: nn.Module) -> tuple[nn.Module, ...]:
    """The attention modules of ``block``: what its model family names (self- and cross-attention), else
    :func:`attention_module` (empty when there is none)."""
    from lightning_msign.families import block_attentions

    found = block_attentions(block)
    if found is not None:
        return found
    attn = attention_module(block)
    return () if attn is None else (attn,)


def _blocks_at(module: nn.Module) -> Optional[tuple[str, list[nn.Module]]]:
    for path in BLOCK_PATHS:
        obj: Any = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return path, list(obj)
    return None


def max_length(model: nn.Module) -> Optional[int]:
    """The longest sequence ``model`` accepts, as it states it, or ``None``."""
    candidates = [getattr(model, "max_seq_length", None)]  # LitGPT GPT (settable; default config.block_size)
    config = getattr(model, "config", None)
    candidates += [getattr(config, name, None) for name in MAX_LENGTH_ATTRIBUTES]
    for value in candidates:
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def find_decoder(module: nn.Module, model_attr: Optional[str] = None) -> Decoder:
    """The decoder in ``module``: ``module.<model_attr>``, or the first submodule with blocks at :data:`BLOCK_PATHS`.

    Wrappers (``torch.compile``, DDP, Fabric) around the decoder are looked through.

    Raises:
        ValueError: ``model_attr`` does not exist or does not lead to such a module, or none is found.
    """
    paths = " or ".join(f"`{p}`" for p in BLOCK_PATHS)
    stacked = _family_stacks(module, model_attr)
    if stacked is not None:
        return stacked
    if model_attr is not None:
        model: Any = module
        for part in model_attr.split("."):
            if not hasattr(model, part):
                raise ValueError(
                    f"`model_attr` must lead from {type(module).__name__} to the model, got {model_attr!r}:"
                    f" {type(model).__name__} has no attribute {part!r}"
                )
            model = getattr(model, part)
        found = _blocks_at(model) if isinstance(model, nn.Module) else None
        if found is None:
            raise ValueError(
                f"`model_attr` must name a transformer (holding a stack of blocks a model family names, or a non-empty"
                f" ModuleList of blocks at {paths}), got {model_attr!r}, a {type(model).__name__}"
            )
    else:
        model, found = next(((m, f) for m in module.modules() if (f := _blocks_at(m)) is not None), (None, None))
        if model is None or found is None:
            raise ValueError(
                f"Diagnostics needs a transformer (a stack of blocks a model family names, see"
                f" lightning_msign.families, or a non-empty ModuleList of blocks at {paths}) in"
                f" {type(module).__name__}, found none: pass `model_attr`, or register the family"
                " (Family.stack, Family.block_attentions)"
            )
    path, blocks = found
    return _decoder(model, blocks, path, 1)


def _decoder(model: nn.Module, blocks: list[nn.Module], path: str, n_stacks: int) -> Decoder:
    model = unwrap_module(model)  # a torch.compile wrapper forwards attributes: call the module inside it
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
        parameters = {}  # type: ignore[assignment]
    takes_cache = "use_cache" in parameters
    takes_ids = not _is_transformers_model(model) or "input_ids" in parameters
    return Decoder(model, blocks, path, max_length(model), {"use_cache": False} if takes_cache else {}, n_stacks,
                   takes_ids)


def _is_transformers_model(module: nn.Module) -> bool:
    return any(c.__name__ == "PreTrainedModel" and c.__module__.startswith("transformers.")
               for c in type(module).__mro__)


def _family_stacks(module: nn.Module, model_attr: Optional[str]) -> Optional[Decoder]:
    """The stacks of blocks model families name in ``module`` (or ``module.<model_attr>``), as one :class:`Decoder`:
    the model is the outermost Hugging Face model holding them all (its forward runs them all; its output has the
    logits), else the innermost module that does."""
    from lightning_msign.families import block_stack

    root: Any = module
    for part in (model_attr.split(".") if model_attr else []):
        root = getattr(root, part, None)
    if not isinstance(root, nn.Module):
        return None
    root = unwrap_module(root)
    named = list(root.named_modules())
    stacks = [(name, stack) for name, m in named if (stack := block_stack(m)) is not None and len(stack) > 0]
    if not stacks:
        return None
    owners = [(name, m) for name, m in named
              if all(name == "" or s.startswith(name + ".") for s, _ in stacks)]  # outermost first
    model_name, model = next(((n, m) for n, m in owners if _is_transformers_model(m)), owners[-1])
    prefix = f"{model_name}." if model_name else ""
    names = {id(m): n for n, m in named}
    path = ", ".join(names.get(id(stack), n)[len(prefix):] for n, stack in stacks)
    blocks = [block for _, stack in stacks for block in stack]
    return _decoder(model, blocks, path, len(stacks))


def has_no_lm_head(model: nn.Module) -> bool:
    """Whether ``model`` says it has no output embeddings (an HF base model such as ``GPT2Model``)."""
    get = getattr(model, "get_output_embeddings", None)
    return callable(get) and get() is None


def output_logits(output: Any) -> Tensor:
    """The logits in a model's output: a tensor, its ``.logits`` (HF ``ModelOutput``), or a dict's
    ``"logits"`` / a dict's or tuple's first tensor.

    Raises:
        TypeError: none of these is a tensor.
    """
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        values = [output["logits"]] if isinstance(output.get("logits"), Tensor) else list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    else:
        values = []
    first = next((v for v in values if isinstance(v, Tensor)), None)
    if first is None:
        raise TypeError(
            "The model must return its logits: a tensor, an object with a `.logits` tensor, or a dict or tuple"
            f" holding tensors, got {type(output).__name__}; pass output_logits=False"
        )
    return first


def block_output(output: Any) -> Tensor:
    """The hidden state a block returns: the output itself, or the first element of a tuple (HF GPT-2).

    Raises:
        TypeError: neither is a tensor.
    """
    if isinstance(output, (tuple, list)) and len(output) > 0:
        output = output[0]
    if not isinstance(output, Tensor):
        raise TypeError(f"A block must return its hidden state (a tensor or a tuple starting with one), got"
                        f" {type(output).__name__}")
    return output


def attention_module(block: nn.Module) -> Optional[nn.Module]:
    """A block's self-attention: ``block.attn`` (LitGPT, GPT-2), ``block.self_attn`` (Llama family) or
    ``block.attention`` (GPT-NeoX). Its class then decides whether its logits can be read."""
    for name in ("attn", "self_attn", "attention"):
        attn = getattr(block, name, None)
        if isinstance(attn, nn.Module):
            return attn
    return None


def argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    """Argument ``name`` of a call, passed at position ``index`` or by keyword."""
    return args[index] if len(args) > index else kwargs.get(name)


def to_compute(x: Tensor) -> Tensor:
    """Float32 (float64 stays float64): the dtype the logits are computed in."""
    return x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)


class AttentionProbe:
    r"""Forward hooks on one attention module that rebuild its queries and keys and keep :math:`\max |s|`.

    A subclass names the submodules whose outputs it needs (:meth:`sources`), what it reads from the
    attention's own arguments (:meth:`read_inputs`), and how ``q``/``k`` follow (:meth:`query_key`), with
    :attr:`scale` and :attr:`window`. When the attention returns, :func:`attention_logit_max` reduces and
    the tensors are dropped (unless ``keep``), so one layer's logits are held at a time.

    Args:
        attn: the attention module.
        keep: keep the last ``q`` (``(B, n_head, T, hs)``), ``k`` (``(B, n_groups, T, hs)``) and the pairs that
            counted (a boolean mask broadcastable to ``(B, 1, T, S)``) in :attr:`query`, :attr:`key` and
            :attr:`allowed` (for tests and for inspecting the logits).

    Attributes:
        value: the last call's :math:`\max |s|` (0-dim tensor), ``None`` before one.
    """

    def __init__(self, attn: nn.Module, keep: bool = False) -> None:
        self.attn = attn
        self.keep = keep
        self.value: Optional[Tensor] = None
        self.query: Optional[Tensor] = None
        self.key: Optional[Tensor] = None
        self.allowed: Optional[Tensor] = None
        self.batch_size: Optional[int] = None
        self.seq_len: Optional[int] = None
        self.scratch: Optional[LogitScratch] = None
        self._seen: dict[str, Any] = {}

    def limit(
        self, batch_size: Optional[int], seq_len: Optional[int], scratch: Optional[LogitScratch] = None
    ) -> AttentionProbe:
        """Reduce over the first ``batch_size`` sequences and their first ``seq_len`` tokens only (``None``: all),
        as when reading the training forward, whose batch is not cut: the maximum is then over the (query, key) pairs
        among those tokens (under causal attention exactly the logits a forward of the cut sequences would form).
        ``scratch``: the memory to form the logits in, shared by the probes of one reader. Returns the probe."""
        self.batch_size, self.seq_len, self.scratch = batch_size, seq_len, scratch
        return self

    # ------------------------------------------------------------------------------- subclass API
    @property
    def scale(self) -> float:
        """The factor of ``q @ k.mT`` in the logits."""
        raise NotImplementedError

    @property
    def window(self) -> Optional[int]:
        """The sliding window (tokens), or ``None`` for full causal attention."""
        return None

    def sources(self) -> dict[str, nn.Module]:
        """Submodules whose outputs :meth:`query_key` reads, by key."""
        raise NotImplementedError

    def read_inputs(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """What :meth:`query_key` reads from the attention's own arguments."""
        return {}

    def query_key(self, seen: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Queries ``(B, n_head, T, hs)`` and keys ``(B, n_groups, T, hs)``, float32 (float64 stays)."""
        raise NotImplementedError

    # ---------------------------------------------------------------------------------------- hooks
    def attach(self) -> list[RemovableHandle]:
        """Register the hooks; the caller removes the returned handles."""
        handles = [self.attn.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for key, module in self.sources().items():
            handles.append(module.register_forward_hook(partial(self._store, key)))
        handles.append(self.attn.register_forward_hook(self._post))
        return handles

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._seen = self.read_inputs(args, kwargs)

    def _store(self, key: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._seen[key] = output

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        seen, self._seen = self._seen, {}
        with torch.no_grad(), torch.autocast(self._device_type(), enabled=False):
            q, k = self.query_key(seen)
            self.record(q, k, self.scale, window=self.window)

    def _device_type(self) -> str:
        param = next(self.attn.parameters(), None)
        return "cpu" if param is None else param.device.type

    def record(
        self, q: Tensor, k: Tensor, scale: float, window: Optional[int] = None, allowed: Optional[Tensor] = None
    ) -> None:
        """Keep the largest ``|logit|`` of queries ``(B, n_head, T, hs)`` and keys ``(B, n_groups, T, hs)`` (cut to the
        probe's :meth:`limit`; ``allowed``, a boolean mask broadcastable to ``(B, 1, T, S)``, is cut alike)."""
        b, n = self.batch_size, self.seq_len
        q, k = to_compute(q.detach()[:b, :, :n]), to_compute(k.detach()[:b, :, :n])
        if allowed is not None:
            allowed = allowed[:b] if allowed.ndim == 4 else allowed
            allowed = allowed[..., :n, :n]
        self.value = attention_logit_max(q, k, scale, window=window, allowed=allowed, scratch=self.scratch)
        if self.keep:
            self.query, self.key = q, k
            self.allowed = causal_allowed(q.shape[2], window, q.device) if allowed is None else allowed


def allowed_from_mask(mask: Any, n_keys: int) -> Optional[Tensor]:
    """The (query, key) pairs a 4-D attention mask lets through, ``(B or 1, 1, T, n_keys)`` boolean (a float mask's
    entries above half its dtype's minimum); ``None`` when ``mask`` is no 4-D tensor (the kernel is then causal)."""
    if not isinstance(mask, Tensor) or mask.ndim != 4:
        return None
    mask = mask[:, :, :, :n_keys].detach()
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


class MaskedAttentionProbe(AttentionProbe):
    """An :class:`AttentionProbe` whose pairs are those of the 4-D ``attention_mask`` the attention is passed (what
    :meth:`read_inputs` puts under ``"mask"``), or, when it is passed none, the causal pairs (:meth:`causal`) or all
    pairs: for attentions that receive the model's mask, which then holds any sliding window and padding."""

    def causal(self, seen: dict[str, Any]) -> bool:
        """Whether the attention is causal when it is passed no mask (what its kernel then does)."""
        return True

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        seen, self._seen = self._seen, {}
        with torch.no_grad(), torch.autocast(self._device_type(), enabled=False):
            q, k = self.query_key(seen)
            allowed = allowed_from_mask(seen.get("mask"), k.shape[2])
            if allowed is None and not self.causal(seen):
                allowed = torch.ones(1, 1, q.shape[2], k.shape[2], dtype=torch.bool, device=q.device)
            self.record(q, k, self.scale, allowed=allowed)


def attention_probe(attn: Optional[nn.Module], keep: bool = False) -> Optional[AttentionProbe]:
    """A probe for ``attn`` from the registered model family that rebuilds its logits
    (:func:`lightning_msign.families.attention_probe`), else ``None``."""
    from lightning_msign.families import attention_probe as family_probe

    return family_probe(attn, keep=keep)


def supported_attention() -> tuple[str, ...]:
    """The attention classes whose logits a registered model family rebuilds."""
    from lightning_msign.families import supported_attention as supported

    return supported()
