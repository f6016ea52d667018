"""Lightning callbacks: when and on which parameters the functional math runs."""

from lightning_msign.callbacks.curvature import CurvatureMonitor
from lightning_msign.callbacks.diagnostics import DiagnosticsMonitor
from lightning_msign.callbacks.msign import MSignCallback
from lightning_msign.callbacks.progress import StepProgressBar
from lightning_msign.callbacks.pss import PSSCallback
from lightning_msign.callbacks.rollback import RollbackGuard
from lightning_msign.callbacks.stable_rank import StableRankMonitor
from lightning_msign.callbacks.warmup import ArchitectureWarmup

__all__ = [
    "ArchitectureWarmup", "CurvatureMonitor", "DiagnosticsMonitor", "MSignCallback", "PSSCallback", "RollbackGuard",
    "StableRankMonitor",
    "StepProgressBar",
]
