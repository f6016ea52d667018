"""Command line: ``lightning-msign fit --config shakespeare/high_lr`` (also ``python -m lightning_msign``).

``--config`` (or ``-c``) takes a YAML file, or the name of a recipe shipped with the package
(:mod:`lightning_msign.recipes`: ``debug``, ``shakespeare/high_lr``, ...) when no file of that name exists. A value
a class refuses when the configuration is instantiated (``model: {lr: -1}``) ends the command with that one-line
message and exit status 2, as a value of the wrong type does; the traceback is kept for callers of
:class:`MSignCLI` (the :class:`ConfigError` chains the original exception).

``lightning-msign report RUN_DIR [RUN_DIR ...] --out DIR`` draws logged runs side by side
(:mod:`lightning_msign.report`); every other subcommand goes to ``LightningCLI``.

A thin ``LightningCLI`` over :class:`~lightning_msign.litgpt_module.LitGPTModule` and
:class:`~lightning_msign.data.ShakespeareDataModule`. The data module decides the vocabulary and the
context length; both are linked into the model, so a recipe never repeats them.
"""

import sys
from pathlib import Path
from types import TracebackType
from typing import Any, Optional

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from lightning_msign.callbacks.progress import StepProgressBar
from lightning_msign.data import ShakespeareDataModule
from lightning_msign.litgpt_module import LitGPTModule
from lightning_msign.recipes import recipe_path

__all__ = ["ConfigError", "MSignCLI", "cli_main", "resolve_configs"]


class ConfigError(ValueError):
    """A value of the configuration refused by the class it configures (raised from the class's own check)."""


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
    def instantiate_classes(self) -> None:
        """Instantiate as ``LightningCLI`` does; a ``ValueError`` of a constructor becomes a :class:`ConfigError`
        naming the class (``LitGPTModule: `lr` must be ...``)."""
        try:
            super().instantiate_classes()
        except ValueError as error:
            if isinstance(error, ConfigError):
                raise
            owner = _refusing_class(error.__traceback__)
            raise ConfigError(f"{owner}: {error}" if owner else str(error)) from error

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


def _refusing_class(tb: Optional[TracebackType]) -> Optional[str]:
    """The class whose ``__init__`` raised: the innermost ``__init__`` frame of the traceback with a ``self``."""
    owner = None
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name == "__init__" and "self" in frame.f_locals:
            owner = type(frame.f_locals["self"]).__name__
        tb = tb.tb_next
    return owner


def resolve_configs(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` / ``-c`` value that is no existing file and no inline YAML replaced by the
    path of the shipped recipe of that name (:func:`lightning_msign.recipes.recipe_path`).

    Raises:
        ConfigError: such a value names no shipped recipe either (the message lists them).
    """
    out, i = list(argv), 0
    while i < len(out):
        arg = out[i]
        if arg in ("--config", "-c") and i + 1 < len(out):
            out[i + 1] = _resolve_config(out[i + 1])
            i += 2
            continue
        if arg.startswith("--config="):
            out[i] = "--config=" + _resolve_config(arg[len("--config="):])
        i += 1
    return out


def _resolve_config(value: str) -> str:
    if Path(value).exists() or any(c in value for c in "{}:\n"):  # a file, or YAML given inline
        return value
    try:
        return str(recipe_path(value))
    except ValueError as error:
        raise ConfigError(f"--config {value!r}: {error}") from None


def cli_main(args: Optional[ArgsType] = None) -> None:
    """Run the ``lightning-msign`` command line (subcommands ``fit``, ``validate``, ``test``, ..., ``report``).

    ``report`` (first argument) is handled by :func:`lightning_msign.report.report_main` before
    ``LightningCLI`` sees the arguments; see ``lightning-msign report --help``.

    The model owns its optimizer and schedule (``LitGPTModule.configure_optimizers``), so the CLI's
    ``--optimizer``/``--lr_scheduler`` options are disabled. The resolved config is saved next to the
    logs (``config.yaml``, overwritten on re-runs).

    ``--config`` may name a shipped recipe (:func:`resolve_configs`). A bad ``--config`` name or a value a class
    refuses at instantiation (:class:`ConfigError`) prints ``lightning-msign: error: ...`` on stderr and exits with
    status 2, without a traceback.

    Args:
        args: Command-line arguments (a list of strings, or a dict/Namespace as ``LightningCLI``
            accepts); ``None`` reads ``sys.argv``.

    Returns:
        None, so that the console script's ``sys.exit(cli_main())`` exits with status 0.

    Example::

        cli_main(["fit", "--config", "shakespeare/high_lr", "--trainer.max_steps", "10"])
        cli_main(["report", "logs/csv/debug", "--out", "reports/debug"])
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, (list, tuple)) and list(argv[:1]) == ["report"]:
        from lightning_msign.report import report_main

        return report_main(list(argv[1:]))
    try:
        if args is None:  # LightningCLI reads sys.argv itself (and warns when given both)
            sys.argv[1:] = resolve_configs(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = resolve_configs([str(a) for a in args])
        MSignCLI(
            LitGPTModule,
            ShakespeareDataModule,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
        )
    except ConfigError as error:
        print(f"lightning-msign: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    cli_main()
