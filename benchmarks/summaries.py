#!/usr/bin/env python
"""Derived tables of the stability pages: figures that combine several result files, computed from them.

The stability benchmarks each write one result folder; the pages compare methods across folders (a guard
against a baseline retrained elsewhere, a gap to a run that never had the LR jump, accuracy over two curvature
runs). This script makes those comparisons from the JSON result files alone: it trains and times nothing, and
every figure it writes is read or computed from them (no number is typed here; the method labels state the
methods' settings, as benchmarks/stability.py defines them).

Usage::

    python benchmarks/summaries.py            # writes benchmarks/results/summaries.md and .json
    python benchmarks/summaries.py --check    # exit 1 when those files differ from what it would write now

Sources: the ``cells`` (one run each) and ``analysis.per_method`` (means over seeds, gaps, largest stable LR)
of ``benchmarks/results/**/stability.json``, ``pss_recovery/pss_recovery.json`` and the ``parts[].summary`` of
``curvature_accuracy*.json``. Each table's section of the ``.md`` names the files it reads.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT_MD = RESULTS / "summaries.md"
OUT_JSON = RESULTS / "summaries.json"
COMMAND = "python benchmarks/summaries.py"

# Row labels: what each method adds to the baseline, as benchmarks/stability.py defines it (settings, not results).
LABELS = {
    "baseline": "baseline",
    "msign_attn": "MSign attention, P = 100, svd (the paper's)",
    "msign_all2d": "MSign all 2D, P = 100",
    "msign_attn_p10": "MSign attention, P = 10, polar_express",
    "msign_qk_p10": "MSign Q and K, P = 10, polar_express",
    "msign_qk_p1": "MSign Q and K, P = 1, polar_express",
    "msign_qk_p10_cap": "MSign Q and K, P = 10, Frobenius norm capped at its initial value",
    "qk_cap_p10": "the same norm cap every 10 steps without the sign (control)",
    "pss": "PSS (tau 2.5, Q and K)",
    "msign_pss": "MSign attention P = 100 + PSS",
    "qk_norm": "qk-norm",
    "z_loss": "z-loss",
    "zclip": "ZClip-style clipping (z 2.5, instead of clip 1.0)",
    "skip_step": "skip-step (6 sigma over 128 steps, with clip 1.0)",
    "msign_qk_logit": "MSign Q/K of a layer whose attention logit > 100",
    "msign_qk_logit50": "MSign Q/K of a layer whose attention logit > 50",
    "msign_qk_logit30": "MSign Q/K of a layer whose attention logit > 30",
    "msign_qk_logit_then_p1": "**MSign Q/K once a layer's logit > 100, then every Q/K every step** (the recommended "
                              "guard, `period_after_trigger=1`)",
    "qk_clip": "QK-Clip (Kimi K2), tau 100",
    "qk_clip_30": "QK-Clip (Kimi K2), tau 30",
    "arch_warmup": "architecture warm-up (`arch_warmup`)",
    "arch_warmup_curv": "architecture warm-up, curvature-gated (`arch_warmup_curv`)",
    "rollback": "RollbackCallback, skip only (snapshots every 10 steps, 6 sigma over 128)",
    "rollback_lr": "RollbackCallback + LR x0.1 for 50 steps, ramped back over 100",
}


# --------------------------------------------------------------------------- the result files
class Sources:
    """The result files read, each once, with the CPU and date its runs record."""

    def __init__(self, root: Path = RESULTS):
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}

    def __call__(self, rel: str) -> dict[str, Any]:
        if rel not in self.files:
            self.files[rel] = json.loads((self.root / rel).read_text(encoding="utf-8"))
        return self.files[rel]

    def listing(self) -> list[dict[str, str]]:
        rows = []
        for rel, data in self.files.items():
            machine = data["machine"]
            if isinstance(machine, dict):  # curvature_accuracy.py: a dict, its date "YYYY-MM-DD HH:MM:SS UTC"
                cpu, line = machine["cpu"], f"{machine['cpu']}, {machine['usable_cpus']} usable cores"
                date = _dt.datetime.strptime(machine["date_utc"], "%Y-%m-%d %H:%M:%S UTC")
                date = date.replace(tzinfo=_dt.timezone.utc).isoformat()
            else:  # stability.py, pss_recovery.py: "CPU, N usable cores, ..."; the date the file was written
                cpu, line, date = machine.split(",")[0].strip(), machine, data["date"]
            rows.append({"file": f"benchmarks/results/{rel}", "cpu": cpu, "machine": line, "date": date})
        return rows


def finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def cells_of(res: dict[str, Any], method: str, lr: Optional[float] = None) -> list[dict[str, Any]]:
    """The runs of ``method`` (at ``lr``), in seed order."""
    found = [c for c in res["cells"] if c["method"] == method and (lr is None or c["lr"] == lr)]
    return sorted(found, key=lambda c: (c["lr"], c["seed"]))


def lr_key(lr: float) -> str:
    """The key of ``lr`` in ``analysis.per_method[m].mean_final_loss`` (JSON keys: ``str`` of the float)."""
    return str(float(lr))


def mean_loss(res: dict[str, Any], method: str, lr: float) -> Optional[float]:
    v = res["analysis"]["per_method"][method]["mean_final_loss"].get(lr_key(lr))
    return v if finite(v) else None


def gap_closed(base: dict[str, float], method: Optional[float], lr: float, margin: float,
               base_best: Optional[float] = None) -> Optional[float]:
    """Share of the baseline's loss gap at ``lr`` that a method closes.

    The formula of ``analyse()`` in benchmarks/stability.py, ``(base[lr] - m[lr]) / (base[lr] - min(base))``, with
    its rule that a gap of at most ``margin`` gives no share; restated here because importing that module imports
    torch and sets ``OMP_WAIT_POLICY``. ``base`` maps each LR to the baseline's mean final loss; ``base_best``
    replaces ``min(base)`` where the reference is another run (the LR jump: the run without the jump).
    """
    best = min(v for v in base.values() if finite(v)) if base_best is None else base_best
    at = base.get(lr_key(lr))
    if method is None or not finite(at) or at - best <= margin:
        return None
    return (at - method) / (at - best)


def identical(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Whether two lists of runs (same seeds) end at exactly the same final validation loss, seed by seed."""
    return bool(a) and [(c["seed"], c["final_val_loss"]) for c in a] == [(c["seed"], c["final_val_loss"]) for c in b]


