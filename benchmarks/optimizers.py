#!/usr/bin/env python
"""Optimizer benchmark of lightning_msign (issue 12): Muon and NuMuon against AdamW, with and without the guards.

NuMuon (``lightning_msign.optim.NuMuon``) keeps only the top ``k`` singular directions of Muon's momentum, a
step that pushes weights towards low rank; MSign and PSS push the other way. This benchmark measures what each
optimizer gives (loss, stable rank, how well the trained weights survive a rank truncation), whether a guard
fights the optimizer's rank pressure, and what the optimizers cost per step. Three parts (``--parts``):

1. ``train``: methods x learning rates x seeds of real Lightning runs (``LitGPTModule(optimizer=...)``), the
   setup of ``benchmarks/stability.py``: LitGPT 12 layers, width 64, 4 heads, no positional encoding, pre-LN,
   byte-level Shakespeare, batch 16 x 128, 500 steps, 50 warm-up steps, linear decay to lr / 10, weight decay
   0.1, betas (0.9, 0.95), gradient clipping 1.0, ``32-true``. With Muon / NuMuon every hidden matrix takes
   Muon steps (fused Q/K/V split), embeddings, LM head and norms AdamW steps, all at the same ``lr``.

   ``adamw``            ``torch.optim.AdamW``
   ``muon``             ``Muon`` (Newton-Schulz sign, 5 steps)
   ``numuon_r<r>``      ``NuMuon(rank_fraction=r, krylov_iterations=2, oversample=8)``, constant ``r``
                        (default methods: r = 0.5, 0.25, 0.125)

   Every cell has ``StableRankMonitor(targets="all_2d", every_n_steps=50)`` (power-iteration estimates: the
   series). At the end: the validation loss on 20 validation batches; the exact stable rank of every hidden
   matrix (Q, K and V blocks separately); and *compressibility*: each hidden matrix truncated by SVD to its top
   50% (then, from the untruncated weights, 25%) of ``min(m, n)`` singular values, and the validation loss of
   the truncated model on the same batches. A method's *tuned LR* is the LR with the best mean final
   validation loss (a diverged run counts as ln 256).
2. ``guards``: on top of Muon and of NuMuon (``--guard-rank``, default 0.25), at each one's tuned LR from part 1
   (its LR sweep is trained first when not saved; ``--guard-lr`` fixes the LR instead):

   ``msign_attn``       ``MSignCallback(period=100, targets="attention")`` (the paper's setting, exact SVD)
   ``msign_qk_p10``     ``MSignCallback(period=10, targets="qk", backend="polar_express")``
   ``pss``              ``PSSCallback(tau=2.5, targets="qk")``

   with the metrics of part 1, so that stable rank and truncation loss with and without the guard compare.
3. ``overhead``: time per step of AdamW, Muon and NuMuon (r = 0.5, 0.25) on the main job's model
   (``recipes/shakespeare/baseline.yaml``: LitGPT 6 x 256, 8 heads, RoPE, 4.86M parameters; batch 16 x 256),
   in plain PyTorch: ``optimizer.step()`` alone and the whole training step (forward, backward, clipping,
   step), the optimizers timed round by round in a fresh random order (``common.interleaved``), medians and
   per-round ratios to AdamW.

A run *diverges* (as in stability.py) at a non-finite training loss or when the mean training loss of the last
``--diverge-window`` steps exceeds ln 256 + 1, and is stopped there.

Usage::

    python benchmarks/optimizers.py --quick                       # smoke test, about a minute
    python benchmarks/optimizers.py                               # everything: 21 cells + part 3, ~1 h
    python benchmarks/optimizers.py --parts train                 # part 1 only (15 cells, ~40 min)
    python benchmarks/optimizers.py --parts guards --guard-lr 0.01    # part 2 at a fixed LR
    python benchmarks/optimizers.py --parts overhead --overhead-repeats 20
    python benchmarks/optimizers.py --reuse-only                  # tabulate the saved cells, train nothing

Each cell trains in this process (``--threads`` torch threads, default 1; the process's thread count, random
generators and environment are restored after it), one at a time, and is saved in
``--out/cells/<cell>.json`` with its spec: an interrupted or extended run trains only what is not saved yet
(``--rerun`` trains everything again, ``--reuse-only`` nothing; the overhead part is saved the same way).
Writes ``--out`` (default ``benchmarks/results/optimizers``, ``--quick``: ``benchmarks/results/optimizers_quick``):
``optimizers.json``, ``optimizers.md`` (tables, command, machine line), ``cells/``, ``runs/`` (CSV logs of
every cell) and ``figures/stable_rank.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Optional

import common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
from common import (
    RESULTS_DIR,
    ROOT,
    atomic_write,
    interleaved,
    log,
    machine_description,
    machine_line,
    ms_cell,
    paired_ratio,
    ratio_cell,
    run_cell_here,
    summary,
)
from stability import LOSS_AT_INIT, MODEL_QUICK, MODEL_12x64, divergence_callback

PARTS = ("train", "guards", "overhead")
TRAIN_METHODS = ["adamw", "muon", "numuon_r0.5", "numuon_r0.25", "numuon_r0.125"]
QUICK_METHODS = ["adamw", "muon", "numuon_r0.25"]
GUARDS: dict[str, dict[str, Any]] = {
    "msign_attn": {"msign": {"period": 100, "targets": "attention"}},
    "msign_qk_p10": {"msign": {"period": 10, "targets": "qk", "backend": "polar_express"}},
    "pss": {"pss": {"tau": 2.5, "targets": "qk"}},
}
OVERHEAD_METHODS = ["adamw", "muon", "numuon_r0.5", "numuon_r0.25"]
MAIN_RECIPE = ROOT / "recipes" / "shakespeare" / "baseline.yaml"
KRYLOV = {"krylov_iterations": 2, "oversample": 8}  # NuMuon's reported settings, written into every spec
_NUMUON = re.compile(r"numuon_r(\d*\.?\d+)")


def optimizer_of(method: str) -> tuple[str, dict[str, Any]]:
    """``(LitGPTModule optimizer, optimizer_options)`` of a method name (the part before any ``+guard``)."""
    base = method.split("+", 1)[0]
    if base in ("adamw", "muon"):
        return base, {}
    match = _NUMUON.fullmatch(base)
    if match and 0.0 < float(match.group(1)) <= 1.0:
        return "numuon", {"rank_fraction": float(match.group(1)), **KRYLOV}
    raise ValueError(f"unknown method {method!r}: adamw, muon or numuon_r<fraction in (0, 1]> (e.g. numuon_r0.25)")


def method_name(value: str) -> str:
    """argparse type of ``--methods``."""
    try:
        optimizer_of(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


# --------------------------------------------------------------------------- one cell
def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, lr, seed) cell, measure stable ranks and compressibility (``common.run_cell_here``)."""
    import torch

    torch.set_num_threads(spec["threads"])
    import lightning.pytorch as pl
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers import CSVLogger

    from lightning_msign import (
        LitGPTModule,
        MSignCallback,
        PSSCallback,
        ShakespeareDataModule,
        StableRankMonitor,
        resolve_targets,
    )

    class StepTimer(Callback):
        """Wall time of each training step: batch start to the end of the callbacks' ``on_train_batch_end``
        (forward, backward, clipping, optimizer step, guards, monitor); last in the list."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.times.append(time.perf_counter() - self._t0)

    pl.seed_everything(spec["seed"], verbose=False)
    module = LitGPTModule(
        spec["model"], vocab_size=256, block_size=spec["seq_len"], lr=spec["lr"], weight_decay=0.1,
        betas=(0.9, 0.95), warmup_steps=spec["warmup"], lr_decay="linear", min_lr_ratio=0.1,
        max_steps=spec["steps"], optimizer=spec["optimizer"],
        optimizer_options=spec["optimizer_options"] if spec["optimizer"] != "adamw" else None,
    )
    data = ShakespeareDataModule(tokenizer="byte", seq_len=spec["seq_len"], batch_size=spec["batch_size"],
                                 seed=spec["seed"])
    class Snapshot(Callback):
        """The weights after the last optimizer step, before a guard acts on them (it comes before the guards)."""

        def __init__(self) -> None:
            self.weights: Optional[dict[str, Any]] = None

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step >= spec["steps"]:
                self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    divergence = divergence_callback(spec["diverge_window"], spec["diverge_loss"], grad_norm=False)
    timer, snapshot = StepTimer(), Snapshot()
    # The monitor reads the weights before a guard acts at that step: what the optimizer made of them since the
    # guard's last application (after it, MSign's targets would always read as full rank).
    callbacks: list[Any] = [divergence, StableRankMonitor(targets="all_2d", every_n_steps=spec["srank_every"])]
    guard = spec.get("guard") or {}
    if guard:
        callbacks.insert(1, snapshot)
    if "pss" in guard:
        callbacks.append(PSSCallback(**guard["pss"]))
    if "msign" in guard:
        callbacks.append(MSignCallback(**guard["msign"]))
    callbacks.append(timer)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=spec["precision"], max_steps=spec["steps"],
        gradient_clip_val=spec["clip"], val_check_interval=spec["val_every"], limit_val_batches=spec["val_batches"],
        num_sanity_val_steps=0, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
        logger=CSVLogger(spec["log_dir"], name=spec["name"], version=0),
    )
    t0 = time.perf_counter()
    trainer.fit(module, data)
    wall = time.perf_counter() - t0
    steps = sorted(timer.times[spec["timing_skip"]:]) or sorted(timer.times)
    out: dict[str, Any] = {
        **{k: spec[k] for k in ("name", "method", "lr", "seed")},
        "guard": spec.get("guard_name"), "diverged_step": divergence.step, "steps_done": trainer.global_step,
        "wall_s": wall, "train_s": sum(timer.times),
        "step_ms_mean": 1e3 * sum(steps) / len(steps) if steps else float("nan"),
        "step_ms_median": 1e3 * steps[len(steps) // 2] if steps else float("nan"),
        "final_val_loss": float("nan"), "log_dir": str(Path(spec["log_dir"]) / spec["name"] / "version_0"),
    }
    if divergence.step is not None:
        return out
    out["final_val_loss"] = float(trainer.validate(module, data, verbose=False)[0]["val/loss"])

    # Compressibility: the same validation batches, every hidden matrix truncated to its top singular values.
    batches = []
    for i, batch in enumerate(data.val_dataloader()):
        if i == spec["val_batches"]:
            break
        batches.append(batch)
    targets = resolve_targets(module, "all_2d")
    params = {id(t.param): t.param for t in targets}

    @torch.no_grad()
    def val_loss() -> float:
        module.eval()
        total = 0.0
        for b in batches:
            logits = module(b["input_ids"]).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), b["targets"].reshape(-1)))
        module.train()
        return total / len(batches)

    @torch.no_grad()
    def measure() -> dict[str, Any]:
        """Loss, exact stable ranks and truncated losses of the module's current weights (left unchanged)."""
        saved = {key: p.detach().clone() for key, p in params.items()}
        svds = [torch.linalg.svd(t.matrix().double(), full_matrices=False) for t in targets]
        sranks = [float(S.square().sum() / S[0].square()) if float(S[0]) > 0 else 0.0 for _, S, _ in svds]
        by_role: dict[str, list[float]] = {}
        for t, value in zip(targets, sranks):
            by_role.setdefault("qk" if t.role in ("q", "k") else t.role, []).append(value)
        reference = val_loss()
        got: dict[str, Any] = {
            "val_loss_eval": reference, "n_matrices": len(targets), "srank_end_mean": sum(sranks) / len(sranks),
            "srank_end_min": min(sranks), "srank_end_by_role": {r: sum(v) / len(v) for r, v in by_role.items()},
            "srank_end": {t.name: v for t, v in zip(targets, sranks)}, "truncation": {},
        }
        for fraction in spec["truncate"]:
            energy = []
            for t, (U, S, Vh) in zip(targets, svds):
                k = max(1, math.ceil(fraction * min(t.shape) - 1e-9))
                t.write(((U[:, :k] * S[:k]) @ Vh[:k]).to(t.param.dtype))
                total = float(S.square().sum())
                energy.append(float(S[:k].square().sum()) / total if total > 0 else 1.0)
            loss = val_loss()
            got["truncation"][f"{fraction:g}"] = {
                "val_loss": loss, "increase": loss - reference, "energy_kept_mean": sum(energy) / len(energy),
                "energy_kept_min": min(energy),
            }
            for key, p in params.items():  # back to the trained weights before the next fraction
                p.copy_(saved[key])
        return got

    out.update(measure())
    named = dict(module.named_parameters())
    if snapshot.weights is not None and any(not torch.equal(named[n], w) for n, w in snapshot.weights.items()):
        # The guard acted on the last step: measure also the weights it was given (the optimizer's own).
        with torch.no_grad():
            for n, w in snapshot.weights.items():
                named[n].copy_(w)
        out["before_last_guard"] = measure()
    return out


