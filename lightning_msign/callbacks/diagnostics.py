"""DiagnosticsMonitor: the Lightning adapter of :class:`~lightning_msign.guards.diagnostics.Diagnostics`."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_msign.callbacks.base import GuardCallback, log_to_loggers
from lightning_msign.guards.diagnostics import Diagnostics, batch_input_ids


class DiagnosticsMonitor(GuardCallback):
    r"""Log, every ``every_n_steps`` optimizer steps, the quantities that tell transformer failure modes apart.

    The math, the arguments and the metrics are those of :class:`~lightning_msign.guards.diagnostics.Diagnostics`
    (read its docstring): attention-logit maxima per layer, output-logit maximum and RMS, and optionally the
    blocks' Jacobian norms and the alignment of adjacent blocks, on the batch just trained on (its tensor,
    its ``"input_ids"`` or its first element, cut to ``max_batch_size`` x ``max_seq_len`` and to the model's
    maximum length, so ``T + 1``-token batches are fine). Decoders: LitGPT, Hugging Face GPT-2 and
    Llama-family causal LMs; attention logits for the attention classes of the registered model families
    (:mod:`lightning_msign.families`).

    It computes after the optimizer steps ``every_n_steps, 2 * every_n_steps, ...`` (``trainer.global_step``:
    once per optimizer step under gradient accumulation, right on resume) and writes the metrics straight
    to the Trainer's loggers, whatever ``log_every_n_steps`` is, at the step index of that batch's
    ``train/loss``. Each process computes on its own batch; only rank zero's loggers write. Under FSDP1
    (``FSDPStrategy``) the units above the decoder (the root around the LightningModule) are gathered for the
    probe; ``MixedPrecision`` and ``jacobian=True`` are refused there (the probe would not be the training
    forward; Jacobians would differentiate through FSDP's hooks).

    Which failure mode: attention logits in the thousands = attention-logit growth (fix: QK-norm, lower
    LR); output logits growing alone = output-logit divergence (z-loss); Jacobian alignment near 1 with
    :math:`\sigma_1 > 1` and collapsing stable ranks (:class:`~lightning_msign.StableRankMonitor`) = the
    failure MSign repairs.

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, when the model cannot be handled
            (no decoder found, an unsupported attention with ``attention_logits=True``, no LM head with
            ``output_logits=True``); at the first batch, when it holds no integer ``(B, T)`` token ids.
        NotImplementedError: at ``setup``, for DeepSpeed.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import DiagnosticsMonitor, StableRankMonitor

        trainer = Trainer(callbacks=[StableRankMonitor(every_n_steps=10), DiagnosticsMonitor(every_n_steps=50)])
    """

    guard_class = Diagnostics
    guard: Diagnostics
    _warn_without_logger = True  # a monitor that only logs

    @property
    @override
    def state_key(self) -> str:
        g = self.guard
        return self._generate_state_key(every_n_steps=g.every_n_steps, model_attr=g.model_attr)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        metrics = self.guard.step(batch_input_ids(batch), trainer.global_step)
        if metrics:
            log_to_loggers(trainer, metrics, step=trainer.global_step - 1)
