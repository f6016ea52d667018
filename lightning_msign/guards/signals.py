"""The signals of an optimizer step that several guards read, computed once per step and model.

PSS, MSign's gradient-ratio trigger, Rollback and StableRank all read the global gradient norm before clipping, a
collective under DDP / FSDP. The guards attached to one module share one :class:`StepSignals`: the first guard to
ask for a step's norm computes it (every process, so the collective happens once), the others read it. Each guard
keeps its own statistics of it (an average, a z-score window), as its rule needs.

The reading is keyed by the optimizer step the guards are given; it is dropped when a guard is (re)attached or
loads a state, so a new fit or a resume never reads a norm of another run. Every process makes the same calls in
the same order, so the same reads hit on every process.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
from torch import nn

from lightning_msign.distributed import global_grad_norm
from lightning_msign.fsdp1 import FSDP1Units

__all__ = ["StepSignals", "step_signals"]


class StepSignals:
    """Per-step readings of one model shared by its guards.

    Attributes:
        computations: how many times the gradient norm was computed (not read from the step's reading).
    """

    def __init__(self) -> None:
        self._step: Optional[int] = None
        self._norm: Optional[torch.Tensor] = None
        self.computations = 0

    def grad_norm(self, module: nn.Module, step: int, units: Optional[FSDP1Units] = None) -> Optional[torch.Tensor]:
        """The global gradient norm of ``module`` for optimizer step ``step`` (1-based, the one about to be taken):
        computed at the step's first call (a collective when distributed), then read. ``None`` when no process has a
        gradient."""
        if self._step != step:
            self._norm = global_grad_norm(module.parameters(), units=units)
            self._step = step
            self.computations += 1
        return self._norm

    def reset(self) -> None:
        """Drop the reading (a new attach or a restored state: the next step's norm is computed afresh)."""
        self._step, self._norm = None, None


_SHARED: weakref.WeakKeyDictionary[nn.Module, StepSignals] = weakref.WeakKeyDictionary()


def step_signals(module: nn.Module) -> StepSignals:
    """The :class:`StepSignals` of ``module`` (the unwrapped module guards attach to), made at the first call."""
    signals = _SHARED.get(module)
    if signals is None:
        signals = _SHARED[module] = StepSignals()
    return signals
