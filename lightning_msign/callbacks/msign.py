"""MSignCallback: the Lightning adapter of :class:`~lightning_msign.guards.msign.MSign`."""

from __future__ import annotations

from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers
from lightning_msign.guards.msign import MSign, MSignBackend


class MSignCallback(GuardCallback):
    r"""Restore the stable rank of target matrices every ``period`` optimizer steps (MSign, arXiv 2602.01734).

    The math, the arguments and the metrics are those of :class:`~lightning_msign.MSign` (read its
    docstring); this callback applies it after the optimizer steps ``period, 2 * period, ...``
    (``trainer.global_step``: once per optimizer step under gradient accumulation, right on resume) and
    writes its metrics straight to the Trainer's loggers at the step index of that batch's
    ``train/loss``. Under DDP and FSDP2 (``ModelParallelStrategy``) each whole matrix is signed on one
    process and shared; a shard is never signed.

    What it really does here: at a failing learning rate it closed only part of the loss gap that
    qk-norm closes, and at healthy ones it costs loss (README, "Measured stability").

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, for targets that match no matrix
            or include a fused weight whose layout is unknown.
        NotImplementedError: at ``setup``, for FSDP1 (``FSDPStrategy``) and DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import LitGPTModule, MSignCallback, ShakespeareDataModule, StableRankMonitor

        model = LitGPTModule({"n_layer": 6, "n_head": 4, "n_embd": 128}, vocab_size=256, block_size=256)
        trainer = Trainer(max_steps=1000, callbacks=[MSignCallback(period=100), StableRankMonitor()])
        trainer.fit(model, ShakespeareDataModule())
    """

    guard: MSign

    def __init__(
        self,
        period: int = 100,
        targets: Union[str, list[str]] = "attention",
        backend: MSignBackend = "svd",
        steps: Optional[int] = None,
        split_qkv: bool = True,
        log_stable_rank: bool = True,
        layouts: Optional[dict[str, str]] = None,
    ) -> None:
        super().__init__(MSign(None, period, targets, backend, steps, split_qkv, log_stable_rank, layouts))

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(period=g.period, targets=g.targets, backend=g.backend)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        g = self.guard
        rank_zero_info(
            f"MSignCallback: {len(g.matrices)} matrices, every {g.period} optimizer steps, backend {g.backend!r}"
        )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = self.guard.step(trainer.global_step)
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step - 1)
