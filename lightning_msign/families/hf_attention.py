"""Attention logits of Hugging Face families read where the model hands ``q`` and ``k`` to its attention kernel.

Most transformers families (4.57: GPT-NeoX, Gemma 2 / 3, Phi, OLMo, Cohere, Granite, Starcoder2, GPTBigCode, OPT,
DeepSeek-V3, SmolLM3, GLM-4, BART, Whisper, CLIP, SigLIP, ViT, ...) compute attention as ``attention_interface(self,
query, key, value, attention_mask, scaling=..., sliding_window=..., **kwargs)``: the module-level
``eager_attention_forward`` of their modeling module for ``attn_implementation="eager"``, else the function registered
under that name in transformers' ``ALL_ATTENTION_FUNCTIONS`` (SDPA, flex, flash, or one a user registered). The
queries and keys it receives are the final ones: after the projections, the per-head norms and RoPE, keys per key
group. :class:`InterfaceProbe` reads them there.

While a probe is attached, the eager function of the attention's modeling module and every entry of the
``ALL_ATTENTION_FUNCTIONS`` it calls are wrapped (through the mapping's own local overrides, which the model looks
up at each call): a wrapped function calls the original with the same arguments and returns its result, so the
forward is unchanged; for an attention module with an attached probe it first hands ``q`` and ``k`` to the probe.
``config._attn_implementation`` is left as it is (many families compare it with ``"eager"`` / ``"sdpa"``). The
wrappers are removed when the last probe is.

What the probe reduces (:func:`~lightning_msign.functional.attention_logit_max`): ``|scaling * q k^T|`` with the
``scaling`` passed to the kernel (``None``: ``head_dim ** -0.5``, what SDPA, flex and flash use), over the pairs the
mask passed to the kernel allows (a boolean mask, or a float mask's entries above half its dtype's minimum; without
one, causal pairs within the ``sliding_window`` passed, or all pairs when the module's ``is_causal`` is ``False``:
an encoder's, or a cross-attention's, whose queries and keys then differ in number).
Logits are read before any soft-capping (Gemma 2: ``softcap``), additive biases in a float mask are not part of
them. Only classes whose probabilities this reproduces are listed by their families (tests compare with the eager
attention's ``output_attentions``); an eager function without a ``scaling`` argument scales in its own way and is
refused.

No import of ``transformers`` here: a model's own modules are read from ``sys.modules``.
"""

from __future__ import annotations

import inspect
import sys
import threading
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from lightning_msign.families.base import qualified_name
from lightning_msign.models.base import AttentionProbe, allowed_from_mask

__all__ = ["InterfaceProbe", "hf_classes", "interface_probe", "uses_attention_interface"]

_EAGER = "eager_attention_forward"
_LOCK = threading.Lock()
_ACTIVE: dict[int, InterfaceProbe] = {}  # id(attention module) -> its attached probe
_INSTALLED: dict[tuple[int, str], tuple[Any, str, Any, bool, int]] = {}  # (id(owner), key) -> what to restore


def hf_classes(*pairs: tuple[str, str]) -> tuple[str, ...]:
    """Qualified names of transformers attention classes, from ``(model module, class name)`` pairs."""
    return tuple(f"transformers.models.{m}.modeling_{m}.{c}" for m, c in pairs)


def uses_attention_interface(attn: nn.Module) -> bool:
    """Whether ``attn``'s modeling module has an ``eager_attention_forward`` and an ``ALL_ATTENTION_FUNCTIONS``
    (the pattern of :mod:`this module <lightning_msign.families.hf_attention>`)."""
    modeling = sys.modules.get(type(attn).__module__)
    return callable(getattr(modeling, _EAGER, None)) and hasattr(getattr(modeling, "ALL_ATTENTION_FUNCTIONS", None),
                                                                 "_local_mapping")


def _takes(function: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):  # pragma: no cover - a builtin
        return False


def interface_probe(attn: nn.Module, classes: tuple[str, ...], keep: bool = False) -> Optional[InterfaceProbe]:
    """An :class:`InterfaceProbe` for ``attn`` when its exact class is one of ``classes`` (qualified names), its
    modeling module follows the pattern, and its eager function takes ``scaling``; else ``None``."""
    if qualified_name(attn) not in classes or not uses_attention_interface(attn):
        return None
    if not _takes(getattr(sys.modules[type(attn).__module__], _EAGER), "scaling"):
        return None
    return InterfaceProbe(attn, keep=keep)


class _Handle:
    def __init__(self, probe: InterfaceProbe) -> None:
        self.probe: Optional[InterfaceProbe] = probe

    def remove(self) -> None:
        if self.probe is not None:
            _detach(self.probe)
            self.probe = None


