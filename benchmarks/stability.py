#!/usr/bin/env python
"""Stability benchmark of lightning_msign: which learning rates train, with and without the suite.

A learning-rate sweep x methods x seeds of real Lightning runs made of the project's own parts
(``LitGPTModule``, ``ShakespeareDataModule``, the callbacks): what users run, not a copy. The default
setup is the probe of ../shared/SPEC.md: LitGPT 12 layers, width 64, 4 heads, no positional encoding,
pre-LayerNorm, byte-level Shakespeare, batch 16 x 128, AdamW (0.9, 0.95), weight decay 0.1, gradient
clipping 1.0, 100 warm-up steps and a linear decay to lr / 10, ``32-true``. Options change the setup
(``--no-clip``, ``--precision bf16-mixed``, ``--steps``, ``--model``) to look for settings where the
baseline really diverges.

Methods (``--methods``; each one adds to the baseline only what its name says):

``baseline``            nothing
``msign_attn``          ``MSignCallback(period=100, targets="attention")`` (exact SVD)
``msign_all2d``         ``MSignCallback(period=100, targets="all_2d")``
``msign_attn_p10``      ``MSignCallback(period=10, targets="attention", backend="polar_express")``
``msign_qk_p10``        ``MSignCallback(period=10, targets="qk", backend="polar_express")``
``pss``                 ``PSSCallback(tau=2.5, targets="qk")`` (detector armed after 100 steps)
``pss_early``           the same armed after 20 steps, inside the LR warm-up, when high-LR runs fail
``msign_pss``           ``msign_attn`` + ``pss``
``msign_qk_p1``         ``MSignCallback(period=1, targets="qk", backend="polar_express")``
``msign_qk_p10_cap``    ``msign_qk_p10`` followed by the ``qk_cap_p10`` cap (Frobenius norm capped at its initial value)
``qk_cap_p10``          control: the same norm cap every 10 steps *without* the sign (benchmark-only callback)
``qk_norm``             LitGPT ``norm_qk=True`` (the known fix)
``z_loss``              ``LitGPTModule(z_loss=1e-4)`` (the known output-logit fix)
``arch_warmup``         ``DepthWarmupCallback(start_fraction=0.5, groups=4)``: half the blocks (the bottom ones) from
                        the start, the rest unlocked in 4 groups from the end of the LR warm-up, one every
                        ``steps // 10`` steps (the paper's half depth and 4 groups, its 500-step interval scaled)
``zclip``              ZClip-style adaptive clipping *instead of* the fixed clip at 1.0 (benchmark-side control,
                        below): EMA mean and variance of the gradient norm (weight 0.97, initialised from the
                        first 25 steps); a norm whose z-score exceeds 2.5 is scaled down to mean + 2.5 std, and the
                        EMA takes the clipped norm (Kumar et al. 2025, arXiv 2504.02507)
``skip_step``           OLMo-core-style step skipping on top of the fixed clip: the optimizer step is skipped when the
                        gradient norm is above mean + 6 std of the last 128 kept steps (at least 20 of them), or
                        non-finite (benchmark-side control, below)
``msign_qk_logit``      ``MSignCallback(period=None, max_attn_logit=100, targets="qk", backend="polar_express",
                        min_spacing=1, logits_from="second_forward")``: MSign on a layer's Q and K after any step
                        whose attention logits (first 4 sequences of the batch, the updated weights) exceed 100;
                        nothing otherwise
``msign_qk_logit50``    the same with the threshold at 50
``msign_qk_logit30``    the same with the threshold at 30
``msign_qk_logit_then_p1`` ``msign_qk_logit`` with ``period_after_trigger=1``: from the first trigger on, MSign on
                        every Q and K after every step
``msign_qk_logit_then_p1_forward`` the same reading the logits in each step's training forward
                        (``logits_from="training_forward"``, the default: the recommended guard as shipped)
``msign_qk_logit_then_p1_forward_every2`` / ``..._every3`` the same checking after every 2nd / 3rd optimizer step
                        (``check_every=2`` / ``3``): what the check costs a healthy run is divided by 2 / 3
``qk_clip``             QK-Clip (Kimi K2, arXiv 2507.20534; benchmark-side control, below): after every step, each
                        head whose largest logit s_h (first 4 sequences of the batch) exceeds tau = 100 has its Q and K
                        rows scaled by sqrt(tau / s_h)
``qk_clip_30``          the same with tau = 30
``arch_warmup_curv``    the same, an unlock waiting while ``curvature/stability_ratio`` >= 1 (at most ``steps // 5``
                        steps past its due step); needs ``--curvature-every``
``rollback``            ``RollbackCallback(snapshot_every=10, min_history=32)``: on a non-finite or 6-sigma loss or
                        gradient norm, back to the last snapshot, the batches since skipped (first callback)
``rollback_lr``         the same, the learning rate x0.1 for 50 steps after a rollback, then ramped back over 100
``rollback_lr_msign``   ``rollback_lr`` plus MSign of Q and K after a rollback
``rollback_lr_restart`` ``rollback_lr`` plus restarting the optimizer state of the Q/K/V weights after a rollback
``qk_norm_retrofit``    ``QKNormRetrofitCallback(max_attn_logit=100)``: qk-norm (LitGPT's, gains at 1) switched on in
                        every layer once a layer's attention logit passes 100 (dormant, the identity, before)
``qk_norm_retrofit_layer`` the same, switching only the layers past 100 (``scope="layer"``)
``qk_norm_retrofit_msign`` the retrofit and the recommended MSign guard together
``recommended``         whatever guard the main job's guarded recipe (recipes/shakespeare/high_lr_guarded.yaml) holds,
                        read from it (its monitors left out); the cell's spec records it, so a changed recipe
                        trains the cell again

With ``--curvature-every N`` every run also has ``CurvatureMonitor(every_n_steps=N)`` (Adam's preconditioned
sharpness against its edge of stability; the curvature table gives its maximum and the first step at or above
the edge). Every run also has ``StableRankMonitor`` (attention, every ``--diag-every`` steps) and, when available,
``DiagnosticsMonitor`` (attention-logit and output-logit magnitude), logging to a CSVLogger under
``--out/runs/<cell>``. A run *diverges* at the first step whose training loss is NaN/Inf, or whose mean
training loss over the last ``--diverge-window`` steps (default 50) is above ``--diverge-loss`` (default:
the loss at initialisation, ln 256 = 5.55, plus 1: a spike it does not recover from), and is stopped there.

Per cell: diverged (step), final validation loss, min stable rank, max attention logit, max gradient
norm, wall time. Per method: Wortsman et al.'s LR sensitivity ``mean_lr[min(final(lr), loss_at_init) -
best_final]``, the largest LR that trains stably (every seed: no divergence and a final loss within
``--stable-margin`` of the best mean final loss of any method in the sweep, so that a method that is
uniformly poor does not count as stable), the largest LR without a divergence, and at each LR the share
of the baseline's gap to its best LR that the method closes.

Usage::

    python benchmarks/stability.py --quick                 # CI smoke test, ~1 min
    python benchmarks/stability.py --jobs 2                 # the full sweep: 90 runs, ~3.5 CPU hours
    python benchmarks/stability.py --lrs 0.1 --methods msign_qk_p1 --jobs 1     # more cells, same folder
    python benchmarks/stability.py --reuse-only --methods baseline qk_norm msign_qk_p1   # tabulate saved cells
    python benchmarks/stability.py --lrs 0.3 1.0 --methods baseline --seeds 0 --no-clip --precision bf16-mixed

Each finished cell is saved in ``--out/cells/<cell>.json`` with its spec: a run that is interrupted,
or extended with more methods or LRs, trains only what is not saved yet (``--rerun`` trains all
again; ``--reuse-only`` trains nothing). Writes ``--out`` (default ``benchmarks/results/stability``):
``stability.json``, ``stability.md``, the runs' CSV logs (``runs/``) and the figures (``figures/``:
``lr_sweep.png``, final loss against LR, and one ``lightning-msign report`` per LR).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from common import cpu_model, run_cell_here, run_cell_in_process_of_its_own  # noqa: E402  (common first: OMP_WAIT_POLICY)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "stability"
GUARDED_RECIPE = ROOT / "recipes" / "shakespeare" / "high_lr_guarded.yaml"
MONITORS = ("StableRankMonitor", "DiagnosticsMonitor", "CurvatureMonitor")


def recommended_guard() -> list[dict[str, Any]]:
    """The guard callbacks (``class_path``, ``init_args``) of the main job's guarded recipe, its monitors left out."""
    import yaml

    callbacks = yaml.safe_load(GUARDED_RECIPE.read_text())["trainer"]["callbacks"]
    found = [{"class_path": c["class_path"], "init_args": dict(c.get("init_args") or {})} for c in callbacks
             if c["class_path"].startswith("lightning_msign.") and c["class_path"].rsplit(".", 1)[1] not in MONITORS]
    if not found:
        raise ValueError(f"{GUARDED_RECIPE} holds no guard callback of lightning_msign")
    return found