def gap_lrs(base: dict[str, float], lrs: list[float], margin: float) -> list[float]:
    """The LRs of ``lrs`` at which the baseline's gap is more than ``margin``: those that have a share closed."""
    best = min(v for v in base.values() if finite(v))
    return [lr for lr in lrs if finite(base.get(lr_key(lr))) and base[lr_key(lr)] - best > margin]


def baseline_curve(res: dict[str, Any]) -> dict[str, float]:
    return res["analysis"]["per_method"]["baseline"]["mean_final_loss"]


# --------------------------------------------------------------------------- formatting
def loss(x: Any) -> str:
    return f"{x:.3f}" if finite(x) else "-"


def share(x: Any) -> str:
    return f"{x:.0%}" if finite(x) else "-"


def magnitude(x: Any) -> str:
    """1.4e4 for large values, 58 for small ones: attention logits, gradient norms."""
    if not finite(x):
        return "-"
    if abs(x) < 1000:
        return f"{x:.0f}"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def ratio(x: Any) -> str:
    """Two significant digits below 10, whole numbers above (stability ratios)."""
    if not finite(x):
        return "-"
    return f"{x:.0f}" if abs(x) >= 10 else f"{x:.2g}"


def percent(x: Any) -> str:
    """A relative error as a percentage: 4962%, 7.0%, 0.04%."""
    if not finite(x):
        return "-"
    p = 100 * x
    return f"{p:.0f}%" if p >= 10 else f"{p:.1f}%" if p >= 1 else f"{p:.2f}%"


def lr_text(lr: Optional[float], complete: bool = True) -> str:
    if not complete:
        return "-"
    return "none" if lr is None else f"{lr:g}"


def seeds_text(seeds: list[int]) -> str:
    return " and ".join(map(str, seeds)) if len(seeds) == 2 else ", ".join(map(str, seeds))


def per_seed(values: list[Any], fmt: Callable[[Any], str]) -> str:
    return ", ".join(fmt(v) for v in values) if values else "-"


def table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    return out + ["| " + " | ".join(r) + " |" for r in rows]


# --------------------------------------------------------------------------- the tables
# Each builder returns (description, header, alignment, rows, values): ``values`` holds the figures behind the row
# cells unformatted, for summaries.json.

MAIN, TRIGGERS, ZCLIP = "stability/stability.json", "stability_triggers/stability.json", \
    "stability_zclip_skip/stability.json"
CURVATURE, JUMP = "stability_curvature/stability.json", "stability_lr_jump/stability.json"


