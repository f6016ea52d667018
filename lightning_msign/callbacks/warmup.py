"""DepthWarmupCallback: the Lightning adapter of :class:`~lightning_msign.guards.warmup.DepthWarmup`."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_msign.callbacks.base import (
    GuardCallback,
    log_to_loggers,
    require_stability_ratio_source,
    require_unused_parameter_detection,
)
from lightning_msign.guards.warmup import DepthWarmup


class DepthWarmupCallback(GuardCallback):
    r"""Start training with part of the transformer's blocks and unlock the rest in groups (arXiv 2606.16768).

    The math, the arguments and the metrics are those of :class:`~lightning_msign.guards.warmup.DepthWarmup`
    (read its docstring): inactive blocks compute the exact identity and get no update; each group is
    unlocked with zeroed output projections, so the model's output does not change at the unlock and the
    new blocks train from the next step.

    Hooks: the guard is attached at ``setup`` and ``on_fit_start`` (the identity forward is on the
    inactive blocks before the first forward); ``on_before_optimizer_step`` drops the inactive blocks'
    gradients (no update, no weight decay, no Adam state); ``on_train_batch_end`` advances the schedule
    once per optimizer step (``trainer.global_step``: right under gradient accumulation and on resume) and
    writes the metrics to the Trainer's loggers at the step index of that batch's ``train/loss``.

    ``start_step=None`` unlocks the first group at the end of the learning-rate warm-up: the
    LightningModule's int attribute ``warmup_steps`` (:class:`~lightning_msign.LitGPTModule` has it).
    With ``curvature_margin``, the stability ratio is the ``guard.latest_stability_ratio`` of the curvature
    monitor among the Trainer's callbacks (the latest measurement; under DDP rank zero's value decides).

    Strategies: single device; DDP only with ``find_unused_parameters=True``
    (``strategy="ddp_find_unused_parameters_true"``), since the inactive blocks' parameters are unused.
    ``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy`` (FSDP1) are refused: the warm-up has not been tested
    under them. DeepSpeed is refused as by every callback of the package.

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, when ``start_step`` is None and the
            module has no int ``warmup_steps``, when ``curvature_margin`` is set and no curvature monitor is
            among the callbacks, or when the model cannot be handled (see
            :class:`~lightning_msign.guards.warmup.DepthWarmup`); at ``on_fit_start``, under DDP without
            ``find_unused_parameters=True`` (read off the wrapped module).
        NotImplementedError: at ``setup``, for ``ModelParallelStrategy`` (FSDP2), FSDP1 and DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import DepthWarmupCallback

        trainer = Trainer(callbacks=[DepthWarmupCallback(start_fraction=0.5, groups=4, interval=500)])
    """

    guard_class = DepthWarmup
    _state_name = "ArchitectureWarmup"  # its earlier name: checkpoints written under it resume
    guard: DepthWarmup

    def __init__(self, guard: DepthWarmup) -> None:
        super().__init__(guard)
        self._start_from_module = guard.start_step is None  # read from the module's `warmup_steps` at setup
        self._source: Optional[Callback] = None

    @property
    def active_blocks(self) -> tuple[int, ...]:
        """Indices of the blocks that run in the forward now (the guard's :attr:`DepthWarmup.active_blocks`)."""
        return self.guard.active_blocks

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(
            start_fraction=g.start_fraction, groups=g.groups, interval=g.interval, order=g.order
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        if self._start_from_module:
            warmup_steps = getattr(pl_module, "warmup_steps", None)
            if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
                raise ValueError(
                    f"DepthWarmupCallback(start_step=None) unlocks at the end of the LR warm-up, read from the"
                    f" module's int attribute `warmup_steps`, but {type(pl_module).__name__} has"
                    f" warmup_steps={warmup_steps!r}: pass `start_step`"
                )
            self.guard.start_step = warmup_steps
        if self.guard.curvature_margin is not None:
            self._source = require_stability_ratio_source(
                trainer, "DepthWarmupCallback", "curvature_margin", self.guard.curvature_margin
            )
        super().setup(trainer, pl_module, stage)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        names = {cls.__name__ for cls in type(strategy).__mro__}
        if "FSDPStrategy" in names:
            raise NotImplementedError(
                "DepthWarmupCallback does not support FSDPStrategy (FSDP1): skipping blocks whose parameters FSDP"
                " gathers in their forward has not been tested here. Use one device or DDP with"
                " strategy='ddp_find_unused_parameters_true'."
            )
        if "ModelParallelStrategy" in names:
            raise NotImplementedError(
                "DepthWarmupCallback does not support ModelParallelStrategy (FSDP2): skipping fully_shard-ed blocks"
                " has not been tested here. Use one device or DDP with"
                " strategy='ddp_find_unused_parameters_true'."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # DDP has wrapped the module by now: its own (public) flag says whether it tolerates parameters without a
        # gradient, whatever the strategy was given (a registry name, DDPStrategy(...) or a subclass)
        require_unused_parameter_detection(trainer, "DepthWarmupCallback", "the inactive blocks' parameters get no"
                                           " gradient")
        super().on_fit_start(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.guard.clear_inactive_grads()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        ratio = None
        if self._source is not None and step > self.guard.last_step and self.guard.unlock_due(step):
            ratio = self._source.guard.latest_stability_ratio  # type: ignore[attr-defined]
            if trainer.world_size > 1:  # one decision on every rank
                ratio = trainer.strategy.broadcast(ratio, src=0)
        metrics = self.guard.step(step, stability_ratio=ratio)
        if metrics:
            log_to_loggers(trainer, metrics, step=step - 1)