LOSS_AT_INIT = math.log(256)  # byte-level tokens, uniform prediction

def _logit_msign(threshold: float, **extra: Any) -> dict[str, Any]:
    """A method: MSign on a layer's Q and K (polar_express) after a step whose attention logits exceed ``threshold``.

    The logits are those of the updated weights, on a second forward after the step (``logits_from="second_forward"``):
    the sweeps of docs/stability.md were measured so, before the training forward became the default reading (one
    step earlier: the weights before the step), and the method keeps them reproducible.
    """
    return {"msign": {"period": None, "targets": "qk", "backend": "polar_express", "max_attn_logit": threshold,
                      "min_spacing": 1, "logits_from": "second_forward", **extra}}


METHODS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "msign_attn": {"msign": {"period": 100, "targets": "attention"}},
    "msign_all2d": {"msign": {"period": 100, "targets": "all_2d"}},
    "msign_attn_p10": {"msign": {"period": 10, "targets": "attention", "backend": "polar_express"}},
    "msign_qk_p10": {"msign": {"period": 10, "targets": "qk", "backend": "polar_express"}},
    "pss": {"pss": {"tau": 2.5, "targets": "qk"}},
    "pss_early": {"pss": {"tau": 2.5, "targets": "qk", "warmup_steps": 20}},
    "msign_pss": {"msign": {"period": 100, "targets": "attention"}, "pss": {"tau": 2.5, "targets": "qk"}},
    "msign_qk_p1": {"msign": {"period": 1, "targets": "qk", "backend": "polar_express"}},
    "msign_qk_p10_cap": {"msign": {"period": 10, "targets": "qk", "backend": "polar_express"},
                         "cap": {"period": 10, "targets": "qk"}},
    "qk_cap_p10": {"cap": {"period": 10, "targets": "qk"}},
    "qk_norm": {"model": {"norm_qk": True}},
    "z_loss": {"module": {"z_loss": 1e-4}},
    "arch_warmup": {"warmup": {"start_fraction": 0.5, "groups": 4}},
    "arch_warmup_curv": {"warmup": {"start_fraction": 0.5, "groups": 4, "curvature_margin": 1.0}},
    "zclip": {"zclip": {"z": 2.5, "alpha": 0.97, "warmup": 25}, "clip": None},
    "skip_step": {"skip": {"sigma": 6.0, "window": 128, "min_window": 20}},
    "msign_qk_logit": _logit_msign(100.0),
    "msign_qk_logit50": _logit_msign(50.0),
    "msign_qk_logit30": _logit_msign(30.0),
    "msign_qk_logit_then_p1": _logit_msign(100.0, period_after_trigger=1),
    # the recommended guard as shipped: the logits of each step's own training forward (the weights before the step)
    "msign_qk_logit_then_p1_forward": _logit_msign(100.0, period_after_trigger=1, logits_from="training_forward"),
    # the same guard checking after every 2nd / 3rd step only (a healthy run pays a half / a third of the check)
    "msign_qk_logit_then_p1_forward_every2": _logit_msign(100.0, period_after_trigger=1, logits_from="training_forward",
                                                          check_every=2),
    "msign_qk_logit_then_p1_forward_every3": _logit_msign(100.0, period_after_trigger=1, logits_from="training_forward",
                                                          check_every=3),
    "qk_norm_retrofit": {"qk_retrofit": {"max_attn_logit": 100.0}},
    "qk_norm_retrofit_layer": {"qk_retrofit": {"max_attn_logit": 100.0, "scope": "layer"}},
    "qk_norm_retrofit_msign": {"qk_retrofit": {"max_attn_logit": 100.0},
                               **_logit_msign(100.0, period_after_trigger=1, logits_from="training_forward")},
    "recommended": {"recommended": True},
    "qk_clip": {"qk_clip": {"tau": 100.0}},
    "qk_clip_30": {"qk_clip": {"tau": 30.0}},
    # RollbackCallback: snapshots every 10 steps, OLMo-core's 6 sigma over 128 steps armed after 32 values.
    "rollback": {"rollback": {"snapshot_every": 10, "min_history": 32}},
    "rollback_lr": {"rollback": {"snapshot_every": 10, "min_history": 32, "lr_factor": 0.1, "lr_steps": 50,
                                 "lr_ramp_steps": 100}},
    "rollback_lr_msign": {"rollback": {"snapshot_every": 10, "min_history": 32, "lr_factor": 0.1, "lr_steps": 50,
                                       "lr_ramp_steps": 100, "repair_msign": "qk"}},
    "rollback_lr_restart": {"rollback": {"snapshot_every": 10, "min_history": 32, "lr_factor": 0.1, "lr_steps": 50,
                                         "lr_ramp_steps": 100, "restart_moments": "qk"}},
}

