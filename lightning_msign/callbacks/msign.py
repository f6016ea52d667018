"""MSign: periodic matrix-sign restoration of the stable rank of weight matrices."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_msign.callbacks._common import (
    check_bool,
    check_choice,
    TargetedCallback,
    check_positive_int,
    log_to_loggers,
    synchronize,
)
from lightning_msign.functional.msign import BACKENDS, msign_restore
from lightning_msign.functional.spectral import stable_rank
from lightning_msign.distributed import Block
from lightning_msign.targets import validate_targets


class MSignCallback(TargetedCallback):
    r"""Restore the stable rank of target weight matrices every ``period`` optimizer steps.

    MSign (arXiv 2602.01734, Algorithm 1) observes that training failures of transformers are preceded
    by a collapse of the stable rank :math:`\|W\|_F^2 / \|W\|_2^2` of weight matrices together with
    growing alignment of adjacent layers' Jacobians, which makes gradient norms grow exponentially
    with depth. After the optimizer step whose ``trainer.global_step`` is a multiple of ``period``
    (gradient accumulation respected: once per optimizer step, never per micro-batch), each target
    matrix :math:`W = U S V^\top` is replaced by its matrix sign, rescaled to keep its Frobenius norm:

    .. math::

        W \leftarrow \frac{\|W\|_F}{\|U V^\top\|_F}\, U V^\top,
        \qquad \|U V^\top\|_F = \sqrt{\operatorname{rank}(W)}.

    Row and column spaces are kept; the spectrum becomes flat. The optimizer state (Adam moments) is
    left as it is, as in the paper. With LitGPT's fused ``attn.qkv.weight`` the Q, K and V row blocks
    are signed separately (``split_qkv=True``, sizes from the model's config, grouped-query aware);
    ``split_qkv=False`` signs the stacked matrix, which mixes the blocks' scales.

    What it really does on these machines: on a 12-layer byte-level LitGPT at a failing learning rate
    it reduced the gap to a healthy run only partly (see README, "Measured stability"); qk-norm did
    more. Treat it as one tool, and watch :class:`~lightning_msign.StableRankMonitor`.

    Computation is in float32 (float64 stays float64) and the result is written back in the
    parameter's dtype, so ``32-true``, ``bf16-mixed`` and ``bf16-true`` all work. A target holding
    NaN/Inf is skipped (warned, counted) and a result that is not finite is never written; a zero
    matrix is left as is. Matrices of one shape are processed in one batched call.

With several processes the work is spread (:mod:`lightning_msign.distributed`): under DDP each
process signs about ``1 / world`` of the targets and broadcasts the results, so every process holds
bit-identical weights, equal to a single process's; under FSDP2 (``ModelParallelStrategy`` with
``fully_shard``) each whole matrix is gathered on one process, signed there and cut back into its
shards. A shard is never signed.

    Args:
        period: optimizer steps between applications (the paper's ``P``; default 100). Applications
            happen after optimizer steps ``P, 2P, ...``.
        targets: a preset (``"attention"``: Q, K, V and output projections; ``"qk"``; ``"mlp"``;
            ``"all_2d"``: every 2D weight except embeddings and LM head), a glob pattern on parameter
            names, or a list mixing both. See :mod:`lightning_msign.targets`.
        backend: ``"svd"`` (exact), ``"polar_express"`` or ``"newton_schulz"`` (approximations; see
            :func:`lightning_msign.functional.msign` for their accuracy).
        steps: iterations of a polynomial backend (``None``: its default); must be ``None`` for svd.
        split_qkv: sign fused Q/K/V blocks separately.
        log_stable_rank: at each application, log the exact stable rank of every target before and
            after (costs one extra singular-value computation per target and application).
        norm: the Frobenius norm of the result. ``"keep"`` (the paper): that of ``W``. ``"cap_init"``:
            ``min(||W||_F, ||W_0||_F)``, where ``W_0`` is the matrix at the start of the first fit (kept
            in the checkpoint): the sign and a norm cap. Not in the paper; an experiment on why MSign
            leaves attention logits growing (the Frobenius-keeping rescale keeps the norm that Adam
            grows). Measured (README, "Measured stability"), a cap every 10 steps did *not* help:
            between applications Adam regrows the norm, and the cap hurt the loss.

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, when ``targets`` match no
            matrix of the model (the message lists the matrices that exist).
        NotImplementedError: at ``setup``, for FSDP1 (``FSDPStrategy``) and DeepSpeed (see README,
            "Distributed training"); DDP and FSDP2 (``ModelParallelStrategy``) are supported.

    Logged metrics (at application steps, straight to the Trainer's loggers whatever
    ``log_every_n_steps`` is, at the step index of that batch's ``train/loss``):
        ``msign/applications``: applications so far. ``msign/time_ms``: wall time of this application.
        ``msign/skipped_nonfinite``: targets skipped so far because they held NaN/Inf.
        ``msign/srank_before/<name>``, ``msign/srank_after/<name>``: stable rank of each target, and
        ``msign/srank_before_min``, ``msign/srank_after_min`` (with ``log_stable_rank``).

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import LitGPTModule, MSignCallback, ShakespeareDataModule, StableRankMonitor

        model = LitGPTModule({"n_layer": 6, "n_head": 4, "n_embd": 128}, vocab_size=256, block_size=256)
        trainer = Trainer(max_steps=1000, callbacks=[MSignCallback(period=100), StableRankMonitor()])
        trainer.fit(model, ShakespeareDataModule())
    """

    def __init__(
        self,
        period: int = 100,
        targets: Union[str, list[str]] = "attention",
        backend: Literal["svd", "polar_express", "newton_schulz"] = "svd",
        steps: Optional[int] = None,
        split_qkv: bool = True,
        log_stable_rank: bool = True,
        norm: Literal["keep", "cap_init"] = "keep",
    ) -> None:
        super().__init__()
        self.period = check_positive_int(period, "period")
        self.backend = check_choice(backend, "backend", BACKENDS)
        if backend == "svd" and steps is not None:
            raise ValueError(f"`steps` must be None with backend 'svd' (it is exact), got {steps!r}")
        self.steps = None if steps is None else check_positive_int(steps, "steps")
        self.split_qkv = check_bool(split_qkv, "split_qkv")
        self.targets = validate_targets(targets, split_qkv)
        self.log_stable_rank = check_bool(log_stable_rank, "log_stable_rank")
        self.norm = check_choice(norm, "norm", ("keep", "cap_init"))

        self._applications = 0
        self._ref_norms: Optional[list[float]] = None  # norm="cap_init": Frobenius norms at the first fit start
        self._skipped_nonfinite = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(period=self.period, targets=self.targets, backend=self.backend)

    @property
    def applications(self) -> int:
        """Number of applications so far (restored on resume)."""
        return self._applications

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.norm == "cap_init":
            if self._ref_norms is None:  # a fresh run; on resume they come from the checkpoint
                table = self._require_plan("on_fit_start").run(self._frobenius_norms, result_size=1, write=False)
                self._ref_norms = table[:, 0].tolist()
            elif len(self._ref_norms) != len(self._targets):
                raise ValueError(
                    f"MSignCallback(norm='cap_init') restored {len(self._ref_norms)} reference norms for "
                    f"{len(self._targets)} target matrices: the targets changed since the checkpoint"
                )
        rank_zero_info(
            f"MSignCallback: {len(self._targets)} matrices, every {self.period} optimizer steps, backend {self.backend!r}"
            + (", Frobenius norms capped at their value at fit start" if self.norm == "cap_init" else "")
        )

    @staticmethod
    def _frobenius_norms(blocks: list[Block]) -> dict[int, torch.Tensor]:
        return {b.index: torch.linalg.matrix_norm(b.matrix.double()).reshape(1) for b in blocks}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._optimizer_step_due(trainer, self.period):
            log_to_loggers(trainer, self.apply(pl_module.device), step=trainer.global_step - 1)

    @torch.no_grad()
    def apply(self, device: Optional[torch.device] = None) -> dict[str, float]:
        """Apply MSign to every target now; returns the metrics of this application.

        Called by the callback after optimizer steps ``period, 2 * period, ...``; public so that a
        manual-optimization loop or a test can apply it directly (after ``setup``). In a run with
        several processes every process must call it (the matrices are spread over them).
        """
        plan = self._require_plan("apply")
        device = device or self._targets[0].param.device
        synchronize(device)
        start = time.perf_counter()
        # Row per target: [written (0/1), stable rank before, stable rank after].
        table = plan.run(self._sign_blocks, result_size=3)
        synchronize(device)
        elapsed_ms = (time.perf_counter() - start) * 1e3

        self._applications += 1
        metrics: dict[str, float] = {}
        skipped = [t.name for t, row in zip(self._targets, table) if row[0] != 1]
        if skipped:
            self._skipped_nonfinite += len(skipped)
            rank_zero_warn(f"MSignCallback skipped {len(skipped)} matrices holding NaN/Inf: {skipped[:5]}")
        if self.log_stable_rank and len(skipped) < len(self._targets):
            written = [(t.name, row) for t, row in zip(self._targets, table.tolist()) if row[0] == 1]
            for name, row in written:
                metrics[f"msign/srank_before/{name}"] = row[1]
                metrics[f"msign/srank_after/{name}"] = row[2]
            metrics["msign/srank_before_min"] = min(row[1] for _, row in written)
            metrics["msign/srank_after_min"] = min(row[2] for _, row in written)
        metrics["msign/applications"] = float(self._applications)
        metrics["msign/time_ms"] = elapsed_ms
        metrics["msign/skipped_nonfinite"] = float(self._skipped_nonfinite)
        return metrics

    def _sign_blocks(self, blocks: list[Block]) -> dict[int, torch.Tensor]:
        """Sign the whole matrices this process owns, batched by shape; never writes a non-finite value."""
        results: dict[int, torch.Tensor] = {}
        groups: dict[tuple, list[Block]] = {}
        for b in blocks:
            groups.setdefault((tuple(b.matrix.shape), b.matrix.dtype), []).append(b)
        for group in groups.values():
            X = torch.stack([b.matrix for b in group])  # (G, m, n)
            X = X.float() if X.dtype != torch.float64 else X
            finite = torch.isfinite(X).flatten(1).all(dim=1)  # (G,)
            X = torch.where(finite[:, None, None], X, torch.zeros((), dtype=X.dtype, device=X.device))
            new = msign_restore(X, backend=self.backend, steps=self.steps)  # (G, m, n), ||new_i||_F = ||X_i||_F
            if self.norm == "cap_init":  # ||new_i||_F = min(||X_i||_F, reference norm)
                ref = torch.tensor([self._ref_norms[b.index] for b in group], dtype=X.dtype, device=X.device)
                current = torch.linalg.matrix_norm(X)
                new = new * torch.where(current > ref, ref / current.clamp_min(torch.finfo(X.dtype).tiny),
                                        torch.ones_like(current))[:, None, None]
            ok = finite & torch.isfinite(new).flatten(1).all(dim=1)
            if self.log_stable_rank:
                before, after = stable_rank(X), stable_rank(new)
            else:
                before = after = torch.zeros(len(group), device=X.device)
            for i, (b, good) in enumerate(zip(group, ok.tolist())):
                if good:
                    b.matrix.copy_(new[i])
                results[b.index] = torch.stack([ok[i].to(before.dtype), before[i], after[i]])
        return results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self._last_step,
            "applications": self._applications,
            "skipped_nonfinite": self._skipped_nonfinite,
            "ref_norms": self._ref_norms,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))
        self._applications = int(state_dict.get("applications", 0))
        self._skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        ref = state_dict.get("ref_norms")
        self._ref_norms = None if ref is None else [float(x) for x in ref]
