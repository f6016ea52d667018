"""Part "guards" of the overhead benchmark: the guards' batched paths against the per-target ones they replaced.

Two changes, each measured before/after, side by side in one run, on the main job's model (the LitGPT of
``recipes/shakespeare/msign.yaml``, freshly initialised with the recipe's seed; ``--quick``: a 2-layer one):

- **StableRank (monitor).** *Before*: one ``stable_rank_estimate(t.matrix(), v_t, 1)`` call per target,
  warm-started from its own vector (the old monitor's loop: ~60-120 us of dispatch per call, whatever the
  matrix). *After*: ``StableRank.compute()``, one batched power iteration per (shape, dtype) group, through
  the guard's plan, over the same ``all_2d`` targets; and the batched math alone (``stable_rank_estimate``
  once per group on stacks made beforehand), to tell the batched call from the guard's plumbing.
  Agreement: one step of each path from the same vectors.
- **MSign with the svd backend.** *Before*: per shape group ``msign_restore(X)`` + ``stable_rank(X)`` +
  ``stable_rank(new)`` (the old path: a second and a third decomposition for the logged stable ranks).
  *After*: ``sign_and_restore(X, "svd", stable_ranks=True)``, which reads both stable ranks off the one SVD
  that signs; ``stable_ranks=False`` shown as the floor. Agreement: max |difference| of the matrices and
  of the stable ranks. Then the whole ``MSign.apply()`` with ``log_stable_rank`` True vs False (svd, and a
  polynomial backend, which still pays for the singular values).

- **Stacking, by matrix size** (why ``StableRank`` stacks only matrices of at most ``STACK_LIMIT`` entries):
  one power iteration on ``G`` random ``m x n`` matrices, per matrix (one call each) vs stacked (the
  ``torch.stack`` copy included), and the stacked product written as a column ``X @ v`` (the first batched
  version) instead of the row ``v^T X^T`` the package uses.

Every comparison is interleaved: each round calls every arm once in a fresh random order (weights restored
before each ``apply()``), warm-up rounds excluded; medians and interquartile ranges over rounds, and the
median of the per-round ratios.
"""

from __future__ import annotations

from typing import Any

import torch
from common import interleaved, log, ms_cell, paired_ratio, ratio_cell, summary
from overhead_settings import Settings


def build_model(s: Settings) -> Any:
    """The guards part's LitGPTModule: the recipe's config and init options, seeded like the recipe."""
    from lightning_msign import LitGPTModule

    torch.manual_seed(s.guards_seed)
    module = LitGPTModule(dict(s.guards_model["config"]), vocab_size=256, block_size=s.guards_seq_len,
                          **s.guards_model.get("init", {}))
    return module.to(s.device)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float(((a - b).abs() / b.abs().clamp_min(1e-30)).max()) if a.numel() else 0.0


def monitor_before_after(s: Settings, module: Any) -> dict[str, Any]:
    """Per-target ``stable_rank_estimate`` calls vs ``StableRank.compute()`` over the ``all_2d`` targets."""
    from lightning_msign import StableRank
    from lightning_msign.functional import stable_rank_estimate

    guard = StableRank(module, targets="all_2d", every_n_steps=1, mode="power")
    guard.compute()  # the cold start (warmup_iters iterations); every later call does power_iters = 1
    targets = guard.matrices
    start = {k: v.clone() for k, v in guard.state_dict()["vectors"].items()}

    # Agreement: one step of each path from the same vectors.
    check = StableRank(module, targets="all_2d", every_n_steps=1, mode="power")
    check.load_state_dict({"vectors": {k: v.clone() for k, v in start.items()}})
    after_sranks = check.compute()
    before_sranks = {t.name: float(stable_rank_estimate(t.matrix(), start[t.name].to(t.matrix().device),
                                                        guard.power_iters)[0]) for t in targets}
    names = [t.name for t in targets]
    a = torch.tensor([before_sranks[n] for n in names])
    b = torch.tensor([after_sranks[n] for n in names])

    vectors = {t.name: start[t.name].to(t.param.device) for t in targets}

    def before() -> None:  # the old monitor: one call per target, each keeping its vector
        for t in targets:
            vectors[t.name] = stable_rank_estimate(t.matrix(), vectors[t.name], guard.power_iters)[1]

    # The batched math alone (what compute() calls once per shape group), on stacks made beforehand: no
    # stacking, finiteness check or plan. Separates the cost of the batched call from the guard's plumbing.
    groups: dict[tuple, list[Any]] = {}
    for t in targets:
        groups.setdefault((tuple(t.shape), t.param.dtype), []).append(t)
    stacks = [(torch.stack([t.matrix() for t in g]).float(), torch.stack([vectors[t.name] for t in g]).float())
              for g in groups.values()]

    def batched_math() -> None:
        for X, v in stacks:
            stable_rank_estimate(X, v, guard.power_iters)

    times = interleaved({"before": before, "after": guard.compute, "after_batched_math_only": batched_math},
                        s.guards_monitor_repeats, s.guards_warmup, s.seed, s.device)
    shapes = sorted({tuple(t.shape) for t in targets})
    return {
        "targets": len(targets), "shape_groups": len(shapes), "shapes": [list(x) for x in shapes],
        "power_iters": guard.power_iters,
        "before": summary(times["before"]), "after": summary(times["after"]),
        "after_batched_math_only": summary(times["after_batched_math_only"]),
        "speedup": paired_ratio(times["before"], times["after"]),
        "speedup_batched_math_only": paired_ratio(times["before"], times["after_batched_math_only"]),
        "srank_max_abs_diff": _max_abs(a, b), "srank_max_rel_diff": _max_rel(a, b),
    }


