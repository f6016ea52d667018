"""PSSCallback: the Lightning adapter of :class:`~lightning_msign.guards.pss.PSS`."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers
from lightning_msign.guards.pss import PSS


class PSSCallback(GuardCallback):
    r"""Smooth dominant singular values when the gradient norm spikes (PSS, arXiv 2602.01308).

    The detector, the protection, the arguments and the metrics are those of :class:`~lightning_msign.PSS`
    (read its docstring). The norm is read in ``on_before_optimizer_step``: after gradient accumulation,
    DDP synchronisation and AMP unscaling, before clipping; a protection happens there too, before the
    optimizer step. Metrics go straight to the Trainer's loggers at the step index of the batch's
    ``train/loss``. Under DDP, FSDP2 and FSDP1 the norm is global and the decision identical on every process.

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, for targets that match no matrix.
        NotImplementedError: at ``setup``, for DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import PSSCallback

        trainer = Trainer(gradient_clip_val=1.0, callbacks=[PSSCallback(tau=2.5, smoothing="softmax")])
    """

    guard_class = PSS
    guard: PSS

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(tau=g.tau, targets=g.targets, action=g.action)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        g = self.guard
        rank_zero_info(f"PSSCallback: watching {len(g.matrices)} matrices, tau={g.tau}, action={g.action!r}")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        triggers = self.guard.triggers
        metrics = self.guard.before_optimizer_step(trainer.global_step + 1)
        if self.guard.triggers > triggers:
            rank_zero_info(f"PSSCallback: trigger at optimizer step {trainer.global_step + 1}")
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step)