def overview(src: Sources) -> tuple:
    main, trig, zs = src(MAIN), src(TRIGGERS), src(ZCLIP)
    lrs = main["analysis"]["lrs"]
    margin = main["analysis"]["stable_margin"]
    gaps_at = gap_lrs(baseline_curve(main), lrs, margin)
    header = ["method"] + [f"lr {lr:g}" for lr in lrs] + [
        "gap closed at " + " / ".join(f"{lr:g}" for lr in gaps_at), f"largest LR within {margin:g} of the best"]
    rows, values = [], []

    def row(rel: str, m: str, base: dict[str, float], label: str) -> None:
        res = src(rel)
        pm = res["analysis"]["per_method"][m]
        means = [mean_loss(res, m, lr) if lr in res["analysis"]["lrs"] else None for lr in lrs]
        gaps = [None if m == "baseline" else gap_closed(base, v, lr, margin) for lr, v in zip(lrs, means)]
        gaps = [g for lr, g in zip(lrs, gaps) if lr in gaps_at]
        complete = pm["lr_sensitivity"] is not None and res["analysis"]["lrs"] == lrs
        rows.append([label] + [loss(v) if v is not None else "" for v in means]
                    + ["-" if m == "baseline" else " / ".join(share(g) for g in gaps),
                       lr_text(pm["largest_stable_lr"], complete) if complete else ""])
        values.append({"method": m, "file": rel, "mean_final_loss": dict(zip(map(lr_key, lrs), means)),
                       "gap_closed": dict(zip(map(lr_key, gaps_at), gaps)),
                       "largest_stable_lr": pm["largest_stable_lr"] if complete else None})

    for m in ["baseline", "msign_attn", "msign_all2d", "msign_attn_p10", "msign_qk_p10", "msign_qk_p1", "pss",
              "msign_pss", "qk_norm", "z_loss"]:
        row(MAIN, m, baseline_curve(main), LABELS[m])
    row(TRIGGERS, "baseline", baseline_curve(trig), "baseline, retrained with the current code (`stability_triggers`)")
    for m in ["zclip", "skip_step"]:
        row(ZCLIP, m, baseline_curve(trig), LABELS[m])
    for m in ["msign_qk_logit_then_p1", "msign_qk_logit", "msign_qk_logit50", "msign_qk_logit30", "qk_clip",
              "qk_clip_30"]:
        row(TRIGGERS, m, baseline_curve(trig), LABELS[m])
    low = min(zs["analysis"]["lrs"])
    same = identical(cells_of(zs, "skip_step", low), cells_of(trig, "baseline", low))
    description = (
        f"Final validation loss, mean of seeds {seeds_text(main['settings']['seeds'])}, of the main sweep "
        f"(`{MAIN}`, the rows down to z-loss, cells trained by older code) and of the rows below the retrained "
        f"baseline (`{TRIGGERS}`: the guards on measured precursors and that baseline; `{ZCLIP}`: ZClip-style "
        f"clipping and skip-step, current code). Gap closed: `(base[lr] - m[lr]) / (base[lr] - min(base))` "
        f"(`analyse()` of benchmarks/stability.py), against the main sweep's baseline for the main sweep's rows "
        f"and against the retrained baseline of `{TRIGGERS}` for every row below it: ZClip-style and skip-step "
        f"included, whose own file has no baseline and whose runs are the current code's"
        + (f" (skip-step's lr-{low:g} runs, which never skipped, end at that baseline's losses to the last digit)"
           if same else "")
        + f". Largest LR within {margin:g} of the best: from each row's own file (`largest_stable_lr`: every seed "
        f"within {margin:g} of the best mean final loss of that file's sweep), given where that sweep ran the "
        f"method at every LR of this table. An empty cell: not run.")
    return description, header, ["l"] + ["r"] * (len(header) - 1), rows, values