def stacking_by_size(s: Settings) -> list[dict[str, Any]]:
    """One power iteration on G random m x n matrices: one call each vs one stacked call, by size."""
    from lightning_msign.functional import stable_rank_estimate
    from lightning_msign.guards.stable_rank import STACK_LIMIT

    shapes = [(24, 64, 64), (24, 256, 256), (6, 1024, 256)] + ([(4, 2048, 2048)] if s.mode == "full" else [])
    gen = torch.Generator().manual_seed(s.seed)
    out = []
    for G, m, n in shapes:
        mats = [torch.randn(m, n, generator=gen).to(s.device) for _ in range(G)]
        vs = [stable_rank_estimate(X, None, 5)[1] for X in mats]
        V = torch.stack(vs)

        def per_matrix() -> None:
            for X, v in zip(mats, vs):
                stable_rank_estimate(X, v, 1)

        def stacked() -> None:
            stable_rank_estimate(torch.stack(mats), V, 1)

        def stacked_column_form() -> None:  # the product as the first batched version wrote it
            X = torch.stack(mats)
            u = X @ V.unsqueeze(-1)
            _ = X.mT @ (u / u.norm(dim=-2, keepdim=True))

        times = interleaved({"per_matrix": per_matrix, "stacked": stacked, "stacked_column_form": stacked_column_form},
                            s.guards_repeats, s.guards_warmup, s.seed, s.device)
        out.append({
            "shape": [G, m, n], "stacked_by_the_monitor": m * n <= STACK_LIMIT,
            "per_matrix": summary(times["per_matrix"]), "stacked": summary(times["stacked"]),
            "stacked_column_form": summary(times["stacked_column_form"]),
            "speedup": paired_ratio(times["per_matrix"], times["stacked"]),
            "row_vs_column": paired_ratio(times["stacked_column_form"], times["stacked"]),
        })
    return out


def _stacks(module: Any, targets: str) -> tuple[list[torch.Tensor], int]:
    """The target matrices of a preset, stacked per (shape, dtype) as MSign batches them (copies, float32)."""
    from lightning_msign import resolve_targets

    groups: dict[tuple, list[torch.Tensor]] = {}
    matrices = resolve_targets(module, targets, split_qkv=True)
    for t in matrices:
        m = t.matrix().detach()
        groups.setdefault((tuple(m.shape), m.dtype), []).append(m)
    return [torch.stack(ms).float().contiguous() for ms in groups.values()], len(matrices)


def msign_math_before_after(s: Settings, module: Any, targets: str) -> dict[str, Any]:
    """The old svd path (sign + two stable-rank decompositions) vs ``sign_and_restore`` reusing its SVD."""
    from lightning_msign.functional import msign_restore, sign_and_restore, stable_rank

    stacks, n_matrices = _stacks(module, targets)

    def before() -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out = []
        for X in stacks:
            new = msign_restore(X, "svd")
            out.append((new, stable_rank(X), stable_rank(new)))
        return out

    def after() -> list[Any]:
        return [sign_and_restore(X, "svd", stable_ranks=True) for X in stacks]

    def after_without_sranks() -> list[Any]:
        return [sign_and_restore(X, "svd", stable_ranks=False) for X in stacks]

    old, new = before(), after()
    agreement = {
        "matrix_max_abs_diff": max(_max_abs(o[0], n.matrices) for o, n in zip(old, new)),
        "matrix_max_abs": max(float(o[0].abs().max()) for o in old),
        "srank_before_max_abs_diff": max(_max_abs(o[1], n.srank_before) for o, n in zip(old, new)),
        "srank_before_max_rel_diff": max(_max_rel(n.srank_before, o[1]) for o, n in zip(old, new)),
        "srank_after_max_abs_diff": max(_max_abs(o[2], n.srank_after) for o, n in zip(old, new)),
        "srank_after_max_rel_diff": max(_max_rel(n.srank_after, o[2]) for o, n in zip(old, new)),
        "all_written": all(bool(n.written.all()) for n in new),
    }
    times = interleaved({"before": before, "after": after, "after_without_stable_ranks": after_without_sranks},
                        s.guards_repeats, s.guards_warmup, s.seed, s.device)
    return {
        "targets": targets, "matrices": n_matrices, "shapes": [list(X.shape) for X in stacks],
        "before": summary(times["before"]), "after": summary(times["after"]),
        "after_without_stable_ranks": summary(times["after_without_stable_ranks"]),
        "speedup": paired_ratio(times["before"], times["after"]),
        "stable_rank_cost": paired_ratio(times["after"], times["after_without_stable_ranks"]),
        **agreement,
    }


