"""StableRank: the stable rank of weight matrices and the total gradient norm, cheap enough for every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_msign import metric_keys as keys
from lightning_msign._validation import check_bool, check_choice, check_positive_int
from lightning_msign.distributed import MatrixResult, OwnedMatrix
from lightning_msign.functional.precision import as_compute
from lightning_msign.functional.spectral import (
    finite_matrices,
    initial_vector,
    spectral_norm_from_stable_rank,
    stable_rank,
    stable_rank_estimate,
)
from lightning_msign.guards.base import TargetedGuard
from lightning_msign.targets import LayoutsArg, TargetsArg

StableRankMode = Literal["power", "exact"]

# Matrices of at most this many entries are measured in stacks of their shape; larger ones one by one.
STACK_LIMIT = 131072


@dataclass
class RankResult(MatrixResult):
    """One matrix: its stable rank, its Frobenius norm (0 unless asked for)."""

    srank: float
    fro_norm: float


@dataclass
class PowerRankResult(MatrixResult):
    """One matrix in power mode: stable rank, Frobenius norm, and the power-iteration vector to warm-start from."""

    srank: float
    fro_norm: float
    vector: Tensor


class StableRank(TargetedGuard):
    r"""The stable rank :math:`\|W\|_F^2 / \|W\|_2^2` of target matrices, and the total gradient norm.

    ``mode="power"`` (default) estimates :math:`\|W\|_2` by power iteration warm-started from the previous
    measurement's vector (``power_iters`` iterations; ``warmup_iters`` for a matrix's first estimate);
    matrices of one shape are iterated together in one batched call. The estimate is an upper bound of
    the exact stable rank that tightens as the iteration converges (loose near initialisation, where the
    top singular values are nearly equal; tight once a direction dominates, the collapse this watches
    for). The vectors are in :meth:`state_dict`, so a resumed run measures what an uninterrupted one
    would. ``mode="exact"`` computes singular values.

    Usage in any loop::

        monitor = StableRank(model, targets="attention", every_n_steps=10)
        ...
        loss.backward()
        metrics = monitor.grad_norm()          # before optimizer.step(): grad_norm/total when due
        optimizer.step()
        metrics.update(monitor.step())         # after it: srank/<name>, srank/min, srank/mean when due

    Args:
        module: the model (or attach later).
        targets: preset, glob or list (default ``"all_2d"``), as for :class:`~lightning_msign.MSign`.
        every_n_steps: measure after every ``n``-th optimizer step.
        mode: ``"power"`` or ``"exact"``.
        power_iters: power iterations per measurement in ``"power"`` mode.
        warmup_iters: power iterations for a matrix's first estimate.
        split_qkv: report fused Q/K/V blocks separately.
        log_per_matrix: return ``srank/<name>`` for every target (else only the summaries).
        log_grad_norm: :meth:`grad_norm` returns the total gradient norm on the same steps.
        log_norms: also return each target's Frobenius norm and spectral norm
            :math:`\|W\|_F / \sqrt{\operatorname{srank}}` (from the same estimate), and their maxima.
        layouts: layouts of fused weights the readers do not know.

    Metrics:
        ``srank/<name>``, ``srank/min``, ``srank/mean``; ``grad_norm/total``; with ``log_norms``
        ``fro_norm/<name>``, ``spectral_norm/<name>``, ``fro_norm/max``, ``spectral_norm/max``. A matrix
        holding NaN/Inf has stable rank NaN (and so do the summaries).
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        targets: TargetsArg = "all_2d",
        every_n_steps: int = 1,
        mode: StableRankMode = "power",
        power_iters: int = 1,
        warmup_iters: int = 20,
        split_qkv: bool = True,
        log_per_matrix: bool = True,
        log_grad_norm: bool = True,
        log_norms: bool = False,
        layouts: LayoutsArg = None,
    ) -> None:
        super().__init__(targets, split_qkv, layouts)
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.mode = check_choice(mode, "mode", StableRankMode)
        self.power_iters = check_positive_int(power_iters, "power_iters")
        self.warmup_iters = check_positive_int(warmup_iters, "warmup_iters")
        self.log_per_matrix = check_bool(log_per_matrix, "log_per_matrix")
        self.log_grad_norm = check_bool(log_grad_norm, "log_grad_norm")
        self.log_norms = check_bool(log_norms, "log_norms")
        self._vectors: dict[str, Tensor] = {}
        if module is not None:
            self.attach(module)

    def _optimizer_calls(self) -> tuple[Any, Any]:
        return (self.grad_norm if self.log_grad_norm else None), self.step

    def grad_norm(self, step: Optional[int] = None) -> dict[str, float]:
        """Before ``optimizer.step()``: the total gradient norm when step ``step`` (1-based, the one about to
        be taken; default ``last_step + 1``) is a measured one. Read-only: no gating state changes."""
        module = self._require_module("grad_norm")
        step = self._last_step + 1 if step is None else int(step)
        if not self.log_grad_norm or step % self.every_n_steps != 0:
            return {}
        norm = self._grad_norm(module, step)
        return {} if norm is None else {keys.GRAD_NORM_TOTAL: float(norm)}

    def step(self, step: Optional[int] = None) -> dict[str, float]:
        """After each optimizer step: the stable ranks (and norms) when the step is a multiple of ``every_n_steps``."""
        self._require_module("step")
        current = self._advance(step)
        if current is None or current % self.every_n_steps != 0:
            return {}
        sranks, fro = self._measure()
        values = torch.tensor(list(sranks.values()), dtype=torch.float64)
        metrics: dict[str, float] = {keys.SRANK_MIN: float(values.min()), keys.SRANK_MEAN: float(values.mean())}
        if self.log_per_matrix:
            metrics.update({keys.per_matrix(keys.SRANK_PREFIX, n): v for n, v in sranks.items()})
        if self.log_norms:
            spectral = {n: spectral_norm_from_stable_rank(fro[n], sranks[n]) for n in sranks}
            metrics[keys.FRO_NORM_MAX] = max(fro.values())
            metrics[keys.SPECTRAL_NORM_MAX] = max(spectral.values())
            if self.log_per_matrix:
                metrics.update({keys.per_matrix(keys.FRO_NORM_PREFIX, n): v for n, v in fro.items()})
                metrics.update({keys.per_matrix(keys.SPECTRAL_NORM_PREFIX, n): v for n, v in spectral.items()})
        return metrics

    def compute(self) -> dict[str, float]:
        """The stable rank of every target now, identical on every process (every process must call it)."""
        return self._measure()[0]

    @torch.no_grad()
    def _measure(self) -> tuple[dict[str, float], dict[str, float]]:
        self._require_module("compute")
        result = PowerRankResult if self.mode == "power" else RankResult
        results = self.plan.run(self._stable_ranks, result, write=False)
        sranks, fro = {}, {}
        for t in self._matrices:
            r = results[t.name]
            sranks[t.name] = r.srank
            fro[t.name] = r.fro_norm
            if isinstance(r, PowerRankResult):
                self._vectors[t.name] = r.vector
        return sranks, fro

    def _stable_ranks(self, owned: list[OwnedMatrix]) -> dict[int, MatrixResult]:
        """Stable ranks of the owned matrices: small ones one batched call per (shape, dtype, warm/cold) group."""
        groups: dict[tuple, list[tuple[OwnedMatrix, Tensor]]] = {}
        for o in owned:
            m = o.matrix
            v = self._vectors.get(o.target.name) if self.mode == "power" else None
            warm = v is not None and v.shape[-1] == m.shape[-1]
            # Small matrices are stacked (one call instead of one dispatch each); large ones alone (the copy into
            # a stack would cost more than it saves: `python benchmarks/overhead.py --only guards`, stacking table).
            alone = o.index if m.numel() > STACK_LIMIT else None
            groups.setdefault((tuple(m.shape), m.dtype, warm, alone), []).append((o, m))
        results: dict[int, MatrixResult] = {}
        for (_, _, warm, _), group in groups.items():
            X = group[0][1].unsqueeze(0) if len(group) == 1 else torch.stack([m for _, m in group])  # (G, m, n)
            X = as_compute(X)
            fro = torch.linalg.matrix_norm(X) if self.log_norms else torch.zeros(len(group), device=X.device)
            if self.mode == "exact":  # singular values of a non-finite matrix are an error: measure zeros instead
                finite = finite_matrices(X)
                zero = torch.zeros((), dtype=X.dtype, device=X.device)
                srank = stable_rank(torch.where(finite[:, None, None], X, zero))
                srank = torch.where(finite, srank, torch.full_like(srank, float("nan")))
                vectors = None
            else:
                if warm:
                    v0 = torch.stack([self._vectors[o.target.name] for o, _ in group]).to(X.device, X.dtype)
                    iters = self.power_iters
                else:  # one start vector for every matrix of the shape: independent of how matrices are grouped
                    v0, iters = initial_vector(X[0]).expand(len(group), -1), self.warmup_iters
                srank, vectors = stable_rank_estimate(X, v0, iters)
                # NaN/Inf in a matrix makes its estimate non-finite (it propagates through the products; no extra
                # pass over the weights to look for it): report NaN and restart its vector cold next time.
                finite = torch.isfinite(srank)
                if not bool(finite.all()):
                    srank = torch.where(finite, srank, torch.full_like(srank, float("nan")))
                    vectors = torch.where(finite[:, None], vectors, initial_vector(X[0]))
            fro = torch.where(torch.isfinite(srank), fro.to(srank.dtype), torch.full_like(srank, float("nan")))
            s_list, f_list = srank.tolist(), fro.tolist()
            for i, (o, _) in enumerate(group):
                if vectors is None:
                    results[o.index] = RankResult(s_list[i], f_list[i])
                else:
                    results[o.index] = PowerRankResult(s_list[i], f_list[i], vectors[i])
        return results

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "vectors": {k: v.detach().cpu() for k, v in self._vectors.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._vectors = dict(state_dict.get("vectors", {}))
