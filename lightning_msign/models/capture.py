"""Attention logits of the training forward itself: no second forward pass.

:class:`ForwardLogits` puts a forward pre-hook and a forward hook on a decoder. When the decoder runs in training
mode with gradients enabled and its owner asks for the step about to be taken (``wanted()``), the pre-hook attaches
each block's :class:`~lightning_msign.models.AttentionProbe` (limited to the first ``batch_size`` sequences and
``seq_len`` tokens) and the hook removes the probes when the forward returns. Each probe reduces its layer's
largest logit under ``torch.no_grad()`` from tensors the forward computes anyway; the forward's values, its autograd
graph and the random numbers it draws are untouched. Forwards in eval mode or without gradients (validation,
generation, a second probe forward) are never read, and the blocks recomputed by activation checkpointing during the
backward pass are not either (the probes are gone by then).

Under gradient accumulation every micro-batch of the step is read and each layer keeps its maximum over them. A
decoder block with cross-attention (an encoder-decoder) takes the larger of its two attentions' maxima.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msign import metric_keys as keys
from lightning_msign.functional.attention import LogitScratch
from lightning_msign.models.base import AttentionProbe, Decoder, attention_probe

__all__ = ["ForwardLogits"]


class ForwardLogits:
    """Per-layer attention-logit maxima read from a decoder's own training forward passes.

    Args:
        decoder: the decoder (:func:`~lightning_msign.models.find_decoder`); every block's attention must have a
            probe (:func:`~lightning_msign.models.attention_probe`).
        wanted: called before each training forward: the optimizer step (1-based) the forward belongs to when it is
            to be read, else ``None``.
        batch_size: sequences of the batch read (the first ones; ``None``: all).
        seq_len: tokens per sequence read (the first ones; ``None``: all).

    Raises:
        ValueError: a block's attention has no probe.
    """

    def __init__(
        self,
        decoder: Decoder,
        wanted: Callable[[], Optional[int]],
        batch_size: Optional[int] = None,
        seq_len: Optional[int] = None,
    ) -> None:
        self.decoder = decoder
        self.wanted = wanted
        scratch = LogitScratch()  # one layer's logits at a time, in the same memory for every layer
        probes: list[tuple[int, AttentionProbe]] = []  # (block index, probe): a decoder block's cross-attention too
        for i in range(len(decoder.blocks)):
            attns = decoder.attentions(i)
            if not attns:
                raise ValueError(f"Block {i} of `{decoder.blocks_path}` has no attention module")
            for attn in attns:
                probe = attention_probe(attn)
                if probe is None:
                    raise ValueError(f"The attention {type(attn).__name__} of block {i} of `{decoder.blocks_path}` has"
                                     " no logit probe")
                probes.append((i, probe.limit(batch_size, seq_len, scratch)))
        self.probes = probes
        self._step: Optional[int] = None
        self._values: list[Optional[Tensor]] = [None] * len(decoder.blocks)
        self._attached: list[Any] = []
        self._hooks: list[RemovableHandle] = [
            decoder.model.register_forward_pre_hook(self._pre),
            decoder.model.register_forward_hook(self._post),
        ]

    def remove(self) -> None:
        """Remove the hooks from the decoder."""
        self._detach_probes()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def read(self, step: int) -> Optional[list[Optional[float]]]:
        """Each layer's maximum over the forwards read for optimizer step ``step`` (``None`` for a layer that did
        not run, such as a block held inactive by a warm-up), or ``None`` when no forward of that step was read."""
        if self._step != step:
            return None
        return [None if v is None else float(v) for v in self._values]

    # ------------------------------------------------------------------------------------------ hooks
    def _pre(self, module: nn.Module, args: tuple) -> None:
        if self._attached or not (module.training and torch.is_grad_enabled()):
            return
        step = self.wanted()
        if step is None:
            return
        if step != self._step:
            self._step, self._values = step, [None] * len(self._values)
        for _, probe in self.probes:
            probe.value = None
            self._attached.extend(probe.attach())

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._attached:
            return
        self._detach_probes()
        for i, probe in self.probes:
            value, probe.value = probe.value, None
            if value is not None:
                previous = self._values[i]
                self._values[i] = value if previous is None else torch.maximum(previous, value)

    def _detach_probes(self) -> None:
        attached, self._attached = self._attached, []
        for handle in attached:
            handle.remove()


class LayerLogits:
    """Each layer's largest attention logit for a guard's check step: the step's training forward as
    :class:`ForwardLogits` read it, else a second forward of the step's token ids.

    Args:
        probe: a :class:`~lightning_msign.Diagnostics` computing attention logits (attached), for the second forward.
        forward: the training-forward reading, or ``None`` (always a second forward).
        owner: how messages name the guard (``"MSign(max_attn_logit=...)"``).
        hint: appended to the one warning given when a check step's training forward was not seen.
    """

    def __init__(self, probe: Any, forward: Optional[ForwardLogits], owner: str, hint: str = "") -> None:
        self.probe, self.forward, self.owner, self.hint = probe, forward, owner, hint
        self._warned = False

    def read(self, step: int, input_ids: Optional[Tensor]) -> list[float]:
        """One value per block (NaN for a block that did not run) for optimizer step ``step``."""
        n_layers = len(self.probe.decoder.blocks)
        read = None if self.forward is None else self.forward.read(step)
        if read is not None:
            return [math.nan if v is None else v for v in read]
        if input_ids is None:
            raise ValueError(
                f"{self.owner} saw no training forward of optimizer step {step} through the attached module (in"
                " training mode, with gradients) and has no token ids for a second forward: call"
                " step(step, input_ids=ids), or run the forward through the module the guard is attached to"
            )
        if self.forward is not None and not self._warned:
            self._warned = True
            warnings.warn(
                f"{self.owner} saw no training forward of optimizer step {step} through the attached module (in"
                " training mode, with gradients): the logits of such steps are read on a second forward of"
                f" `input_ids` after the step (a forward pass more).{self.hint}",
                stacklevel=4,
            )
        values = self.probe.compute(input_ids)
        return [values.get(f"{keys.DIAG_ATTN_LOGIT_MAX_PREFIX}{i}", math.nan) for i in range(n_layers)]

    def remove(self) -> None:
        """Remove the training-forward hooks."""
        if self.forward is not None:
            self.forward.remove()
