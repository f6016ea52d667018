"""Every metric key the package logs, in one place (no Lightning or torch import).

Producers log these keys and readers (the report) look them up here, so a key is typed once. A
``*_PREFIX`` constant ends with ``/`` and is followed by a matrix, layer or block name: build the
full key with :func:`per_matrix`. Matrix names are parameter names, with fused blocks suffixed
(``model.transformer.h.3.attn.qkv.weight.q``).

Example::

    from lightning_msign import metric_keys as K

    K.per_matrix(K.SRANK_PREFIX, "model.transformer.h.0.mlp.fc.weight")  # 'srank/model.transformer.h.0.mlp.fc.weight'
    run.series(K.TRAIN_LOSS)
"""

from __future__ import annotations

from typing import Union

# --------------------------------------------------------------------------- LitGPTModule
TRAIN_LOSS = "train/loss"  # cross-entropy of the step's batch, every step
TRAIN_Z_LOSS = "train/z_loss"  # weighted z-loss term, every step when `z_loss > 0`
VAL_LOSS = "val/loss"  # cross-entropy over the validation windows, per validation run
TEST_LOSS = "test/loss"  # cross-entropy over the test windows, per test run

# --------------------------------------------------------------------------- StableRankMonitor
SRANK_PREFIX = "srank/"  # stable rank ||W||_F^2 / sigma_1^2 of one matrix: srank/<matrix>
SRANK_MIN = "srank/min"  # minimum stable rank over the watched matrices
SRANK_MEAN = "srank/mean"  # mean stable rank over the watched matrices
GRAD_NORM_TOTAL = "grad_norm/total"  # global gradient 2-norm, after accumulation and unscaling, before clipping
FRO_NORM_PREFIX = "fro_norm/"  # Frobenius norm of one matrix (log_norms=True): fro_norm/<matrix>
FRO_NORM_MAX = "fro_norm/max"  # largest Frobenius norm (log_norms=True)
SPECTRAL_NORM_PREFIX = "spectral_norm/"  # sigma_1 of one matrix (log_norms=True): spectral_norm/<matrix>
SPECTRAL_NORM_MAX = "spectral_norm/max"  # largest sigma_1 (log_norms=True)

# --------------------------------------------------------------------------- MSignCallback
MSIGN_APPLICATIONS = "msign/applications"  # applications so far; logged at each application
MSIGN_TIME_MS = "msign/time_ms"  # wall time of the application, in milliseconds
MSIGN_SKIPPED_NONFINITE = "msign/skipped_nonfinite"  # matrices skipped so far for non-finite values
MSIGN_SRANK_BEFORE_PREFIX = "msign/srank_before/"  # exact stable rank before the application: .../<matrix>
MSIGN_SRANK_AFTER_PREFIX = "msign/srank_after/"  # exact stable rank after the application: .../<matrix>
MSIGN_SRANK_BEFORE_MIN = "msign/srank_before_min"  # minimum over matrices before the application
MSIGN_SRANK_AFTER_MIN = "msign/srank_after_min"  # minimum over matrices after the application
MSIGN_TRIGGERS = "msign/triggers"  # applications a precursor trigger caused, so far; logged at each application
MSIGN_MATRICES = "msign/matrices"  # matrices signed in this application
MSIGN_ATTN_LOGIT_MAX = "msign/attn_logit_max"  # largest attention logit the trigger read (max over layers, processes)
MSIGN_SRANK_FRACTION_MIN = "msign/srank_fraction_min"  # min over targets of stable rank / its reference
MSIGN_GRAD_RATIO = "msign/grad_ratio"  # gradient norm / its EWMA, as the trigger read it
MSIGN_CURVATURE_RATIO = "msign/curvature_ratio"  # the curvature monitor's stability ratio the trigger read

# --------------------------------------------------------------------------- optim.NuMuon / optim.Muon
NUMUON_RANK_FRACTION = "numuon/rank_fraction"  # rank fraction r(t) of the step (first Muon group)
NUMUON_CAPTURED_ENERGY = "numuon/captured_energy"  # mean ||S_k||^2 / ||M||_F^2 over matrices: momentum followed
NUMUON_SKIPPED_NONFINITE = "numuon/skipped_nonfinite"  # parameters not updated so far (non-finite gradient)
MUON_SKIPPED_NONFINITE = "muon/skipped_nonfinite"  # the same for Muon

# --------------------------------------------------------------------------- PSSCallback
PSS_GRAD_NORM = "pss/grad_norm"  # global gradient 2-norm the trigger watches
PSS_RATIO = "pss/ratio"  # gradient norm over its running average
PSS_EWMA = "pss/ewma"  # running (exponentially weighted) average of the gradient norm
PSS_TRIGGERED = "pss/triggered"  # 1.0 at a step that triggered a protection, else 0.0
PSS_TRIGGERS = "pss/triggers"  # protections so far
PSS_ADAPTATIONS = "pss/adaptations"  # times the average restarted at a new gradient-norm level so far
PSS_NONFINITE = "pss/nonfinite"  # steps so far with a non-finite gradient norm
PSS_TIME_MS = "pss/time_ms"  # wall time of the protection, in milliseconds
PSS_SIGMA1_BEFORE_PREFIX = "pss/sigma1_before/"  # sigma_1 before smoothing: pss/sigma1_before/<matrix>
PSS_SIGMA1_AFTER_PREFIX = "pss/sigma1_after/"  # sigma_1 after smoothing: pss/sigma1_after/<matrix>
PSS_RANK_PREFIX = "pss/rank/"  # k, the leading singular values smoothed: pss/rank/<matrix>

