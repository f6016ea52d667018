"""PSS: gradient-ratio-triggered Parametric Singularity Smoothing of dominant singular values."""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

from lightning_msign.callbacks._common import (
    check_bool,
    check_choice,
    TargetedCallback,
    check_positive_int,
    global_grad_norm,
    log_to_loggers,
    synchronize,
)
from lightning_msign.functional.smoothing import SMOOTHINGS, pss_rank, pss_smooth, smooth_singular_values
from lightning_msign.distributed import Block
from lightning_msign.functional.spectral import spectral_norm_estimate
from lightning_msign.targets import validate_targets

ACTIONS = ("smooth", "skip", "smooth_and_skip")


class PSSCallback(TargetedCallback):
    r"""Smooth the dominant singular values of target matrices when the gradient norm spikes.

    Parametric Singularity Smoothing (arXiv 2602.01308) watches the ratio of the total gradient norm
    to its exponentially weighted moving average,

    .. math::

        \mu_t = \frac{\|g_t\|}{\bar g_{t-1}}, \qquad
        \bar g_t = (1 - \alpha)\,\bar g_{t-1} + \alpha \|g_t\|,

    and when :math:`\mu_t \ge \tau` protects each target matrix: its top-:math:`k` singular triplets
    (:math:`k = \max(2, \lfloor \operatorname{srank}(W) \rfloor)` by default, from a seeded randomized
    range finder, never a full SVD) get their singular values smoothed by ``f`` and

    .. math::

        W^* = W - U_k \operatorname{diag}(\sigma - f(\sigma)) V_k^\top ,

    leaving the rest of ``W`` untouched. The norm is read in ``on_before_optimizer_step``: after
    gradient accumulation, DDP synchronisation and AMP unscaling, before clipping. Protection happens
    there too, before the optimizer step (which then applies the update computed on the old ``W``).

    EWMA policy: the norm of a *triggering* step does not enter the average, so one spike cannot
    inflate the baseline and mask the next; every other finite norm does, including those of the
    cooldown steps, so a lasting shift of the gradient scale is absorbed after at most one trigger
    per ``cooldown_steps + 1`` steps. The average starts at the first step's norm and keeps learning
    during ``warmup_steps`` (the detector is not armed before). ``alpha = 0.1`` gives a ~10-step
    memory: long enough to average out batch-to-batch noise, short enough to follow the slow decay of
    gradient norms over training (the paper's summary uses the same value in its example).

    Actions: ``"smooth"`` (the paper); ``"skip"`` drops the optimizer step (gradients are set to
    ``None``, so AdamW leaves those parameters *and their moments and step counts* untouched, while the
    LR schedule and ``global_step`` still advance); ``"smooth_and_skip"`` does both. A non-finite norm is
    warned about, logged and counted, never enters the average, never triggers smoothing, and with
    ``skip_nonfinite`` (default) its optimizer step is skipped the same way, so it cannot write NaN/Inf
    into the weights.

    With several processes (DDP, FSDP2) the gradient norm is the global one: DDP has synchronised the
    gradients, and FSDP2's gradient shards are reduced over their mesh. The trigger decision is made
    identical on every process (``reduce_boolean_decision``), and a protection smooths each whole
    matrix on one process and shares the result, as :class:`~lightning_msign.MSignCallback` does.

    Args:
        tau: trigger threshold on :math:`\mu_t`, > 1 (paper: 2.5).
        alpha: EWMA weight in (0, 1].
        warmup_steps: optimizer steps before the detector is armed (>= 0).
        targets: preset, pattern or list (default ``"qk"``: the Q and K blocks of each attention layer,
            grouped-query aware); as for :class:`~lightning_msign.MSignCallback`.
        smoothing: ``"softplus"``, ``"softmax"`` or ``"conv"`` (formulas in
            :mod:`lightning_msign.functional.smoothing`); ``smoothing_kwargs`` are passed to it.
        rank: ``"stable"`` (``max(2, floor(srank))``) or a fixed positive int ``k``.
        max_rank: optional cap on ``k`` (bounds the cost on healthy, high-stable-rank matrices).
        cooldown_steps: steps after a trigger during which no new trigger fires (>= 0).
        action: ``"smooth"``, ``"skip"`` or ``"smooth_and_skip"``.
        skip_nonfinite: skip optimizer steps whose gradient norm is NaN/Inf.
        split_qkv: treat fused Q/K/V blocks separately.
        power_iters: power iterations of the randomized range finder.
        log_every_n_steps: log the detector's metrics every n optimizer steps (always on triggers).

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, when ``targets`` match no matrix.
        NotImplementedError: at ``setup``, for FSDP1 (``FSDPStrategy``) and DeepSpeed; DDP and FSDP2
            (``ModelParallelStrategy``) are supported.

    Logged metrics (straight to the Trainer's loggers, at the step index of the batch's ``train/loss``):
        ``pss/grad_norm``, ``pss/ratio``, ``pss/ewma``, ``pss/triggered`` (0 or 1), ``pss/triggers``
        (count so far), ``pss/nonfinite`` (count so far); on a protection ``pss/time_ms`` and for each
        target ``pss/sigma1_before/<name>``, ``pss/sigma1_after/<name>``, ``pss/rank/<name>``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import PSSCallback

        trainer = Trainer(gradient_clip_val=1.0, callbacks=[PSSCallback(tau=2.5, smoothing="softmax")])
    """

    def __init__(
        self,
        tau: float = 2.5,
        alpha: float = 0.1,
        warmup_steps: int = 100,
        targets: Union[str, list[str]] = "qk",
        smoothing: Literal["softplus", "softmax", "conv"] = "softplus",
        smoothing_kwargs: Optional[dict[str, float]] = None,
        rank: Union[Literal["stable"], int] = "stable",
        max_rank: Optional[int] = None,
        cooldown_steps: int = 10,
        action: Literal["smooth", "skip", "smooth_and_skip"] = "smooth",
        skip_nonfinite: bool = True,
        split_qkv: bool = True,
        power_iters: int = 4,
        log_every_n_steps: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 1:
            raise ValueError(f"`tau` must be a number > 1, got {tau!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ValueError(f"`alpha` must be in (0, 1], got {alpha!r}")
        for name, value in (("warmup_steps", warmup_steps), ("cooldown_steps", cooldown_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative int, got {value!r}")
        self.smoothing = check_choice(smoothing, "smoothing", SMOOTHINGS)
        if smoothing_kwargs is not None and not isinstance(smoothing_kwargs, dict):
            raise ValueError(f"`smoothing_kwargs` must be a dict or None, got {smoothing_kwargs!r}")
        try:  # bad keys or values fail now, not at the first spike
            smooth_singular_values(torch.tensor([3.0, 2.0, 1.0]), smoothing, **(smoothing_kwargs or {}))
        except (TypeError, ValueError) as err:
            raise ValueError(f"`smoothing_kwargs` {smoothing_kwargs!r} do not fit smoothing {smoothing!r}: {err}") from err
        if rank != "stable" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"`rank` must be 'stable' or an int >= 1, got {rank!r}")
        self.tau = float(tau)
        self.alpha = float(alpha)
        self.warmup_steps = warmup_steps
        self.cooldown_steps = cooldown_steps
        self.smoothing_kwargs = dict(smoothing_kwargs or {})
        self.rank = rank
        self.max_rank = None if max_rank is None else check_positive_int(max_rank, "max_rank")
        self.action = check_choice(action, "action", ACTIONS)
        self.skip_nonfinite = check_bool(skip_nonfinite, "skip_nonfinite")
        self.split_qkv = check_bool(split_qkv, "split_qkv")
        self.targets = validate_targets(targets, split_qkv)
        self.power_iters = check_positive_int(power_iters, "power_iters")
        self.log_every_n_steps = check_positive_int(log_every_n_steps, "log_every_n_steps")

        self._ewma: Optional[float] = None
        self._triggers = 0
        self._nonfinite = 0
        self._cooldown_until = 0
        self._last_step = -1
        self.trigger_steps: list[int] = []  # optimizer steps (1-based) that triggered (restored on resume)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(tau=self.tau, targets=self.targets, action=self.action)

    @property
    def triggers(self) -> int:
        """Triggers so far (restored on resume)."""
        return self._triggers

    @property
    def ewma(self) -> Optional[float]:
        """Current EWMA of the gradient norm (``None`` before the first step)."""
        return self._ewma

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        rank_zero_info(f"PSSCallback: watching {len(self._targets)} matrices, tau={self.tau}, action={self.action!r}")

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step == self._last_step:  # several optimizers: detect once per step
            return
        self._last_step = trainer.global_step
        step = trainer.global_step + 1  # the optimizer step about to be taken
        params = [p for p in pl_module.parameters() if p.grad is not None]
        total = global_grad_norm(params)
        if total is None:
            return
        norm = float(total)
        metrics: dict[str, float] = {"pss/grad_norm": norm}

        if not math.isfinite(norm):
            self._nonfinite += 1
            skipping = self.skip_nonfinite
            rank_zero_warn(
                f"PSSCallback: gradient norm is {norm} at optimizer step {step};"
                + (" skipping this optimizer step." if skipping else " not used by the detector.")
            )
            if skipping:
                self._drop_gradients(params)
            metrics.update({"pss/triggered": 0.0, "pss/triggers": float(self._triggers), "pss/nonfinite": float(self._nonfinite)})
            log_to_loggers(trainer, metrics, step=trainer.global_step)
            return

        ratio = norm / self._ewma if self._ewma else float("nan")
        armed = self._ewma is not None and step > self.warmup_steps and step > self._cooldown_until
        triggered = bool(trainer.strategy.reduce_boolean_decision(armed and ratio >= self.tau, all=False))
        if triggered:
            self._triggers += 1
            self._cooldown_until = step + self.cooldown_steps
            self.trigger_steps.append(step)
            rank_zero_info(f"PSSCallback: trigger at optimizer step {step} (ratio {ratio:.2f} >= tau {self.tau})")
            if self.action in ("smooth", "smooth_and_skip"):
                metrics.update(self.protect(pl_module.device))
            if self.action in ("skip", "smooth_and_skip"):
                self._drop_gradients(params)
        else:
            self._ewma = norm if self._ewma is None else (1 - self.alpha) * self._ewma + self.alpha * norm

        if triggered or step % self.log_every_n_steps == 0:
            metrics.update(
                {
                    "pss/ratio": ratio,
                    "pss/ewma": float(self._ewma) if self._ewma is not None else float("nan"),
                    "pss/triggered": float(triggered),
                    "pss/triggers": float(self._triggers),
                    "pss/nonfinite": float(self._nonfinite),
                }
            )
            log_to_loggers(trainer, metrics, step=trainer.global_step)

    @staticmethod
    def _drop_gradients(params: list[torch.nn.Parameter]) -> None:
        # torch optimizers skip parameters whose grad is None: no update, no moment update, no step count.
        for p in params:
            p.grad = None

    @torch.no_grad()
    def protect(self, device: Optional[torch.device] = None) -> dict[str, float]:
        """Smooth every target now; returns the metrics of this protection (public for manual loops).

        In a run with several processes every process must call it: each whole matrix is smoothed by
        one process and the result shared (:mod:`lightning_msign.distributed`).
        """
        plan = self._require_plan("protect")
        device = device or self._targets[0].param.device
        synchronize(device)
        start = time.perf_counter()
        # Row per target: [written (0/1), sigma_1 before, sigma_1 after, k].
        table = plan.run(self._smooth_blocks, result_size=4)
        synchronize(device)
        metrics: dict[str, float] = {}
        for t, (written, before, after, k) in zip(self._targets, table.tolist()):
            if written != 1:
                continue
            metrics[f"pss/sigma1_before/{t.name}"] = before
            metrics[f"pss/sigma1_after/{t.name}"] = after
            metrics[f"pss/rank/{t.name}"] = k
        metrics["pss/time_ms"] = (time.perf_counter() - start) * 1e3
        return metrics

    def _smooth_blocks(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        results: dict[int, torch.Tensor] = {}
        for b in blocks:
            W = b.matrix
            X = W.float() if W.dtype != torch.float64 else W
            if not bool(torch.isfinite(X).all()):
                warnings.warn(f"PSSCallback: {b.target.name} holds NaN/Inf; left as it is.", RuntimeWarning)
                continue
            if self.rank == "stable":
                sigma_1, _ = spectral_norm_estimate(X, num_iters=20)
                k = pss_rank(X, sigma_1, self.max_rank)
            else:
                k = min(self.rank, *X.shape)
            # The seed depends only on the trigger count and the target's place: the same on every process.
            new, sigma, smoothed = pss_smooth(
                X, k, self.smoothing, self.smoothing_kwargs, power_iters=self.power_iters, seed=self._triggers * 7919 + b.index
            )
            if not bool(torch.isfinite(new).all()):
                warnings.warn(f"PSSCallback: smoothing {b.target.name} gave non-finite values; left as it is.", RuntimeWarning)
                continue
            W.copy_(new)
            results[b.index] = torch.tensor([1.0, float(sigma[0]), float(smoothed[0]), float(k)])
        return results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "ewma": self._ewma,
            "triggers": self._triggers,
            "nonfinite": self._nonfinite,
            "cooldown_until": self._cooldown_until,
            "last_step": self._last_step,
            "trigger_steps": list(self.trigger_steps),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ewma = state_dict.get("ewma")
        self._ewma = None if ewma is None else float(ewma)
        self._triggers = int(state_dict.get("triggers", 0))
        self._nonfinite = int(state_dict.get("nonfinite", 0))
        self._cooldown_until = int(state_dict.get("cooldown_until", 0))
        self._last_step = int(state_dict.get("last_step", -1))
        self.trigger_steps = [int(s) for s in state_dict.get("trigger_steps", [])]
