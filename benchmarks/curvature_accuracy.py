#!/usr/bin/env python
"""Accuracy of ``Curvature``'s warm-started estimate: against a dense Hessian and against a long Lanczos run.

The claim measured (seed 004, "Taming Curvature"): a power iteration warm-started from the previous step's
eigenvector tracks the top eigenvalue of Adam's preconditioned Hessian with fewer than 5 Hessian-vector
products (HVPs) per step, better than a cold start with 20.

Two parts, both real training on the shipped Shakespeare corpus (byte tokens), AdamW, the suite's own
``Curvature`` guard measuring after every optimizer step:

1. **dense** -- a tiny LitGPT (2 layers, width 8: a few thousand parameters). Every ``--dense-every`` steps the
   exact ``stability ratio`` is the top eigenvalue of ``D^1/2 H D^1/2 / 38`` with ``H`` the dense Hessian
   (``functional.hessian_matrix``, one HVP per coordinate) and ``D = lr / P`` from the optimizer state.
2. **lanczos** -- the stability benchmark's 12 x 64 LitGPT (``--lanczos-model``), batch 16 x 128. The reference
   is 40 Lanczos steps with full reorthogonalisation from a fixed random start (top Ritz value of the
   tridiagonal matrix, its residual reported), every ``--lanczos-every`` steps.

Compared: warm-started guards (the default ``method="lanczos"``) with 2, 3 and 5 HVPs per measurement
(``iterations``; their first measurement is a 20-HVP cold start) and the paper's power iteration with 5, all
measuring after every step in the dense part and every ``--lanczos-every`` steps (the vector carried over that
many optimizer steps) in the Lanczos part; and cold starts of 20 HVPs from a fresh random vector at every
reference step (Lanczos and power iteration). Reported: median and maximum relative error against the reference
over the reference steps (the first ``--skip`` excluded: warm starts need a few steps to lock on), and HVPs per
measurement.

Usage::

    python benchmarks/curvature_accuracy.py                # both parts (~10 min on 2 CPU cores)
    python benchmarks/curvature_accuracy.py --quick        # smoke version (~1 min)

Writes ``benchmarks/results/curvature_accuracy.json`` and ``.md`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import torch
from common import RESULTS_DIR, atomic_write, log, machine_description, machine_line

WARM_ITERATIONS = (2, 3, 5)
COLD_ITERATIONS = 20


def lanczos_top(
    operator: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int
) -> tuple[float, float]:
    """Largest eigenvalue of a symmetric operator on flat vectors by Lanczos with full reorthogonalisation.

    Returns ``(top Ritz value, its residual ||A y - theta y|| / |theta|)`` (the residual from the last
    off-diagonal entry and the Ritz vector's last coordinate, the standard Lanczos bound).
    """
    q = start / start.norm()
    basis = [q]
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(steps):
        w = operator(basis[-1])
        alpha = float(torch.dot(w, basis[-1]))
        alphas.append(alpha)
        for b in basis:  # full reorthogonalisation (twice is enough)
            w = w - torch.dot(w, b) * b
        for b in basis:
            w = w - torch.dot(w, b) * b
        beta = float(w.norm())
        if j == steps - 1 or beta < 1e-12:
            break
        betas.append(beta)
        basis.append(w / beta)
    k = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    values, vectors = torch.linalg.eigh(T)
    theta = float(values[-1])
    residual = abs(beta * float(vectors[-1, -1])) / abs(theta) if theta else math.inf
    return theta, residual


def _flat(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([v.reshape(-1).double() for v in vectors])


def _unflat(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    return [chunk.view_as(p).to(p.dtype) for chunk, p in zip(flat.split([p.numel() for p in like]), like)]


def reference(kind: str, module: Any, optimizer: Any, loss_fn: Callable[[], torch.Tensor], lanczos_steps: int,
              seed: int) -> tuple[float, float, int]:
    """``(stability ratio, residual, HVPs)`` of the reference: dense eigenvalues or Lanczos."""
    from lightning_msign.functional.curvature import (
        adam_preconditioner,
        edge_of_stability,
        hessian_matrix,
        hessian_vector_product,
        sdpa_math_kernel,
    )

    params, scales = [], []
    for group in optimizer.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                continue
            P = adam_preconditioner(state["exp_avg_sq"], int(state["step"]), beta1, beta2, group["eps"])
            params.append(p)
            scales.append((group["lr"] / (P * edge_of_stability(beta1))).sqrt())
    D_half = _flat(scales)
    with sdpa_math_kernel():
        if kind == "dense":
            H = hessian_matrix(loss_fn, params)
            A = H * D_half[:, None] * D_half[None, :]
            return float(torch.linalg.eigvalsh(A)[-1]), 0.0, H.shape[0]
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, create_graph=True)

        def operator(v: torch.Tensor) -> torch.Tensor:
            hv = hessian_vector_product(grads, params, _unflat(v * D_half, params))
            return _flat(hv) * D_half

        start = torch.randn(D_half.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        value, residual = lanczos_top(operator, start, lanczos_steps)
    return value, residual, lanczos_steps


def run_part(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from lightning_msign import Curvature, LitGPTModule, ShakespeareDataModule
    from lightning_msign.metric_keys import CURV_HVPS, CURV_STABILITY_RATIO

    if kind == "dense":
        config = {"n_layer": 2, "n_embd": 8, "n_head": 2, "intermediate_size": 32, "rotary_percentage": 0.0,
                  "parallel_residual": False, "bias": False}
        batch_size, seq_len, lr, steps, every = 4, 32, args.dense_lr, args.dense_steps, args.dense_every
        measure_every = 1
    else:
        config = json.loads(args.lanczos_model)
        batch_size, seq_len, lr, steps, every = 16, 128, args.lanczos_lr, args.lanczos_steps, args.lanczos_every
        measure_every = every  # the monitor's default cadence: warm starts carry over `every` steps
    torch.manual_seed(args.seed)
    module = LitGPTModule(config, vocab_size=256, block_size=seq_len, lr=lr)
    module.train()
    data = ShakespeareDataModule(tokenizer="byte", seq_len=seq_len, batch_size=batch_size, seed=args.seed)
    data.prepare_data()
    data.setup("fit")
    loader = iter(data.train_dataloader())
    optimizer = torch.optim.AdamW(module.param_groups(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = {f"warm{k}": Curvature(module, optimizer, every_n_steps=measure_every, iterations=k,
                                  cold_iterations=COLD_ITERATIONS, seed=args.seed) for k in WARM_ITERATIONS}
    warm["power_warm5"] = Curvature(module, optimizer, every_n_steps=measure_every, iterations=5,
                                    cold_iterations=COLD_ITERATIONS, seed=args.seed, method="power")
    rows = []
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(loader)
        loss_fn = lambda b=batch: module.curvature_loss(b)  # noqa: E731
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
        estimates = {name: guard.step(loss_fn, step) for name, guard in warm.items()}
        if step % every == 0:
            for method in ("lanczos", "power"):
                estimates["cold20" if method == "lanczos" else "power_cold20"] = Curvature(
                    module, optimizer, cold_iterations=COLD_ITERATIONS, seed=args.seed + 1000 + step, method=method,
                ).compute(loss_fn)
            ref, residual, ref_hvps = reference(kind, module, optimizer, loss_fn, args.lanczos_iterations,
                                                args.seed + step)
            row = {"step": step, "reference": ref, "reference_residual": residual, "reference_hvps": ref_hvps}
            for name, metrics in estimates.items():
                row[name] = metrics[CURV_STABILITY_RATIO]
                row[f"{name}_hvps"] = metrics[CURV_HVPS]
            rows.append(row)
            log(f"{kind} step {step}: reference {ref:.4g}, " + ", ".join(
                f"{name} {row[name]:.4g}" for name in estimates))
    methods = [f"warm{k}" for k in WARM_ITERATIONS] + ["cold20", "power_warm5", "power_cold20"]
    scored = [r for r in rows if r["step"] > args.skip]
    summary = {}
    for name in methods:
        errors = [abs(r[name] / r["reference"] - 1) for r in scored if r["reference"] > 0]
        summary[name] = {"median_rel_error": statistics.median(errors) if errors else None,
                         "max_rel_error": max(errors) if errors else None,
                         "hvps_per_step": statistics.median(r[f"{name}_hvps"] for r in scored) if scored else None}
    return {"kind": kind, "config": config, "parameters": sum(p.numel() for p in module.parameters()),
            "batch": [batch_size, seq_len], "lr": lr, "steps": steps, "every": every,
            "measure_every": measure_every, "rows": rows,
            "summary": summary, "wall_s": time.perf_counter() - t0}


def render(res: dict[str, Any]) -> str:
    lines = ["# Curvature estimate accuracy", "", f"Machine: {machine_line(res['machine'])}.",
             f"Command: `{res['command']}` ({res['wall_time_s']:.0f} s).", "",
             "Relative error of `curvature/stability_ratio` against the reference, over the reference steps after "
             f"step {res['skip']} (warm starts carry their vector from their previous measurement).", ""]
    for part in res["parts"]:
        ref = "dense Hessian (eigvalsh)" if part["kind"] == "dense" else \
            f"{part['rows'][0]['reference_hvps'] if part['rows'] else '?'} Lanczos steps"
        batch = f"{part['batch'][0]} x {part['batch'][1]}"
        lines += [f"## {part['kind']}: {part['parameters']:,} parameters, batch {batch},"
                  f" lr {part['lr']:g}, {part['steps']} steps, warm-started guards measuring every"
                  f" {part['measure_every']} step(s), reference ({ref}) every {part['every']} steps", "",
                  "| estimate | HVPs per step | median rel. error | max rel. error |", "|---|---:|---:|---:|"]
        for name, s in part["summary"].items():
            label = {"cold20": f"Lanczos, cold start, {COLD_ITERATIONS} HVPs",
                     "power_warm5": "power iteration, warm start, 5 HVPs",
                     "power_cold20": f"power iteration, cold start, {COLD_ITERATIONS} HVPs"}.get(
                         name, f"Lanczos, warm start, {name[4:]} HVP(s)")
            med = "-" if s["median_rel_error"] is None else f"{100 * s['median_rel_error']:.2f}%"
            mx = "-" if s["max_rel_error"] is None else f"{100 * s['max_rel_error']:.2f}%"
            lines.append(f"| {label} | {s['hvps_per_step']:g} | {med} | {mx} |")
        lines += ["", "| step | reference | residual | " + " | ".join(part["summary"]) + " |",
                  "|---:|---:|---:|" + "---:|" * len(part["summary"])]
        for r in part["rows"]:
            lines.append(f"| {r['step']} | {r['reference']:.4g} | {r['reference_residual']:.1e} | "
                         + " | ".join(f"{r[n]:.4g}" for n in part["summary"]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version: few steps")
    p.add_argument("--parts", nargs="+", choices=("dense", "lanczos"), default=["dense", "lanczos"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", type=int, default=5, help="steps excluded from the error statistics")
    p.add_argument("--dense-steps", type=int, default=60)
    p.add_argument("--dense-every", type=int, default=5)
    p.add_argument("--dense-lr", type=float, default=1e-2)
    p.add_argument("--lanczos-model", default='{"n_layer": 12, "n_embd": 64, "n_head": 4, "rotary_percentage": 0.0, '
                   '"parallel_residual": false, "bias": false}')
    p.add_argument("--lanczos-steps", type=int, default=120)
    p.add_argument("--lanczos-every", type=int, default=10)
    p.add_argument("--lanczos-lr", type=float, default=1e-2)
    p.add_argument("--lanczos-iterations", type=int, default=40, help="Lanczos steps of the reference")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.dense_steps, args.dense_every, args.lanczos_steps, args.lanczos_every = 12, 6, 8, 4
        args.lanczos_model = json.dumps({"n_layer": 2, "n_embd": 32, "n_head": 2, "rotary_percentage": 0.0,
                                         "parallel_residual": False, "bias": False})
        args.lanczos_iterations, args.skip = 20, 2
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS_DIR / ("curvature_accuracy_quick.json" if args.quick else "curvature_accuracy.json")
    t0 = time.perf_counter()
    res = {"machine": machine_description(), "skip": args.skip,
           "command": " ".join(["python", "benchmarks/curvature_accuracy.py",
                                *(sys.argv[1:] if argv is None else argv)]),
           "parts": [run_part(kind, args) for kind in args.parts]}
    res["wall_time_s"] = time.perf_counter() - t0
    atomic_write(out, json.dumps(res, indent=1) + "\n")
    md = render(res)
    atomic_write(out.with_suffix(".md"), md)
    print(md)
    log(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
