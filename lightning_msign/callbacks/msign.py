"""MSignCallback: the Lightning adapter of :class:`~lightning_msign.guards.msign.MSign`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers, require_stability_ratio_source
from lightning_msign.guards.diagnostics import batch_input_ids
from lightning_msign.guards.msign import MSign


class MSignCallback(GuardCallback):
    r"""Restore the stable rank of target matrices every ``period`` optimizer steps, or when a measured precursor
    (attention logits, stable rank, gradient-norm ratio, curvature) says so (MSign, arXiv 2602.01734).

    The math, the arguments, the triggers and the metrics are those of :class:`~lightning_msign.MSign` (read
    its docstring). This callback checks and applies after each optimizer step (``trainer.global_step``: once
    per optimizer step under gradient accumulation, right on resume); ``max_attn_logit`` reads the logits of the
    step's training forward (the token ids of the batch, a tensor, a dict's ``"input_ids"`` or a sequence's first
    element, serve a second forward where that forward was not seen, or with ``logits_from="second_forward"``), reads
    the gradient norm in ``on_before_optimizer_step`` (``max_grad_ratio``) and the latest stability ratio of
    the Trainer's curvature monitor (``max_curvature_ratio``), and writes its metrics straight to the
    Trainer's loggers at the step index of that batch's ``train/loss``. Under DDP, FSDP2
    (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``, one unit gathered at a time) each whole matrix is
    signed on one process and shared; a shard is never signed; every process takes the same decision. The
    logit trigger under FSDP1 needs a 32-bit precision (see ``DiagnosticsMonitor``).

    What it really does here: periodic MSign at a failing learning rate closed only part of the loss gap
    that qk-norm closes, and at healthy ones it costs loss; triggered by attention logits it leaves healthy
    runs alone (the documentation's "Measured stability", docs/results.md).

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, for targets that match no matrix
            or include a fused weight whose layout is unknown.
        NotImplementedError: at ``setup``, for DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import LitGPTModule, MSignCallback, ShakespeareDataModule, StableRankMonitor

        model = LitGPTModule({"n_layer": 6, "n_head": 4, "n_embd": 128}, vocab_size=256, block_size=256)
        trainer = Trainer(max_steps=1000, callbacks=[MSignCallback(period=100), StableRankMonitor()])
        trainer.fit(model, ShakespeareDataModule())
    """

    guard_class = MSign
    guard: MSign

    def __init__(self, guard: MSign) -> None:
        super().__init__(guard)
        self._curvature: Any = None  # the curvature monitor read by `max_curvature_ratio`, found at fit start

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        names = ("max_attn_logit", "min_srank_fraction", "max_grad_ratio", "max_curvature_ratio",
                 "period_after_trigger")
        triggers = {k: getattr(g, k) for k in names if getattr(g, k) is not None}
        return self._generate_state_key(period=g.period, targets=g.targets, backend=g.backend, **triggers)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        g = self.guard
        if g.max_curvature_ratio is not None:
            self._curvature = require_stability_ratio_source(
                trainer, "MSignCallback", "max_curvature_ratio", g.max_curvature_ratio
            )
        when = [] if g.period is None else [f"every {g.period} optimizer steps"]
        when += [f"{k} {v:g}" for k, v in (("attention logit >", g.max_attn_logit),
                                            ("stable rank < reference x", g.min_srank_fraction),
                                            ("gradient-norm ratio >=", g.max_grad_ratio),
                                            ("stability ratio >=", g.max_curvature_ratio),
                                            ("then every target every", g.period_after_trigger)) if v is not None]
        rank_zero_info(f"MSignCallback: {len(g.matrices)} matrices, {'; '.join(when)}, backend {g.backend!r}")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        if self.guard.max_grad_ratio is not None:
            self.guard.before_optimizer_step(trainer.global_step + 1)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        g = self.guard
        ids = batch_input_ids(batch) if g.max_attn_logit is not None else None
        curvature = None if self._curvature is None else self._curvature.guard.latest_stability_ratio
        metrics = g.step(trainer.global_step, input_ids=ids, curvature_ratio=curvature)
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step - 1)
