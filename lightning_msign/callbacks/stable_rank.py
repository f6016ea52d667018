"""StableRankMonitor: the Lightning adapter of :class:`~lightning_msign.guards.stable_rank.StableRank`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers
from lightning_msign.guards.stable_rank import StableRank


class StableRankMonitor(GuardCallback):
    r"""Log the stable rank of weight matrices every ``every_n_steps`` optimizer steps.

    The stable rank :math:`\|W\|_F^2 / \|W\|_2^2` of attention projections collapsing towards one is the
    precursor MSign (arXiv 2602.01734) repairs. The measurement, the arguments and the metrics are those
    of :class:`~lightning_msign.StableRank` (read its docstring): matrix by matrix (fused blocks
    separately), the minimum and mean, and the total gradient norm (read in ``on_before_optimizer_step``:
    after accumulation and AMP unscaling, before clipping). Stable ranks are read after the optimizer
    step; put this callback after :class:`~lightning_msign.MSignCallback` to see the restored values.
    Values go straight to the Trainer's loggers, whatever ``log_every_n_steps`` is, at the step index of
    that batch's ``train/loss``.

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, for targets that match no matrix.
        NotImplementedError: at ``setup``, for DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import StableRankMonitor

        trainer = Trainer(callbacks=[StableRankMonitor(targets="attention", every_n_steps=10)])
    """

    guard_class = StableRank
    guard: StableRank
    _warn_without_logger = True  # a monitor that only logs

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(targets=g.targets, every_n_steps=g.every_n_steps, mode=g.mode)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        log_to_loggers(trainer, self.guard.grad_norm(trainer.global_step + 1), step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = self.guard.step(trainer.global_step)
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step - 1)