def apply_log_true_false(s: Settings, module: Any, targets: str, backend: str) -> dict[str, Any]:
    """The whole ``MSign.apply()`` with ``log_stable_rank`` True vs False; weights restored before each call."""
    from lightning_msign import MSign

    with_log = MSign(module, targets=targets, backend=backend, log_stable_rank=True)
    without = MSign(module, targets=targets, backend=backend, log_stable_rank=False)
    snapshot = {k: v.detach().clone() for k, v in module.state_dict().items()}

    def restore() -> None:
        module.load_state_dict(snapshot)  # in place: the guards' target views stay valid

    times = interleaved({"log_true": with_log.apply, "log_false": without.apply}, s.guards_repeats,
                        s.guards_warmup, s.seed, s.device, reset=restore)
    restore()
    return {
        "targets": targets, "backend": backend, "matrices": len(with_log.matrices),
        "log_true": summary(times["log_true"]), "log_false": summary(times["log_false"]),
        "ratio": paired_ratio(times["log_true"], times["log_false"]),
    }


def run_guards_part(s: Settings) -> dict[str, Any]:
    module = build_model(s)
    cfg = module.config
    n_params = sum(p.numel() for p in module.parameters())
    log(f"guards part: LitGPT {cfg.n_layer}x{cfg.n_embd} ({n_params / 1e6:.2f}M params), {s.guards_repeats} rounds "
        f"(monitor {s.guards_monitor_repeats}) after {s.guards_warmup} warm-up round(s)")
    with torch.no_grad():
        out: dict[str, Any] = {
            "model": {"config": s.guards_model["config"], "init": s.guards_model.get("init", {}),
                      "recipe": s.guards_model.get("recipe"), "seed": s.guards_seed, "parameters": n_params,
                      "mlp_class": cfg.mlp_class_name, "n_query_groups": cfg.n_query_groups},
            "repeats": s.guards_repeats, "monitor_repeats": s.guards_monitor_repeats, "warmup": s.guards_warmup,
        }
        out["monitor"] = monitor_before_after(s, module)
        log("  monitor done")
        out["stacking"] = stacking_by_size(s)
        log("  stacking by size done")
        out["msign"] = []
        for targets in ("attention", "all_2d"):
            out["msign"].append(msign_math_before_after(s, module, targets))
            log(f"  MSign math ({targets}) done")
        out["apply"] = []
        for backend in s.guards_apply_backends:
            for targets in ("attention", "all_2d"):
                out["apply"].append(apply_log_true_false(s, module, targets, backend))
            log(f"  MSign.apply ({backend}) done")
    return out


