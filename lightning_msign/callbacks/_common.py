"""Glue shared by the callbacks: argument checks, target resolution against a Trainer, step gating."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

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


def new_optimizer_step(trainer: pl.Trainer, last_step: int) -> bool:
    """True once per optimizer step: ``trainer.global_step`` counts optimizer steps, not micro-batches."""
    return trainer.global_step > last_step


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