# The full sweep's methods: the issue's list, MSign at P=100 (SVD) and at P=10 (polar express). `pss_early` is
# a variant for the no-clipping searches.
SWEEP_METHODS = ["baseline", "msign_attn", "msign_all2d", "msign_attn_p10", "msign_qk_p10", "pss", "msign_pss",
                 "qk_norm", "z_loss"]

MODEL_12x64 = {"n_layer": 12, "n_embd": 64, "n_head": 4, "rotary_percentage": 0.0, "parallel_residual": False,
               "bias": False}
MODEL_QUICK = {"n_layer": 2, "n_embd": 32, "n_head": 2, "rotary_percentage": 0.0, "parallel_residual": False,
               "bias": False}


def _norm_cap_callback(period: int, targets: str) -> Any:
    """Control for ``msign_qk_p10_cap``: every ``period`` steps scale each target down to its Frobenius norm
    at fit start (never up), with no change of its spectrum's shape. Single process only."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_msign.targets import resolve_targets

    class NormCap(Callback):
        def on_fit_start(self, trainer, pl_module):
            self.targets = resolve_targets(pl_module, targets)
            self.ref = [float(t.matrix().float().norm()) for t in self.targets]

        @torch.no_grad()
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step % period == 0:
                for t, ref in zip(self.targets, self.ref):
                    W = t.matrix()
                    norm = float(W.float().norm())
                    if math.isfinite(norm) and norm > ref:
                        t.write(W * (ref / norm))

    return NormCap()


def divergence_callback(window: int, limit: float, grad_norm: bool = True) -> Any:
    """Stops the run at the first non-finite training loss, or when the mean loss of the last ``window`` steps is
    above ``limit``, recording the step in ``.step``; with ``grad_norm`` also the largest gradient norm before
    clipping (``.max_grad_norm``, inf once one was non-finite). Put it first among the callbacks."""
    from lightning.pytorch.callbacks import Callback

    class Divergence(Callback):
        def __init__(self) -> None:
            self.step: Optional[int] = None
            self.max_grad_norm = 0.0
            self.recent: list[float] = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if grad_norm:
                norm = _grad_norm(pl_module)[1]
                self.max_grad_norm = max(self.max_grad_norm, norm) if math.isfinite(norm) else float("inf")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            self.recent = (self.recent + [loss])[-window:]
            too_high = len(self.recent) == window and sum(self.recent) / len(self.recent) > limit
            if self.step is None and (not math.isfinite(loss) or too_high):
                self.step = trainer.global_step
                trainer.should_stop = True

    return Divergence()


def _grad_norm(pl_module: Any) -> tuple[list[Any], float]:
    import torch

    grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
    return grads, float(torch.nn.utils.get_total_norm(grads)) if grads else float("nan")


def _zclip_callback(z: float, alpha: float, warmup: int) -> Any:
    """``zclip``: ZClip-style adaptive clipping (z-score mode), a benchmark-side control. Single process only."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class ZClipControl(Callback):
        def __init__(self) -> None:
            self.first: list[float] = []
            self.mean: Optional[float] = None
            self.var = 0.0
            self.clips = 0

        @torch.no_grad()
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads, norm = _grad_norm(pl_module)
            if not math.isfinite(norm):
                return  # left to the run (the divergence test records it)
            if self.mean is None:
                self.first.append(norm)
                if len(self.first) == warmup:
                    self.mean = sum(self.first) / warmup
                    self.var = sum((x - self.mean) ** 2 for x in self.first) / warmup
                return
            std = math.sqrt(self.var)
            if (norm - self.mean) / (std + 1e-6) > z:
                target = self.mean + z * std
                torch._foreach_mul_(grads, target / norm)
                norm, self.clips = target, self.clips + 1
            self.mean = alpha * self.mean + (1 - alpha) * norm
            self.var = alpha * self.var + (1 - alpha) * (norm - self.mean) ** 2

    return ZClipControl()


def _skip_step_callback(sigma: float, window: int, min_window: int) -> Any:
    """``skip_step``: skip the optimizer step on a gradient-norm outlier (OLMo-core style), a benchmark-side control.
    Single process only (a skipped step sets every gradient to None: AdamW leaves parameters and moments)."""
    import torch
    from lightning.pytorch.callbacks import Callback

    class SkipStepControl(Callback):
        def __init__(self) -> None:
            self.kept: list[float] = []
            self.skips = 0

        @torch.no_grad()
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            _, norm = _grad_norm(pl_module)
            recent = self.kept[-window:]
            outlier = not math.isfinite(norm)
            if not outlier and len(recent) >= min_window:
                mean = sum(recent) / len(recent)
                std = math.sqrt(sum((x - mean) ** 2 for x in recent) / len(recent))
                outlier = norm > mean + sigma * std
            if outlier:
                self.skips += 1
                for p in pl_module.parameters():
                    p.grad = None
            else:
                self.kept.append(norm)

    return SkipStepControl()


