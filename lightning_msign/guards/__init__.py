"""Loop-agnostic guards: they decide when and on which matrices the math runs; no Trainer needed."""

from lightning_msign.guards.base import Guard, TargetedGuard
from lightning_msign.guards.curvature import Curvature
from lightning_msign.guards.diagnostics import Diagnostics
from lightning_msign.guards.msign import MSign, SignResult
from lightning_msign.guards.pss import PSS, SmoothResult
from lightning_msign.guards.qk_norm import QKNormRetrofit
from lightning_msign.guards.rollback import Rollback, Snapshot
from lightning_msign.guards.stable_rank import StableRank
from lightning_msign.guards.warmup import DepthWarmup

__all__ = [
    "PSS",
    "Curvature",
    "DepthWarmup",
    "Diagnostics",
    "Guard",
    "MSign",
    "QKNormRetrofit",
    "Rollback",
    "SignResult",
    "Snapshot",
    "SmoothResult",
    "StableRank",
    "TargetedGuard",
]