def zclip_skip(src: Sources) -> tuple:
    main, trig, zs = src(MAIN), src(TRIGGERS), src(ZCLIP)
    lrs, seeds = zs["analysis"]["lrs"], zs["settings"]["seeds"]
    margin = trig["analysis"]["stable_margin"]
    gaps_at = gap_lrs(baseline_curve(trig), lrs, margin)
    top = max(lrs)
    header = ["method"] + [f"lr {lr:g}" for lr in lrs] + [
        "gap closed at " + " / ".join(f"{lr:g}" for lr in gaps_at),
        "clips / skipped steps (seeds " + ", ".join(map(str, seeds)) + ") at " + " / ".join(f"{lr:g}" for lr in lrs),
        f"max attention logit at {top:g} (seeds " + ", ".join(map(str, seeds)) + ")"]
    rows, values = [], []

    def row(res: dict[str, Any], m: str, base: Optional[dict[str, float]], label: str, count: Optional[str],
            rule: float = margin) -> None:  # rule: the margin of the file whose baseline ``base`` is
        means = [mean_loss(res, m, lr) for lr in lrs]
        gaps = [gap_closed(base, v, lr, rule) for lr, v in zip(lrs, means) if lr in gaps_at] if base else []
        counts = [[c.get(count) for c in cells_of(res, m, lr)] for lr in lrs] if count else []
        noun = {"zclip_clips": "clips", "skipped_steps": "skips"}.get(count, "")
        logits = [c["max_attn_logit"] for c in cells_of(res, m, top)]
        rows.append([label] + [loss(v) for v in means]
                    + [" / ".join(share(g) for g in gaps) if base else "-",
                       " / ".join(per_seed(n, str) for n in counts) + f" {noun}" if counts else "-",
                       per_seed(logits, magnitude)])
        values.append({"method": m, "mean_final_loss": dict(zip(map(lr_key, lrs), means)),
                       "gap_closed": dict(zip(map(lr_key, gaps_at), gaps)),
                       "counts": dict(zip(map(lr_key, lrs), counts)), "max_attn_logit_top_lr": logits})

    row(trig, "baseline", None, f"baseline (clip {trig['settings']['clip']}), current code (`stability_triggers`)",
        None)
    row(zs, "zclip", baseline_curve(trig), "ZClip-style", "zclip_clips")
    row(zs, "skip_step", baseline_curve(trig), "skip-step", "skipped_steps")
    row(main, "qk_norm", baseline_curve(main), "qk-norm (for reference; main sweep, older code)", None,
        rule=main["analysis"]["stable_margin"])
    description = (
        f"ZClip-style clipping and skip-step (`{ZCLIP}`) beside the baseline retrained with the current code "
        f"(`{TRIGGERS}`), and qk-norm from the main sweep (`{MAIN}`). Final validation loss, mean of seeds "
        f"{seeds_text(seeds)}. Gap closed against that retrained baseline (`analyse()`'s formula, the "
        f"baseline's best over its {len(trig['analysis']['lrs'])} learning rates); qk-norm's against the main "
        f"sweep's own baseline, its runs being that sweep's (older code). Clips and skipped steps: `zclip_clips` "
        f"and `skipped_steps` of each run; max attention logit: `max_attn_logit` of each run at the largest LR.")
    return description, header, ["l"] + ["r"] * (len(lrs) + 1) + ["l", "r"], rows, values


def triggers(src: Sources) -> tuple:
    main, trig, curv = src(MAIN), src(TRIGGERS), src(CURVATURE)
    lrs = trig["analysis"]["lrs"]
    margin = trig["analysis"]["stable_margin"]
    gaps_at = gap_lrs(baseline_curve(trig), lrs, margin)
    header = ["method"] + [f"lr {lr:g}" for lr in lrs] + [
        "gap closed at " + " / ".join(f"{lr:g}" for lr in gaps_at), "LR sensitivity",
        f"largest LR within {margin:g} of the best"]
    rows, values = [], []

    def row(res: dict[str, Any], m: str, label: str) -> None:
        pm = res["analysis"]["per_method"][m]
        means = [mean_loss(res, m, lr) if lr in res["analysis"]["lrs"] else None for lr in lrs]
        gaps = [gap_closed(baseline_curve(res), v, lr, res["analysis"]["stable_margin"])
                for lr, v in zip(lrs, means) if lr in gaps_at]
        complete = pm["lr_sensitivity"] is not None and res["analysis"]["lrs"] == lrs
        rows.append([label] + [loss(v) if v is not None else "" for v in means]
                    + ["-" if m == "baseline" else " / ".join(share(g) for g in gaps),
                       f"{pm['lr_sensitivity']:.3f}" if complete else "", lr_text(pm["largest_stable_lr"], complete)
                       if complete else ""])
        values.append({"method": m, "mean_final_loss": dict(zip(map(lr_key, lrs), means)),
                       "gap_closed": {} if m == "baseline" else dict(zip(map(lr_key, gaps_at), gaps)),
                       "lr_sensitivity": pm["lr_sensitivity"] if complete else None,
                       "largest_stable_lr": pm["largest_stable_lr"] if complete else None})

    for m in trig["analysis"]["methods"]:
        row(trig, m, "baseline (this code)" if m == "baseline" else LABELS[m])
    for m in ["arch_warmup", "arch_warmup_curv"]:
        row(curv, m, LABELS[m] + ", `stability_curvature`")
    for m in ["msign_attn", "msign_qk_p10", "qk_norm"]:
        row(main, m, f"*main sweep, older cells:* {LABELS[m]}")
    same = all(identical(cells_of(curv, "baseline", lr), cells_of(trig, "baseline", lr))
               for lr in curv["analysis"]["lrs"])
    description = (
        f"The guards on measured precursors and QK-Clip (`{TRIGGERS}`, with the baseline retrained by the current "
        f"code), architecture warm-up (`{CURVATURE}`, same code"
        + (f"; its baseline's runs end at `{TRIGGERS}`'s losses to the last digit" if same else "")
        + f") and rows of the main sweep (`{MAIN}`, older cells). Final validation loss, mean of "
        f"seeds {seeds_text(trig['settings']['seeds'])}; an empty cell: not run at that LR. Each row's gap closed is "
        f"`analyse()`'s, against the baseline of its own file; LR sensitivity and the largest LR within "
        f"{margin:g} of the best are its file's `analysis.per_method`, given where that file ran the method at "
        f"all {len(lrs)} LRs (over fewer they do not compare).")
    return description, header, ["l"] + ["r"] * (len(header) - 1), rows, values


