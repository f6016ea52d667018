"""Pure tensor math of lightning_msign: no Lightning import, usable in any training loop."""

from lightning_msign.functional.attention import (
    LogitScratch,
    attention_logit_max,
    attention_logit_max_per_head,
    causal_allowed,
    output_logit_stats,
)
from lightning_msign.functional.curvature import (
    adam_preconditioner,
    edge_of_stability,
    hessian_matrix,
    hessian_vector_product,
    power_iteration,
    sdpa_math_kernel,
)
from lightning_msign.functional.jacobian import jacobian_alignment, jacobian_top_singular
from lightning_msign.functional.lowrank import LowRankSign, block_krylov_topk, rank_k_sign
from lightning_msign.functional.msign import BACKENDS, SignedBatch, msign, msign_restore, sign_and_restore
from lightning_msign.functional.precision import as_compute, check_matrix, compute_dtype
from lightning_msign.functional.smoothing import (
    SMOOTHINGS,
    protection_seed,
    pss_rank,
    pss_smooth,
    smooth_conv,
    smooth_singular_values,
    smooth_softmax,
    smooth_softplus,
    top_singular_triplets,
)
from lightning_msign.functional.spectral import (
    finite_matrices,
    initial_vector,
    spectral_norm_estimate,
    spectral_norm_from_stable_rank,
    stable_rank,
    stable_rank_estimate,
)

__all__ = [
    "LowRankSign",
    "block_krylov_topk",
    "rank_k_sign",
    "adam_preconditioner",
    "edge_of_stability",
    "hessian_matrix",
    "hessian_vector_product",
    "power_iteration",
    "sdpa_math_kernel",
    "finite_matrices",
    "LogitScratch",
    "attention_logit_max",
    "attention_logit_max_per_head",
    "causal_allowed",
    "output_logit_stats",
    "SignedBatch",
    "as_compute",
    "check_matrix",
    "compute_dtype",
    "protection_seed",
    "sign_and_restore",
    "spectral_norm_from_stable_rank",
    "BACKENDS",
    "SMOOTHINGS",
    "initial_vector",
    "jacobian_alignment",
    "jacobian_top_singular",
    "msign",
    "msign_restore",
    "pss_rank",
    "pss_smooth",
    "smooth_conv",
    "smooth_singular_values",
    "smooth_softmax",
    "smooth_softplus",
    "spectral_norm_estimate",
    "stable_rank",
    "stable_rank_estimate",
    "top_singular_triplets",
]
