"""Command line: ``lightning-msign fit --config recipes/debug.yaml`` (also ``python -m lightning_msign``).

``lightning-msign report RUN_DIR [RUN_DIR ...] --out DIR`` draws logged runs side by side
(:mod:`lightning_msign.report`); every other subcommand goes to ``LightningCLI``.

A thin ``LightningCLI`` over :class:`~lightning_msign.litgpt_module.LitGPTModule` and
:class:`~lightning_msign.data.ShakespeareDataModule`. The data module decides the vocabulary and the
context length; both are linked into the model, so a recipe never repeats them.
"""

import sys
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_msign.callbacks.progress import StepProgressBar
from lightning_msign.data import ShakespeareDataModule
from lightning_msign.litgpt_module import LitGPTModule

__all__ = ["MSignCLI", "cli_main"]


class MSignCLI(LightningCLI):
    """``LightningCLI`` that links ``data.vocab_size -> model.vocab_size`` and ``data.seq_len -> model.block_size``.

    Both links are applied when the classes are instantiated (the data module's public attributes
    are read), so ``model.vocab_size`` and ``model.block_size`` cannot be set in a recipe or on the
    command line: set ``data.tokenizer``/``data.bpe_vocab_size`` and ``data.seq_len`` instead.

    Example::

        cli = MSignCLI(LitGPTModule, ShakespeareDataModule, args=["--config", "recipes/debug.yaml"], run=False)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.block_size", apply_on="instantiate")

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with :class:`~lightning_msign.StepProgressBar` unless the recipe turns the progress bar
        off or names its own (a pretraining run counts steps, not the epochs of ``max_epochs=-1``)."""
        trainer = super().instantiate_trainer(**kwargs)
        bars = [c for c in trainer.callbacks if isinstance(c, ProgressBar)]
        if len(bars) == 1 and type(bars[0]) in (TQDMProgressBar, RichProgressBar) and not self._named_progress_bar():
            index = trainer.callbacks.index(bars[0])
            trainer.callbacks[index] = StepProgressBar()
        return trainer

    def _named_progress_bar(self) -> bool:
        """Whether the recipe or command line names a progress bar among the trainer's callbacks."""
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        callbacks = config.get("trainer", {}).get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        return any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)


def cli_main(args: Optional[ArgsType] = None) -> None:
    """Run the ``lightning-msign`` command line (subcommands ``fit``, ``validate``, ``test``, ..., ``report``).

    ``report`` (first argument) is handled by :func:`lightning_msign.report.report_main` before
    ``LightningCLI`` sees the arguments; see ``lightning-msign report --help``.

    The model owns its optimizer and schedule (``LitGPTModule.configure_optimizers``), so the CLI's
    ``--optimizer``/``--lr_scheduler`` options are disabled. The resolved config is saved next to the
    logs (``config.yaml``, overwritten on re-runs).

    Args:
        args: Command-line arguments (a list of strings, or a dict/Namespace as ``LightningCLI``
            accepts); ``None`` reads ``sys.argv``.

    Returns:
        None, so that the console script's ``sys.exit(cli_main())`` exits with status 0.

    Example::

        cli_main(["fit", "--config", "recipes/debug.yaml", "--trainer.max_steps", "10"])
        cli_main(["report", "logs/csv/debug", "--out", "reports/debug"])
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
        from lightning_msign.report import report_main

        return report_main(list(argv[1:]))
    MSignCLI(
        LitGPTModule,
        ShakespeareDataModule,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )


if __name__ == "__main__":
    cli_main()