def lr_jump(src: Sources) -> tuple:
    jump, trig = src(JUMP), src(TRIGGERS)
    (lr,) = jump["analysis"]["lrs"]
    seeds = jump["settings"]["seeds"]
    at_step, factor = jump["settings"]["lr_jump"]
    margin = jump["analysis"]["stable_margin"]
    reference = mean_loss(trig, "baseline", lr)  # the same runs without the jump
    base = {lr_key(lr): mean_loss(jump, "baseline", lr)}
    s = " / ".join(map(str, seeds))
    header = ["method", "final val loss", "gap closed", f"acted (seeds {s})", f"steps trained (seeds {s})"]
    rows, values = [], []
    for m in jump["analysis"]["methods"]:
        runs = cells_of(jump, m, lr)
        v = mean_loss(jump, m, lr)
        stopped = any(c.get("rollback_stopped") for c in runs)
        gap = None if m == "baseline" else gap_closed(base, v, lr, margin, base_best=reference)
        if "rollbacks" in runs[0]:
            acted = (f"{' / '.join(str(c['rollbacks']) for c in runs)} rollbacks (at steps "
                     + " / ".join(", ".join(map(str, c["rollback_steps"])) for c in runs)
                     + f"), {' / '.join(str(c['steps_lost']) for c in runs)} steps lost"
                     + ("; stopped by the retry budget: " + " / ".join("yes" if c["rollback_stopped"] else "no"
                                                                        for c in runs) if stopped else ""))
        elif "msign_triggers" in runs[0]:
            acted = f"{' / '.join(str(c['msign_triggers']) for c in runs)} MSign triggers"
        elif "skipped_steps" in runs[0]:
            acted = f"{' / '.join(str(c['skipped_steps']) for c in runs)} steps skipped"
        else:
            acted = "-" if m == "baseline" else "not recorded in the result file"
        rows.append([LABELS[m] if m != "baseline" else "no guard", loss(v),
                     "-" if m == "baseline" else "(stopped)" if stopped else share(gap), acted,
                     " / ".join(str(c["steps_done"]) for c in runs)])
        values.append({"method": m, "mean_final_loss": v, "gap_closed": None if stopped else gap,
                       "stopped": stopped, "cells": [{k: c.get(k) for k in (
                           "seed", "final_val_loss", "steps_done", "msign_triggers", "skipped_steps", "rollbacks",
                           "rollback_steps", "steps_lost", "rollback_stopped")} for c in runs]})
    description = (
        f"The learning rate raised mid-run (`{JUMP}`): LR {lr:g}, multiplied by {factor:g} from step "
        f"{at_step:g} on. Final validation loss, mean of seeds {seeds_text(seeds)}. Gap closed: `analyse()`'s "
        f"formula with the jumped baseline's loss ({loss(base[lr_key(lr)])}) as `base[lr]` and, as its best, the "
        f"mean final loss of the same baseline without the jump, the LR-{lr:g} baseline of `{TRIGGERS}` "
        f"({loss(reference)}; same code, same setup); `(stopped)` where the retry budget stopped a run, whose final "
        f"loss is that of the state it restored. Acted: the runs' `msign_triggers`, `skipped_steps`, `rollbacks`, "
        f"`rollback_steps` and `steps_lost`; PSS's triggers are not in the result file.")
    return description, header, ["l", "r", "r", "l", "r"], rows, values


