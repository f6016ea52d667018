"""RollbackCallback: a Lightning callback that rolls a diverging run back in memory and repairs it."""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_msign import metric_keys as keys
from lightning_msign._validation import check_bool, check_range
from lightning_msign.callbacks.base import GuardCallback, log_to_loggers, require_stability_ratio_source
from lightning_msign.guards.rollback import Rollback


class RollbackCallback(GuardCallback):
    r"""Catch a divergence, roll the run back to a snapshot held in memory, repair, and train on.

    The math, the arguments and the repairs are those of :class:`~lightning_msign.guards.rollback.Rollback`
    (read its docstring). This callback takes a snapshot when training starts and after every
    ``snapshot_every``-th optimizer step (``trainer.global_step``), reads the global gradient norm in
    ``on_before_optimizer_step`` and the training loss from ``training_step``'s output (the mean over the
    micro-batches of an optimizer step), and decides after each optimizer step, identically on every
    process. After a rollback training goes on with the next batch: the batches since the snapshot are
    skipped, listed in ``skipped_path`` (JSON, rank zero; default ``<log dir>/rollback_skipped.json``) and in
    the guard's state. ``trainer.global_step`` keeps counting (a rollback costs the steps it undoes, reported
    as ``rollback/steps_lost``); the LR schedulers are restored with the rest, so the schedule resumes from
    the snapshot. When the retry budget is spent the state is restored to the last good snapshot and the
    Trainer stops (``trainer.should_stop``) with a warning that says what happened.

    Other triggers: ``on_pss_trigger=True`` rolls back at the optimizer steps a :class:`PSSCallback` of the
    Trainer triggered on (instead of, or besides, its own protection); ``max_curvature_ratio`` at steps whose
    latest curvature stability ratio (the Trainer's :class:`CurvatureMonitor`) exceeds it.

    Under DDP every process holds the same snapshots; under FSDP2 / FSDP1 each process snapshots its own
    shards (about 3x its fp32 weight shards under Adam per snapshot, on CPU by default).

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, for ``max_curvature_ratio`` without a
            curvature monitor, or ``on_pss_trigger`` without a PSSCallback.
        NotImplementedError: at ``setup``, for DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import RollbackCallback

        trainer = Trainer(callbacks=[RollbackCallback(snapshot_every=50, lr_factor=0.5, lr_steps=50, lr_ramp_steps=50)])
    """

    guard_class = Rollback
    _state_name = "RollbackGuard"  # its earlier name: checkpoints written under it resume
    guard_runtime = ("module", "optimizers", "schedulers")
    guard: Rollback

    def __init__(
        self,
        guard: Rollback,
        *,
        on_pss_trigger: bool = False,
        max_curvature_ratio: Optional[float] = None,
        skipped_path: Optional[str] = None,
    ) -> None:
        super().__init__(guard)
        self.on_pss_trigger = check_bool(on_pss_trigger, "on_pss_trigger")
        if max_curvature_ratio is not None:
            check_range(max_curvature_ratio, "max_curvature_ratio", low=0.0, low_open=True)
        self.max_curvature_ratio = None if max_curvature_ratio is None else float(max_curvature_ratio)
        if skipped_path is not None and not isinstance(skipped_path, str):
            raise ValueError(f"`skipped_path` must be None or a path string, got {skipped_path!r}")
        self.skipped_path = skipped_path
        self._pss: list[Any] = []
        self._curvature: Any = None
        self._losses: list[float] = []

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(snapshot_every=g.snapshot_every, z_threshold=g.z_threshold)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.on_pss_trigger:
            from lightning_msign.callbacks.pss import PSSCallback

            self._pss = [cb for cb in trainer.callbacks if isinstance(cb, PSSCallback)]
            if not self._pss:
                raise ValueError(
                    "RollbackCallback(on_pss_trigger=True) needs a PSSCallback among the Trainer's callbacks"
                )
        if self.max_curvature_ratio is not None:
            self._curvature = require_stability_ratio_source(
                trainer, "RollbackCallback", "max_curvature_ratio", self.max_curvature_ratio
            )
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        schedulers = [config.scheduler for config in trainer.lr_scheduler_configs]
        self.guard.set_optimizers(trainer.optimizers, schedulers)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        snap = self.guard.snapshot(trainer.global_step, self._position(trainer, None))
        rank_zero_info(
            f"RollbackCallback: snapshots every {self.guard.snapshot_every} steps, {self.guard.keep} kept, "
            f"{snap.nbytes / 2**20:.1f} MiB each on this process ({self.guard.snapshot_device})"
        )

    @staticmethod
    def _position(trainer: pl.Trainer, batch_idx: Optional[int]) -> dict[str, Any]:
        return {"epoch": trainer.current_epoch, "batch_idx": batch_idx}

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        self.guard.before_optimizer_step(trainer.global_step + 1)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:
            self._losses.append(float(loss.detach().float()) if hasattr(loss, "detach") else float(loss))
        step = trainer.global_step
        if step <= self.guard.last_step:  # a micro-batch of a step still accumulating
            return
        for cb in self._pss:
            if step in cb.guard.trigger_steps:
                self.guard.flag("PSS triggered", step)
        if self._curvature is not None:
            ratio = self._curvature.guard.latest_stability_ratio
            if ratio is not None and ratio > self.max_curvature_ratio:
                self.guard.flag(f"curvature stability ratio {ratio:.3g} > {self.max_curvature_ratio:g}", step)
        losses, self._losses = self._losses, []
        mean = sum(losses) / len(losses) if losses else None
        metrics = self.guard.after_step(mean, step, self._position(trainer, batch_idx))
        log_to_loggers(trainer, metrics, step - 1)
        if metrics.get(keys.ROLLBACK_ROLLED_BACK):
            record = self.guard.skipped[-1]
            rank_zero_warn(
                f"RollbackCallback: optimizer step {step} flagged ({'; '.join(record['reasons'])}); rolled back to"
                f" step {record['restored_to']}, the batches since are skipped"
                f" ({self.guard.rollbacks} rollback(s), {self.guard.steps_lost} step(s) lost so far)"
            )
            self._write_skipped(trainer)
        if self.guard.should_stop:
            rank_zero_warn(self.guard.stop_reason)
            self._write_skipped(trainer)
            trainer.should_stop = True

    def _write_skipped(self, trainer: pl.Trainer) -> None:
        # `trainer.log_dir` is a broadcast under distributed strategies: every process reads it, rank zero writes.
        path = self.skipped_path or os.path.join(trainer.log_dir or trainer.default_root_dir, "rollback_skipped.json")
        if trainer.global_rank != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"skipped": self.guard.skipped, "stop_reason": self.guard.stop_reason}, f, indent=1, default=str)
