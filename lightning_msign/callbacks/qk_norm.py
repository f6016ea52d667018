"""QKNormRetrofitCallback: the Lightning adapter of :class:`~lightning_msign.guards.qk_norm.QKNormRetrofit`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers, require_unused_parameter_detection
from lightning_msign.guards.diagnostics import batch_input_ids
from lightning_msign.guards.qk_norm import QKNormRetrofit


class QKNormRetrofitCallback(GuardCallback):
    r"""Switch qk-norm on in the running model when a layer's attention logit passes ``max_attn_logit``.

    The norms, the arguments and the metrics are those of :class:`~lightning_msign.QKNormRetrofit` (read its
    docstring). The dormant norms are installed at ``setup``, before ``configure_optimizers``, so the optimizer holds
    their gains from the first step (``on_fit_start`` checks that it does); the logits are read in the step's training
    forward (the batch's token ids serve a second forward where that forward was not seen) and the switch happens
    after the optimizer step, with the metrics written straight to the Trainer's loggers at the step index of that
    batch's ``train/loss``. The switch is saved in the model's state (the norms' extra state) and in the callback's,
    so a resumed run goes on with the same norms.

    Strategies: one device; DDP only with ``find_unused_parameters=True`` (the dormant gains get no gradient), every
    process switching alike. FSDP1 (``FSDPStrategy``), FSDP2 (``ModelParallelStrategy``) and DeepSpeed are refused at
    ``setup``: new parameters under sharding have not been tested.

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, for a model without a qk-norm retrofit;
            at ``on_fit_start``, when an optimizer does not hold the norms' gains or DDP does not look for unused
            parameters.
        NotImplementedError: at ``setup``, for FSDP1, FSDP2 and DeepSpeed.
    """

    guard_class = QKNormRetrofit
    guard: QKNormRetrofit

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(max_attn_logit=g.max_attn_logit, scope=g.scope)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if stage == "fit" and names & {"FSDPStrategy", "ModelParallelStrategy"}:
            raise NotImplementedError(
                f"QKNormRetrofitCallback does not support {type(trainer.strategy).__name__}: new parameters in a"
                " sharded model have not been tested here. Use one device or DDP with"
                " strategy='ddp_find_unused_parameters_true'."
            )
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require_unused_parameter_detection(trainer, "QKNormRetrofitCallback", "the dormant q/k norms' gains get no"
                                           " gradient until switched on")
        super().on_fit_start(trainer, pl_module)
        held = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        gains = self.guard.gains()
        missing = [p for p in gains if id(p) not in held]
        if missing:
            raise ValueError(
                f"QKNormRetrofitCallback: {len(missing)} of the {len(gains)} q/k norm parameters it"
                " installed are in no optimizer, so they would never train once switched on: build the optimizer"
                " from the module's parameters in configure_optimizers (it runs after the callback's setup)"
            )
        g = self.guard
        rank_zero_info(f"QKNormRetrofitCallback: {len(g.switch_steps)} layers with dormant q/k norms, switched on"
                       f" ({g.scope}) past an attention logit of {g.max_attn_logit:g}")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = self.guard.step(trainer.global_step, input_ids=batch_input_ids(batch))
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step - 1)
