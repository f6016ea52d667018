"""Muon and NuMuon (rank-``k`` Muon) with AdamW for the other parameters, as one ``torch.optim.Optimizer``.

Muon (Jordan et al. 2024) steps every hidden weight matrix along the matrix sign of its momentum;
NuMuon (arXiv 2603.03597) keeps only the top ``k`` singular directions of the momentum, a
nuclear-norm-constrained step that pushes weights towards low rank. MSign and PSS push the other way (they
restore stable rank), so the suite ships both optimizers to let a user measure the trade-off.

The optimizer is one object, as Keller Jordan's ``MuonWithAuxAdam``: param groups with ``use_muon=True``
take (Nu)Muon steps, groups with ``use_muon=False`` AdamW steps (torch's own AdamW function, so they match
``torch.optim.AdamW`` exactly). One optimizer is what Lightning's automatic optimization, LR schedulers and
``LearningRateMonitor`` expect. :func:`muon_param_groups` builds the groups from a model: every matrix of the
hidden layers to Muon, with the layouts of fused weights read from the model (a fused Q/K/V weight is three
matrices, each with its own update: the same layouts as MSign, :mod:`lightning_msign.layouts`); token
embeddings, the LM head, norms and biases to AdamW.

Distributed: the update of a matrix is computed on the whole matrix by one process and sent to the others,
through the plan MSign uses (:class:`~lightning_msign.distributed.WholeMatrixPlan`): under DDP each process
computes about ``1 / world`` of the matrices; under FSDP2 the momentum of a sharded matrix is gathered whole
onto its owner and the update scattered back as shards. A rank-``k`` update of a shard would be as wrong as the
sign of a shard.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.adam import adam as _adam_function

from lightning_msign import metric_keys as keys
from lightning_msign._validation import (
    check_betas,
    check_bool,
    check_choice,
    check_non_negative_int,
    check_optional_positive_int,
    check_range,
)
from lightning_msign.distributed import MatrixResult, OwnedMatrix, WholeMatrixPlan, is_distributed, local_tensor
from lightning_msign.functional.lowrank import rank_k_sign
from lightning_msign.functional.msign import BACKENDS, msign
from lightning_msign.functional.precision import as_compute
from lightning_msign.layouts import parse_layout
from lightning_msign.optim.groups import refuse_fsdp1
from lightning_msign.optim.schedule import (
    AdjustLR,
    RankFraction,
    check_rank_fraction,
    lr_scale,
    rank_fraction_at,
    rank_of,
)
from lightning_msign.targets import (
    TargetMatrix,
    expand_targets,
)

__all__ = ["Muon", "NuMuon"]


# ------------------------------------------------------------------------------------------ the optimizer
@dataclass(frozen=True)
class _Block(TargetMatrix):
    """One matrix of a Muon parameter, read from (and written into) the step's update tensor."""

    k: int = 0  # directions kept; 0: the full sign by the group's backend
    scale: float = 1.0  # the learning-rate factor of its shape


@dataclass
class _BlockResult(MatrixResult):
    right: Tensor  # V_k, flattened (empty for a full sign)
    captured: float
    kept: int
    finite: bool

    @classmethod
    def vector_length(cls, field_name: str, target: TargetMatrix) -> int:
        return target.shape[1] * getattr(target, "k", 0)


