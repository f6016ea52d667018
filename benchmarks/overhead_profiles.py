"""After the training part: where the guards' time goes, on the trained baseline model (guard API only).

- ``MSign.apply()`` for every backend, the ``attention`` and ``all_2d`` presets, with and without
  ``log_stable_rank`` (the trained weights restored before every call);
- StableRank's ``compute()``, each target's ``stable_rank_estimate`` call, the fixed cost of a call and
  the gradient norm;
- PSS: the detector on steps that do not trigger (``before_optimizer_step`` with increasing steps) and one
  ``protect()``.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from common import BACKENDS, clock, log, median, pct, time_calls
from overhead_settings import PSS_IDLE_TARGET, PSS_PAPER_PROTECTION, Settings


def msign_apply_breakdown(s: Settings, module: Any, base_ms: float) -> list[dict[str, Any]]:
    """Time ``MSign.apply()`` on a trained model: targets x backend x log_stable_rank.

    The trained weights are restored before every call, so each application acts on trained weights (as in
    training), not on weights this loop has already signed. A failing call is recorded, not raised.
    """
    from lightning_msign import MSign

    snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}
    rows = []
    for targets in ("attention", "all_2d"):
        for backend in BACKENDS:
            for log_srank in (True, False):
                guard = MSign(module, period=s.period, targets=targets, backend=backend, log_stable_rank=log_srank)
                shapes = sorted({tuple(t.shape) for t in guard.matrices})
                times: list[float] = []
                error = None
                for i in range(1 + s.apply_repeats):  # the first call is a warm-up
                    module.load_state_dict(snapshot)  # in place: the guard's target views stay valid
                    try:
                        t0 = clock(s.device)
                        guard.apply()
                        if i:
                            times.append((clock(s.device) - t0) * 1e3)
                    except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
                        error = f"{type(err).__name__}: {err}"
                        log(f"  apply() failed ({targets}, {backend}, log_stable_rank={log_srank}): {error}")
                        break
                rows.append({
                    "targets": targets, "backend": backend, "log_stable_rank": log_srank,
                    "matrices": len(guard.matrices), "shapes": [list(x) for x in shapes], "times_ms": times,
                    "apply_ms": median(times), "overhead_at_period": median(times) / (s.period * base_ms),
                    "error": error,
                })
    module.load_state_dict(snapshot)
    return rows


def monitor_profile(s: Settings, module: Any) -> dict[str, Any]:
    """Where StableRank's time goes, outside training: ``compute()``, each target, the gradient norm.

    Per-target times are taken in sweeps over all targets in model order, so each matrix comes from
    memory as cold as in ``compute()``, not from a cache warmed by timing it alone.
    """
    from lightning_msign import StableRank
    from lightning_msign.functional import stable_rank_estimate

    reps = 20 if s.mode == "full" else 5
    guard = StableRank(module, targets=s.monitor_targets, every_n_steps=1, mode="power")
    compute_ms = time_calls(guard.compute, reps, 2, s.device)  # the first call is the 20-iteration cold start
    targets = guard.matrices
    vectors = [stable_rank_estimate(t.matrix(), None, guard.warmup_iters)[1] for t in targets]
    per_target: list[list[float]] = [[] for _ in targets]
    for _ in range(reps):
        for i, (t, v) in enumerate(zip(targets, vectors)):
            t0 = clock(s.device)
            stable_rank_estimate(t.matrix(), v, guard.power_iters)
            per_target[i].append((clock(s.device) - t0) * 1e3)
    groups: dict[tuple[str, tuple[int, int]], list[float]] = defaultdict(list)
    for t, times in zip(targets, per_target):
        groups[(t.role, tuple(t.shape))].append(median(times))
    tiny = torch.randn(8, 8, device=s.device)
    tiny_v = stable_rank_estimate(tiny, None, 5)[1]
    tiny_ms = time_calls(lambda: stable_rank_estimate(tiny, tiny_v, guard.power_iters), reps, 2, s.device)
    grads = [torch.randn_like(p) for p in module.parameters() if p.requires_grad]
    grad_ms = time_calls(lambda: torch.nn.utils.get_total_norm(grads), reps, 2, s.device)
    by_group = [
        {"role": role, "shape": list(shape), "count": len(v), "per_target_us": median(v) * 1e3, "total_ms": sum(v)}
        for (role, shape), v in sorted(groups.items())
    ]
    return {
        "targets": len(targets),
        "compute_ms": median(compute_ms),
        "per_target_sum_ms": sum(g["total_ms"] for g in by_group),
        "by_group": by_group,
        "tiny_8x8_us": median(tiny_ms) * 1e3,  # the same call on an 8x8 matrix: dispatch and Python only
        "grad_norm_ms": median(grad_ms),
        "grad_norm_elements": sum(g.numel() for g in grads),
    }


def pss_profile(s: Settings, module: Any, base_ms: float) -> dict[str, Any]:
    """PSS's cost: its detector on a step that does not trigger, and one protection.

    The detector is the real ``PSS.before_optimizer_step`` (total gradient norm of all parameters, EWMA,
    the metrics) on gradients of the model's shapes, called with increasing step numbers; ``tau`` is so
    high that it never triggers. The protection is the real ``protect()`` with the default ``"qk"``
    targets, ``rank="stable"`` and softplus smoothing; the weights are restored after it.
    """
    from lightning_msign import PSS

    reps = 20 if s.mode == "full" else 5
    idle = PSS(module, tau=1e12, warmup_steps=0)
    for p in module.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    steps = iter(range(1, 1_000_000))
    idle_ms = time_calls(lambda: idle.before_optimizer_step(next(steps)), reps, 2, s.device)
    for p in module.parameters():
        p.grad = None
    if idle.triggers:
        raise RuntimeError(f"the idle PSS detector (tau=1e12) triggered {idle.triggers} times")

    pss = PSS(module)
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    protect_ms = []
    metrics: dict[str, float] = {}
    for _ in range(max(3, reps // 4)):
        t0 = clock(s.device)
        metrics = pss.protect()
        protect_ms.append((clock(s.device) - t0) * 1e3)
        module.load_state_dict(saved)
    ranks = [int(v) for k, v in metrics.items() if k.startswith("pss/rank/")]
    return {
        "targets": len(pss.matrices),
        "ranks": ranks,
        "idle_ms": median(idle_ms),
        "idle_overhead": median(idle_ms) / base_ms,
        "idle_met": median(idle_ms) / base_ms <= PSS_IDLE_TARGET,
        "protect_ms": median(protect_ms),
        "protect_vs_step": median(protect_ms) / base_ms,
    }


def run_profiles(s: Settings, module: Any, base_ms: float) -> dict[str, Any]:
    log("  timing MSign.apply(), profiling StableRank and PSS on the trained baseline model ...")
    return {
        "monitor_profile": monitor_profile(s, module),
        "msign_apply": msign_apply_breakdown(s, module, base_ms),
        "pss": pss_profile(s, module, base_ms),
    }


# --------------------------------------------------------------------------- report
def render_profiles(s: dict[str, Any], tr: dict[str, Any]) -> list[str]:
    P = s["period"]
    lines = [
        "",
        f"### MSign.apply() on the trained baseline model (median of {s['apply_repeats']} after 1 warm-up; "
        "weights restored before each call)",
        "",
        f"| targets | matrices (shapes) | backend | log_stable_rank | apply (ms) | overhead at P = {P} |",
        "|---|---|---|---|---:|---:|",
    ]
    for a in tr["msign_apply"]:
        shapes = ", ".join("x".join(map(str, sh)) for sh in a["shapes"])
        cost = f"{a['apply_ms']:.0f} | {pct(a['overhead_at_period'])}" if a["times_ms"] else "failed | -"
        if a["error"]:
            cost += f" (error: {a['error'][:160]})"
        lines.append(f"| {a['targets']} | {a['matrices']} ({shapes}) | {a['backend']} | {a['log_stable_rank']} "
                     f"| {cost} |")
    mp = tr["monitor_profile"]
    mon = next(c for c in tr["configs"] if c["name"] == "monitor")
    parts = mon["hook_parts_ms"]
    lines += [
        "",
        "### Where StableRankMonitor's time goes (per step)",
        "",
        "In training (medians per step): `on_before_optimizer_step` (total gradient norm) "
        f"{parts['grad_norm']:.2f} ms; "
        f"`on_train_batch_end` {parts['batch_end']:.2f} ms, of which the guard's `step()` (measurement and metrics) "
        f"{parts['step']:.2f} ms and {parts['batch_end'] - parts['step']:.2f} ms for `float()` of the values and the "
        f"logger call; both hooks {mon['hook_ms_per_step']:.2f} ms.",
        f"Outside training: `StableRank.compute()` over {mp['targets']} targets {mp['compute_ms']:.2f} ms (batched by "
        f"shape); one `stable_rank_estimate` call per target (1 power iteration; medians) would sum to "
        f"{mp['per_target_sum_ms']:.2f} ms; the same call on an 8x8 matrix (dispatch and Python only) takes "
        f"{mp['tiny_8x8_us']:.0f} us; the gradient norm over {mp['grad_norm_elements'] / 1e6:.2f}M elements "
        f"{mp['grad_norm_ms']:.2f} ms.",
        "",
        "| role | shape | targets | per target, one call each (us) | total (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for g in mp["by_group"]:
        lines.append(f"| {g['role']} | {'x'.join(map(str, g['shape']))} | {g['count']} | {g['per_target_us']:.0f} "
                     f"| {g['total_ms']:.2f} |")
    p, base = tr["pss"], tr["baseline_median_step_ms"]
    lines += [
        "",
        "### PSS (on the trained baseline model)",
        "",
        "Detector: the real `PSS.before_optimizer_step` (total gradient norm, EWMA, metrics) on a step that does",
        "not trigger. Protection: the real `protect()`, targets `qk`, rank `stable`, softplus.",
        "",
        "| what | time (ms) | relative to a training step | reference |",
        "|---|---:|---:|---|",
        f"| detector, step without trigger | {p['idle_ms']:.2f} | {pct(p['idle_overhead'])} | target <= 0.1%: "
        f"{'met' if p['idle_met'] else 'NOT met'} |",
        f"| one protection ({p['targets']} matrices, k = {sorted(set(p['ranks']))}) | {p['protect_ms']:.1f} | "
        f"{p['protect_vs_step']:.3f}x | paper: ~{PSS_PAPER_PROTECTION}x a step |",
        "",
        f"Baseline step: {base:.0f} ms.",
    ]
    return lines


def profile_verdicts(tr: dict[str, Any]) -> list[str]:
    p = tr["pss"]
    return [
        f"PSS without trigger: {pct(p['idle_overhead'])} of a step vs target <= 0.1%: "
        f"{'met' if p['idle_met'] else 'NOT met'}; one protection = {p['protect_vs_step']:.3f}x a step "
        f"(paper ~{PSS_PAPER_PROTECTION}x)."
    ]
