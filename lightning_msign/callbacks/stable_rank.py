"""StableRankMonitor: cheap per-step stable rank of weight matrices, and the total gradient norm."""

from __future__ import annotations

from typing import Any, Literal, Union

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.optim import Optimizer
from torchmetrics.aggregation import MeanMetric, MinMetric
from typing_extensions import override

from lightning_msign.callbacks._common import (
    check_bool,
    check_choice,
    TargetedCallback,
    check_positive_int,
    global_grad_norm,
    log_to_loggers,
)
from lightning_msign.functional.spectral import initial_vector, stable_rank, stable_rank_estimate
from lightning_msign.distributed import Block
from lightning_msign.targets import validate_targets

MODES = ("power", "exact")


class StableRankMonitor(TargetedCallback):
    r"""Log the stable rank of weight matrices every ``every_n_steps`` optimizer steps.

    The stable rank :math:`\operatorname{srank}(W) = \|W\|_F^2 / \|W\|_2^2` of attention projections
    collapsing towards one is, with growing Jacobian alignment between layers, the precursor of the
    gradient explosions that MSign (arXiv 2602.01734) repairs. This callback makes it visible in any
    logger, matrix by matrix (fused Q/K/V blocks separately), with the minimum and mean over all
    targets and the total gradient norm.

    ``mode="power"`` (default) estimates :math:`\|W\|_2` by power iteration warm-started from the
    previous step's singular vector (``power_iters`` iterations, two matrix-vector products each;
    the first estimate of a matrix uses ``warmup_iters``). Its estimate of the stable rank is an upper
    bound of the exact value that tightens as the iteration converges; the vectors are saved in
    checkpoints so a resumed run logs what an uninterrupted one would. Measured on a tiny LitGPT at
    learning rate 3e-3: near initialisation, where the top singular values of a random matrix are
    nearly equal and the weights move ~10% a step, one iteration a step overstates the stable rank by
    up to ~15-20% for a few matrices, and one iteration every two steps by up to ~40% (42% seen once;
    the median is within 2-7%; even 16 iterations a step left one matrix 3% high); once a matrix has a dominant direction, which is the collapse this monitor is
    for, the estimate is tight. Use ``mode="exact"`` where exact values matter. ``mode="exact"`` computes
    singular values (costly: use it with a larger ``every_n_steps``).

    Stable ranks are read after the optimizer step. Put this callback after
    :class:`~lightning_msign.MSignCallback` in the callback list to see the restored values at
    application steps (MSign logs its own before/after values too).

    Args:
        targets: preset, glob pattern or list of them, as for :class:`~lightning_msign.MSignCallback`
            (default ``"all_2d"``).
        every_n_steps: log after every ``n``-th optimizer step.
        mode: ``"power"`` (warm-started power iteration) or ``"exact"`` (singular values).
        power_iters: power iterations per logged step in ``"power"`` mode.
        warmup_iters: power iterations for a matrix's first estimate (cold start).
        split_qkv: report fused Q/K/V blocks separately.
        log_per_matrix: log ``srank/<name>`` for every target (else only the summaries).
        log_grad_norm: log the total gradient norm (after accumulation and AMP unscaling, before
            clipping) on the same steps.
        log_norms: also log each target's Frobenius norm and spectral norm
            (:math:`\|W\|_F / \sqrt{\operatorname{srank}}`, from the same estimate). They tell the two
            ways an attention logit :math:`q \cdot k` can grow apart: a collapsing stable rank at a fixed
            Frobenius norm (what MSign undoes) or a growing Frobenius norm (which MSign keeps).

    Raises:
        ValueError: at construction, for any bad argument; at ``setup``, when ``targets`` match no
            matrix of the model.
        NotImplementedError: at ``setup``, for FSDP1 (``FSDPStrategy``) and DeepSpeed; DDP and FSDP2
            (``ModelParallelStrategy``) are supported.

    Logged metrics (straight to the Trainer's loggers on the steps this callback computes them,
    whatever ``log_every_n_steps`` is, at the step index of that batch's ``train/loss``):
        ``srank/<name>`` per target, ``srank/min`` and ``srank/mean`` over targets (aggregated with
        torchmetrics), ``grad_norm/total`` (the global norm under DDP and FSDP2); with ``log_norms``,
        ``fro_norm/<name>``, ``spectral_norm/<name>`` and their maxima ``fro_norm/max``,
        ``spectral_norm/max``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import StableRankMonitor

        trainer = Trainer(callbacks=[StableRankMonitor(targets="attention", every_n_steps=10)])
    """

    _warn_without_logger = True  # a monitor that only logs

    def __init__(
        self,
        targets: Union[str, list[str]] = "all_2d",
        every_n_steps: int = 1,
        mode: Literal["power", "exact"] = "power",
        power_iters: int = 1,
        warmup_iters: int = 20,
        split_qkv: bool = True,
        log_per_matrix: bool = True,
        log_grad_norm: bool = True,
        log_norms: bool = False,
    ) -> None:
        super().__init__()
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.mode = check_choice(mode, "mode", MODES)
        self.power_iters = check_positive_int(power_iters, "power_iters")
        self.warmup_iters = check_positive_int(warmup_iters, "warmup_iters")
        self.split_qkv = check_bool(split_qkv, "split_qkv")
        self.targets = validate_targets(targets, split_qkv)
        self.log_per_matrix = check_bool(log_per_matrix, "log_per_matrix")
        self.log_grad_norm = check_bool(log_grad_norm, "log_grad_norm")
        self.log_norms = check_bool(log_norms, "log_norms")

        self._vectors: dict[str, Tensor] = {}
        # Values are already identical on every process: no synchronisation (and no collective) on compute.
        self._min = MinMetric(sync_on_compute=False)
        self._mean = MeanMetric(sync_on_compute=False)

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(targets=self.targets, every_n_steps=self.every_n_steps, mode=self.mode)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        # global_step counts finished optimizer steps: this is step global_step + 1.
        if not self.log_grad_norm or (trainer.global_step + 1) % self.every_n_steps != 0:
            return
        norm = global_grad_norm(pl_module.parameters())
        if norm is not None:
            log_to_loggers(trainer, {"grad_norm/total": norm}, step=trainer.global_step)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._optimizer_step_due(trainer, self.every_n_steps):
            return
        values, fro = self._measure()
        sranks = torch.stack(list(values.values()))
        self._min.update(sranks)
        self._mean.update(sranks)
        metrics: dict[str, Tensor] = {"srank/min": self._min.compute(), "srank/mean": self._mean.compute()}
        self._min.reset()
        self._mean.reset()
        if self.log_per_matrix:
            metrics.update({f"srank/{name}": v for name, v in values.items()})
        if self.log_norms:
            spectral = {name: fro[name] / values[name].clamp_min(1.0).sqrt() for name in values}
            metrics["fro_norm/max"] = torch.stack(list(fro.values())).max()
            metrics["spectral_norm/max"] = torch.stack(list(spectral.values())).max()
            if self.log_per_matrix:
                metrics.update({f"fro_norm/{name}": v for name, v in fro.items()})
                metrics.update({f"spectral_norm/{name}": v for name, v in spectral.items()})
        log_to_loggers(trainer, metrics, step=trainer.global_step - 1)

    def compute(self) -> dict[str, Tensor]:
        """Stable rank of every target now, as 0-dim float32 tensors (CPU), identical on every process.

        With several processes each whole matrix is computed by one process and the values (and the
        power-iteration vectors) are shared, so every process must call it.
        """
        return self._measure()[0]

    @torch.no_grad()
    def _measure(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Stable ranks and, with ``log_norms``, Frobenius norms (else empty) of every target."""
        plan = self._require_plan("compute")
        # Row per target: [stable rank, Frobenius norm (0 without log_norms), power vector (power mode)].
        width = 2 if self.mode == "exact" else 2 + max(t.shape[1] for t in self._targets)
        table = plan.run(self._stable_ranks, result_size=width, write=False)
        sranks: dict[str, Tensor] = {}
        fro: dict[str, Tensor] = {}
        for t, row in zip(self._targets, table):
            sranks[t.name] = row[0].float()
            if self.log_norms:
                fro[t.name] = row[1].float()
            if self.mode == "power":
                self._vectors[t.name] = row[2 : 2 + t.shape[1]].float()
        return sranks, fro

    def _stable_ranks(self, blocks: list[Block]) -> dict[int, Tensor]:
        results: dict[int, Tensor] = {}
        for b in blocks:
            W = b.matrix
            fro = (torch.linalg.matrix_norm(W.float() if W.dtype != torch.float64 else W).reshape(1) if self.log_norms
                   else torch.zeros(1, device=W.device))
            if self.mode == "exact":
                results[b.index] = torch.cat([stable_rank(W).reshape(1).to(fro.dtype), fro])
                continue
            v = self._vectors.get(b.target.name)
            if v is None or v.shape[-1] != W.shape[-1]:
                v, iters = initial_vector(W), self.warmup_iters
            else:
                v, iters = v.to(W.device), self.power_iters
            srank, v = stable_rank_estimate(W, v, iters)
            results[b.index] = torch.cat([srank.reshape(1).to(v.dtype), fro.to(v.dtype), v.reshape(-1)])
        return results

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step, "vectors": {k: v.detach().cpu() for k, v in self._vectors.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))
        self._vectors = dict(state_dict.get("vectors", {}))
