"""Pure tensor math of lightning_msign: no Lightning import, usable in any training loop."""

from lightning_msign.functional.msign import BACKENDS, msign, msign_restore
from lightning_msign.functional.spectral import (
    initial_vector,
    spectral_norm_estimate,
    stable_rank,
    stable_rank_estimate,
)

__all__ = [
    "BACKENDS",
    "initial_vector",
    "msign",
    "msign_restore",
    "spectral_norm_estimate",
    "stable_rank",
    "stable_rank_estimate",
]
