"""Lightning callbacks: when and on which parameters the functional math runs."""

import re

from lightning_msign.callbacks.base import GuardCallback
from lightning_msign.callbacks.curvature import CurvatureMonitor
from lightning_msign.callbacks.diagnostics import DiagnosticsMonitor
from lightning_msign.callbacks.msign import MSignCallback
from lightning_msign.callbacks.progress import StepProgressBar
from lightning_msign.callbacks.pss import PSSCallback
from lightning_msign.callbacks.qk_norm import QKNormRetrofitCallback
from lightning_msign.callbacks.rollback import RollbackCallback
from lightning_msign.callbacks.stable_rank import StableRankMonitor
from lightning_msign.callbacks.warmup import DepthWarmupCallback

__all__ = [
    "CurvatureMonitor", "DepthWarmupCallback", "DiagnosticsMonitor", "MSignCallback", "PSSCallback",
    "QKNormRetrofitCallback", "RollbackCallback", "StableRankMonitor",
    "StepProgressBar",
    "pairs_table",
]

#: earlier names of callbacks, kept importable (with a deprecation warning) so code and YAML recipes written
#: with them (``class_path: lightning_msign.ArchitectureWarmup``) still run
RENAMED = {"ArchitectureWarmup": "DepthWarmupCallback", "RollbackGuard": "RollbackCallback"}


def renamed(module: str, name: str) -> type:
    """The callback an earlier ``name`` now is, with a deprecation warning; ``AttributeError`` for anything else."""
    if name not in RENAMED:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    from lightning.pytorch.utilities.rank_zero import rank_zero_deprecation

    rank_zero_deprecation(
        f"`{module}.{name}` is now `{RENAMED[name]}` (the guard's name + Callback, as the other pairs): the old name"
        " will be removed in a later release"
    )
    return globals()[RENAMED[name]]


def __getattr__(name: str) -> type:
    return renamed(__name__, name)

_SUPPLIED = {"module": "the model", "optimizer": "its optimizer", "optimizers": "its optimizers",
             "schedulers": "its LR schedulers"}


def pairs_table() -> str:
    """README's table of the guards and their Lightning callbacks (markdown, one row per pair, in the order of
    ``lightning_msign.__all__``), generated from the callbacks' ``guard_class`` and ``guard_runtime``."""
    import lightning_msign

    pairs = [getattr(lightning_msign, n) for n in lightning_msign.__all__]
    pairs = [c for c in pairs if isinstance(c, type) and issubclass(c, GuardCallback) and c is not GuardCallback]
    rows = ["| guard (any loop) | Lightning callback | what it does | the callback passes the guard |",
            "|---|---|---|---|"]
    for cb in pairs:
        guard = cb.guard_class
        line = re.sub(r"``([^`]+)``", r"`\1`", (guard.__doc__ or "").strip().splitlines()[0])
        line = re.sub(r":math:`([^`]+)`", r"`\1`", line)
        line = re.sub(r"(?<!\\)\|", r"\\|", line)
        supplied = ", ".join(_SUPPLIED.get(a, a) for a in cb.guard_runtime)
        rows.append(f"| `{guard.__name__}` | `{cb.__name__}` | {line} | {supplied} |")
    return "\n".join(rows) + "\n"