def summarize_log(cell: dict[str, Any]) -> dict[str, Any]:
    """From the cell's CSV log: the stable-rank series, final training loss, NuMuon's captured energy, guard counts."""
    import csv

    path = Path(cell["log_dir"]) / "metrics.csv"
    out: dict[str, Any] = {"srank_series": [], "final_train_loss": None}
    if not path.exists():
        return out
    train: list[float] = []
    captured: list[float] = []
    series: list[list[float]] = []
    last: dict[str, float] = {}
    with path.open() as fh:
        for row in csv.DictReader(fh):

            def value(key: str) -> Optional[float]:
                v = row.get(key)
                return None if v in (None, "") else float(v)

            if value("train/loss") is not None:
                train.append(value("train/loss"))
            if value("numuon/captured_energy") is not None:
                captured.append(value("numuon/captured_energy"))
            if value("srank/mean") is not None:  # logged at the step index of its batch: after step + 1 steps
                series.append([int(row["step"]) + 1, value("srank/mean"), value("srank/min")])
            for key in ("msign/applications", "pss/triggers"):
                if value(key) is not None:
                    last[key] = value(key)
    finite = [x for x in train if math.isfinite(x)]
    out["srank_series"] = series
    out["final_train_loss"] = sum(finite[-10:]) / len(finite[-10:]) if finite else None
    if captured:
        out["captured_energy_mean"] = sum(captured) / len(captured)
        out["captured_energy_last"] = captured[-1]
    if "msign/applications" in last:
        out["msign_applications"] = int(last["msign/applications"])
    if cell.get("guard") and "pss" in cell["guard"]:
        out["pss_triggers"] = int(last.get("pss/triggers", 0))
    return out