def norm_cap(src: Sources) -> tuple:
    main = src(MAIN)
    margin = main["analysis"]["stable_margin"]
    methods = ["msign_qk_p1", "msign_qk_p10_cap", "qk_cap_p10"]
    (lr,) = {c["lr"] for m in methods for c in cells_of(main, m)}
    seeds = main["settings"]["seeds"]
    base = cells_of(main, "baseline")
    header = ["variant", "lr"] + [f"seed {s}" for s in seeds] + ["mean", "gap closed, per seed / mean"]
    rows, values = [], []
    for m in methods:
        runs = cells_of(main, m, lr)
        per = []
        for c in runs:  # analyse()'s formula on one seed: that seed's baseline at each LR
            curve = {lr_key(b["lr"]): b["final_val_loss"] for b in base if b["seed"] == c["seed"]}
            per.append(gap_closed(curve, c["final_val_loss"], lr, margin))
        mean_gap = main["analysis"]["per_method"][m]["gap_closed"].get(lr_key(lr))
        rows.append([LABELS[m], f"{lr:g}"] + [loss(c["final_val_loss"]) for c in runs]
                    + [loss(mean_loss(main, m, lr)), " / ".join(share(g) for g in per + [mean_gap])])
        values.append({"method": m, "lr": lr, "final_val_loss": [c["final_val_loss"] for c in runs],
                       "gap_closed_per_seed": per, "gap_closed_mean": mean_gap})
    description = (
        f"MSign of Q and K after every step and the norm-cap variants, per seed (`{MAIN}`, cells trained by "
        f"older code). Final validation loss; gap closed by `analyse()`'s formula on each seed alone (that "
        f"seed's baseline at each LR) and on the means (the file's `gap_closed`).")
    return description, header, ["l"] + ["r"] * (len(header) - 1), rows, values


DIVERGENCE = [  # (file, what was run; clipping, precision, steps and LRs are read from the file)
    ("stability/stability.json", "the sweep"),
    ("stability_noclip_seed0.json", "the probe"),
    ("stability_noclip_bf16_seed0.json", "the probe"),
    ("stability_lr0.5_noclip_bf16_seed0.json", "the probe"),
    ("stability_lr1_noclip_bf16_seed0.json", "the probe"),
    ("stability_llama_noclip_bf16/stability.json", "{norm_class_name} + {mlp_class_name}"),
    ("stability_deepnarrow_noclip_bf16/stability.json",
     "the MSign paper's deep-narrow shape: {n_layer} x {n_embd}, {n_head} heads, MLP {intermediate_size}, {module}"),
]
MODULE_WORDS = {"zero_init_query": "zero-initialised queries", "scale_residual_init": "scaled residual init",
                "lr_mult_2d": "LR x{:g} for matrices", "lr_mult_embedding": "x{:g} for embeddings"}


def divergence(src: Sources) -> tuple:
    header = ["setting", "lr", "runs", "diverged: method, the step the benchmark stopped it at (max attention logit)",
              "final val loss, baseline", "max attention logit, baseline"]
    rows, values = [], []
    for rel, what in DIVERGENCE:
        res = src(rel)
        st = res["settings"]
        words = [MODULE_WORDS[k].format(v) for k, v in st.get("module", {}).items() if v]
        what = what.format(module=", ".join(words), **st["model"])
        clip = f"clip {st['clip']}" if st["clip"] else "no clipping"
        seeds = ", ".join(map(str, st["seeds"]))
        lrs = sorted({c["lr"] for c in res["cells"]})
        methods = list(dict.fromkeys(c["method"] for c in res["cells"]))
        diverged = [c for c in res["cells"] if c["diverged_step"] is not None]
        finals, logits = [], []
        for lr in lrs:
            base = cells_of(res, "baseline", lr)
            ok = [c["final_val_loss"] for c in base if c["diverged_step"] is None and finite(c["final_val_loss"])]
            finals.append(sum(ok) / len(ok) if ok and len(ok) == len(base) else None)
            logits.append(max(c["max_attn_logit"] for c in base))
        if not diverged:
            stopped = "none"
        else:
            stopped = ("every run: " if len(diverged) == len(res["cells"]) else "") + "; ".join(
                f"lr {lr:g}: " * (len(lrs) > 1) + ", ".join(
                    f"{c['method']} {c['diverged_step']} ({magnitude(c['max_attn_logit'])})" for c in diverged
                    if c["lr"] == lr)
                for lr in lrs if any(c["lr"] == lr for c in diverged))
        runs = (f"{len(res['cells'])} runs, {len(methods)} methods" if len(methods) > 6
                else f"{len(res['cells'])} run{'s' * (len(res['cells']) > 1)}: {', '.join(methods)}")
        rows.append([f"{what}; {clip}, {st['precision']}, {st['steps']} steps, seed{'s' * (len(st['seeds']) > 1)} "
                     f"{seeds} (`{rel}`)", " / ".join(f"{lr:g}" for lr in lrs), runs, stopped,
                     " / ".join(loss(v) for v in finals)
                     + (f" (mean of seeds {seeds})" if len(st["seeds"]) > 1 else ""),
                     " / ".join(magnitude(v) for v in logits)
                     + (" (the larger seed)" if len(st["seeds"]) > 1 else "")])
        values.append({"file": rel, "lrs": lrs, "baseline_final_val_loss": finals, "baseline_max_attn_logit": logits,
                       "diverged": [{"method": c["method"], "lr": c["lr"], "seed": c["seed"],
                                     "step": c["diverged_step"]} for c in diverged]})
    rel = "pss_recovery/pss_recovery.json"
    rec = src(rel)
    failing, st = rec["failing"], rec["settings"]
    control = next(v for v in rec["variants"] if v["variant"] == "control")
    rows.append([f"the probe, trained on without the benchmark's stop, a checkpoint every {st['ckpt_every']} "
                 f"steps; no clipping (pss_recovery.py never clips), {st['precision']}, warm-up {st['warmup']}, "
                 f"seed {st['seed']} (`{rel}`)", f"{st['lr']:g}",
                 "the baseline, resumed once without a guard (`control`)",
                 f"not stopped; loss spike at step {failing['onset']}: mean training loss "
                 f"{loss(failing['loss_after_onset'])} over the next {st['window']} steps, "
                 f"{loss(failing['loss_before'])} over the {st['window']} before the checkpoint at step "
                 f"{failing['resume_step']}, max gradient norm {magnitude(failing['max_grad_norm'])}; resumed from "
                 f"there, the control's training loss is {loss(control['final_train_loss'])} over its last "
                 f"{st['window']} steps (to step {control['last_step']}), max gradient norm "
                 f"{magnitude(control['max_grad_norm'])}", "-", "-"])
    values.append({"file": rel, "failing": failing,
                   "control": {k: control[k] for k in ("last_step", "final_train_loss", "max_grad_norm")}})
    description = (
        "The settings searched for a divergence of the baseline (NaN, or a loss spike it does not come back from). "
        "Per file, from its cells: the runs, the step at which the benchmark stopped each run it found diverged "
        "(`diverged_step`: a non-finite training loss, or a windowed mean past the limit of benchmarks/stability.py; "
        "the stop, some steps after the spike's onset), and the baseline's final validation loss and largest "
        f"attention logit at each LR. The last row: the lr-{st['lr']:g} failure as `pss_recovery.json` records it "
        "(`failing`: its spike's onset and levels; `control`: the run resumed from the checkpoint with nothing "
        "added).")
    return description, header, ["l", "r", "l", "l", "r", "r"], rows, values


