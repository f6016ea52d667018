"""Glue shared by the callbacks: argument checks, target resolution against a Trainer, step gating."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_msign.distributed import WholeMatrixPlan
from lightning_msign.targets import TargetMatrix, TargetsArg, is_sharded, resolve_targets

# Strategies whose parameters cannot be reached as whole matrices by this version (see resolve_for_trainer).
_UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "FSDPStrategy": (
        "FSDP1 flattens parameters into shards of one flat buffer per module; this version reaches whole"
        " matrices only through DTensor parameters. Use FSDP2: `ModelParallelStrategy` with `fully_shard`"
        " in `configure_model` (LitGPTModule does this), or DDP."
    ),
    "DeepSpeedStrategy": (
        "DeepSpeed keeps the weights the optimizer updates in its own (ZeRO-partitioned, fp32) buffers, so"
        " writing the module's parameters would be undone at the next step and, with ZeRO-3, would touch"
        " shards only; this version does not implement DeepSpeed's full-parameter access. Use"
        " `ModelParallelStrategy` (FSDP2) or DDP."
    ),
}


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


def refuse_strategies(trainer: pl.Trainer, owner: str, reasons: dict[str, str], suffix: str = "") -> None:
    """Raise ``NotImplementedError`` naming the strategy when it (or a base class) is a key of ``reasons``."""
    for cls in type(trainer.strategy).__mro__:
        if cls.__name__ in reasons:
            raise NotImplementedError(
                f"{owner} does not support strategy {type(trainer.strategy).__name__}: " + reasons[cls.__name__] + suffix
            )


def resolve_for_trainer(
    trainer: pl.Trainer, pl_module: pl.LightningModule, targets: TargetsArg, split_qkv: bool, owner: str
) -> tuple[list[TargetMatrix], WholeMatrixPlan]:
    """Resolve ``targets`` on ``pl_module`` and plan whole-matrix work over the Trainer's processes.

    Single device, DDP (``ddp``, ``ddp_spawn``, ...) and ``ModelParallelStrategy`` with FSDP2
    (``DTensor`` parameters) are supported; see :mod:`lightning_msign.distributed`.

    Raises:
        ValueError: the targets match no matrix (the message lists the matrices that exist).
        NotImplementedError: FSDP1 (``FSDPStrategy``), DeepSpeed, or a DTensor layout that cannot be
            gathered whole; the message names the strategy or parameter.
    """
    refuse_strategies(
        trainer, owner, _UNSUPPORTED_STRATEGIES,
        " It never acts on a shard: the matrix sign or stable rank of a shard is not that of the matrix.",
    )
    resolved = resolve_targets(pl_module, targets, split_qkv=split_qkv)
    return resolved, WholeMatrixPlan(resolved, distributed=trainer.world_size > 1)


def global_grad_norm(params: Iterable[torch.nn.Parameter]) -> Optional[Tensor]:
    """Total 2-norm of the gradients of ``params`` over the whole model, the same on every process.

    Under DDP gradients are already synchronised; DTensor (FSDP2) gradients are shards, whose norm
    ``torch.nn.utils.get_total_norm`` reduces over their mesh. ``None`` when no parameter has a gradient.
    """
    plain: list[Tensor] = []
    sharded: dict[tuple, list[Tensor]] = {}
    for p in params:
        g = p.grad
        if g is None:
            continue
        if is_sharded(g):
            sharded.setdefault((id(g.device_mesh), tuple(g.placements)), []).append(g)
        else:
            plain.append(g)
    if not plain and not sharded:
        return None
    squares: list[Tensor] = []
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain).float().square())
    for grads in sharded.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if is_sharded(norm) else norm
        squares.append(norm.float().square().to(squares[0].device if squares else norm.device))
    return torch.stack(squares).sum().sqrt()


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
    _warn_without_logger = False  # monitors, whose only output is what they log, set this

    def __init__(self) -> None:
        super().__init__()
        self._targets: list[TargetMatrix] = []
        self._plan: Optional[WholeMatrixPlan] = None
        self._last_step = 0

    @property
    def target_names(self) -> list[str]:
        """Names of the matrices acted on (known after ``setup``)."""
        return [t.name for t in self._targets]

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._targets, self._plan = resolve_for_trainer(
            trainer, pl_module, self.targets, self.split_qkv, type(self).__name__
        )

    def _require_plan(self, method: str) -> WholeMatrixPlan:
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}.{method}() needs resolved targets: call it after the Trainer's setup")
        return self._plan

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(True for _ in pl_module.parameters()):
            self._resolve(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(trainer, pl_module)
        if self._warn_without_logger and not trainer.loggers:
            rank_zero_warn(f"{type(self).__name__}: the Trainer has no logger, so nothing will be recorded.")

    def _optimizer_step_due(self, trainer: pl.Trainer, every: int) -> bool:
        """In ``on_train_batch_end``: True once per optimizer step whose number is a multiple of ``every``.

        ``trainer.global_step`` counts optimizer steps, not micro-batches, so gradient accumulation and
        resume (``_last_step`` is saved by subclasses) are handled.
        """
        if trainer.global_step <= self._last_step:
            return False
        self._last_step = trainer.global_step
        return trainer.global_step % every == 0