class InterfaceProbe(AttentionProbe):
    """The queries and keys an HF attention hands to its attention function (see the module docstring)."""

    def __init__(self, attn: nn.Module, keep: bool = False) -> None:
        super().__init__(attn, keep=keep)
        self._scale: Optional[float] = None
        self._window: Optional[int] = None

    @property
    def scale(self) -> float:
        """The scale of the last call (``scaling``, or ``head_dim ** -0.5``)."""
        if self._scale is None:
            raise RuntimeError("InterfaceProbe.scale is known once the attention has been called")
        return self._scale

    @property
    def window(self) -> Optional[int]:
        """The ``sliding_window`` of the last call (``None``: none passed)."""
        return self._window

    def attach(self) -> list[Any]:
        _attach(self)
        return [_Handle(self)]

    def read_call(self, signature: inspect.Signature, args: tuple, kwargs: dict) -> None:
        """Reduce the logits of one call of the attention function (its arguments bound to ``signature``)."""
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as error:
            raise RuntimeError(
                f"{type(self.attn).__name__} called its attention function with arguments that do not fit its"
                f" signature {signature}: {error}"
            ) from None
        named = {**bound.arguments, **bound.arguments.get("kwargs", {})}
        query, key, mask = named.get("query"), named.get("key"), named.get("attention_mask")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.ndim != 4 or key.ndim != 4:
            raise RuntimeError(f"{type(self.attn).__name__}'s attention function got no 4-D `query` and `key`")
        scaling = named.get("scaling")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        window = named.get("sliding_window")
        window = int(window) if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
        with torch.no_grad(), torch.autocast(query.device.type, enabled=False):
            allowed = allowed_from_mask(mask, key.shape[2])
            if allowed is not None:
                window = None  # the mask holds it
            else:
                causal = named.get("is_causal")
                causal = getattr(self.attn, "is_causal", True) if causal is None else bool(causal)
                if not causal:  # bidirectional or cross-attention: every pair
                    allowed = torch.ones(1, 1, query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
                    window = None
            if allowed is None and query.shape[2] != key.shape[2]:
                raise RuntimeError(
                    f"{type(self.attn).__name__} attends {query.shape[2]} queries causally to {key.shape[2]} keys (a KV"
                    " cache): attention logits are read on a forward of whole sequences without a cache"
                )
            self._scale, self._window = scale, window
            self.record(query, key, scale, window=window, allowed=allowed)


def _wrap(original: Callable) -> Callable:
    signature = inspect.signature(original)

    def attention(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        probe = _ACTIVE.get(id(module))
        if probe is not None and probe.attn is module:
            probe.read_call(signature, (module, *args), kwargs)
        return original(module, *args, **kwargs)

    attention.__wrapped__ = original  # type: ignore[attr-defined]
    attention._lightning_msign_wrapper = True  # type: ignore[attr-defined]
    return attention


def _install(owner: Any, key: str, get: Callable[[], Any], set_: Callable[[Any], None], had_local: bool,
             restore: Callable[[], None]) -> None:
    slot = (id(owner), key)
    if slot in _INSTALLED:
        entry = _INSTALLED[slot]
        _INSTALLED[slot] = (*entry[:4], entry[4] + 1)
        return
    original = get()
    if getattr(original, "_lightning_msign_wrapper", False):  # pragma: no cover - installed by another path
        return
    set_(_wrap(original))
    _INSTALLED[slot] = (owner, key, restore, had_local, 1)


def _slots(attn: nn.Module) -> list[tuple[Any, str]]:
    modeling = sys.modules[type(attn).__module__]
    interface = modeling.ALL_ATTENTION_FUNCTIONS
    return [(modeling, _EAGER)] + [(interface, key) for key in list(interface)]


def _attach(probe: InterfaceProbe) -> None:
    attn = probe.attn
    with _LOCK:
        if id(attn) in _ACTIVE and _ACTIVE[id(attn)] is not probe:
            raise RuntimeError(f"Another probe is attached to this {type(attn).__name__}: remove its handles first")
        _ACTIVE[id(attn)] = probe
        for owner, key in _slots(attn):
            if owner is sys.modules[type(attn).__module__] and key == _EAGER:
                original = getattr(owner, _EAGER)

                def restore(owner: Any = owner, original: Any = original) -> None:
                    setattr(owner, _EAGER, original)

                _install(owner, key, lambda o=owner: getattr(o, _EAGER), lambda f, o=owner: setattr(o, _EAGER, f),
                         False, restore)
            else:
                local = owner._local_mapping
                had = key in local
                previous = local.get(key)

                def restore(owner: Any = owner, key: str = key, had: bool = had, previous: Any = previous) -> None:
                    if had:
                        owner._local_mapping[key] = previous
                    else:
                        owner._local_mapping.pop(key, None)

                _install(owner, key, lambda o=owner, k=key: o[k], lambda f, o=owner, k=key: o.__setitem__(k, f),
                         had, restore)


def _detach(probe: InterfaceProbe) -> None:
    attn = probe.attn
    with _LOCK:
        if _ACTIVE.get(id(attn)) is probe:
            del _ACTIVE[id(attn)]
        for owner, key in _slots(attn):
            slot = (id(owner), key)
            entry = _INSTALLED.get(slot)
            if entry is None:
                continue
            if entry[4] > 1:
                _INSTALLED[slot] = (*entry[:4], entry[4] - 1)
            else:
                del _INSTALLED[slot]
                entry[2]()