def reference(part: dict[str, Any]) -> str:
    """What a curvature_accuracy.py part measures against: the dense Hessian, or Lanczos with more steps."""
    if part["kind"] == "dense":
        return "the dense Hessian"
    (steps,) = {r["reference_hvps"] for r in part["rows"]}
    return f"{steps} Lanczos steps"


def curvature_accuracy(src: Sources) -> tuple:
    parts = src("curvature_accuracy.json")["parts"] + src("curvature_accuracy_every100.json")["parts"]
    keys = ["warm3", "warm5", "cold20", "power_warm5", "power_cold20"]
    names = {"warm": "Lanczos, warm start", "cold": "Lanczos, cold start",
             "power_warm": "power iteration (the paper's), warm start", "power_cold": "power iteration, cold start"}
    header = ["estimate (HVPs per measurement)"] + [
        f"{p['config']['n_layer']} x {p['config']['n_embd']} ({p['parameters']:,} parameters), every "
        f"{p['measure_every']}, against {reference(p)}: median / max rel. error" for p in parts]
    rows, values = [], []
    for k in keys:
        hvps = {p["summary"][k]["hvps_per_step"] for p in parts}
        (n,) = hvps
        rows.append([f"{names[k.rstrip('0123456789')]}, {n:g}"]
                    + [f"{percent(p['summary'][k]['median_rel_error'])} / {percent(p['summary'][k]['max_rel_error'])}"
                       for p in parts])
        values.append({"estimate": k, "hvps": n, "median_rel_error": [p["summary"][k]["median_rel_error"]
                                                                      for p in parts],
                       "max_rel_error": [p["summary"][k]["max_rel_error"] for p in parts]})
    description = (
        "Relative error of the stability ratio (`parts[].summary[estimate].median_rel_error` / `max_rel_error`) "
        "against each part's reference (its rows' `reference`), over the reference steps after the first, one "
        "column per part: the two parts of `curvature_accuracy.json` "
        "(dense, a tiny LitGPT; Lanczos, the stability benchmark's model) and the Lanczos part of "
        "`curvature_accuracy_every100.json` (the same model, measured less often).")
    return description, header, ["l"] + ["r"] * len(parts), rows, values


