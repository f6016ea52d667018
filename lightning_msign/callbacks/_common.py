"""Glue shared by the callbacks: argument checks, target resolution against a Trainer, step gating."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_msign.targets import TargetMatrix, TargetsArg, is_sharded, resolve_targets

# Strategies whose parameters are shards: signing a shard is not signing the matrix.
_SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def check_positive_int(value: Any, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}")
    return value


def check_choice(value: Any, argument: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"`{argument}` must be one of {choices}, got {value!r}")
    return value


def check_bool(value: Any, argument: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"`{argument}` must be a bool, got {value!r}")
    return value


def resolve_for_trainer(
    trainer: pl.Trainer, pl_module: pl.LightningModule, targets: TargetsArg, split_qkv: bool, owner: str
) -> list[TargetMatrix]:
    """Resolve ``targets`` on ``pl_module`` and refuse configurations that would act on shards.

    Raises:
        ValueError: the targets match no matrix (the message lists the matrices that exist).
        NotImplementedError: a sharding strategy (FSDP, DeepSpeed, FSDP2 / DTensor parameters).
    """
    strategy = type(trainer.strategy).__name__
    resolved = resolve_targets(pl_module, targets, split_qkv=split_qkv)
    sharded = [t.param_name for t in resolved if is_sharded(t.param)]
    if strategy in _SHARDED_STRATEGIES or sharded:
        raise NotImplementedError(
            f"{owner} does not support strategy {strategy} in this version: its parameters are shards"
            f" ({sharded[:3] or 'flattened'}), and the matrix sign or stable rank of a shard is not that of"
            " the matrix. Use a single device or DDP (`strategy='ddp'`)."
        )
    return resolved


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
    """Write ``metrics`` to every logger of the Trainer at ``step`` (rank zero only, as loggers are).

    Like Lightning's ``LearningRateMonitor`` this bypasses ``Trainer(log_every_n_steps=...)``: a
    callback that computes something on a step of its own choosing logs it on that step. Callers pass
    the step index Lightning uses for the same batch's training metrics (``global_step - 1`` after an
    optimizer step), so rows line up with ``train/loss``.
    """
    if not trainer.loggers or not metrics:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so wall-clock timings of GPU work are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TargetedCallback(Callback):
    """Base of the suite's callbacks: the matrices they act on, and once-per-optimizer-step gating.

    Subclasses set ``self.targets`` and ``self.split_qkv`` in ``__init__``. Targets are resolved at
    ``setup`` (so a selection matching nothing fails before any step) when the model already has its
    parameters, and again at ``on_fit_start``, after the strategy may have replaced them or after
    ``configure_model`` built them.
    """

    targets: list[str]
    split_qkv: bool

    def __init__(self) -> None:
        super().__init__()
        self._targets: list[TargetMatrix] = []
        self._last_step = 0

    @property
    def target_names(self) -> list[str]:
        """Names of the matrices acted on (known after ``setup``)."""
        return [t.name for t in self._targets]

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets = resolve_for_trainer(trainer, pl_module, self.targets, self.split_qkv, type(self).__name__)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(True for _ in pl_module.parameters()):
            self._resolve(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(trainer, pl_module)

    def _optimizer_step_due(self, trainer: pl.Trainer, every: int) -> bool:
        """In ``on_train_batch_end``: True once per optimizer step whose number is a multiple of ``every``.

        ``trainer.global_step`` counts optimizer steps, not micro-batches, so gradient accumulation and
        resume (``_last_step`` is saved by subclasses) are handled.
        """
        if trainer.global_step <= self._last_step:
            return False
        self._last_step = trainer.global_step
        return trainer.global_step % every == 0