# --------------------------------------------------------------------------- DiagnosticsMonitor
DIAG_ATTN_LOGIT_MAX = "diag/attn_logit_max"  # max |q.k| / sqrt(head_size) over layers, heads and causal pairs
DIAG_ATTN_LOGIT_MAX_PREFIX = "diag/attn_logit_max/"  # the same for one layer: diag/attn_logit_max/<layer>
DIAG_OUTPUT_LOGIT_MAX = "diag/output_logit_max"  # max |logit| of the LM head
DIAG_OUTPUT_LOGIT_RMS = "diag/output_logit_rms"  # root mean square of the LM head's logits
DIAG_JACOBIAN_NORM_PREFIX = "diag/jacobian_norm/"  # sigma_1 of a block's input-output Jacobian: .../<block>
DIAG_JACOBIAN_ALIGNMENT_PREFIX = "diag/jacobian_alignment/"  # |<u_1(J_l), v_1(J_l+1)>| of blocks l, l+1: .../<l>
DIAG_JACOBIAN_ALIGNMENT_MAX = "diag/jacobian_alignment_max"  # largest alignment of adjacent blocks
DIAG_TIME_MS = "diag/time_ms"  # wall time of the diagnostics, in milliseconds

# --------------------------------------------------------------------------- RollbackCallback
ROLLBACK_ROLLED_BACK = "rollback/rolled_back"  # 1.0 at a step that was flagged and rolled back, else 0.0
ROLLBACK_ROLLBACKS = "rollback/rollbacks"  # rollbacks so far
ROLLBACK_STEPS_LOST = "rollback/steps_lost"  # optimizer steps undone by rollbacks so far
ROLLBACK_RESTORED_TO = "rollback/restored_to"  # the optimizer step of the snapshot restored (rollback steps only)
ROLLBACK_LOST = "rollback/lost"  # optimizer steps this rollback undid (rollback steps only)
ROLLBACK_LR_SCALE = "rollback/lr_scale"  # learning-rate multiplier of the repair for the next step (1.0 outside)

# --------------------------------------------------------------------------- CurvatureMonitor
CURV_SHARPNESS = "curvature/preconditioned_sharpness"  # lambda_max of P^-1/2 H P^-1/2 (Adam's preconditioner P)
CURV_STABILITY_RATIO = "curvature/stability_ratio"  # lambda_max of D^1/2 H D^1/2 (D = lr / P) / ((2 + 2 b1) / (1 - b1))
CURV_THRESHOLD = "curvature/threshold"  # (2 + 2 b1) / ((1 - b1) lr): the sharpness's edge (one LR, one beta1)
CURV_HVPS = "curvature/hvps"  # Hessian-vector products spent on this measurement
CURV_RESIDUAL = "curvature/residual"  # ||A u - lambda u|| / |lambda| of the returned vector (0 at an exact eigenpair)
CURV_COLD_START = "curvature/cold_start"  # 1.0 when this measurement started from a random vector, else 0.0
CURV_TIME_MS = "curvature/time_ms"  # wall time of the measurement, in milliseconds

# --------------------------------------------------------------------------- DepthWarmupCallback
WARMUP_ACTIVE_BLOCKS = "warmup/active_blocks"  # number of active (computing, trainable) blocks
WARMUP_UNLOCKED = "warmup/unlocked"  # blocks unlocked at this step (logged at unlock steps)
WARMUP_DEFERRED = "warmup/deferred"  # 1.0 at a step where a due unlock waited for the curvature, else not logged

# --------------------------------------------------------------------------- QKNormRetrofitCallback
QKNORM_ATTN_LOGIT_MAX = "qknorm/attn_logit_max"  # largest attention logit of the layers checked, at a check step
QKNORM_SWITCHED_LAYERS = "qknorm/switched_layers"  # layers whose q/k norms are on, at a check step
QKNORM_SWITCHED_NOW = "qknorm/switched_now"  # layers switched on at this step (0.0 at a check step that switched none)

# --------------------------------------------------------------------------- Lightning
EPOCH = "epoch"  # added by Lightning to every `log_metrics` call, several times per step


def per_matrix(prefix: str, name: Union[str, int]) -> str:
    """The key of one matrix, layer or block under a ``*_PREFIX`` key.

    Args:
        prefix: A prefix constant of this module (ends with ``/``).
        name: Matrix (parameter) name, or layer / block index.

    Returns:
        ``prefix + str(name)``.

    Raises:
        ValueError: If ``prefix`` does not end with ``/``.
    """
    if not prefix.endswith("/"):
        raise ValueError(f"`prefix` must be a key prefix ending with '/', got {prefix!r}")
    return f"{prefix}{name}"
