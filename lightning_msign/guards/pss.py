"""PSS: gradient-ratio-triggered Parametric Singularity Smoothing of dominant singular values, for any loop."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

import torch
from torch import nn

from lightning_msign import metric_keys as keys
from lightning_msign._validation import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_optional_positive_int,
    check_positive_int,
    check_range,
)
from lightning_msign.distributed import MatrixResult, OwnedMatrix, any_process
from lightning_msign.functional.precision import as_compute
from lightning_msign.functional.smoothing import (
    Smoothing,
    protection_seed,
    pss_rank,
    pss_smooth,
    smooth_singular_values,
)
from lightning_msign.functional.spectral import spectral_norm_estimate
from lightning_msign.guards.base import TargetedGuard
from lightning_msign.targets import LayoutsArg, TargetsArg

PSSAction = Literal["smooth", "skip", "smooth_and_skip"]


@dataclass
class SmoothResult(MatrixResult):
    """One matrix of a protection: ``sigma_1`` before and after, and the number ``k`` of smoothed values."""

    sigma1_before: float
    sigma1_after: float
    rank: int


class PSS(TargetedGuard):
    r"""Smooth the dominant singular values of target matrices when the gradient norm spikes (arXiv 2602.01308).

    The detector watches the ratio of the total gradient norm to its exponentially weighted moving average,

    .. math::

        \mu_t = \frac{\|g_t\|}{\bar g_{t-1}}, \qquad \bar g_t = (1 - \alpha)\,\bar g_{t-1} + \alpha \|g_t\|,

    and when :math:`\mu_t \ge \tau` protects each target matrix: its top-:math:`k` singular triplets
    (:math:`k = \max(2, \lfloor \operatorname{srank}(W) \rfloor)` by default, seeded randomized range
    finder) get their singular values smoothed by ``f``:
    :math:`W^* = W - U_k \operatorname{diag}(\sigma - f(\sigma)) V_k^\top`; the rest of ``W`` is untouched.
    Call :meth:`before_optimizer_step` after the backward pass (after gradient accumulation, DDP
    synchronisation and AMP unscaling), before clipping and ``optimizer.step()``.

    EWMA policy: the norm of a triggering step does not enter the average (one spike cannot mask the
    next); every other finite norm does, cooldown steps included. The average starts at the first
    step's norm and learns during ``warmup_steps`` (the detector is not armed before). When the gradient
    norm moves to a higher level for good (after a failure, or a raised learning rate), a detector whose
    average only learns between triggers would fire every ``cooldown_steps + 1`` steps for as long as the
    average lags: after ``adapt_after`` consecutive triggers (no armed, non-triggering step between them)
    the average restarts at the current norm, the new level is taken as normal, and the adaptation is
    counted (``pss/adaptations``).

    Actions: ``"smooth"`` (the paper); ``"skip"`` drops the optimizer step by setting every gradient to
    ``None`` (torch optimizers then leave those parameters, their moments and step counts untouched);
    ``"smooth_and_skip"`` both. A non-finite norm is counted and warned about, never enters the average,
    never triggers, and with ``skip_nonfinite`` its step is skipped the same way. Under
    ``torch.distributed`` the norm is the global one and the decision is the same on every process.

    Args:
        module: the model (or attach later).
        tau: trigger threshold on :math:`\mu_t`, > 1 (paper: 2.5).
        alpha: EWMA weight in (0, 1].
        warmup_steps: optimizer steps before the detector is armed.
        targets: preset, glob or list (default ``"qk"``), as for :class:`~lightning_msign.MSign`.
        smoothing: ``"softplus"``, ``"softmax"`` or ``"conv"`` (:mod:`lightning_msign.functional.smoothing`);
            ``smoothing_kwargs`` go to it.
        rank: ``"stable"`` (``max(2, floor(srank))``) or a fixed ``k``; ``max_rank`` caps it.
        cooldown_steps: steps after a trigger during which no new trigger fires.
        action: ``"smooth"``, ``"skip"`` or ``"smooth_and_skip"``.
        skip_nonfinite: skip optimizer steps whose gradient norm is NaN/Inf.
        split_qkv: treat fused Q/K/V blocks separately.
        power_iters: power iterations of the randomized range finder.
        log_every_n_steps: return the detector's metrics every n optimizer steps (always on triggers).
        layouts: layouts of fused weights the readers do not know.
        adapt_after: consecutive triggers after which the average restarts at the current norm (>= 1);
            ``None``: never (the average then learns only from the steps between triggers).

    Metrics (returned by :meth:`before_optimizer_step`):
        ``pss/grad_norm``, ``pss/ratio``, ``pss/ewma``, ``pss/triggered``, ``pss/triggers``, ``pss/nonfinite``,
        ``pss/adaptations``;
        on a protection ``pss/time_ms`` and per target ``pss/sigma1_before/<name>``,
        ``pss/sigma1_after/<name>``, ``pss/rank/<name>``.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        tau: float = 2.5,
        alpha: float = 0.1,
        warmup_steps: int = 100,
        targets: TargetsArg = "qk",
        smoothing: Smoothing = "softplus",
        smoothing_kwargs: Optional[dict[str, float]] = None,
        rank: Union[Literal["stable"], int] = "stable",
        max_rank: Optional[int] = None,
        cooldown_steps: int = 10,
        action: PSSAction = "smooth",
        skip_nonfinite: bool = True,
        split_qkv: bool = True,
        power_iters: int = 4,
        log_every_n_steps: int = 1,
        layouts: LayoutsArg = None,
        adapt_after: Optional[int] = 3,
    ) -> None:
        super().__init__(targets, split_qkv, layouts)
        self.tau = check_range(tau, "tau", 1.0, low_open=True)
        self.alpha = check_range(alpha, "alpha", 0.0, 1.0, low_open=True)
        self.warmup_steps = check_non_negative_int(warmup_steps, "warmup_steps")
        self.cooldown_steps = check_non_negative_int(cooldown_steps, "cooldown_steps")
        self.smoothing = check_choice(smoothing, "smoothing", Smoothing)
        if smoothing_kwargs is not None and not isinstance(smoothing_kwargs, dict):
            raise ValueError(f"`smoothing_kwargs` must be a dict or None, got {smoothing_kwargs!r}")
        try:  # bad keys or values fail now, not at the first spike
            smooth_singular_values(torch.tensor([3.0, 2.0, 1.0]), smoothing, **(smoothing_kwargs or {}))
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"`smoothing_kwargs` {smoothing_kwargs!r} do not fit smoothing {smoothing!r}: {err}"
            ) from err
        self.smoothing_kwargs = dict(smoothing_kwargs or {})
        if rank != "stable" and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"`rank` must be 'stable' or an int >= 1, got {rank!r}")
        self.rank = rank
        self.max_rank = check_optional_positive_int(max_rank, "max_rank")
        self.action = check_choice(action, "action", PSSAction)
        self.skip_nonfinite = check_bool(skip_nonfinite, "skip_nonfinite")
        self.power_iters = check_positive_int(power_iters, "power_iters")
        self.log_every_n_steps = check_positive_int(log_every_n_steps, "log_every_n_steps")
        self.adapt_after = check_optional_positive_int(adapt_after, "adapt_after")
        self._streak = 0  # consecutive triggers (cooldown steps in between do not break it)
        self._adaptations = 0
        self._ewma: Optional[float] = None
        self._nonfinite = 0
        self._cooldown_until = 0
        self.trigger_steps: list[int] = []  # optimizer steps (1-based) that triggered (restored on resume)
        if module is not None:
            self.attach(module)

    @property
    def triggers(self) -> int:
        """Triggers so far (restored on resume)."""
        return len(self.trigger_steps)

    @property
    def adaptations(self) -> int:
        """Restarts of the average at a new level after ``adapt_after`` consecutive triggers (kept on resume)."""
        return self._adaptations

    @property
    def ewma(self) -> Optional[float]:
        """Current EWMA of the gradient norm (``None`` before the first step)."""
        return self._ewma

    def _optimizer_calls(self) -> tuple[Any, Any]:
        return self.before_optimizer_step, None

    def before_optimizer_step(self, step: Optional[int] = None) -> dict[str, float]:
        """Read the gradient norm, update the detector, protect / skip on a trigger; returns the metrics.

        Args:
            step: the optimizer step about to be taken, 1-based (``trainer.global_step + 1``); default:
                the guard counts its calls. A step already seen does nothing (several optimizers).

        Returns:
            The detector's metrics on logged steps and triggers (else ``{}``).
        """
        module = self._require_module("before_optimizer_step")
        current = self._advance(step)
        if current is None:
            return {}
        params = [p for p in module.parameters() if p.grad is not None]
        total = self._grad_norm(module, current)
        if total is None:
            return {}
        norm = float(total)
        metrics: dict[str, float] = {keys.PSS_GRAD_NORM: norm}
        if not math.isfinite(norm):
            self._nonfinite += 1
            warnings.warn(
                f"PSS: gradient norm is {norm} at optimizer step {current};"
                + (" skipping this optimizer step." if self.skip_nonfinite else " not used by the detector."),
                RuntimeWarning,
            )
            if self.skip_nonfinite:
                _drop_gradients(params)
            metrics.update({keys.PSS_TRIGGERED: 0.0, keys.PSS_TRIGGERS: float(self.triggers),
                            keys.PSS_NONFINITE: float(self._nonfinite)})
            return metrics

        ratio = norm / self._ewma if self._ewma else float("nan")
        armed = self._ewma is not None and current > self.warmup_steps and current > self._cooldown_until
        triggered = armed and ratio >= self.tau
        if self._distributed:  # the same decision on every process
            triggered = any_process(triggered, total.device)
        if triggered:
            self._streak += 1
            self._cooldown_until = current + self.cooldown_steps
            self.trigger_steps.append(current)
            if self.action in ("smooth", "smooth_and_skip"):
                metrics.update(self.protect())
            if self.action in ("skip", "smooth_and_skip"):
                _drop_gradients(params)
            if self.adapt_after is not None and self._streak >= self.adapt_after:
                # The level has moved for good: take it as the new normal instead of firing on it forever.
                self._ewma, self._streak = norm, 0
                self._adaptations += 1
                warnings.warn(
                    f"PSS: {self.adapt_after} consecutive triggers up to optimizer step {current}; the gradient-norm"
                    f" average restarts at the current norm {norm:.4g} (the new level is taken as normal)",
                    RuntimeWarning,
                )
        else:
            if armed:
                self._streak = 0
            self._ewma = norm if self._ewma is None else (1 - self.alpha) * self._ewma + self.alpha * norm
        if not (triggered or current % self.log_every_n_steps == 0):
            return {}
        metrics.update({
            keys.PSS_RATIO: ratio,
            keys.PSS_EWMA: float(self._ewma) if self._ewma is not None else float("nan"),
            keys.PSS_TRIGGERED: float(triggered),
            keys.PSS_TRIGGERS: float(self.triggers),
            keys.PSS_NONFINITE: float(self._nonfinite),
            keys.PSS_ADAPTATIONS: float(self._adaptations),
        })
        return metrics

    @torch.no_grad()
    def protect(self) -> dict[str, float]:
        """Smooth every target now; returns the metrics of this protection. Every process must call it."""
        self._require_module("protect")
        with self._timed(self._device()) as elapsed:
            results = self.plan.run(self._smooth, SmoothResult)
        metrics: dict[str, float] = {}
        for name, r in results.items():
            metrics[keys.per_matrix(keys.PSS_SIGMA1_BEFORE_PREFIX, name)] = r.sigma1_before
            metrics[keys.per_matrix(keys.PSS_SIGMA1_AFTER_PREFIX, name)] = r.sigma1_after
            metrics[keys.per_matrix(keys.PSS_RANK_PREFIX, name)] = float(r.rank)
        metrics[keys.PSS_TIME_MS] = elapsed[0]
        return metrics

    def _smooth(self, owned: list[OwnedMatrix]) -> dict[int, SmoothResult]:
        results: dict[int, SmoothResult] = {}
        for o in owned:
            X = o.matrix
            X = as_compute(X)
            if not bool(torch.isfinite(X).all()):
                warnings.warn(f"PSS: {o.target.name} holds NaN/Inf; left as it is.", RuntimeWarning)
                continue
            if self.rank == "stable":
                sigma_1, _ = spectral_norm_estimate(X, num_iters=20)
                k = pss_rank(X, sigma_1, self.max_rank)
            else:
                k = min(self.rank, *X.shape)
            new, sigma, smoothed = pss_smooth(
                X, k, self.smoothing, self.smoothing_kwargs, power_iters=self.power_iters,
                seed=protection_seed(self.triggers, o.index),
            )
            if not bool(torch.isfinite(new).all()):
                warnings.warn(f"PSS: smoothing {o.target.name} gave non-finite values; left as it is.", RuntimeWarning)
                continue
            o.write(new)
            results[o.index] = SmoothResult(float(sigma[0]), float(smoothed[0]), k)
        return results

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "ewma": self._ewma,
            "nonfinite": self._nonfinite,
            "cooldown_until": self._cooldown_until,
            "trigger_steps": list(self.trigger_steps),
            "streak": self._streak,
            "adaptations": self._adaptations,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        ewma = state_dict.get("ewma")
        self._ewma = None if ewma is None else float(ewma)
        self._nonfinite = int(state_dict.get("nonfinite", 0))
        self._cooldown_until = int(state_dict.get("cooldown_until", 0))
        self.trigger_steps = [int(s) for s in state_dict.get("trigger_steps", [])]
        self._streak = int(state_dict.get("streak", 0))
        self._adaptations = int(state_dict.get("adaptations", 0))


def _drop_gradients(params: list[nn.Parameter]) -> None:
    # torch optimizers skip parameters whose grad is None: no update, no moment update, no step count.
    for p in params:
        p.grad = None