# --------------------------------------------------------------------------- analysis
def final_loss(c: dict[str, Any]) -> float:
    """The final validation loss, ln 256 for a diverged run (as stability.py)."""
    ok = c["diverged_step"] is None and math.isfinite(c["final_val_loss"])
    return c["final_val_loss"] if ok else LOSS_AT_INIT


def _mean(xs: list[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def aggregate_measures(measures: list[dict[str, Any]], fractions: list[float]) -> dict[str, Any]:
    """Means over seeds of what ``measure()`` in :func:`run_cell` returns (stable ranks, truncation)."""
    roles = sorted({r for m in measures for r in m.get("srank_end_by_role", {})})
    agg: dict[str, Any] = {
        "val_loss_eval": _mean([m.get("val_loss_eval") for m in measures]),
        "srank_end_mean": _mean([m.get("srank_end_mean") for m in measures]),
        "srank_end_min": _mean([m.get("srank_end_min") for m in measures]),
        "srank_end_by_role": {r: _mean([m.get("srank_end_by_role", {}).get(r) for m in measures]) for r in roles},
        "truncation": {},
    }
    for f in fractions:
        key = f"{f:g}"
        rows = [m["truncation"][key] for m in measures if key in m.get("truncation", {})]
        agg["truncation"][key] = {k: _mean([r[k] for r in rows]) for k in ("val_loss", "increase", "energy_kept_mean")}
    return agg


def aggregate(cells: list[dict[str, Any]], fractions: list[float]) -> dict[str, Any]:
    """Means over the seeds of one (method, lr): the final loss over all seeds (diverged = ln 256), the
    measurements over the seeds that trained to the end."""
    ok = [c for c in cells if c["diverged_step"] is None and math.isfinite(c["final_val_loss"])]
    agg: dict[str, Any] = {
        "seeds": len(cells), "diverged": len(cells) - len(ok),
        "final_val_loss": _mean([final_loss(c) for c in cells]),
        **aggregate_measures(ok, fractions),
        "step_ms_mean": _mean([c["step_ms_mean"] for c in cells]),
        "step_ms_median": _mean([c["step_ms_median"] for c in cells]),
    }
    before = [c["before_last_guard"] for c in ok if "before_last_guard" in c]
    if before:
        agg["before_last_guard"] = {**aggregate_measures(before, fractions), "seeds": len(before)}
    for key in ("captured_energy_mean", "msign_applications", "pss_triggers"):
        if any(key in c for c in cells):
            agg[key] = _mean([c.get(key) for c in cells])
    # Stable-rank series: the mean over seeds at the steps every trained seed logged.
    series = [{int(s): (m, n) for s, m, n in c.get("srank_series", [])} for c in ok]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    agg["srank_series"] = [[s, _mean([x[s][0] for x in series]), _mean([x[s][1] for x in series])] for s in steps]
    return agg


def analyse_methods(cells: list[dict[str, Any]], methods: list[str], fractions: list[float]) -> dict[str, Any]:
    """Per method: mean final loss per LR, the tuned LR (best mean final loss) and the aggregate there."""
    per: dict[str, Any] = {}
    for m in methods:
        mine = [c for c in cells if c["method"] == m]
        if not mine:
            continue
        lrs = sorted({c["lr"] for c in mine})
        by_lr = {lr: [c for c in mine if c["lr"] == lr] for lr in lrs}
        mean = {lr: sum(final_loss(c) for c in v) / len(v) for lr, v in by_lr.items()}
        tuned = min(lrs, key=lambda lr: (mean[lr], lr))
        per[m] = {"mean_final_loss": {f"{lr:g}": v for lr, v in mean.items()}, "tuned_lr": tuned,
                  "at_tuned": aggregate(by_lr[tuned], fractions),
                  "per_lr": {f"{lr:g}": aggregate(v, fractions) for lr, v in by_lr.items()}}
    return per


# --------------------------------------------------------------------------- overhead (in this process)
def run_overhead(st: dict[str, Any]) -> dict[str, Any]:
    """Step time of the optimizers on one model: ``optimizer.step()`` alone and the whole training step."""
    import torch
    import torch.nn.functional as F

    from lightning_msign import LitGPTModule, ShakespeareDataModule, resolve_targets

    torch.set_num_threads(st["threads"])
    data = ShakespeareDataModule(tokenizer="byte", seq_len=st["seq_len"], batch_size=st["batch_size"], seed=st["seed"])
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    x, y = batch["input_ids"], batch["targets"]
    arms: dict[str, tuple[Any, Any]] = {}
    for method in st["methods"]:
        optimizer, options = optimizer_of(method)
        torch.manual_seed(st["seed"])  # the same initial weights for every optimizer
        module = LitGPTModule(st["model"], vocab_size=256, block_size=st["seq_len"], lr=st["lr"], weight_decay=0.1,
                              warmup_steps=0, max_steps=1000, optimizer=optimizer,
                              optimizer_options=options or None, **st["init"])
        arms[method] = (module, module.configure_optimizers()["optimizer"])

    def train_step(method: str) -> None:
        module, opt = arms[method]
        opt.zero_grad(set_to_none=True)
        logits = module(x)
        F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1)).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
        opt.step()

    def opt_step(method: str) -> None:
        arms[method][1].step()

    full = interleaved({m: (lambda m=m: train_step(m)) for m in arms}, st["repeats"], st["warmup"], st["seed"], "cpu")
    # The gradients of each arm's last training step stay in place: step() alone reuses them.
    step = interleaved({m: (lambda m=m: opt_step(m)) for m in arms}, st["repeats"], st["warmup"], st["seed"] + 1,
                       "cpu")
    module = arms[st["methods"][0]][0]
    out: dict[str, Any] = {
        "settings": st, "parameters": sum(p.numel() for p in module.parameters()),
        "hidden_matrices": len(resolve_targets(module, "all_2d")), "methods": {},
    }
    base = st["methods"][0]
    for m in arms:
        out["methods"][m] = {
            "optimizer_step": summary(step[m]), "train_step": summary(full[m]),
            "optimizer_step_vs_" + base: paired_ratio(step[m], step[base]),
            "train_step_vs_" + base: paired_ratio(full[m], full[base]),
            "optimizer_share": paired_ratio(step[m], full[m])["median"],
        }
    return out