def _qk_clip_callback(tau: float, probe_batch_size: int = 4) -> Any:
    """QK-Clip for LitGPT multi-head attention (benchmark-side control): after each optimizer step, measure each
    head's largest attention logit s_h on the first sequences of the batch just trained on; for s_h > tau scale the
    head's query and key rows of ``attn.qkv.weight`` by sqrt(tau / s_h), so that its logits shrink by tau / s_h.
    Kimi K2 reads s_h from its attention kernel during the training forward; here it is one extra forward pass of
    ``probe_batch_size`` sequences. Single process."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from lightning_msign.functional import attention_logit_max_per_head
    from lightning_msign.guards.diagnostics import batch_input_ids
    from lightning_msign.models.base import attention_module, attention_probe, find_decoder

    class QKClip(Callback):
        def __init__(self) -> None:
            self.clips = 0  # (step, head) pairs rescaled

        def on_fit_start(self, trainer, pl_module):
            self.decoder = find_decoder(pl_module)
            config = self.decoder.model.config
            if config.n_query_groups != config.n_head or getattr(config, "bias", False):
                raise SystemExit("qk_clip: this control handles multi-head attention without biases only")
            self.n_head, self.hs = config.n_head, config.head_size

        @torch.no_grad()
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ids = batch_input_ids(batch)[:probe_batch_size]
            probes = [attention_probe(attention_module(b), keep=True) for b in self.decoder.blocks]
            handles = [h for p in probes for h in p.attach()]
            modes = [(m, m.training) for m in pl_module.modules()]
            try:
                pl_module.eval()
                self.decoder(ids.to(next(pl_module.parameters()).device))
            finally:
                for h in handles:
                    h.remove()
                for m, training in modes:
                    m.training = training
            C = self.n_head * self.hs
            for block, probe in zip(self.decoder.blocks, probes):
                s = attention_logit_max_per_head(probe.query, probe.key, probe.scale)
                w = attention_module(block).qkv.weight
                for h in torch.nonzero(s > tau).flatten().tolist():
                    factor = math.sqrt(tau / float(s[h]))
                    w[h * self.hs:(h + 1) * self.hs].mul_(factor)  # W_q of head h
                    w[C + h * self.hs:C + (h + 1) * self.hs].mul_(factor)  # W_k of head h
                    self.clips += 1

    return QKClip()


def _lr_jump_callback(step: int, factor: float) -> Any:
    """Before optimizer step ``step + 1``, multiply every parameter group's learning rate and the scheduler's base
    rates by ``factor`` (the schedule goes on from there, ``factor`` times higher): a run resumed with a raised LR."""
    from lightning.pytorch.callbacks import Callback

    class LRJump(Callback):
        """A configuration change, not an event: a rollback to a snapshot from before it gets the raised LR again."""

        raised: Optional[list[list[float]]] = None  # each scheduler's base rates once raised

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step < step:
                return
            configs = trainer.lr_scheduler_configs
            if self.raised is not None and all(c.scheduler.base_lrs == r for c, r in zip(configs, self.raised)):
                return
            for config in configs:
                config.scheduler.base_lrs = [lr * factor for lr in config.scheduler.base_lrs]
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= factor
            self.raised = [list(c.scheduler.base_lrs) for c in configs]

    return LRJump()


# --------------------------------------------------------------------------- one cell
def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, lr, seed) cell and return its summary (in this process: ``common.run_cell_here``; in a
    process of its own: ``--cell``)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    from lightning_msign import LitGPTModule, MSignCallback, PSSCallback, ShakespeareDataModule, StableRankMonitor

    method = METHODS[spec["method"]]

    pl.seed_everything(spec["seed"], verbose=False)
    model_config = {**spec["model"], **method.get("model", {})}
    module = LitGPTModule(
        model_config, vocab_size=256, block_size=spec["seq_len"], lr=spec["lr"], weight_decay=0.1,
        betas=(0.9, 0.95), warmup_steps=spec["warmup"], lr_decay="linear", min_lr_ratio=0.1,
        max_steps=spec["steps"], **{**spec.get("module", {}), **method.get("module", {})},
    )
    data = ShakespeareDataModule(tokenizer="byte", seq_len=spec["seq_len"], batch_size=spec["batch_size"],
                                 seed=spec["seed"])
    divergence = divergence_callback(spec["diverge_window"], spec["diverge_loss"])
    callbacks: list[Any] = [divergence]
    controls: dict[str, Any] = {}
    if spec.get("lr_jump"):
        callbacks.append(_lr_jump_callback(*spec["lr_jump"]))
    if "pss" in method:
        callbacks.append(PSSCallback(**method["pss"]))
    if "msign" in method:
        callbacks.append(MSignCallback(**method["msign"]))
        if method["msign"].get("period", 100) is None:
            controls["msign_triggers"] = callbacks[-1]
    retrofit = None
    if "qk_retrofit" in method:
        from lightning_msign import QKNormRetrofitCallback

        retrofit = QKNormRetrofitCallback(**method["qk_retrofit"])
        callbacks.append(retrofit)
    if method.get("recommended"):
        import importlib

        for entry in spec["recommended"]:
            module_name, _, cls_name = entry["class_path"].rpartition(".")
            callbacks.append(getattr(importlib.import_module(module_name), cls_name)(**entry["init_args"]))
            if cls_name == "MSignCallback":
                controls["msign_triggers"] = callbacks[-1]
    if "cap" in method:
        callbacks.append(_norm_cap_callback(**method["cap"]))
    if "qk_clip" in method:
        callbacks.append(controls.setdefault("qk_clips", _qk_clip_callback(**method["qk_clip"])))
    if "zclip" in method:
        callbacks.append(controls.setdefault("zclip_clips", _zclip_callback(**method["zclip"])))
    if "skip" in method:
        callbacks.append(controls.setdefault("skipped_steps", _skip_step_callback(**method["skip"])))
    rollback = None
    if "rollback" in method:
        from lightning_msign import RollbackCallback

        rollback = RollbackCallback(**method["rollback"])
        callbacks.insert(0, rollback)  # first: a rollback happens before the other callbacks see the step
    if spec.get("curvature_every"):  # before the warm-up, which reads its latest ratio
        from lightning_msign import CurvatureMonitor

        callbacks.append(CurvatureMonitor(every_n_steps=spec["curvature_every"]))
    if "warmup" in method:
        from lightning_msign import DepthWarmupCallback

        options = dict(method["warmup"])
        if "curvature_margin" in options:
            if not spec.get("curvature_every"):
                raise SystemExit(f"method {spec['method']} needs --curvature-every")
            options["max_defer_steps"] = max(1, spec["steps"] // 5)
        callbacks.append(DepthWarmupCallback(interval=max(1, spec["steps"] // 10), **options))
    callbacks.append(StableRankMonitor(targets="attention", every_n_steps=spec["diag_every"], log_grad_norm=True,
                                       log_norms=spec.get("log_norms", False)))
    try:
        from lightning_msign import DiagnosticsMonitor

        callbacks.append(DiagnosticsMonitor(every_n_steps=spec["diag_every"], jacobian=spec["jacobian"]))
    except ImportError:  # an older checkout without the diagnostics callback
        pass
    trainer = pl.Trainer(
        accelerator=spec.get("accelerator", "cpu"), devices=1, precision=spec["precision"], max_steps=spec["steps"],
        gradient_clip_val=method["clip"] if "clip" in method else spec["clip"], val_check_interval=spec["val_every"],
        limit_val_batches=spec["val_batches"],
        num_sanity_val_steps=0, log_every_n_steps=spec["log_every"], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        logger=CSVLogger(spec["log_dir"], name=spec["name"], version=0),
    )
    t0 = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - t0
    if divergence.step is None:
        val = trainer.validate(module, data, verbose=False)[0]["val/loss"]
    else:
        val = float("nan")
    return {**{k: spec[k] for k in ("name", "method", "lr", "seed")}, "diverged_step": divergence.step,
            "final_val_loss": float(val), "max_grad_norm": divergence.max_grad_norm, "wall_s": wall,
            "steps_done": trainer.global_step, "log_dir": str(Path(spec["log_dir"]) / spec["name"] / "version_0"),
            **{key: _count(cb) for key, cb in controls.items()},
            **({} if retrofit is None else {  # the step after which each layer's q/k norms switched on (None: never)
                "qk_norm_switch_steps": list(retrofit.guard.switch_steps)}),
            **({} if rollback is None else {
                "rollbacks": rollback.guard.rollbacks, "steps_lost": rollback.guard.steps_lost,
                "rollback_steps": list(rollback.guard.rollback_steps), "rollback_stopped": rollback.guard.should_stop,
                "rollback_reasons": sorted({r.split(" ")[0] for s in rollback.guard.skipped for r in s["reasons"]}),
            })}


def _count(callback: Any) -> Optional[int]:
    """What a control counted: clips, skipped steps, or triggered MSign applications."""
    for attr in ("clips", "skips"):
        if hasattr(callback, attr):
            return getattr(callback, attr)
    guard = getattr(callback, "guard", None)
    return getattr(guard, "triggers", None)


def summarize_logs(cell: dict[str, Any]) -> dict[str, Any]:
    """Min stable rank, max attention logit and the last training losses from the cell's CSV log."""
    import csv

    path = Path(cell["log_dir"]) / "metrics.csv"
    out = {"min_srank": None, "max_attn_logit": None, "max_output_logit": None, "final_train_loss": None}
    ratios: list[tuple[int, float]] = []  # (step, curvature/stability_ratio)
    unlocks: list[int] = []
    if not path.exists():
        return out
    srank, attn, outl, train = [], [], [], []
    qk_fro: list[float] = []  # with --log-norms: Frobenius norms of the Q and K blocks, first logged row first
    with path.open() as fh:
        for row in csv.DictReader(fh):
            norms = [float(v) for k, v in row.items()
                     if k.startswith("fro_norm/") and k.endswith((".q", ".k")) and v not in (None, "")]
            if norms:
                qk_fro.append(max(norms))
            if row.get("curvature/stability_ratio") not in (None, ""):
                ratios.append((int(row["step"]), float(row["curvature/stability_ratio"])))
            if row.get("warmup/unlocked") not in (None, ""):
                unlocks.append(int(row["step"]) + 1)
            for key, acc in (("srank/min", srank), ("diag/attn_logit_max", attn), ("diag/output_logit_max", outl),
                             ("train/loss", train)):
                value = row.get(key)
                if value not in (None, ""):
                    acc.append(float(value))
    finite = [x for x in train if math.isfinite(x)]
    out["min_srank"] = min(srank) if srank else None
    out["max_attn_logit"] = max(attn) if attn else None
    out["max_output_logit"] = max(outl) if outl else None
    out["final_train_loss"] = sum(finite[-20:]) / len(finite[-20:]) if finite else None
    if qk_fro:
        out["qk_fro_norm_first"], out["qk_fro_norm_max"] = qk_fro[0], max(qk_fro)
    finite_ratios = [(s, r) for s, r in ratios if math.isfinite(r)]
    if ratios:
        out["max_stability_ratio"] = max(r for _, r in finite_ratios) if finite_ratios else None
        # optimizer steps (1-based): a measurement after step t is logged at row t - 1
        out["first_edge_step"] = next((s + 1 for s, r in finite_ratios if r >= 1.0), None)
        out["stability_ratio_median"] = sorted(r for _, r in finite_ratios)[len(finite_ratios) // 2] \
            if finite_ratios else None
    if unlocks:
        out["unlock_steps"] = unlocks
    return out


# --------------------------------------------------------------------------- analysis
def analyse(cells: list[dict[str, Any]], margin: float) -> dict[str, Any]:
    methods = sorted({c["method"] for c in cells}, key=list(METHODS).index)
    lrs = sorted({c["lr"] for c in cells})

    def final(c: dict[str, Any]) -> float:
        ok = c["diverged_step"] is None and math.isfinite(c["final_val_loss"])
        return c["final_val_loss"] if ok else LOSS_AT_INIT

    table: dict[str, dict[float, list[float]]] = {m: {lr: [] for lr in lrs} for m in methods}
    for c in cells:
        table[c["method"]][c["lr"]].append(final(c))
    mean = {m: {lr: (sum(v) / len(v) if v else float("nan")) for lr, v in table[m].items()} for m in methods}
    base = mean.get("baseline")
    best_overall = min((v for m in methods for v in mean[m].values() if math.isfinite(v)), default=float("nan"))
    per_method = {}
    for m in methods:
        curve = {lr: v for lr, v in mean[m].items() if math.isfinite(v)}
        best = min(curve.values())
        complete = len(curve) == len(lrs)  # sensitivity and largest stable LR need the whole sweep
        sensitivity = sum(min(v, LOSS_AT_INIT) - best for v in curve.values()) / len(curve) if complete else None
        at = {lr: [c for c in cells if c["method"] == m and c["lr"] == lr] for lr in lrs}
        stable = [lr for lr in lrs if at[lr] and all(
            c["diverged_step"] is None and final(c) <= best_overall + margin for c in at[lr])] if complete else []
        no_divergence = [lr for lr in lrs if at[lr] and all(c["diverged_step"] is None for c in at[lr])]
        gap_closed = {}
        if base:
            base_best = min(v for v in base.values() if math.isfinite(v))
            for lr in lrs:
                gap = base.get(lr, float("nan")) - base_best
                if math.isfinite(gap) and gap > margin and math.isfinite(mean[m][lr]):
                    gap_closed[lr] = (base[lr] - mean[m][lr]) / gap
        per_method[m] = {"best_final_loss": best, "lr_sensitivity": sensitivity,
                         "largest_stable_lr": max(stable) if stable else None,
                         "largest_lr_without_divergence": max(no_divergence) if complete and no_divergence else None,
                         "gap_closed": gap_closed,
                         "mean_final_loss": mean[m]}
    return {"methods": methods, "lrs": lrs, "best_final_loss": best_overall, "stable_margin": margin,
            "per_method": per_method}


def render(res: dict[str, Any]) -> str:
    a = res["analysis"]
    lrs = a["lrs"]
    lines = [
        "# lightning_msign stability benchmark",
        "",
        f"Machine: {res['machine']}. Wall time of this command {res['wall_time_s']:.0f} s; "
        f"the {len(res['cells'])} cells "
        f"trained for {sum(c['wall_s'] for c in res['cells']) / 60:.0f} min in all (one thread each; saved cells are "
        f"reused, see `cells/`). Command: `{res['command']}`",
        "",
        f"Setup: {json.dumps(res['settings']['model'])}, batch {res['settings']['batch_size']} x "
        f"{res['settings']['seq_len']}, {res['settings']['steps']} steps, clip {res['settings']['clip']}, "
        f"{res['settings']['precision']}, warm-up {res['settings']['warmup']}, seeds {res['settings']['seeds']}"
        + (f", module {json.dumps(res['settings']['module'])}" if res["settings"].get("module") else "")
        + (f", learning rate x{res['settings']['lr_jump'][1]:g} from step {res['settings']['lr_jump'][0]:g} on"
           if res["settings"].get("lr_jump") else "") + ".",
        "",
        "## Final validation loss (mean over seeds; a diverged run counts as ln 256 = 5.55)",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs)
        + f" | LR sensitivity | largest LR within {a['stable_margin']:g} of the best ({a['best_final_loss']:.3f}) "
        "| largest LR without divergence |",
        "|---|" + "---:|" * len(lrs) + "---:|---:|---:|",
    ]
    for m in a["methods"]:
        pm = a["per_method"][m]
        cells = " | ".join(f"{pm['mean_final_loss'][lr]:.3f}" if math.isfinite(pm["mean_final_loss"][lr]) else "-"
                           for lr in lrs)
        if pm["lr_sensitivity"] is None:  # not run at every LR of the table
            sens = stable = no_div = "-"
        else:
            sens = f"{pm['lr_sensitivity']:.3f}"
            stable = f"{pm['largest_stable_lr']:g}" if pm["largest_stable_lr"] else "none"
            no_div = f"{pm['largest_lr_without_divergence']:g}" if pm["largest_lr_without_divergence"] else "none"
        lines.append(f"| {m} | {cells} | {sens} | {stable} | {no_div} |")
    if "baseline" in a["per_method"]:
        gaps = sorted({lr for m, pm in a["per_method"].items() if m != "baseline" for lr in pm["gap_closed"]})
        if gaps:
            lines += ["", "## Share of the baseline's loss gap (to its best LR) closed", "",
                      "| method | " + " | ".join(f"lr {lr:g}" for lr in gaps) + " |", "|---|" + "---:|" * len(gaps)]
            for m in [m for m in a["methods"] if m != "baseline"]:
                g = a["per_method"][m]["gap_closed"]
                lines.append(f"| {m} | " + " | ".join(f"{g[lr]:.0%}" if lr in g else "-" for lr in gaps) + " |")
    lines += ["", "## Cells", "", "| method | lr | seed | diverged at | final val | final train | min srank "
              "| max attn logit | max out logit | max grad norm | wall s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def f(x: Any, fmt: str) -> str:
        return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)

    for c in res["cells"]:
        lines.append(
            f"| {c['method']} | {c['lr']:g} | {c['seed']} "
            f"| {c['diverged_step'] if c['diverged_step'] is not None else '-'} "
            f"| {f(c['final_val_loss'], '.3f')} | {f(c['final_train_loss'], '.3f')} | {f(c['min_srank'], '.2f')} "
            f"| {f(c['max_attn_logit'], '.3g')} | {f(c['max_output_logit'], '.3g')} | {f(c['max_grad_norm'], '.3g')} "
            f"| {c['wall_s']:.0f} |"
        )
    if any("max_stability_ratio" in c for c in res["cells"]):
        lines += ["", "## Curvature (CurvatureMonitor): stability ratio = lambda_max(D^1/2 H D^1/2) / 38, 1 = the edge",
                  "", "| method | lr | seed | median ratio | max ratio | first step >= 1 | max attn logit "
                  "| diverged at | blocks unlocked at |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for c in res["cells"]:
            if "max_stability_ratio" in c:
                lines.append(
                    f"| {c['method']} | {c['lr']:g} | {c['seed']} | {f(c.get('stability_ratio_median'), '.3g')} "
                    f"| {f(c['max_stability_ratio'], '.3g')} | {c['first_edge_step'] if c['first_edge_step'] else '-'} "
                    f"| {f(c['max_attn_logit'], '.3g')} "
                    f"| {c['diverged_step'] if c['diverged_step'] is not None else '-'} "
                    f"| {', '.join(map(str, c.get('unlock_steps', []))) or '-'} |")
    if any("rollbacks" in c for c in res["cells"]):
        lines += ["", "## Rollback", "", "| method | lr | seed | rollbacks | steps lost | first rollbacks "
                  "| stopped by the budget | steps done | final val |", "|---|---:|---:|---:|---:|---|---|---:|---:|"]
        for c in res["cells"]:
            if "rollbacks" in c:
                first = ", ".join(map(str, c["rollback_steps"][:8])) + (" ..." if len(c["rollback_steps"]) > 8 else "")
                lines.append(f"| {c['method']} | {c['lr']:g} | {c['seed']} | {c['rollbacks']} | {c['steps_lost']} "
                             f"| {first or '-'} | {'yes' if c['rollback_stopped'] else 'no'} | {c['steps_done']} "
                             f"| {f(c['final_val_loss'], '.3f')} |")
    if any("qk_norm_switch_steps" in c for c in res["cells"]):
        lines += ["", "## qk-norm retrofit: when the q/k norms switched on", "",
                  "| method | lr | seed | first switch (after step) | layers switched | final val |",
                  "|---|---:|---:|---:|---:|---:|"]
        for c in res["cells"]:
            if "qk_norm_switch_steps" in c:
                steps = [s for s in c["qk_norm_switch_steps"] if s is not None]
                lines.append(f"| {c['method']} | {c['lr']:g} | {c['seed']} | {min(steps) if steps else '-'} "
                             f"| {len(steps)} of {len(c['qk_norm_switch_steps'])} | {f(c['final_val_loss'], '.3f')} |")
    if any("qk_fro_norm_max" in c for c in res["cells"]):
        lines += ["", "## Q and K weight norms (largest Frobenius norm of a Q or K block)", "",
                  "| method | lr | seed | at the first log | max | growth |", "|---|---:|---:|---:|---:|---:|"]
        for c in res["cells"]:
            if "qk_fro_norm_max" in c:
                lines.append(f"| {c['method']} | {c['lr']:g} | {c['seed']} | {c['qk_fro_norm_first']:.2f} "
                             f"| {c['qk_fro_norm_max']:.2f} | {c['qk_fro_norm_max'] / c['qk_fro_norm_first']:.1f}x |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures
def draw_figures(res: dict[str, Any], out: Path) -> list[Path]:
    """``lr_sweep.png`` (final loss against LR per method) and one ``lightning-msign report`` per LR.

    The per-LR reports put the first seed of every method side by side (loss, gradient norm, min
    stable rank, attention logits, MSign and PSS marks) under ``figures/lr<LR>/``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lightning_msign.report import load_run, render_report

    a, cells = res["analysis"], res["cells"]
    if not cells:
        return []
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    figures = []
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    markers = "osD^v<>phX*"
    for i, m in enumerate(a["methods"]):
        lrs = [lr for lr in a["lrs"] if math.isfinite(a["per_method"][m]["mean_final_loss"][lr])]
        ys = [a["per_method"][m]["mean_final_loss"][lr] for lr in lrs]
        line, = ax.plot(lrs, ys, marker=markers[i % len(markers)], label=m, lw=2.2 if m == "baseline" else 1.4,
                        color="black" if m == "baseline" else plt.cm.tab20(i % 20))
        for c in cells:  # every seed as a small dot; diverged runs drawn at ln 256
            if c["method"] == m:
                ok = c["diverged_step"] is None and math.isfinite(c["final_val_loss"])
                y = c["final_val_loss"] if ok else LOSS_AT_INIT
                ax.plot([c["lr"]], [y], ".", color=line.get_color(), alpha=0.5, ms=4)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("final validation loss (mean over seeds)")
    st = res["settings"]
    ax.set_title(f"{st['steps']} steps, clip {st['clip']}, {st['precision']}, seeds {st['seeds']}", fontsize=9)
    if any(c["diverged_step"] is not None for c in cells):  # diverged runs are drawn at ln 256
        ax.axhline(LOSS_AT_INIT, color="grey", ls=":", lw=1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = fig_dir / "lr_sweep.png"
    fig.savefig(path)
    plt.close(fig)
    figures.append(path)
    first_seed = min(c["seed"] for c in cells)
    for lr in a["lrs"]:
        runs = [load_run(c["log_dir"], label=c["method"]) for m in a["methods"] for c in cells
                if c["method"] == m and c["lr"] == lr and c["seed"] == first_seed and Path(c["log_dir"]).exists()]
        if runs:
            png, _ = render_report(runs, fig_dir / f"lr{lr:g}", title=f"lr {lr:g}, seed {first_seed}")
            figures.append(png)
    return figures


# --------------------------------------------------------------------------- driver
def machine_line() -> str:
    """CPU model, usable cores, torch / lightning / litgpt versions: where the figures come from."""
    import lightning
    import torch

    cpu = cpu_model()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    from importlib.metadata import version

    return (f"{cpu}, {usable} usable cores, {gpu}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"litgpt {version('litgpt')}, Python {platform.python_version()}")



def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny model, 2 LRs, 2 methods, 40 steps")
    parser.add_argument("--lrs", type=float, nargs="+", default=None,
                        help="peak learning rates (default 0.003 0.01 0.03 0.1 0.3; --quick: 0.003 0.1)")
    parser.add_argument("--methods", nargs="+", default=None, choices=list(METHODS),
                        help="methods (default: the sweep's, SWEEP_METHODS; --quick: baseline and msign_attn_p10)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", type=json.loads, default=None, help="litgpt Config fields as JSON (default 12x64)")
    parser.add_argument("--module", type=json.loads, default={},
                        help="extra LitGPTModule arguments as JSON (e.g. the muP-style knobs lr_mult_2d, "
                        "zero_init_query)")
    parser.add_argument("--no-clip", action="store_true", help="no gradient clipping (default: clip at 1.0)")
    parser.add_argument("--lr-jump", type=float, nargs=2, default=None, metavar=("STEP", "FACTOR"),
                        help="before optimizer step STEP + 1, multiply the learning rate (and its schedule) by FACTOR:"
                             " a run resumed with a raised learning rate")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--diverge-loss", type=float, default=LOSS_AT_INIT + 1.0)
    parser.add_argument("--diverge-window", type=int, default=50, help="steps averaged by the divergence test")
    parser.add_argument("--stable-margin", type=float, default=0.1, help="'stable': final loss within this of the best")
    parser.add_argument("--diag-every", type=int, default=25)
    parser.add_argument("--jacobian", action="store_true", help="also log Jacobian alignment (costly)")
    parser.add_argument("--curvature-every", type=int, default=0,
                        help="add CurvatureMonitor(every_n_steps=N) to every cell (0: none; each measurement costs "
                        "about ten training steps, benchmarks/overhead.py --only curvature)")
    parser.add_argument("--log-norms", action="store_true",
                        help="also log Frobenius / spectral norms of the attention matrices (table: Q/K norm growth)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="cells trained at once (1: one after the other in this process; more: one process and "
                        "thread each)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator of every cell (cpu, gpu, auto)")
    parser.add_argument("--reuse-only", action="store_true",
                        help="train nothing: tabulate the cells already saved under --out (others are left out)")
    parser.add_argument("--rerun", action="store_true",
                        help="train every cell again (default: reuse a cell whose saved result has the same spec)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cell", type=json.loads, default=None, help=argparse.SUPPRESS)  # internal: run one cell
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")

    if args.cell is not None:  # child process: one cell, result as the last line of stdout
        print(json.dumps(run_cell(args.cell)))
        return 0

    if args.quick:
        args.lrs, args.seeds = args.lrs or [0.003, 0.1], [0]
        args.methods = args.methods or ["baseline", "msign_attn_p10"]
        args.steps, args.warmup, args.batch_size, args.seq_len, args.diag_every = 40, 5, 8, 64, 10
        args.diverge_window = 10
        args.model = args.model or MODEL_QUICK
    args.methods = args.methods or SWEEP_METHODS
    args.lrs = args.lrs or [0.003, 0.01, 0.03, 0.1, 0.3]
    out = args.out or (RESULTS.parent / "stability_quick" if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"model": args.model or MODEL_12x64, "steps": args.steps, "warmup": args.warmup,
                "batch_size": args.batch_size, "seq_len": args.seq_len, "clip": None if args.no_clip else 1.0,
                "precision": args.precision, "seeds": args.seeds, "lrs": args.lrs, "methods": args.methods,
                "module": args.module, **({"lr_jump": args.lr_jump} if args.lr_jump else {})}
    specs = []
    for seed in args.seeds:  # seed-major: an interrupted sweep has whole seeds (cells are saved as they end)
        for lr in args.lrs:
            for method in args.methods:
                specs.append({
                    "name": f"{method}_lr{lr:g}_s{seed}", "method": method, "lr": lr, "seed": seed,
                    "model": settings["model"], "steps": args.steps, "warmup": args.warmup,
                    "batch_size": args.batch_size, "seq_len": args.seq_len, "clip": settings["clip"],
                    "precision": args.precision, "diverge_loss": args.diverge_loss,
                    "diverge_window": args.diverge_window, "diag_every": args.diag_every,
                    "jacobian": args.jacobian, "val_every": min(args.steps, 250), "val_batches": 20,
                    "log_every": 1, "threads": 1, "log_dir": str(out / "runs"), "accelerator": args.accelerator,
                })
                if args.module:  # only when given, so that cells saved before these options still match
                    specs[-1]["module"] = args.module
                if args.log_norms:
                    specs[-1]["log_norms"] = True
                if args.lr_jump:
                    specs[-1]["lr_jump"] = [int(args.lr_jump[0]), float(args.lr_jump[1])]
                if args.curvature_every:
                    specs[-1]["curvature_every"] = args.curvature_every
                if method == "recommended":
                    specs[-1]["recommended"] = recommended_guard()

    cell_dir = out / "cells"
    cell_dir.mkdir(exist_ok=True)

    def launch(spec: dict[str, Any]) -> dict[str, Any]:
        saved = cell_dir / f"{spec['name']}.json"
        if saved.exists() and not args.rerun:
            previous = json.loads(saved.read_text())
            same = {k: v for k, v in previous.get("spec", {}).items() if k != "log_dir"} == \
                {k: v for k, v in spec.items() if k != "log_dir"}  # a clone elsewhere reuses them too
            if same:
                print(f"  {spec['name']}: reused {saved}", file=sys.stderr, flush=True)
                return previous["cell"]
        if args.reuse_only:
            return {**{k: spec[k] for k in ("name", "method", "lr", "seed")}, "missing": True}
        # One at a time: in this process (no interpreter start per cell); side by side: one process each.
        cell = run_cell_here(run_cell, spec) if args.jobs == 1 else run_cell_in_process_of_its_own(__file__, spec)
        if "error" in cell:  # recorded and reported; the other cells go on
            print(f"  {spec['name']}: FAILED\n{cell['error']}", file=sys.stderr, flush=True)
            return {**{k: spec[k] for k in ("name", "method", "lr", "seed")}, "error": cell["error"]}
        cell.update(summarize_logs(cell))
        saved.write_text(json.dumps({"spec": spec, "cell": cell}, indent=1) + "\n")
        print(f"  {cell['name']}: val {cell['final_val_loss']:.3f}, diverged {cell['diverged_step']}, "
              f"{cell['wall_s']:.0f} s", file=sys.stderr, flush=True)
        return cell

    wall0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(launch, specs))
    failed = [c for c in results if "error" in c]
    cells = [c for c in results if "error" not in c and "missing" not in c]
    if not cells:
        print(f"no cell results under {out}", file=sys.stderr)
        return 1
    res = {
        "settings": settings,
        "machine": machine_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/stability.py", *(sys.argv[1:] if argv is None else argv)]),
        "cells": cells,
        "analysis": analyse(cells, args.stable_margin),
        "wall_time_s": time.perf_counter() - wall0,
    }
    if failed:
        res["failed_cells"] = failed
    (out / "stability.json").write_text(json.dumps(res, indent=2) + "\n")
    figures = draw_figures(res, out)
    md = render(res) + "".join(
        f"\n![{f.parent.name if f.stem == 'report' else f.stem}]({f.relative_to(out).as_posix()})\n" for f in figures
    )
    (out / "stability.md").write_text(md)
    print(md)
    if failed:
        print(f"{len(failed)} cell(s) failed: {', '.join(c['name'] for c in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
