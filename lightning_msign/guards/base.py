"""What every guard shares: the module it is attached to, once-per-optimizer-step gating, state, timing."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from lightning_msign._validation import check_bool
from lightning_msign.distributed import WholeMatrixPlan, is_distributed
from lightning_msign.fsdp1 import FSDP1Units, fsdp1_units
from lightning_msign.guards.signals import step_signals
from lightning_msign.layouts import validate_layouts
from lightning_msign.targets import (
    LayoutsArg,
    TargetMatrix,
    TargetsArg,
    resolve_targets,
    unwrap_module,
    validate_targets,
)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings of accelerator work are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


StepCall = Callable[[], dict[str, float]]


class GuardHooks:
    """The optimizer hooks :meth:`Guard.hook_optimizer` registered.

    Attributes:
        metrics: what the guard returned for the last optimizer step (before and after it), ``{}`` on most steps.
    """

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}
        self._handles: list[Any] = []

    def remove(self) -> None:
        """Unregister both hooks: the optimizer steps on without the guard."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class Guard:
    """Base of the loop-agnostic guards: attached to a module, acting at most once per optimizer step.

    A guard is built with its configuration (``module`` optional), attached to the model with
    :meth:`attach` (or by passing ``module``), and driven by the training loop: a plain PyTorch loop, a
    Fabric loop, or a Lightning callback (:mod:`lightning_msign.callbacks` are thin adapters over the
    guards). Steps are *optimizer* steps: pass ``step`` (the count of optimizer steps taken, e.g.
    ``trainer.global_step``) or let the guard count calls; a call with a step it has already seen does
    nothing, so gradient accumulation and resume are handled. :meth:`state_dict` holds plain values.

    Under ``torch.distributed`` (DDP, FSDP2, FSDP1) every process must make the same calls: whole matrices
    are computed on one process each and shared (:mod:`lightning_msign.distributed`); under FSDP1 one unit
    is gathered at a time (:mod:`lightning_msign.fsdp1`).
    """

    def __init__(self) -> None:
        self._module: Optional[nn.Module] = None
        self._distributed = False
        self._last_step = 0
        self._fsdp1: Optional[FSDP1Units] = None

    #: why :meth:`hook_optimizer` cannot drive this guard (its calls need what an optimizer step does not have)
    _no_optimizer_hooks: ClassVar[str] = "it needs the loop's own calls"

    def _optimizer_calls(self) -> tuple[Optional[StepCall], Optional[StepCall]]:
        """What to call before and after each optimizer step when :meth:`hook_optimizer` drives the guard."""
        return None, None

    def hook_optimizer(self, optimizer: torch.optim.Optimizer) -> GuardHooks:
        """Drive the guard from ``optimizer.step()`` itself, for loops without callbacks (torchtitan, OLMo-core, a
        custom loop): a step pre-hook makes the calls due before the update, a post-hook those due after it, the guard
        counting the steps (one optimizer step = one guard step; gradient accumulation is the loop's, before the
        step). Attach the guard first. The pre-hook runs inside ``optimizer.step()``, so *after* any gradient clipping
        the loop did before it: a guard reading the gradient norm there (PSS, MSign's ``max_grad_ratio``,
        StableRank's ``grad_norm``) reads the clipped norm; call ``before_optimizer_step`` / ``grad_norm`` yourself
        before clipping where that matters.

        Returns:
            The hooks; their ``metrics`` hold what the guard returned for the last step (for the loop's logger).

        Raises:
            NotImplementedError: for a guard whose calls need what the optimizer step does not give (the loss, token
                ids, a closure), naming what.
        """
        before, after = self._optimizer_calls()
        if before is None and after is None:
            raise NotImplementedError(
                f"{type(self).__name__} cannot be driven by optimizer hooks: {self._no_optimizer_hooks}"
            )
        self._require_module("hook_optimizer")
        hooks = GuardHooks()

        def pre(opt: Any, args: Any, kwargs: Any) -> None:
            hooks.metrics = dict(before()) if before is not None else {}

        def post(opt: Any, args: Any, kwargs: Any) -> None:
            if after is not None:
                hooks.metrics.update(after())

        hooks._handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]
        return hooks

    # -------------------------------------------------------------------------------------- attaching
    def attach(self, module: nn.Module, distributed: Optional[bool] = None) -> "Guard":
        """Attach to ``module`` (wrappers of Fabric, ``torch.compile`` and DDP are looked through).

        Args:
            module: the model whose weights the guard reads and writes. Under FSDP1 pass the FSDP root (in
                Lightning ``trainer.strategy.model``, which the callbacks pass), or a module holding its units.
            distributed: whether the run has several processes; default: ``torch.distributed`` is
                initialised with more than one.

        Returns:
            The guard itself.

        Raises:
            ValueError: ``module`` holds parameters sharded by an FSDP1 unit it does not contain.
            NotImplementedError: an FSDP1 unit with ``use_orig_params=False`` or parameter offloading.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
        return self.attach_unwrapped(unwrap_module(module), distributed, fsdp1_units(module))

    def attach_unwrapped(
        self, module: nn.Module, distributed: Optional[bool], fsdp1: Optional[FSDP1Units]
    ) -> "Guard":
        """Attach to a module :func:`~lightning_msign.targets.unwrap_module` already unwrapped, whose FSDP1 units
        (:func:`~lightning_msign.fsdp1.fsdp1_units`) are known: how a guard attaches the helpers it owns (MSign's
        logit probe, Rollback's MSign) to the module it was attached to itself. Returns the guard."""
        self._fsdp1 = fsdp1
        self._module = module
        self._distributed = is_distributed() if distributed is None else bool(distributed)
        step_signals(module).reset()
        self._on_attach(self._module)
        return self

    def _on_attach(self, module: nn.Module) -> None:
        """Subclasses resolve what they act on here."""

    @property
    def fsdp1(self) -> Optional[FSDP1Units]:
        """The FSDP1 units of the attached model (``None`` when it has none)."""
        return self._fsdp1

    def _grad_norm(self, module: nn.Module, step: int) -> Optional[torch.Tensor]:
        """The global gradient norm of ``module`` before optimizer step ``step``, computed once for every guard
        attached to it (:mod:`lightning_msign.guards.signals`; every process must call it: a collective when
        distributed)."""
        return step_signals(module).grad_norm(module, step, units=self._fsdp1)

    @property
    def module(self) -> Optional[nn.Module]:
        """The (unwrapped) module the guard is attached to, or ``None``."""
        return self._module

    def _require_module(self, method: str) -> nn.Module:
        if self._module is None:
            raise RuntimeError(
                f"{type(self).__name__}.{method}() needs a module: pass it to the constructor or call attach(module)"
                " first (a Lightning callback attaches at the Trainer's setup)"
            )
        return self._module

    # ---------------------------------------------------------------------------------------- gating
    @property
    def last_step(self) -> int:
        """The last optimizer step the guard has seen (restored on resume)."""
        return self._last_step

    def _advance(self, step: Optional[int]) -> Optional[int]:
        """The new step number, or ``None`` when ``step`` was already seen (another micro-batch of it)."""
        step = self._last_step + 1 if step is None else int(step)
        if step <= self._last_step:
            return None
        self._last_step = step
        return step

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state for checkpoints (exact resume)."""
        return {"last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; missing keys keep their defaults (older checkpoints load)."""
        self._last_step = int(state_dict.get("last_step", 0))
        if self._module is not None:
            step_signals(self._module).reset()

    # ---------------------------------------------------------------------------------------- timing
    @contextmanager
    def _timed(self, device: torch.device) -> Iterator[list[float]]:
        """Measure the wall time of the block, accelerator work included; yields ``[milliseconds]``."""
        out = [0.0]
        synchronize(device)
        start = time.perf_counter()
        yield out
        synchronize(device)
        out[0] = (time.perf_counter() - start) * 1e3


class TargetedGuard(Guard):
    """A guard acting on selected weight matrices (see :mod:`lightning_msign.targets`)."""

    def __init__(self, targets: TargetsArg, split_qkv: bool, layouts: LayoutsArg) -> None:
        super().__init__()
        self.split_qkv = check_bool(split_qkv, "split_qkv")
        self.targets = validate_targets(targets, split_qkv)
        validate_layouts(layouts)
        self.layouts = dict(layouts) if layouts else None
        self._matrices: list[TargetMatrix] = []
        self._plan: Optional[WholeMatrixPlan] = None

    def _on_attach(self, module: nn.Module) -> None:
        self._matrices = resolve_targets(
            module, self.targets, split_qkv=self.split_qkv, layouts=self.layouts, units=self._fsdp1
        )
        self._plan = WholeMatrixPlan(self._matrices, distributed=self._distributed, units=self._fsdp1)

    @property
    def matrices(self) -> list[TargetMatrix]:
        """The target matrices (known once attached)."""
        return list(self._matrices)

    @property
    def target_names(self) -> list[str]:
        """Names of the target matrices (known once attached)."""
        return [t.name for t in self._matrices]

    @property
    def plan(self) -> WholeMatrixPlan:
        """Who computes which matrix (:class:`~lightning_msign.distributed.WholeMatrixPlan`)."""
        if self._plan is None:
            raise RuntimeError(
                f"{type(self).__name__}.plan needs a module: pass it to the constructor or call attach(module) first"
            )
        return self._plan

    def _device(self) -> torch.device:
        return self._matrices[0].param.device if self._matrices else torch.device("cpu")
