"""Curvature: Adam's preconditioned sharpness and its distance to the edge of stability, in any loop."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_msign._validation import check_choice, check_non_negative_int, check_positive_int
from lightning_msign.distributed import any_process, is_sharded
from lightning_msign.functional.curvature import (
    EigenEstimate,
    adam_preconditioner,
    edge_of_stability,
    hessian_vector_product,
    lanczos,
    power_iteration,
    random_unit_vector,
    scaled,
    sdpa_math_kernel,
    unit,
)
from lightning_msign.guards.base import Guard
from lightning_msign.metric_keys import (
    CURV_COLD_START,
    CURV_HVPS,
    CURV_RESIDUAL,
    CURV_SHARPNESS,
    CURV_STABILITY_RATIO,
    CURV_THRESHOLD,
    CURV_TIME_MS,
)
from lightning_msign.targets import TargetsArg, resolve_targets, validate_targets

#: The optimizers whose step is ``lr * P^-1 m`` with a diagonal ``P`` read from their state.
SUPPORTED_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW)

_STABILITY, _SHARPNESS = "stability", "sharpness"

CurvatureMethod = Literal["lanczos", "power"]
_ESTIMATORS = {"lanczos": lanczos, "power": power_iteration}


class Curvature(Guard):
    r"""Every ``every_n_steps`` optimizer steps, the top eigenvalue of the Hessian as Adam's step sees it.

    After optimizer step :math:`t`, at the new weights :math:`\theta_{t}`, on the batch of that step, with the
    optimizer's state after the step, it estimates by a warm-started power iteration on Hessian-vector products
    (:mod:`lightning_msign.functional.curvature`):

    - the **stability ratio** :math:`\lambda_{\max}(D^{1/2} H D^{1/2}) \,/\, \frac{2 + 2\beta_1}{1 - \beta_1}` with
      :math:`D = \eta_g / P` per parameter (its group's learning rate :math:`\eta_g`, so per-group rates such as
      muP multipliers count) and Adam's effective preconditioner
      :math:`P = (1 - \beta_1^t)(\sqrt{v_t / (1 - \beta_2^t)} + \epsilon)` (Cohen et al. 2022: the step AdamW
      takes is :math:`\eta P^{-1} m_t`). Above 1, the step is past Adam's edge of stability (the threshold is 38
      for :math:`\beta_1 = 0.9`); groups with different :math:`\beta_1` are each divided by their own threshold.
    - the **preconditioned sharpness** :math:`\lambda_{\max}(P^{-1/2} H P^{-1/2})`, to compare with
      ``threshold`` :math:`= \frac{2 + 2\beta_1}{(1 - \beta_1)\eta}` (the "38 / lr" of the papers). When every
      measured parameter has the same :math:`\eta` and :math:`\beta_1` the two are the same eigenproblem scaled
      (one power iteration serves both); otherwise the sharpness needs a second iteration (twice the
      Hessian-vector products) and no single threshold exists.

    :math:`H` is the Hessian of the loss the closure returns, w.r.t. the measured parameters: all parameters
    that require a gradient and that the optimizer has updated (it holds their state), or those of ``targets``.
    The learning rate :math:`\eta` is the group's current ``lr`` (in Lightning, after the scheduler's step: the
    rate of the next step).

    *Estimator.* ``method="lanczos"`` (default): ``iterations`` Lanczos steps (:func:`~lightning_msign.functional.
    curvature.lanczos`), the top Ritz value of the Krylov space of the start: it converges to the largest
    *algebraic* eigenvalue, is never below power iteration's estimate from the same products, and keeps the
    ``iterations`` basis vectors in memory. ``method="power"``: the paper's power iteration (the Rayleigh quotient
    of the last iterate; two vectors of memory), which converges to the eigenvalue of largest *magnitude* and so
    reads a negative number when a negative eigenvalue dominates (measured: ``benchmarks/curvature_accuracy.py``).
    Both give lower bounds of the top eigenvalue; ``curvature/residual`` says how far from an eigenpair the
    returned vector is.

    *Warm start.* The eigenvector is carried from one measurement to the next in parameter space
    (:math:`w = D^{1/2} u`) and mapped through the new scale (:math:`u_0 = D_t^{-1/2} w`, i.e.
    :math:`D_t^{-1/2} D_{t-1}^{1/2} u_{t-1}`), then renormalised; ``iterations`` Hessian-vector products refine
    it. A cold start (a seeded random vector, ``cold_iterations`` products) happens at the first measurement,
    when the measured parameters change (a block unlocked by :class:`~lightning_msign.DepthWarmupCallback`, say),
    when the carried vector is more than ``max_gap`` optimizer steps old or not finite.

    *Cost.* One forward pass and one backward pass with ``create_graph=True``, then one double backward per
    Hessian-vector product (each about 2-3 backward passes), with the attention on SDPA's math kernel (the fused
    kernels have no double backward). Measured: ``benchmarks/overhead.py --curvature``. Nothing of the training
    is disturbed: no ``.grad`` is written (``torch.autograd.grad``), the global RNG is restored (dropout in the
    recomputed forward draws from a forked RNG), a ``torch.compile``-d module runs uncompiled, and no autocast
    is applied (the curvature of the loss in the parameters' dtype).

    *Distributed.* Under DDP every process computes Hessian-vector products on its own batch and they are
    averaged (the Hessian of the global loss, the mean of the processes' losses): the estimate, the carried
    vector and the metrics are identical on every process; every process must call on the same steps. Sharded
    parameters (FSDP2's DTensors) are refused: the double backward through ``fully_shard``'s gather hooks is
    not implemented here.

    Usage in any loop::

        curvature = Curvature(model, optimizer, every_n_steps=100)
        for x, y in loader:
            loss_fn(model(x), y).backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = curvature.step(lambda: loss_fn(model(x), y))  # {} except after steps 100, 200, ...

    Args:
        module: the model (or attach later with :meth:`attach`).
        optimizer: a ``torch.optim.Adam`` / ``AdamW`` over the model's parameters (or set later with
            :meth:`set_optimizer`). Others raise ``NotImplementedError``: Muon-type optimizers orthogonalise
            the momentum, a step that is no diagonal :math:`P^{-1} m`.
        every_n_steps: measure after every ``n``-th optimizer step.
        iterations: Hessian-vector products per warm-started measurement (per eigenproblem); at least 2 with
            Lanczos.
        cold_iterations: Hessian-vector products of a cold start.
        targets: ``None`` for every trainable parameter, else a selection as for the other guards (preset or
            globs, :mod:`lightning_msign.targets`): the parameters holding the selected matrices.
        max_gap: a carried vector older than this many optimizer steps is dropped (cold start).
        seed: seed of the cold-start vectors (the ``k``-th cold start uses ``seed + k``).
        method: ``"lanczos"`` or ``"power"`` (see *Estimator*).

    Raises:
        ValueError: at construction, for a bad argument; at :meth:`compute`, when the closure does not return
            a scalar tensor.
        NotImplementedError: at :meth:`set_optimizer` for an optimizer other than Adam / AdamW; at attach for
            sharded (DTensor) parameters.
        RuntimeError: at :meth:`compute`, when the optimizer holds no state for any measured parameter (it has
            not stepped yet) or has no parameter of the module.

    Metrics (returned by :meth:`step` / :meth:`compute`):
        ``curvature/stability_ratio``, ``curvature/preconditioned_sharpness``, ``curvature/threshold`` (one
        learning rate and one :math:`\beta_1` only), ``curvature/hvps``, ``curvature/residual`` (of the
        stability eigenproblem), ``curvature/cold_start`` and ``curvature/time_ms``.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        every_n_steps: int = 100,
        iterations: int = 5,
        cold_iterations: int = 20,
        targets: Optional[TargetsArg] = None,
        max_gap: int = 1000,
        seed: int = 0,
        method: CurvatureMethod = "lanczos",
    ) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.iterations = check_positive_int(iterations, "iterations")
        self.cold_iterations = check_positive_int(cold_iterations, "cold_iterations")
        self.targets = None if targets is None else validate_targets(targets, False)
        self.max_gap = check_positive_int(max_gap, "max_gap")
        self.seed = check_non_negative_int(seed, "seed")
        self.method = check_choice(method, "method", CurvatureMethod)
        if self.method == "lanczos" and min(self.iterations, self.cold_iterations) < 2:
            raise ValueError(
                "`iterations` and `cold_iterations` must be at least 2 with method='lanczos' (one Lanczos step returns"
                f" its start vector, so a warm start would never move), got iterations={iterations!r},"
                f" cold_iterations={cold_iterations!r}: use 2 or more, or method='power'"
            )
        self._optimizer: Optional[torch.optim.Optimizer] = None
        self._selected: Optional[set[int]] = None  # ids of the parameters of `targets`
        self._names: dict[int, str] = {}
        self._vectors: dict[str, list[Tensor]] = {}  # carried eigenvectors, in parameter space
        self._vector_names: list[str] = []
        self._vector_step = 0
        self._cold_starts = 0
        self._latest: dict[str, float] = {}
        if module is not None:
            self.attach(module)
        if optimizer is not None:
            self.set_optimizer(optimizer)

    # -------------------------------------------------------------------------------------- attaching
    def _on_attach(self, module: nn.Module) -> None:
        if self._fsdp1 is not None:
            raise NotImplementedError(
                "Curvature does not support FSDP1 (FullyShardedDataParallel): Hessian-vector products need a double"
                " backward through FSDP's gather and reduce-scatter hooks, which is not implemented here. Use DDP, or"
                " a single process."
            )
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        sharded = [n for n, p in named if is_sharded(p)]
        if sharded:
            raise NotImplementedError(
                f"Curvature does not support sharded (DTensor) parameters, got {sharded[0]!r}: Hessian-vector"
                " products need a double backward through FSDP2's all-gather hooks, which is not implemented here."
                " Use DDP, or a single process."
            )
        self._names = {id(p): n for n, p in named}
        if self.targets is not None:
            matrices = resolve_targets(module, self.targets, split_qkv=False)
            self._selected = {id(t.param) for t in matrices}

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> "Curvature":
        """The optimizer whose preconditioner and learning rates define the measured operator."""
        if not isinstance(optimizer, SUPPORTED_OPTIMIZERS):
            raise NotImplementedError(
                f"Curvature reads the diagonal preconditioner of torch.optim.Adam / AdamW, got"
                f" {type(optimizer).__name__}: its step is not `lr * P^-1 m` for a diagonal P read from its state"
                " (Muon and NuMuon orthogonalise the momentum; SGD has no preconditioner)"
            )
        self._optimizer = optimizer
        return self

    @property
    def optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer (``None`` until set)."""
        return self._optimizer

    @property
    def latest(self) -> dict[str, float]:
        """The metrics of the latest measurement (``{}`` before the first)."""
        return dict(self._latest)

    @property
    def latest_stability_ratio(self) -> Optional[float]:
        """``curvature/stability_ratio`` of the latest measurement, or ``None`` (read by the warm-up's gate)."""
        value = self._latest.get(CURV_STABILITY_RATIO)
        return None if value is None or not math.isfinite(value) else value

    _no_optimizer_hooks = "its step needs a loss closure on the step's batch (step(loss_fn, step))"

    # ------------------------------------------------------------------------------------------ steps
    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is followed by a measurement."""
        return step % self.every_n_steps == 0

    def step(self, loss_fn: Callable[[], Tensor], step: Optional[int] = None) -> dict[str, float]:
        """Call after each optimizer step; measures after steps ``n, 2n, ...``.

        Args:
            loss_fn: recomputes the loss of the step's batch at the current weights (called only when due).
            step: optimizer steps taken so far; default: the guard counts its calls. A step already seen
                does nothing (gradient accumulation).

        Returns:
            The metrics, or ``{}`` when not due.
        """
        self._require_module("step")
        current = self._advance(step)
        if current is None or not self.due(current):
            return {}
        return self._measure(loss_fn, current)

    def compute(self, loss_fn: Callable[[], Tensor]) -> dict[str, float]:
        """Measure now (at the step last seen), whatever the schedule."""
        self._require_module("compute")
        return self._measure(loss_fn, self._last_step)

    # ---------------------------------------------------------------------------------------- measuring
    def _operands(self) -> tuple[list[str], list[nn.Parameter], list[Tensor], list[float], list[float]]:
        """Measured parameters with their ``P``, group learning rate and group threshold."""
        optimizer = self._optimizer
        if optimizer is None:
            raise RuntimeError(
                "Curvature needs the optimizer: pass it to the constructor or call set_optimizer(optimizer) first"
                " (the Lightning callback takes the Trainer's)"
            )
        names, params, precond, lrs, thresholds = [], [], [], [], []
        in_optimizer = 0
        for group in optimizer.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                name = self._names.get(id(p))
                if name is None or not p.requires_grad:
                    continue
                in_optimizer += 1
                if self._selected is not None and id(p) not in self._selected:
                    continue
                state = optimizer.state.get(p, {})
                moment = state.get("max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq")
                if moment is None:
                    continue  # not updated yet (an inactive block, or before the first step)
                step = int(state["step"])
                names.append(name)
                params.append(p)
                precond.append(adam_preconditioner(moment, step, beta1, beta2, group["eps"]))
                lrs.append(float(group["lr"]))
                thresholds.append(edge_of_stability(beta1))
        if in_optimizer == 0:
            raise RuntimeError("Curvature: the optimizer holds no trainable parameter of the attached module")
        if not params:
            raise RuntimeError(
                "Curvature: the optimizer holds no state for the measured parameters: measure after an optimizer step"
            )
        return names, params, precond, lrs, thresholds

    def _measure(self, loss_fn: Callable[[], Tensor], step: int) -> dict[str, float]:
        module = self._require_module("step")
        names, params, precond, lrs, thresholds = self._operands()
        # D^1/2 = sqrt(lr / (P * threshold)): the top eigenvalue of D^1/2 H D^1/2 is the stability ratio.
        scale_stability = [(lr / (P * thr)).sqrt() for P, lr, thr in zip(precond, lrs, thresholds)]
        single = len(set(lrs)) == 1 and len(set(thresholds)) == 1
        fresh = (
            names != self._vector_names
            or step - self._vector_step > self.max_gap
            or any(not torch.isfinite(v).all() for vs in self._vectors.values() for v in vs)
        )
        if fresh:
            self._vectors = {}
        device = params[0].device
        metrics: dict[str, float] = {}
        cold = False
        hvps = 0
        with self._timed(device) as elapsed:
            # The global RNG (and the CUDA device's) is restored: dropout here does not shift the training's draws.
            rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            with rng, sdpa_math_kernel(), torch.enable_grad(), _uncompiled(module):
                loss = loss_fn()
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError(f"Curvature: `loss_fn` must return a scalar tensor, got {_describe(loss)}")
                loss = loss.reshape(())
                finite = bool(torch.isfinite(loss.detach()))
                if self._distributed:  # one decision everywhere: a process skipping the all-reduces would hang
                    finite = not any_process(not finite, loss.device)
                if finite:
                    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                    hvp = self._hvp_fn(params, grads, used)
                    problems = [(_STABILITY, scale_stability)]
                    if not single:
                        problems.append((_SHARPNESS, [P.rsqrt() for P in precond]))
                    estimates: dict[str, EigenEstimate] = {}
                    for key, scale in problems:
                        start = self._warm_start(key, scale)
                        iters = self.iterations
                        if start is None:
                            start, iters, cold = self._cold_start(params), self.cold_iterations, True
                        estimate = _ESTIMATORS[self.method](
                            lambda u, s=scale: scaled(hvp(scaled(u, s)), s), start, iters
                        )
                        hvps += estimate.products
                        estimates[key] = estimate
                        self._vectors[key] = [v.detach() for v in scaled(estimate.vector, scale)]
                    del grads
            if finite:
                ratio = estimates[_STABILITY]
                metrics[CURV_STABILITY_RATIO] = ratio.value
                metrics[CURV_RESIDUAL] = ratio.residual
                if single:
                    lr, thr = lrs[0], thresholds[0]
                    metrics[CURV_SHARPNESS] = ratio.value * thr / lr if lr > 0 else math.nan
                    if lr > 0:
                        metrics[CURV_THRESHOLD] = thr / lr
                else:
                    metrics[CURV_SHARPNESS] = estimates[_SHARPNESS].value
            else:
                metrics[CURV_STABILITY_RATIO] = metrics[CURV_SHARPNESS] = math.nan
                self._vectors = {}
        metrics[CURV_HVPS] = float(hvps)
        metrics[CURV_COLD_START] = float(cold)
        metrics[CURV_TIME_MS] = elapsed[0]
        self._vector_names = names if self._vectors else []
        self._vector_step = step
        self._latest = dict(metrics)
        return metrics

    def _hvp_fn(
        self, params: list[nn.Parameter], grads: tuple, used: list[int]
    ) -> Callable[[list[Tensor]], list[Tensor]]:
        """``v -> H v`` over ``params`` (zero rows for parameters the loss does not use), averaged over processes."""
        used_params = [params[i] for i in used]
        used_grads = [grads[i] for i in used]
        distributed = self._distributed and dist.is_available() and dist.is_initialized()

        def hvp(vector: list[Tensor]) -> list[Tensor]:
            out = [torch.zeros_like(p) for p in params]
            if used:
                products = hessian_vector_product(used_grads, used_params, [vector[i] for i in used])
                for i, hv in zip(used, products):
                    out[i] = hv
            if distributed:
                flat = torch.cat([h.reshape(-1) for h in out])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                flat /= dist.get_world_size()
                out = [chunk.view_as(p) for chunk, p in zip(flat.split([p.numel() for p in params]), params)]
            return out

        return hvp

    def _warm_start(self, key: str, scale: list[Tensor]) -> Optional[list[Tensor]]:
        carried = self._vectors.get(key)
        if carried is None:
            return None
        return unit(scaled([v.to(s.device) for v, s in zip(carried, scale)], scale, inverse=True))

    def _cold_start(self, params: list[nn.Parameter]) -> list[Tensor]:
        vector = random_unit_vector([p.detach() for p in params], self.seed + self._cold_starts)
        self._cold_starts += 1
        return vector

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Step, carried eigenvectors (CPU tensors), their parameter names and age, cold starts, latest metrics."""
        return {
            **super().state_dict(),
            "vectors": {k: [v.detach().cpu().clone() for v in vs] for k, vs in self._vectors.items()},
            "vector_names": list(self._vector_names),
            "vector_step": self._vector_step,
            "cold_starts": self._cold_starts,
            "latest": dict(self._latest),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._vectors = {k: [v.clone() for v in vs] for k, vs in state_dict.get("vectors", {}).items()}
        self._vector_names = list(state_dict.get("vector_names", []))
        self._vector_step = int(state_dict.get("vector_step", 0))
        self._cold_starts = int(state_dict.get("cold_starts", 0))
        self._latest = {k: float(v) for k, v in state_dict.get("latest", {}).items()}


@contextmanager
def _uncompiled(module: nn.Module) -> Iterator[None]:
    """Submodules compiled in place (``nn.Module.compile``) run their eager forward in the block.

    AOT-autograd graphs have no double backward; the eager forward computes the same function.
    """
    compiled = [(m, m._compiled_call_impl) for m in module.modules() if getattr(m, "_compiled_call_impl", None)]
    for m, _ in compiled:
        m._compiled_call_impl = None
    try:
        yield
    finally:
        for m, impl in compiled:
            m._compiled_call_impl = impl


def _describe(value: Any) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return type(value).__name__
