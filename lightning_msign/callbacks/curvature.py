"""CurvatureMonitor: the Lightning adapter of :class:`~lightning_msign.guards.curvature.Curvature`."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers
from lightning_msign.guards.curvature import Curvature


class CurvatureMonitor(GuardCallback):
    r"""Log Adam's preconditioned sharpness and its ratio to the edge of stability every ``every_n_steps`` steps.

    The math, the arguments and the metrics are those of :class:`~lightning_msign.guards.curvature.Curvature`
    (read its docstring): after optimizer step :math:`t`, at the new weights, on that step's batch (the last
    micro-batch under gradient accumulation), with the optimizer state after the step, a power iteration on
    Hessian-vector products warm-started from the previous measurement's eigenvector estimates
    :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})` (``curvature/preconditioned_sharpness``, to compare with
    ``curvature/threshold`` = :math:`(2 + 2\beta_1) / ((1 - \beta_1)\,\eta)`, 38 / lr for :math:`\beta_1 = 0.9`)
    and :math:`\lambda_{\max}(D^{1/2} H D^{1/2})` over that threshold with the groups' learning rates
    (``curvature/stability_ratio``: above 1 the run is past Adam's edge of stability).

    The loss of the batch is recomputed, in this order of preference:

    1. ``loss_fn``: an import path ``"package.module:function"`` (or ``"package.module.function"``) of a
       function ``fn(pl_module, batch) -> Tensor``;
    2. the LightningModule's own ``curvature_loss(batch)`` method, if it has one
       (:class:`~lightning_msign.LitGPTModule` does: its training objective);
    3. ``training_step(batch, batch_idx)`` with ``self.log`` / ``self.log_dict`` silenced; its loss (a
       tensor, or the ``"loss"`` of a dict).

    The optimizer is the Trainer's (exactly one, a ``torch.optim.Adam`` / ``AdamW``). Metrics go straight to
    the Trainer's loggers at the step index of that batch's ``train/loss``. DDP: every process measures the
    Hessian of the global loss and logs the same values. FSDP2, FSDP1 and DeepSpeed are refused at ``setup``.

    Cost: one forward, one backward with ``create_graph=True`` and ``iterations`` Hessian-vector products (each
    about 2.8 forward+backward passes) per measurement: on the main job's model a warm measurement with 5 costs
    about 15 training steps, so the default ``every_n_steps=100`` adds about 16% to training time and
    ``every_n_steps=10`` about 155% (``python benchmarks/overhead.py --only curvature``). A gap above ``max_gap``
    steps makes every measurement a cold start of ``cold_iterations`` products.

    Raises:
        ValueError: at construction, for a bad argument or a ``loss_fn`` that cannot be imported; at the first
            measurement, when the loss is not a scalar tensor.
        NotImplementedError: at ``setup`` / ``on_fit_start``, for sharded strategies or an optimizer other than
            Adam / AdamW.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import CurvatureMonitor

        trainer = Trainer(callbacks=[CurvatureMonitor(every_n_steps=100, iterations=5)])

    Args:
        loss_fn: import path of ``fn(pl_module, batch) -> Tensor``, or ``None``.
    """

    guard_class = Curvature
    guard_runtime = ("module", "optimizer")
    guard: Curvature
    _warn_without_logger = True

    def __init__(self, guard: Curvature, *, loss_fn: Optional[str] = None) -> None:
        super().__init__(guard)
        self.loss_fn = loss_fn
        self._loss_fn = None if loss_fn is None else import_function(loss_fn, "loss_fn")

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.guard.every_n_steps, targets=self.guard.targets)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if len(trainer.optimizers) != 1:
            raise NotImplementedError(
                f"CurvatureMonitor measures the step of one optimizer, got {len(trainer.optimizers)} optimizers"
            )
        self.guard.set_optimizer(trainer.optimizers[0])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = self.guard.step(partial(self._loss, pl_module, batch, batch_idx), trainer.global_step)
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step - 1)

    def _loss(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> Tensor:
        if self._loss_fn is not None:
            return self._loss_fn(pl_module, batch)
        own = getattr(pl_module, "curvature_loss", None)
        if callable(own):
            return own(batch)
        with _silenced(pl_module):
            output = pl_module.training_step(batch, batch_idx)
        if isinstance(output, dict):
            output = output.get("loss")
        if not isinstance(output, Tensor):
            raise ValueError(
                f"CurvatureMonitor: {type(pl_module).__name__}.training_step returned {type(output).__name__}, not a"
                " loss tensor (or a dict with 'loss'): give the module a `curvature_loss(batch)` method or pass"
                " `loss_fn`"
            )
        return output


def import_function(path: str, argument: str) -> Callable[..., Any]:
    """The callable at ``"package.module:name"`` or ``"package.module.name"``; ``ValueError`` naming ``argument``."""
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"`{argument}` must be an import path like 'package.module:function', got {path!r}")
    module_name, _, name = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"`{argument}` {path!r} cannot be imported: {type(error).__name__}: {error}") from error
    if not callable(function):
        raise ValueError(f"`{argument}` {path!r} is not callable, got {type(function).__name__}")
    return function


@contextmanager
def _silenced(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log`` and ``self.log_dict`` of the module do nothing in the block."""
    saved = {name: pl_module.__dict__[name] for name in ("log", "log_dict") if name in pl_module.__dict__}
    pl_module.log = _no_log  # type: ignore[method-assign]
    pl_module.log_dict = _no_log  # type: ignore[method-assign]
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                setattr(pl_module, name, saved[name])
            else:
                delattr(pl_module, name)


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None