class NuMuon(Optimizer):
    r"""NuMuon: Muon with a rank-``k`` update (arXiv 2603.03597), and AdamW for the ``use_muon=False`` groups.

    For each matrix of a ``use_muon`` group, with gradient :math:`G_t`, momentum :math:`\mu` and rank
    fraction :math:`r(t)`:

    .. math::

        M_t &= \mu M_{t-1} + (1 - \mu) G_t, \qquad
        \tilde M_t = \mu M_t + (1 - \mu) G_t \ \text{(nesterov, else } M_t) \\
        k_t &= \lceil r(t) \min(m, n) \rceil, \qquad (U_k, S_k, V_k) = \text{top-}k_t \text{ SVD of } \tilde M_t \\
        W &\leftarrow (1 - \eta\lambda) W - \eta\, s(m, n)\, U_k V_k^\top

    (the momentum and weight-decay conventions of ``torch.optim.Muon``). The update has rank :math:`\le k_t`
    and all its non-zero singular values equal :math:`\eta s`: the maximiser of
    :math:`\langle \tilde M_t, X\rangle` over the spectral-norm ball intersected with a nuclear-norm ball. With
    :math:`k_t = \min(m, n)` it is Muon's update with the sign computed by ``backend`` (``"svd"``: the exact
    sign). Otherwise the top-``k`` directions come from a randomized block Krylov space
    (:func:`~lightning_msign.functional.block_krylov_topk`: ``krylov_iterations`` iterations, a block of
    ``k + oversample`` columns) warm-started from the previous step's :math:`V_k`, which is kept in the
    optimizer state. Singular values at the zero threshold of :func:`~lightning_msign.functional.msign` are
    dropped (a zero momentum gives no update). Fused weights are cut by their ``layouts`` (from
    :func:`muon_param_groups`) and each block gets its own ``k``, scale and update.

    ``adjust_lr_fn`` sets :math:`s(m, n)` from the block's shape: ``"match_rms_adamw"`` (default; Moonlight,
    :math:`0.2\sqrt{\max(m, n)}`: a full-rank update then has the RMS of a typical AdamW update, so one learning
    rate serves both kinds of groups), ``"original"`` (Keller Jordan's :math:`\sqrt{\max(1, m/n)}`) or
    ``"none"``. The spectral norm of the update is :math:`\eta s` whatever ``k``; its RMS is
    :math:`\sqrt{k / \min(m, n)}` times Muon's.

    ``rank_fraction`` is a float in (0, 1] or a schedule dict (plain values, so it saves with the optimizer):
    ``{"schedule": "cosine", "start": 1.0, "end": 0.25, "steps": 1000}``,
    ``{"schedule": "piecewise", "start": 1.0, "milestones": [[500, 0.5], [2000, 0.25]]}`` or
    ``{"schedule": "constant", "value": 0.25}`` (see :func:`rank_fraction_at`); steps count this group's
    optimizer steps, kept in the group (``"steps"``) and in the state dict.

    ``use_muon=False`` groups take ``torch.optim.AdamW`` steps (the same function; ``betas``, ``eps``,
    ``weight_decay`` per group), with AdamW's state keys (``step``, ``exp_avg``, ``exp_avg_sq``).

    Non-finite gradients: a Muon parameter whose gradient holds NaN/Inf (on any process) is not updated and its
    momentum is kept (counted in ``skipped_nonfinite``, a ``RuntimeWarning``); a weight is never written with
    a non-finite value. AdamW groups behave as ``torch.optim.AdamW`` (use gradient clipping or a scaler).

    Args:
        params: parameters or param groups. Group keys: ``use_muon`` (default True), ``layouts`` (Muon groups:
            one layout string or ``None`` per parameter), and any argument below.
        lr: learning rate :math:`\eta` (both kinds of groups).
        momentum: :math:`\mu`, in [0, 1).
        nesterov: Nesterov momentum (as Muon).
        weight_decay: decoupled weight decay :math:`\lambda` (both kinds of groups).
        rank_fraction: :math:`r`, a float in (0, 1] or a schedule (above).
        krylov_iterations: block Krylov iterations (the reported 2).
        oversample: extra columns of the Krylov block (the reported 8).
        backend: how a full-rank update's sign is computed: ``"svd"`` (exact), ``"newton_schulz"`` (Muon's 5
            quintic steps, in float32) or ``"polar_express"``.
        ns_steps: iterations of a polynomial backend (``None``: its default); must be ``None`` for ``"svd"``.
        adjust_lr_fn: ``"match_rms_adamw"``, ``"original"`` or ``"none"`` (above).
        betas: AdamW's, for the ``use_muon=False`` groups.
        eps: AdamW's, for the ``use_muon=False`` groups.
        distributed: share the work and write identical weights on every process through the whole-matrix
            plan; ``None`` (default): when ``torch.distributed`` runs more than one process. Set ``False`` when
            processes train different models.

    Raises:
        ValueError: at construction, a bad argument (naming it and the value), a parameter of a Muon group
            that is not a matrix and has no layout (a 1D norm weight or bias belongs in an AdamW group:
            :func:`muon_param_groups`), a layout that does not fit its parameter.

    Example::

        from lightning_msign.optim import NuMuon, muon_param_groups

        optimizer = NuMuon(muon_param_groups(model), lr=3e-3, rank_fraction=0.25, weight_decay=0.1)
        for batch in loader:
            model(batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    """

    _full_rank_only = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        rank_fraction: RankFraction = 0.25,
        krylov_iterations: int = 2,
        oversample: int = 8,
        backend: str = "svd",
        ns_steps: Optional[int] = None,
        adjust_lr_fn: AdjustLR = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        distributed: Optional[bool] = None,
    ) -> None:
        if distributed is not None:
            check_bool(distributed, "distributed")
        self.distributed = distributed
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
            "rank_fraction": rank_fraction,
            "krylov_iterations": krylov_iterations,
            "oversample": oversample,
            "backend": backend,
            "ns_steps": ns_steps,
            "adjust_lr_fn": adjust_lr_fn,
            "betas": betas,
            "eps": eps,
            "use_muon": True,
            "layouts": None,
            "steps": 0,
            "skipped_nonfinite": 0,
        }
        self._check_options(defaults, "")
        self._blocks: dict[int, list[_Block]] = {}
        self._last: dict[str, float] = {}
        super().__init__(params, defaults)

    # -------------------------------------------------------------------------------------- validation
    @staticmethod
    def _check_options(group: dict[str, Any], where: str) -> None:
        def name(key: str) -> str:
            return f"{where}{key}"

        check_range(group["lr"], name("lr"), low=0.0)
        check_range(group["momentum"], name("momentum"), low=0.0, high=1.0)
        if group["momentum"] >= 1.0:
            raise ValueError(f"`{name('momentum')}` must be in [0, 1), got {group['momentum']!r}")
        check_bool(group["nesterov"], name("nesterov"))
        check_range(group["weight_decay"], name("weight_decay"), low=0.0)
        group["rank_fraction"] = check_rank_fraction(group["rank_fraction"], name("rank_fraction"))
        check_non_negative_int(group["krylov_iterations"], name("krylov_iterations"))
        check_non_negative_int(group["oversample"], name("oversample"))
        if group["backend"] not in BACKENDS:
            raise ValueError(f"`{name('backend')}` must be one of {BACKENDS}, got {group['backend']!r}")
        steps = group["ns_steps"]
        if group["backend"] == "svd" and steps is not None:
            raise ValueError(f"`{name('ns_steps')}` must be None with backend 'svd' (it is exact), got {steps!r}")
        check_optional_positive_int(steps, name("ns_steps"))
        check_choice(group["adjust_lr_fn"], name("adjust_lr_fn"), AdjustLR)
        group["betas"] = check_betas(group["betas"], name("betas"))
        check_range(group["eps"], name("eps"), low=0.0, low_open=True)
        check_bool(group["use_muon"], name("use_muon"))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        label = f"param_groups[{index}]" + (f" ({group['name']!r})" if "name" in group else "")
        self._check_options(group, f"{label}.")
        params = group["params"]
        refuse_fsdp1(params, label)
        layouts = group["layouts"]
        if not group["use_muon"]:
            if layouts is not None:
                raise ValueError(f"{label}: `layouts` applies to Muon groups only (use_muon=True), got {layouts!r}")
            return
        if layouts is None:
            layouts = group["layouts"] = [None] * len(params)
        if not isinstance(layouts, (list, tuple)) or len(layouts) != len(params):
            raise ValueError(
                f"{label}: `layouts` must be a list with one layout string (or None) per parameter ({len(params)}),"
                f" got {layouts!r}"
            )
        group["layouts"] = list(layouts)
        for i, (p, spec) in enumerate(zip(params, layouts)):
            where = f"{label} parameter {i} (shape {tuple(p.shape)})"
            if spec is None:
                if p.ndim != 2:
                    raise ValueError(
                        f"{where}: a Muon group takes matrices, got a {p.ndim}-D tensor. Norm weights, biases and"
                        " embeddings belong in an AdamW group (use_muon=False; lightning_msign.optim.muon_param_groups"
                        " builds both); a tensor holding several matrices needs its layout in the group's `layouts`"
                    )
                layout = None
            else:
                layout = parse_layout(spec, f"{label}.layouts[{i}]")
                layout.check(tuple(p.shape), where)
            self._blocks[id(p)] = expand_targets(f"group{index}.param{i}", p, "other", layout)

    # ------------------------------------------------------------------------------------------ info
    def rank_fraction(self, group_index: Optional[int] = None) -> float:
        """The rank fraction the next step of the (first, by default) Muon group uses."""
        groups = [g for g in self.param_groups if g["use_muon"]]
        if group_index is not None:
            groups = [self.param_groups[group_index]]
        if not groups:
            raise ValueError("This optimizer has no Muon group (use_muon=True)")
        return rank_fraction_at(groups[0]["rank_fraction"], groups[0]["steps"])

    def metrics(self) -> dict[str, float]:
        """What the last step did, for a logger: ``numuon/rank_fraction`` (the first Muon group's),
        ``numuon/captured_energy`` (mean over matrices of ``||S_k||^2 / ||M||_F^2``: the share of the
        momentum the update followed) and ``numuon/skipped_nonfinite`` (parameters skipped so far).
        ``{}`` before the first step."""
        return dict(self._last)

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Any = None) -> Optional[Tensor]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if not group["use_muon"]:
                self._adamw_step(group)
        self._muon_step([g for g in self.param_groups if g["use_muon"]])
        for group in self.param_groups:
            group["steps"] += 1
        return loss

    def _adamw_step(self, group: dict[str, Any]) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        has_complex = False
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("NuMuon's AdamW groups do not support sparse gradients")
            has_complex |= torch.is_complex(p)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        _adam_function(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            foreach=None, capturable=False, differentiable=False, fused=None, grad_scale=None, found_inf=None,
            has_complex=has_complex, decoupled_weight_decay=True, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    def _is_distributed(self) -> bool:
        return is_distributed() if self.distributed is None else bool(self.distributed and is_distributed())

    def _muon_step(self, groups: list[dict[str, Any]]) -> None:
        work = [(g, p) for g in groups for p in g["params"] if p.grad is not None]
        if not groups:
            return
        distributed = self._is_distributed()
        finite = self._finite([p.grad for _, p in work], distributed)
        blocks: list[_Block] = []
        owners: list[tuple[dict[str, Any], Tensor, int]] = []  # (group, param, slot) per block
        starts: dict[int, Optional[Tensor]] = {}
        updates: list[tuple[dict[str, Any], Tensor, Tensor]] = []
        skipped = 0
        for (group, p), ok in zip(work, finite):
            if not ok:
                group["skipped_nonfinite"] += 1
                skipped += 1
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf.clone()
            updates.append((group, p, update))
            fraction = rank_fraction_at(group["rank_fraction"], group["steps"])
            for slot, t in enumerate(self._blocks[id(p)]):
                shape = t.shape
                k = rank_of(fraction, shape)
                full = k == min(shape)
                block = _Block(t.name, t.param_name, update, t.role, t.layout, t.expert, t.offset, t.size,
                               k=0 if full else k, scale=lr_scale(group["adjust_lr_fn"], shape))
                starts[len(blocks)] = None if full else state.get(f"krylov_right_{slot}")
                blocks.append(block)
                owners.append((group, p, slot))
        if skipped:
            warnings.warn(
                f"{type(self).__name__}: {skipped} parameters with a non-finite gradient were not updated (their"
                " momentum is kept)", RuntimeWarning, stacklevel=3,
            )
        results: dict[str, _BlockResult] = {}
        if blocks:
            def compute(owned: list[OwnedMatrix]) -> dict[int, _BlockResult]:
                return {o.index: self._orthogonalize(o, owners[o.index][0], starts[o.index]) for o in owned}

            results = WholeMatrixPlan(blocks, distributed).run(compute, _BlockResult)
        captured, by_param_bad = [], set()
        for block, (group, p, slot) in zip(blocks, owners):
            r = results.get(block.name)
            if r is None or not r.finite:
                by_param_bad.add(id(p))
                continue
            captured.append(r.captured)
            if block.k:
                self.state[p][f"krylov_right_{slot}"] = r.right.view(block.shape[1], block.k).to(p.dtype).clone()
        for group, p, update in updates:
            if id(p) in by_param_bad:
                group["skipped_nonfinite"] += 1
                continue
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update, alpha=-group["lr"])
        first = groups[0]
        skipped_total = float(sum(g["skipped_nonfinite"] for g in groups))
        if self._full_rank_only:
            self._last = {keys.MUON_SKIPPED_NONFINITE: skipped_total}
            return
        self._last = {
            keys.NUMUON_RANK_FRACTION: rank_fraction_at(first["rank_fraction"], first["steps"]),
            keys.NUMUON_CAPTURED_ENERGY: sum(captured) / len(captured) if captured else float("nan"),
            keys.NUMUON_SKIPPED_NONFINITE: skipped_total,
        }

    def _finite(self, grads: list[Tensor], distributed: bool) -> list[bool]:
        if not grads:
            return []
        flags = torch.stack([torch.isfinite(local_tensor(g)).all() for g in grads]).float()
        if distributed:
            backend = dist.get_backend()
            device = flags.device if backend != "gloo" else torch.device("cpu")
            moved = flags.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.MIN)
            flags = moved
        return [bool(v) for v in flags.cpu().tolist()]

    @staticmethod
    def _orthogonalize(o: OwnedMatrix, group: dict[str, Any], start: Optional[Tensor]) -> _BlockResult:
        block: _Block = o.target  # type: ignore[assignment]
        X = as_compute(o.matrix)
        empty = X.new_zeros(block.shape[1] * block.k)
        if block.k == 0:
            sign = msign(X, group["backend"], group["ns_steps"] if group["backend"] != "svd" else None)
            captured, kept, right = 1.0, min(X.shape), empty
        else:
            try:
                low = rank_k_sign(X, block.k, group["krylov_iterations"], group["oversample"], start, group["steps"])
            except torch.linalg.LinAlgError:  # LAPACK's SVD did not converge: once more in float64
                low = rank_k_sign(X.double(), block.k, group["krylov_iterations"], group["oversample"], start,
                                  group["steps"])
            sign, captured, kept, right = low.sign.to(X.dtype), low.captured, low.rank, low.right.reshape(-1)
        update = sign * block.scale
        if not bool(torch.isfinite(update).all()):
            o.write(torch.zeros_like(update))
            return _BlockResult(empty, float("nan"), 0, False)
        o.write(update)
        return _BlockResult(right.to(X.dtype), float(captured), int(kept), True)