# --------------------------------------------------------------------------- report
def render_guards(s: dict[str, Any], g: dict[str, Any]) -> list[str]:
    c = g["model"]["config"]
    mon = g["monitor"]
    where = f"`{g['model']['recipe']}`" if g["model"].get("recipe") else "a tiny model (--quick)"
    lines = [
        "",
        "## 4. Guards: batched paths, before vs after (one run, interleaved)",
        "",
        f"The main job's model, {where}: LitGPT {c['n_layer']} layers, n_embd {c['n_embd']}, {c['n_head']} heads, "
        f"{g['model']['mlp_class']} {c.get('intermediate_size')} ({g['model']['parameters'] / 1e6:.2f}M parameters), "
        f"fresh init (seed {g['model']['seed']}); float32, {s['threads']} torch thread(s) on `{s['device']}`. Each "
        f"round calls every arm once in a random order; {g['repeats']} recorded rounds ({g['monitor_repeats']} for the "
        f"monitor) after {g['warmup']} warm-up round(s). Times: median [IQR] in ms; speed-up: median [IQR] of the "
        "per-round ratios before / after.",
        "",
        "| what | targets | before (ms) | after (ms) | speed-up | agreement (max abs diff) |",
        "|---|---|---:|---:|---:|---|",
        f"| StableRank monitor, power, 1 iteration: before = one `stable_rank_estimate` call per target; after = "
        f"`StableRank.compute()` (batched per shape) | all_2d: {mon['targets']} ({mon['shape_groups']} shapes) "
        f"| {ms_cell(mon['before'])} | {ms_cell(mon['after'])} | {ratio_cell(mon['speedup'])} "
        f"| stable ranks {mon['srank_max_abs_diff']:.2e} (rel. {mon['srank_max_rel_diff']:.1e}) |",
    ]
    for m in g["msign"]:
        shapes = ", ".join(f"{x[0]}x{x[1]}x{x[2]}" for x in m["shapes"])
        lines.append(
            f"| MSign svd + stable ranks: before = `msign_restore` + 2 x `stable_rank`; after = "
            f"`sign_and_restore(..., stable_ranks=True)` | {m['targets']}: {m['matrices']} ({shapes}) "
            f"| {ms_cell(m['before'], 1)} | {ms_cell(m['after'], 1)} | {ratio_cell(m['speedup'])} "
            f"| matrices {m['matrix_max_abs_diff']:.1e} (entries up to {m['matrix_max_abs']:.2f}); srank before "
            f"{m['srank_before_max_abs_diff']:.1e}, after {m['srank_after_max_abs_diff']:.1e} |"
        )
    lines += [
        "",
        f"Monitor, the batched math alone (`stable_rank_estimate` once per shape group on stacks made beforehand: "
        f"no stacking or plan): {ms_cell(mon['after_batched_math_only'])} ms; before / it: "
        f"{ratio_cell(mon['speedup_batched_math_only'])}.",
        "",
        "One power iteration on G random matrices, by size: one call per matrix vs one stacked call (the copy into "
        "the stack included); last column: the stacked product written `X @ v` (columns) instead of `v^T X^T` "
        "(rows, what the package does).",
        "",
        "| G x m x n | stacked by StableRank | per matrix (ms) | stacked (ms) | per matrix / stacked "
        "| column form / row form |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for st in g.get("stacking", []):
        G, m, n = st["shape"]
        lines.append(f"| {G} x {m} x {n} | {'yes' if st['stacked_by_the_monitor'] else 'no'} "
                     f"| {ms_cell(st['per_matrix'])} | {ms_cell(st['stacked'])} | {ratio_cell(st['speedup'])} "
                     f"| {ratio_cell(st['row_vs_column'])} |")
    lines += [
        "",
        "`sign_and_restore` without stable ranks (the floor): "
        + "; ".join(f"{m['targets']} {ms_cell(m['after_without_stable_ranks'], 1)} ms, with them "
                    f"{ratio_cell(m['stable_rank_cost'])} of that" for m in g["msign"]) + ".",
        "",
        "| `MSign.apply()` | targets | log_stable_rank=True (ms) | log_stable_rank=False (ms) | True / False |",
        "|---|---|---:|---:|---:|",
    ]
    for a in g["apply"]:
        lines.append(f"| backend {a['backend']} | {a['targets']}: {a['matrices']} | {ms_cell(a['log_true'], 1)} "
                     f"| {ms_cell(a['log_false'], 1)} | {ratio_cell(a['ratio'])} |")
    lines += [
        "",
        "The after-srank of the svd path is the count of kept singular values (all equal after the sign); the "
        "old path computed it from a second SVD of the result, so it differs from the count by float32 rounding.",
    ]
    return lines


def _faster(ratio: float) -> str:
    """``before / after`` as words."""
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x SLOWER"


def guards_verdicts(g: dict[str, Any]) -> list[str]:
    mon = g["monitor"]
    out = [f"StableRank monitor ({mon['targets']} targets): batched compute() {mon['after']['median_ms']:.2f} ms vs "
           f"{mon['before']['median_ms']:.2f} ms per target: {_faster(mon['speedup']['median'])} (the batched math "
           f"alone {mon['after_batched_math_only']['median_ms']:.2f} ms: "
           f"{_faster(mon['speedup_batched_math_only']['median'])})."]
    for m in g["msign"]:
        out.append(f"MSign svd with stable ranks ({m['targets']}): one SVD {m['after']['median_ms']:.0f} ms vs three "
                   f"decompositions {m['before']['median_ms']:.0f} ms: {_faster(m['speedup']['median'])}; "
                   f"matrices agree to {m['matrix_max_abs_diff']:.1e}.")
    for a in g["apply"]:
        out.append(f"MSign.apply() ({a['backend']}, {a['targets']}): log_stable_rank costs "
                   f"{a['ratio']['median']:.2f}x the time without it.")
    return out