def overhead_settings(args: argparse.Namespace) -> dict[str, Any]:
    if args.quick:
        return {"model": MODEL_QUICK, "init": {}, "recipe": None, "seq_len": 64, "batch_size": 8, "lr": 0.01,
                "seed": 0, "threads": args.threads, "repeats": args.overhead_repeats or 3, "warmup": 1,
                "methods": ["adamw", "muon", "numuon_r0.25"]}
    import yaml

    recipe = yaml.safe_load(MAIN_RECIPE.read_text())
    model = recipe["model"]
    config = {k: v for k, v in model["model_config"].items() if k != "name"}
    init = {k: model[k] for k in ("init_std", "zero_init_query", "scale_residual_init") if k in model}
    return {"model": config, "init": init, "recipe": str(MAIN_RECIPE.relative_to(ROOT)),
            "seq_len": int(recipe["data"]["seq_len"]), "batch_size": args.overhead_batch_size,
            "lr": float(model["lr"]), "seed": int(recipe.get("seed_everything", 0)), "threads": args.threads,
            "repeats": args.overhead_repeats or 15, "warmup": 2, "methods": OVERHEAD_METHODS}


# --------------------------------------------------------------------------- rendering
def fmt(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def trunc_cell(agg: dict[str, Any], key: str) -> str:
    t = agg["truncation"].get(key)
    if not t or t["val_loss"] is None:
        return "-"
    return f"{t['val_loss']:.3f} (+{t['increase']:.3f})" if t["increase"] >= 0 else \
        f"{t['val_loss']:.3f} ({t['increase']:.3f})"


def srank_cells(a: dict[str, Any]) -> str:
    """``mean | min | Q/K | MLP`` stable-rank cells of an aggregate."""
    role = a.get("srank_end_by_role", {})
    return (f"{fmt(a['srank_end_mean'], '.2f')} | {fmt(a['srank_end_min'], '.2f')} | {fmt(role.get('qk'), '.2f')} "
            f"| {fmt(role.get('mlp'), '.2f')}")


def series_table(rows: list[tuple[str, dict[str, Any]]], which: int, title: str) -> list[str]:
    steps = sorted({s for _, agg in rows for s, *_ in agg["srank_series"]})
    if not steps:
        return []
    lines = ["", title, "", "| method | lr | " + " | ".join(str(s) for s in steps) + " |",
             "|---|---:|" + "---:|" * len(steps)]
    for label, agg in rows:
        at = {s: v for s, *v in agg["srank_series"]}
        lines.append(f"| {label} | {agg['lr']:g} | " + " | ".join(fmt(at[s][which], ".2f") if s in at else "-"
                                                                      for s in steps) + " |")
    return lines


def render(res: dict[str, Any]) -> str:
    st = res["settings"]
    fracs = [f"{f:g}" for f in st["truncate"]]
    pcts = [f"{100 * f:g}%" for f in st["truncate"]]
    lines = [
        "# lightning_msign optimizer benchmark: Muon / NuMuon vs AdamW",
        "",
        f"Machine: {res['machine_line']}. Wall time of this command {res['wall_time_s']:.0f} s"
        + (f"; the {len(res['cells'])} cells trained for {sum(c['wall_s'] for c in res['cells']) / 60:.1f} min in "
           f"all ({st['threads']} torch thread(s) each, one at a time; saved cells are reused, see `cells/`)"
           if res["cells"] else "") + ".",
        "",
        f"Command: `{res['command']}`",
        "",
        f"Setup: {json.dumps(st['model'])}, batch {st['batch_size']} x {st['seq_len']}, {st['steps']} steps, "
        f"warm-up {st['warmup']}, linear decay to lr/10, weight decay 0.1, betas (0.9, 0.95), clip 1.0, "
        f"{st['precision']}, seeds {st['seeds']}; validation loss on {st['val_batches']} batches; stable ranks of "
        f"every hidden matrix (Q/K/V blocks apart). Truncation: every hidden matrix cut to its top "
        f"{' / '.join(pcts)} of min(m, n) singular values (each from the trained weights), loss on the same "
        "validation batches (increase over the untruncated loss in brackets). A diverged run counts as ln 256 = "
        "5.55 in the mean final loss.",
    ]
    train = res.get("train")
    if train:
        per = train["per_method"]
        lrs = sorted({float(lr) for m in per.values() for lr in m["mean_final_loss"]})
        most = max((a["seeds"] for pm in per.values() for a in pm["per_lr"].values()), default=1)
        lines += ["", "## 1. Final validation loss per learning rate (mean over seeds)", "",
                  "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | tuned LR |",
                  "|---|" + "---:|" * len(lrs) + "---:|"]

        def loss_cell(pm: dict[str, Any], lr: float) -> str:
            agg = pm["per_lr"].get(f"{lr:g}")
            text = fmt(pm["mean_final_loss"].get(f"{lr:g}"), ".3f")
            return text + (f" ({agg['seeds']} seed{'s' if agg['seeds'] > 1 else ''})"
                           if agg is not None and agg["seeds"] < most else "")

        for m, pm in per.items():
            lines.append(f"| {m} | " + " | ".join(loss_cell(pm, lr) for lr in lrs) + f" | {pm['tuned_lr']:g} |")
        adamw_ms = per.get("adamw", {}).get("at_tuned", {}).get("step_ms_mean")
        lines += ["", "## 1. Each method at its tuned LR", "",
                  "| method | tuned LR | final val | " + " | ".join(f"val after {p} truncation" for p in pcts)
                  + " | mean srank | min srank | Q/K srank | MLP srank | ms/step | vs adamw | diverged seeds |",
                  "|---|---:|---:|" + "---:|" * len(pcts) + "---:|" * 7]
        for m, pm in per.items():
            a = pm["at_tuned"]
            rel = fmt(a["step_ms_mean"] / adamw_ms if adamw_ms and a["step_ms_mean"] else None, ".2f") + "x"
            lines.append(
                f"| {m} | {pm['tuned_lr']:g} | {fmt(a['final_val_loss'], '.3f')} | "
                + " | ".join(trunc_cell(a, k) for k in fracs)
                + f" | {srank_cells(a)} | {fmt(a['step_ms_mean'], '.0f')} | {rel} | {a['diverged']}/{a['seeds']} |")
        lines += ["", "Stable ranks: exact, at the end, over the hidden matrices: mean, minimum, mean of the Q and K "
                  "blocks, mean of the MLP matrices. ms/step: mean "
                  "training step of the run (forward, backward, clipping, optimizer step, callbacks; the first "
                  f"{st['timing_skip']} steps and the validation passes left out); the full runs share a 2-core "
                  "machine, so differences under ~10% are noise (part 3 times the optimizers properly)."]
        rows = [(m, {**pm["at_tuned"], "lr": pm["tuned_lr"]}) for m, pm in per.items()]
        lines += series_table(rows, 0, "## 1. Mean stable rank over training (StableRankMonitor, power estimate), "
                              "at the tuned LR")
        lines += series_table(rows, 1, "## 1. Minimum stable rank over training, at the tuned LR")
    guards = res.get("guards")
    if guards:
        lines += ["", "## 2. Guards on top of Muon / NuMuon: does the guard fight the optimizer's rank pressure?", "",
                  "| optimizer | guard | lr | final val | " + " | ".join(f"val after {p} truncation" for p in pcts)
                  + " | mean srank | min srank | Q/K srank | MLP srank | ms/step | MSign applications / PSS triggers |",
                  "|---|---|---:|---:|" + "---:|" * len(pcts) + "---:|" * 6]
        for row in guards["rows"]:
            a = row["agg"]
            acts = a.get("msign_applications", a.get("pss_triggers"))
            lines.append(
                f"| {row['base']} | {row['guard'] or 'none'} | {row['lr']:g} | {fmt(a['final_val_loss'], '.3f')} | "
                + " | ".join(trunc_cell(a, k) for k in fracs)
                + f" | {srank_cells(a)} | {fmt(a['step_ms_mean'], '.0f')} | {fmt(acts, '.0f')} |")
            b = a.get("before_last_guard")
            if b:
                lines.append(
                    f"| {row['base']} | {row['guard']}, before its last application | {row['lr']:g} "
                    f"| {fmt(b['val_loss_eval'], '.3f')} | " + " | ".join(trunc_cell(b, k) for k in fracs)
                    + f" | {srank_cells(b)} | | |")
        lines += ["", "LR: " + ", ".join(f"{b} at {lr:g} ({guards['lr_source']})"
                                         for b, lr in guards["guard_lr"].items()) + ". Measured on the final model; "
                  "where the guard acted on the last step (MSign whose period divides the steps), a second row "
                  "measures the weights it was given, the optimizer's own: the guard's lasting effect, not its last "
                  "restoration. The stable-rank series below are read before the guard acts at that step."]
        rows = [(f"{r['base']} + {r['guard'] or 'none'}", {**r["agg"], "lr": r["lr"]}) for r in guards["rows"]]
        lines += series_table(rows, 0, "## 2. Mean stable rank over training, with and without the guards")
    over = res.get("overhead")
    if over:
        s = over["settings"]
        base = s["methods"][0]
        lines += ["", "## 3. Step time of the optimizers", "",
                  f"Model {json.dumps(s['model'])}" + (f" (from `{s['recipe']}`)" if s.get("recipe") else "")
                  + f", {over['parameters'] / 1e6:.2f}M parameters, {over['hidden_matrices']} hidden matrices "
                  f"(Q/K/V apart), batch {s['batch_size']} x {s['seq_len']}, {s['threads']} torch thread(s), "
                  f"`32-true`; plain PyTorch, {s['repeats']} recorded rounds after {s['warmup']}, the optimizers in "
                  "a fresh random order each round. Median [interquartile range] in ms; ratios: per round, to "
                  f"{base}, median [IQR].", "",
                  f"| optimizer | optimizer.step() ms | vs {base} | training step ms | vs {base} "
                  "| step share of the training step |", "|---|---:|---:|---:|---:|---:|"]
        for m, r in over["methods"].items():
            lines.append(f"| {m} | {ms_cell(r['optimizer_step'], 1)} | {ratio_cell(r['optimizer_step_vs_' + base])} "
                         f"| {ms_cell(r['train_step'], 0)} | {ratio_cell(r['train_step_vs_' + base])} "
                         f"| {100 * r['optimizer_share']:.0f}% |")
        if over.get("reused_from"):
            lines += ["", f"(Timings reused from {over['reused_from']}.)"]
    if res["cells"]:
        lines += ["", "## Cells", "", "| method | lr | seed | diverged at | final val | "
                  + " | ".join(f"trunc {p}" for p in pcts) + " | mean srank | min srank | captured energy "
                  "| ms/step | wall s |",
                  "|---|---:|---:|---:|---:|" + "---:|" * len(pcts) + "---:|---:|---:|---:|---:|"]
        for c in res["cells"]:
            tr = [fmt(c.get("truncation", {}).get(k, {}).get("val_loss"), ".3f") for k in fracs]
            lines.append(
                f"| {c['method']} | {c['lr']:g} | {c['seed']} "
                f"| {c['diverged_step'] if c['diverged_step'] is not None else '-'} "
                f"| {fmt(c['final_val_loss'], '.3f')} | " + " | ".join(tr)
                + f" | {fmt(c.get('srank_end_mean'), '.2f')} | {fmt(c.get('srank_end_min'), '.2f')} "
                f"| {fmt(c.get('captured_energy_mean'), '.2f')} | {fmt(c['step_ms_mean'], '.0f')} "
                f"| {c['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def draw_figure(res: dict[str, Any], out: Path) -> Optional[Path]:
    """``figures/stable_rank.png``: mean stable rank over steps, each method at its tuned LR (and the guards)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # (title, [(base method, guard, lr, series)])
    if res.get("train"):
        panels.append(("each method at its tuned LR", [(m, None, pm["tuned_lr"], pm["at_tuned"]["srank_series"])
                                                        for m, pm in res["train"]["per_method"].items()]))
    if res.get("guards"):
        panels.append(("with and without the guards", [(r["base"], r["guard"], r["lr"], r["agg"]["srank_series"])
                                                        for r in res["guards"]["rows"]]))
    panels = [(title, [row for row in rows if row[3]]) for title, rows in panels]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    bases = list(dict.fromkeys(row[0] for _, rows in panels for row in rows))
    colors = {b: "black" if b == "adamw" else plt.cm.tab10(i % 10) for i, b in enumerate(bases)}
    styles = dict(zip([None, *GUARDS], ["-", "--", ":", "-."]))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, (title, rows) in zip(axes[0], panels):
        for base, guard, lr, series in rows:
            ax.plot([s for s, *_ in series], [m for _, m, _ in series], marker="o", ms=3, color=colors[base],
                    ls=styles.get(guard, "-"), label=f"{base}{' + ' + guard if guard else ''} (lr {lr:g})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("mean stable rank of the hidden matrices")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "figures" / "stable_rank.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- driver
def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: tiny model, 40 steps, 1 LR, adamw/muon/numuon_r0.25, one guard, small part 3")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--methods", nargs="+", type=method_name, default=None,
                        help=f"part 1 methods (default {' '.join(TRAIN_METHODS)}; any numuon_r<fraction> works)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="peak LRs (default 0.003 0.01 0.03 0.1)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--guards", nargs="+", choices=list(GUARDS), default=None,
                        help="part 2 guards (default all; --quick: msign_qk_p10)")
    parser.add_argument("--guard-rank", type=float, default=0.25, help="NuMuon's rank fraction under the guards")
    parser.add_argument("--guard-lr", type=float, default=None,
                        help="LR of part 2 (default: each optimizer's tuned LR from part 1)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--model", type=json.loads, default=None, help="litgpt Config fields as JSON (default 12x64)")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--srank-every", type=int, default=50, help="StableRankMonitor's every_n_steps")
    parser.add_argument("--truncate", type=float, nargs="+", default=[0.5, 0.25],
                        help="rank fractions the trained matrices are truncated to")
    parser.add_argument("--diverge-loss", type=float, default=LOSS_AT_INIT + 1.0)
    parser.add_argument("--diverge-window", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of every cell and of part 3")
    parser.add_argument("--overhead-repeats", type=int, default=None, help="recorded rounds of part 3 (default 15)")
    parser.add_argument("--overhead-batch-size", type=int, default=16)
    parser.add_argument("--reuse-only", action="store_true", help="train and time nothing: tabulate what is saved")
    parser.add_argument("--rerun", action="store_true", help="train and time everything again")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    if args.quick:
        args.lrs = args.lrs or [0.01]
        args.methods = args.methods or QUICK_METHODS
        args.guards = args.guards or ["msign_qk_p10"]
        args.steps, args.warmup, args.batch_size, args.seq_len = 40, 5, 8, 64
        args.diverge_window, args.srank_every = 10, 10
        args.model = args.model or MODEL_QUICK
    args.methods = args.methods or TRAIN_METHODS
    args.lrs = args.lrs or [0.003, 0.01, 0.03, 0.1]
    args.guards = args.guards or list(GUARDS)
    if not 0.0 < args.guard_rank <= 1.0:
        parser.error(f"--guard-rank must be in (0, 1], got {args.guard_rank}")
    out = args.out or (RESULTS_DIR / ("optimizers_quick" if args.quick else "optimizers"))
    cell_dir = out / "cells"
    cell_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(args.threads)  # the machine line records it; part 3 runs in this process
    machine = machine_description()
    wall0 = time.perf_counter()
    settings = {
        "model": args.model or MODEL_12x64, "steps": args.steps, "warmup": args.warmup,
        "batch_size": args.batch_size, "seq_len": args.seq_len, "clip": 1.0, "precision": args.precision,
        "seeds": args.seeds, "lrs": args.lrs, "methods": args.methods, "truncate": args.truncate,
        "srank_every": args.srank_every, "val_batches": 20, "threads": args.threads, "parts": args.parts,
        "timing_skip": min(5, max(0, args.steps // 10)),
    }

    def spec_of(method: str, lr: float, seed: int, guard: Optional[str] = None) -> dict[str, Any]:
        optimizer, options = optimizer_of(method)
        name = f"{method}+{guard}" if guard else method
        spec = {
            "name": f"{name}_lr{lr:g}_s{seed}", "method": name, "optimizer": optimizer, "optimizer_options": options,
            "guard_name": guard, "guard": GUARDS[guard] if guard else None, "lr": lr, "seed": seed,
            **{k: settings[k] for k in ("model", "steps", "warmup", "batch_size", "seq_len", "clip", "precision",
                                        "truncate", "srank_every", "val_batches", "threads", "timing_skip")},
            "diverge_loss": args.diverge_loss, "diverge_window": args.diverge_window,
            "val_every": min(args.steps, 250), "log_dir": str(out / "runs"),
        }
        return spec

    def saved(path: Path, spec: dict[str, Any]) -> Optional[dict[str, Any]]:
        if not path.exists() or args.rerun:
            return None
        previous = json.loads(path.read_text())
        strip = ("log_dir",)  # a clone elsewhere reuses the cells too
        if {k: v for k, v in previous.get("spec", {}).items() if k not in strip} != \
                {k: v for k, v in spec.items() if k not in strip}:
            return None
        return previous

    def launch(spec: dict[str, Any]) -> Optional[dict[str, Any]]:
        path = cell_dir / f"{spec['name']}.json"
        previous = saved(path, spec)
        if previous is not None:
            log(f"  {spec['name']}: reused {path}")
            return previous["cell"]
        if args.reuse_only:
            log(f"  {spec['name']}: not saved, left out (--reuse-only)")
            return None
        if any(f["name"] == spec["name"] for f in failed):  # part 2 asks again for part 1's cells
            return None
        log(f"  {spec['name']}: training ...")
        cell = run_cell_here(run_cell, spec)
        if "error" in cell:  # recorded and reported; the other cells go on
            log(f"  {spec['name']}: FAILED\n{cell['error']}")
            failed.append({"name": spec["name"], "error": cell["error"]})
            return None
        cell.update(summarize_log(cell))
        atomic_write(path, json.dumps({"spec": spec, "cell": cell}, indent=1) + "\n")
        log(f"  {cell['name']}: val {fmt(cell['final_val_loss'], '.3f')}, diverged {cell['diverged_step']}, "
            f"srank mean {fmt(cell.get('srank_end_mean'), '.2f')}, {cell['step_ms_mean']:.0f} ms/step, "
            f"{cell['wall_s']:.0f} s")
        return cell

    failed: list[dict[str, Any]] = []
    cells: list[dict[str, Any]] = []
    res: dict[str, Any] = {"settings": settings, "machine": machine, "command": " ".join(
        ["python", "benchmarks/optimizers.py", *(sys.argv[1:] if argv is None else argv)])}

    def run_all(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        got = [c for c in map(launch, specs) if c is not None]
        cells.extend(c for c in got if c["name"] not in {x["name"] for x in cells})
        return got

    guard_bases = ["muon", f"numuon_r{args.guard_rank:g}"]
    if "train" in args.parts:
        log(f"part 1: {len(args.methods)} methods x {len(args.lrs)} LRs x {len(args.seeds)} seeds")
        got = run_all([spec_of(m, lr, s) for s in args.seeds for lr in args.lrs for m in args.methods])
        res["train"] = {"per_method": analyse_methods(got, args.methods, args.truncate)}
    if "guards" in args.parts:
        lrs = [args.guard_lr] if args.guard_lr is not None else args.lrs
        log(f"part 2: {', '.join(args.guards)} on {', '.join(guard_bases)}"
            + (f" at lr {args.guard_lr:g}" if args.guard_lr is not None
               else " at each one's tuned LR (its LR sweep trained first where not saved)"))
        base_cells = run_all([spec_of(b, lr, s) for s in args.seeds for lr in lrs for b in guard_bases])
        per = analyse_methods(base_cells, guard_bases, args.truncate)
        rows, guard_lr = [], {}
        for b in guard_bases:
            if b not in per:
                log(f"  no trained cell of {b}: its guards are left out")
                continue
            lr = guard_lr[b] = per[b]["tuned_lr"]
            rows.append({"base": b, "guard": None, "lr": lr, "agg": per[b]["per_lr"][f"{lr:g}"]})
            for g in args.guards:
                got = run_all([spec_of(b, lr, s, g) for s in args.seeds])
                if got:
                    rows.append({"base": b, "guard": g, "lr": lr, "agg": aggregate(got, args.truncate)})
        res["guards"] = {"guard_lr": guard_lr, "rows": rows,
                         "lr_source": "--guard-lr" if args.guard_lr is not None else "its tuned LR"}
    if "overhead" in args.parts:
        st = overhead_settings(args)
        path = cell_dir / "overhead.json"
        previous = saved(path, st)
        if previous is not None:
            log(f"part 3: reused {path}")
            res["overhead"] = {**previous["overhead"], "reused_from": previous["date_utc"]}
        elif args.reuse_only:
            log("part 3: not saved, left out (--reuse-only)")
        else:
            log(f"part 3: {', '.join(st['methods'])}, {st['repeats']} rounds")
            res["overhead"] = run_overhead(st)
            atomic_write(path, json.dumps({"spec": st, "overhead": res["overhead"],
                                           "date_utc": machine["date_utc"]}, indent=1) + "\n")
    res["cells"] = cells
    if not cells and "overhead" not in res:
        log(f"no results under {out}")
        return 1
    res["wall_time_s"] = time.perf_counter() - wall0
    machine["loadavg_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    res["machine_line"] = machine_line(machine)
    if failed:
        res["failed_cells"] = failed
    figure = draw_figure(res, out)
    atomic_write(out / "optimizers.json", json.dumps(res, indent=1) + "\n")
    md = render(res) + (f"\n![stable rank]({figure.relative_to(out).as_posix()})\n" if figure else "")
    atomic_write(out / "optimizers.md", md)
    print(md)
    if failed:
        log(f"{len(failed)} cell(s) failed: {', '.join(c['name'] for c in failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
