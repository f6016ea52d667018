"""StepProgressBar: a progress bar that counts optimizer steps towards ``max_steps``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from typing_extensions import override

__all__ = ["StepProgressBar"]


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm progress bar, counting optimizer steps when the run is limited by ``max_steps``.

    A pretraining run is set by ``max_steps`` with no epoch limit (``max_epochs=-1``), where Lightning's bars
    read ``Epoch 0/-2`` and count the batches of an epoch the run never finishes. This bar reads
    ``Steps`` and counts ``trainer.global_step`` out of ``max_steps`` (gradient accumulation counted
    correctly; a resumed run starts at its step). Runs limited by epochs look as with ``TQDMProgressBar``.
    ``lightning-msign fit`` uses it unless the recipe disables the progress bar or names another one.

    Its arguments are ``TQDMProgressBar``'s (``refresh_rate``, ``process_position``, ``leave``).
    """

    def _step_limited(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (None, -1)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        super().on_train_epoch_start(trainer)
        if self._step_limited(trainer) and self.train_progress_bar is not None:
            self.train_progress_bar.reset(total=trainer.max_steps)
            self.train_progress_bar.initial = 0
            self.train_progress_bar.n = trainer.global_step
            self.train_progress_bar.set_description("Steps")
            self.train_progress_bar.refresh()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._step_limited(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        n = trainer.global_step
        if bar is not None and not bar.disable and self._should_update(n, bar.total):
            bar.n = n
            bar.set_postfix(self.get_metrics(trainer, pl_module))
            bar.refresh()