def curvature_warmup(src: Sources) -> tuple:
    curv = src(CURVATURE)
    lo, hi = curv["analysis"]["lrs"]
    seeds = ", ".join(map(str, curv["settings"]["seeds"]))
    header = ["method", f"val loss, LR {lo:g}", f"val loss, LR {hi:g} (seeds {seeds})", f"LR-{hi:g} gap closed",
              f"median stability ratio, LR {lo:g} / LR {hi:g} (seeds {seeds})",
              f"max attention logit, LR {hi:g} (seeds {seeds})"]
    base = baseline_curve(curv)
    best = min((lr for lr in (lo, hi) if finite(base[lr_key(lr)])), key=lambda lr: base[lr_key(lr)])
    rows, values = [], []
    for m in ["baseline", "arch_warmup", "arch_warmup_curv"]:
        low, high = cells_of(curv, m, lo), cells_of(curv, m, hi)
        gap = curv["analysis"]["per_method"][m]["gap_closed"].get(lr_key(hi))
        rows.append([m, loss(mean_loss(curv, m, lo)),
                     f"{loss(mean_loss(curv, m, hi))} ({per_seed([c['final_val_loss'] for c in high], loss)})",
                     "-" if m == "baseline" else share(gap),
                     f"{per_seed([c['stability_ratio_median'] for c in low], ratio)} / "
                     f"{per_seed([c['stability_ratio_median'] for c in high], ratio)}",
                     per_seed([c["max_attn_logit"] for c in high], magnitude)])
        values.append({"method": m, "mean_final_loss": {lr_key(lo): mean_loss(curv, m, lo),
                                                        lr_key(hi): mean_loss(curv, m, hi)},
                       "gap_closed": gap, "stability_ratio_median": {
                           lr_key(lo): [c["stability_ratio_median"] for c in low],
                           lr_key(hi): [c["stability_ratio_median"] for c in high]}})
    description = (
        f"Architecture warm-up and its curvature-gated variant (`{CURVATURE}`, `--curvature-every`): final "
        f"validation loss (mean of seeds {seeds}, and per seed), the file's gap closed at LR {hi:g} (against its "
        f"own baseline's best, at LR {best:g}), each run's `stability_ratio_median` and `max_attn_logit`.")
    return description, header, ["l"] + ["r"] * (len(header) - 1), rows, values


TABLES = [
    ("Stability overview: the sweep, the gradient-norm tools and the guards", overview),
    ("ZClip-style clipping and skip-step", zclip_skip),
    ("Guards on measured precursors", triggers),
    ("The learning rate raised mid-run", lr_jump),
    ("MSign with a norm cap, per seed", norm_cap),
    ("Searching for a divergence", divergence),
    ("Curvature estimate accuracy", curvature_accuracy),
    ("Curvature and architecture warm-up", curvature_warmup),
]


# --------------------------------------------------------------------------- the files
def build(root: Path = RESULTS) -> tuple[str, str]:
    """The text of summaries.md and of summaries.json, computed from the result files under ``root``."""
    src = Sources(root)
    sections = []
    for heading, builder in TABLES:
        description, header, align, rows, values = builder(src)
        sections.append({"heading": heading, "description": description, "header": header, "rows": rows,
                         "values": values, "align": align})
    sources = src.listing()
    cpus = sorted({s["cpu"] for s in sources}, key=lambda cpu: -sum(s["cpu"] == cpu for s in sources))
    lines = [
        "# Stability summaries: tables derived from several result files",
        "",
        f"Machine: {' and '.join(cpus)} (as the source files name the CPU); this script measures nothing: it reads "
        f"the result files below and computes each table from their runs. The machine and date each file records "
        f"(the date the file was written; a file tabulated again with `--reuse-only` holds runs made before it):",
        "",
    ]
    lines += [f"- `{s['file']}`: {s['machine']}; {s['date']}" for s in sources]
    lines += ["", f"Command: `{COMMAND}`"]
    for s in sections:
        lines += ["", f"## {s['heading']}", "", s["description"], ""]
        lines += table(s["header"], s["align"], s["rows"])
    md = "\n".join(lines) + "\n"
    data = {"command": COMMAND, "sources": sources,
            "tables": [{k: s[k] for k in ("heading", "description", "header", "rows", "values")} for s in sections]}
    return md, json.dumps(_plain(data), indent=1, allow_nan=False) + "\n"


def _plain(x: Any) -> Any:
    """JSON-safe: non-finite floats as None."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 when summaries.md or .json differ from what would be written")
    args = parser.parse_args(argv)
    md, js = build()
    if args.check:
        stale = [p for p, text in ((OUT_MD, md), (OUT_JSON, js))
                 if not p.is_file() or p.read_text(encoding="utf-8") != text]
        for p in stale:
            print(f"{p.relative_to(ROOT)} differs from what `{COMMAND}` writes now", file=sys.stderr)
        return 1 if stale else 0
    OUT_MD.write_text(md, encoding="utf-8")
    OUT_JSON.write_text(js, encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
