"""What the Lightning adapters share: attaching their guard at setup, strategy checks, logging, state."""

from __future__ import annotations

import inspect
import typing
from typing import Any, Callable, ClassVar, Optional, Sequence

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


def require_unused_parameter_detection(trainer: pl.Trainer, owner: str, why: str) -> None:
    """Raise ``ValueError`` when the Trainer's DDP does not look for parameters without a gradient (read off the
    wrapped module's public ``find_unused_parameters``, once the strategy has wrapped it: at ``on_fit_start``)."""
    from torch.nn.parallel import DistributedDataParallel

    wrapped = trainer.strategy.model
    if isinstance(wrapped, DistributedDataParallel) and not wrapped.find_unused_parameters:
        raise ValueError(
            f"{owner} under DDP needs find_unused_parameters=True ({why}), got {type(trainer.strategy).__name__} with"
            " find_unused_parameters=False: use strategy='ddp_find_unused_parameters_true' (or"
            " 'ddp_spawn_find_unused_parameters_true', or DDPStrategy(find_unused_parameters=True))"
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

    A subclass names its guard class in :attr:`guard_class` and the guard arguments the adapter supplies itself
    (the module, optimizers, ...) in :attr:`guard_runtime`; it never restates the guard's signature. Its constructor
    is then built from that one signature: ``Callback(**guard_options, **adapter_options)`` builds the guard by
    keyword and hands it to the subclass's own ``__init__(self, guard, *, adapter_options)`` (written only when the
    adapter has options of its own), which :meth:`from_guard` calls too. :func:`inspect.signature` (and so
    LightningCLI) sees every guard argument with its type and default, in the guard's order, then the adapter's.
    """

    guard_class: ClassVar[Optional[type[Guard]]] = None
    guard_runtime: ClassVar[tuple[str, ...]] = ("module",)
    _warn_without_logger = False  # monitors, whose only output is what they log, set this
    #: the class name the checkpoint's state key starts with, where it differs from the class's own (a renamed
    #: callback keeps its earlier name there, so checkpoints written before the rename resume)
    _state_name: ClassVar[Optional[str]] = None

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("guard_class") is None:
            return
        own = cls.__dict__.get("__init__")
        cls._adapter_init = staticmethod(own if own is not None else GuardCallback.__init__)  # type: ignore[assignment]
        cls.__init__ = _constructor(cls, cls._adapter_init)  # type: ignore[method-assign]

    @classmethod
    def from_guard(cls, guard: Guard, **adapter_options: Any) -> "GuardCallback":
        """The callback over an existing guard (one configured in code, or a subclass of :attr:`guard_class`),
        with the adapter's own options (those :func:`inspect.signature` of the class lists after the guard's)."""
        expected = cls.guard_class
        if expected is None or not isinstance(guard, expected):
            raise TypeError(f"{cls.__name__}.from_guard needs a {getattr(expected, '__name__', 'guard')}, got"
                            f" {type(guard).__name__}")
        callback = cls.__new__(cls)
        cls._adapter_init(callback, guard, **adapter_options)
        return callback

    def _attach(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        refuse_strategies(trainer, type(self).__name__)
        self.guard.attach(_model_for_guard(trainer, pl_module), distributed=trainer.world_size > 1)

    @override
    def _generate_state_key(self, **kwargs: Any) -> str:
        return f"{self._state_name or type(self).__qualname__}{kwargs!r}"

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


def guard_options(guard_class: type[Guard], runtime: tuple[str, ...]) -> list[inspect.Parameter]:
    """The configuration parameters of ``guard_class``'s constructor (all but ``runtime``), annotations evaluated."""
    signature = inspect.signature(guard_class.__init__)
    hints = typing.get_type_hints(guard_class.__init__)
    params = list(signature.parameters.values())[1:]
    missing = set(runtime) - {p.name for p in params}
    if missing:
        raise TypeError(f"{guard_class.__name__} has no constructor arguments {sorted(missing)}")
    return [p.replace(annotation=hints.get(p.name, p.annotation)) for p in params if p.name not in runtime]


def _constructor(cls: type[GuardCallback], adapter_init: Callable[..., None]) -> Callable[..., None]:
    """``cls.__init__`` from the guard's signature and the adapter's own keyword-only options."""
    assert cls.guard_class is not None
    guard_class, runtime = cls.guard_class, cls.guard_runtime
    options = guard_options(guard_class, runtime)
    own = list(inspect.signature(adapter_init).parameters.values())[2:]  # after (self, guard)
    loose = [p.name for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    if loose:
        raise TypeError(f"{cls.__name__}.__init__(self, guard, ...): the adapter's own options must be keyword-only,"
                        f" got {loose}")
    clash = {p.name for p in own} & {p.name for p in options}
    if clash:
        raise TypeError(f"{cls.__name__}'s own options {sorted(clash)} are also {guard_class.__name__} arguments")
    hints = typing.get_type_hints(adapter_init)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    names = [p.name for p in options]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    signature = inspect.Signature([self_param, *options, *own], return_annotation=None)

    def __init__(self: GuardCallback, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)  # by name, through the guard's own signature
        except TypeError as err:
            raise TypeError(f"{type(self).__name__}: {err}") from None
        values = dict(bound.arguments)
        del values["self"]
        guard = guard_class(**{k: values.pop(k) for k in names if k in values})
        adapter_init(self, guard, **values)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__annotations__ = {p.name: p.annotation for p in (*options, *own)} | {"return": None}
    __init__.__doc__ = _without_args(guard_class.__doc__, cls.guard_runtime)  # the guard's argument help
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    return __init__


def stability_ratio_source(trainer: pl.Trainer) -> Optional[Callback]:
    """The first callback of the Trainer whose guard exposes ``latest_stability_ratio`` (a curvature monitor)."""
    return next((cb for cb in trainer.callbacks if hasattr(getattr(cb, "guard", None), "latest_stability_ratio")), None)


def require_stability_ratio_source(trainer: pl.Trainer, owner: str, argument: str, value: Any) -> Callback:
    """:func:`stability_ratio_source`, or a ``ValueError`` naming ``owner``'s ``argument`` that needs it."""
    source = stability_ratio_source(trainer)
    if source is None:
        raise ValueError(
            f"{owner}({argument}={value!r}) needs a CurvatureMonitor among the Trainer's callbacks (a callback whose"
            f" guard has `latest_stability_ratio`): add one, or set {argument}=None"
        )
    return source


def _without_args(doc: str | None, names: Sequence[str]) -> str | None:
    """``doc`` with the entries of ``names`` (and their continuation lines) cut from its ``Args:`` section: the
    arguments the adapter supplies are not the callback's."""
    if not doc or not names:
        return doc
    kept: list[str] = []
    dropping_at: Optional[int] = None  # the indent of the entry being cut; deeper lines continue it
    for line in doc.split("\n"):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if dropping_at is not None:
            if stripped and indent > dropping_at:
                continue
            dropping_at = None
        if ":" in stripped and stripped.split(":", 1)[0] in names:
            dropping_at = indent
            continue
        kept.append(line)
    return "\n".join(kept)
