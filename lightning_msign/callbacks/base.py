"""What the Lightning adapters share: attaching their guard at setup, strategy checks, logging, state."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lightning_msign.guards.base import Guard

# Strategies whose parameters the guards cannot reach as whole matrices (one list for every callback).
UNSUPPORTED_STRATEGIES: dict[str, str] = {
    "DeepSpeedStrategy": (
        "DeepSpeed keeps the weights its optimizer updates in its own (ZeRO-partitioned, fp32) buffers, so"
        " writes to the module's parameters would be undone at the next step and, with ZeRO-3, would touch"
        " partitions only. Full-parameter access through DeepSpeed (safe_get/set_full_fp32_param, then"
        " refreshing the low-precision copy) needs a GPU to run, and has not run on one here, so it is not"
        " enabled. Use FSDPStrategy (FSDP1), ModelParallelStrategy (FSDP2) or DDP."
    ),
}


def refuse_strategies(trainer: pl.Trainer, owner: str) -> None:
    """Raise ``NotImplementedError`` naming the strategy when it (or a base class) cannot be supported."""
    for cls in type(trainer.strategy).__mro__:
        if cls.__name__ in UNSUPPORTED_STRATEGIES:
            raise NotImplementedError(
                f"{owner} does not support strategy {type(trainer.strategy).__name__}: "
                + UNSUPPORTED_STRATEGIES[cls.__name__]
                + " A guard never acts on a shard: the matrix sign or stable rank of a shard is not that of the matrix."
            )


def _model_for_guard(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
    """``pl_module``, or the FSDP1 root wrapping it (``FSDPStrategy`` wraps the whole LightningModule).

    The root's own parameters (embeddings, head, norms: those of no inner unit) are gathered through it.
    """
    model = getattr(trainer.strategy, "model", None)
    names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
    if "FSDPStrategy" in names and model is not None and model is not pl_module:
        inner = getattr(model, "module", None)
        if inner is pl_module:
            return model
    return pl_module


def log_to_loggers(trainer: pl.Trainer, metrics: dict[str, Any], step: int) -> None:
    """Write ``metrics`` to every logger of the Trainer at ``step`` (rank zero only, as loggers are).

    Like Lightning's ``LearningRateMonitor`` this bypasses ``Trainer(log_every_n_steps=...)``: a guard
    that computes something on a step of its own choosing logs it on that step. Callers pass the step
    index Lightning uses for the same batch's training metrics (``global_step - 1`` after an optimizer
    step), so rows line up with ``train/loss``.
    """
    if not trainer.loggers or not metrics:
        return
    values = {k: float(v) for k, v in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)


class GuardCallback(Callback):
    """A Lightning callback over one guard (:attr:`guard`, public: the seam for tests and manual loops).

    The guard is attached to the LightningModule at ``setup`` (so a selection matching nothing fails
    before any step) when the module already has parameters, and again at ``on_fit_start``, after the
    strategy may have replaced them or ``configure_model`` built them. The callback's checkpoint state is
    the guard's state.
    """

    _warn_without_logger = False  # monitors, whose only output is what they log, set this

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard

    @classmethod
    def from_guard(cls, guard: Guard) -> "GuardCallback":
        """The callback over an existing guard (a subclass, or one configured in code), instead of building one."""
        callback = cls.__new__(cls)
        GuardCallback.__init__(callback, guard)
        return callback

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_strategies(trainer, type(self).__name__)
        self.guard.attach(_model_for_guard(trainer, pl_module), distributed=trainer.world_size > 1)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(True for _ in pl_module.parameters()):
            self._attach(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._attach(trainer, pl_module)
        if self._warn_without_logger and not trainer.loggers:
            rank_zero_warn(f"{type(self).__name__}: the Trainer has no logger, so nothing will be recorded.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.guard.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.guard.load_state_dict(state_dict)