class Muon(NuMuon):
    r"""Muon (orthogonalised momentum) for the ``use_muon`` groups and AdamW for the others, as one optimizer.

    :class:`NuMuon` at rank fraction 1 with Muon's Newton-Schulz sign by default (``backend``: ``"svd"`` for
    the exact sign, ``"polar_express"``), the momentum, Nesterov and weight-decay conventions of
    ``torch.optim.Muon``, per-block updates of fused weights, and the whole-matrix distributed plan. The
    Newton-Schulz iteration runs in float32 (``torch.optim.Muon`` runs it in bfloat16).

    Args:
        params: as :class:`NuMuon`.
        lr: as :class:`NuMuon`.
        momentum: as :class:`NuMuon`.
        nesterov: as :class:`NuMuon`.
        weight_decay: as :class:`NuMuon`.
        adjust_lr_fn: as :class:`NuMuon`.
        betas: as :class:`NuMuon`.
        eps: as :class:`NuMuon`.
        distributed: as :class:`NuMuon`.
        backend: ``"newton_schulz"`` (default, 5 steps), ``"polar_express"`` or ``"svd"``.
        ns_steps: iterations of a polynomial backend (``None``: its default).

    :meth:`metrics` returns ``muon/skipped_nonfinite`` (parameters skipped so far).
    """

    _full_rank_only = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.1,
        backend: str = "newton_schulz",
        ns_steps: Optional[int] = None,
        adjust_lr_fn: AdjustLR = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        distributed: Optional[bool] = None,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, rank_fraction=1.0,
            backend=backend, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn, betas=betas, eps=eps,
            distributed=distributed,
        )

