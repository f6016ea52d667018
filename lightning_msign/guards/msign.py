"""MSign: periodic matrix-sign restoration of the stable rank of weight matrices, for any training loop."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lightning_msign import metric_keys as keys
from lightning_msign._validation import check_bool, check_choice, check_positive_int
from lightning_msign.distributed import MatrixResult, OwnedMatrix
from lightning_msign.functional.msign import Backend, sign_and_restore
from lightning_msign.guards.base import TargetedGuard
from lightning_msign.targets import LayoutsArg, TargetsArg

MSignBackend = Backend  # the functional backends


@dataclass
class SignResult(MatrixResult):
    """One matrix of an MSign application: whether it was written, and its stable rank before and after."""

    written: bool
    srank_before: float
    srank_after: float


class MSign(TargetedGuard):
    r"""Restore the stable rank of target matrices every ``period`` optimizer steps (arXiv 2602.01734).

    After the optimizer step whose number is a multiple of ``period``, each target matrix
    :math:`W = U S V^\top` is replaced by its matrix sign rescaled to keep its Frobenius norm:

    .. math::

        W \leftarrow \frac{\|W\|_F}{\|U V^\top\|_F}\, U V^\top,
        \qquad \|U V^\top\|_F = \sqrt{\operatorname{rank}(W)}.

    Row and column spaces are kept; the spectrum becomes flat. Optimizer state is left as it is, as in
    the paper. Fused weights are cut into their blocks by their layout (Q, K, V separately; each expert
    its own matrix; see :mod:`lightning_msign.layouts`); ``split_qkv=False`` signs a fused attention
    projection as one matrix, which mixes the blocks' scales. Computation is in float32 (float64 stays
    float64), results are written back in the parameter's dtype; a matrix holding NaN/Inf is skipped and
    counted, and a non-finite result is never written. Matrices of one shape are signed in one batched call.

    Usage in any loop::

        msign = MSign(model, period=100, targets="qk")
        for batch in loader:
            loss = model(batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = msign.step()  # {} except after steps 100, 200, ...

    Args:
        module: the model (or attach later with :meth:`attach`).
        period: optimizer steps between applications (the paper's ``P``): after steps ``P, 2P, ...``.
        targets: a preset (``"attention"``, ``"qk"``, ``"mlp"``, ``"all_2d"``), a glob on parameter names,
            or a list of both (:mod:`lightning_msign.targets`).
        backend: ``"svd"`` (exact), ``"polar_express"`` or ``"newton_schulz"`` (approximations, see
            :func:`lightning_msign.functional.msign`).
        steps: iterations of a polynomial backend (``None``: its default); must be ``None`` for ``"svd"``.
        split_qkv: sign fused Q/K/V blocks separately.
        log_stable_rank: return the exact stable rank of every matrix before and after (free with
            ``"svd"``: it reuses the decomposition; one singular-value computation each otherwise).
        layouts: layouts of fused weights the readers do not know, ``{glob on parameter names: layout}``.

    Raises:
        ValueError: at construction, for any bad argument; when attached, for targets that match no
            matrix or include a fused weight whose layout is unknown.

    Metrics (returned by :meth:`step` / :meth:`apply`):
        ``msign/applications``, ``msign/time_ms``, ``msign/skipped_nonfinite`` (count so far), and with
        ``log_stable_rank`` ``msign/srank_before/<name>``, ``msign/srank_after/<name>``,
        ``msign/srank_before_min``, ``msign/srank_after_min``.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        period: int = 100,
        targets: TargetsArg = "attention",
        backend: MSignBackend = "svd",
        steps: Optional[int] = None,
        split_qkv: bool = True,
        log_stable_rank: bool = True,
        layouts: LayoutsArg = None,
    ) -> None:
        super().__init__(targets, split_qkv, layouts)
        self.period = check_positive_int(period, "period")
        self.backend = check_choice(backend, "backend", MSignBackend)
        if backend == "svd" and steps is not None:
            raise ValueError(f"`steps` must be None with backend 'svd' (it is exact), got {steps!r}")
        self.steps = None if steps is None else check_positive_int(steps, "steps")
        self.log_stable_rank = check_bool(log_stable_rank, "log_stable_rank")
        self._applications = 0
        self._skipped_nonfinite = 0
        if module is not None:
            self.attach(module)

    @property
    def applications(self) -> int:
        """Applications so far (restored on resume)."""
        return self._applications

    @property
    def skipped_nonfinite(self) -> int:
        """Matrices skipped so far because they held NaN/Inf (restored on resume)."""
        return self._skipped_nonfinite

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is followed by an application."""
        return step % self.period == 0

    def step(self, step: Optional[int] = None) -> dict[str, float]:
        """Call after each optimizer step; applies MSign after steps ``period, 2 * period, ...``.

        Args:
            step: optimizer steps taken so far (``trainer.global_step`` after the step); default: the
                guard counts its calls. A step already seen does nothing (gradient accumulation).

        Returns:
            The application's metrics, or ``{}`` when none happened.
        """
        self._require_module("step")
        current = self._advance(step)
        if current is None or not self.due(current):
            return {}
        return self.apply()

    @torch.no_grad()
    def apply(self) -> dict[str, float]:
        """Apply MSign to every target now; returns the metrics. Every process must call it."""
        self._require_module("apply")
        with self._timed(self._device()) as elapsed:
            results = self.plan.run(self._sign, SignResult)
        self._applications += 1
        written = {name: r for name, r in results.items() if r.written}
        skipped = [t.name for t in self._matrices if t.name not in written]
        self._skipped_nonfinite += len(skipped)
        if skipped:
            warnings.warn(f"MSign skipped {len(skipped)} matrices holding NaN/Inf: {skipped[:5]}", RuntimeWarning)
        metrics: dict[str, float] = {}
        if self.log_stable_rank and written:
            for name, r in written.items():
                metrics[keys.per_matrix(keys.MSIGN_SRANK_BEFORE_PREFIX, name)] = r.srank_before
                metrics[keys.per_matrix(keys.MSIGN_SRANK_AFTER_PREFIX, name)] = r.srank_after
            metrics[keys.MSIGN_SRANK_BEFORE_MIN] = min(r.srank_before for r in written.values())
            metrics[keys.MSIGN_SRANK_AFTER_MIN] = min(r.srank_after for r in written.values())
        metrics[keys.MSIGN_APPLICATIONS] = float(self._applications)
        metrics[keys.MSIGN_TIME_MS] = elapsed[0]
        metrics[keys.MSIGN_SKIPPED_NONFINITE] = float(self._skipped_nonfinite)
        return metrics

    def _sign(self, owned: list[OwnedMatrix]) -> dict[int, SignResult]:
        """Sign the whole matrices this process owns, batched by shape and dtype."""
        groups: dict[tuple, list[tuple[OwnedMatrix, torch.Tensor]]] = {}
        for o in owned:
            m = o.matrix
            groups.setdefault((tuple(m.shape), m.dtype), []).append((o, m))
        results: dict[int, SignResult] = {}
        for group in groups.values():
            batch = sign_and_restore(
                torch.stack([m for _, m in group]), self.backend, self.steps, stable_ranks=self.log_stable_rank
            )
            flags = batch.written.tolist()
            before, after = batch.srank_before.tolist(), batch.srank_after.tolist()
            for i, (o, _) in enumerate(group):
                if flags[i]:
                    o.write(batch.matrices[i])
                results[o.index] = SignResult(bool(flags[i]), before[i], after[i])
        return results

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "applications": self._applications,
            "skipped_nonfinite": self._skipped_nonfinite,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._applications = int(state_dict.get("applications", 0))
        self._skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
