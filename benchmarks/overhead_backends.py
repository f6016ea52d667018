"""Part 2 of the overhead benchmark: accuracy and speed of the backends of ``lightning_msign.functional.msign``.

For each shape and input (plain Gaussian; a "collapsed" matrix = Gaussian noise + a strong rank-3 part,
stable rank ~2, like a collapsed attention weight): the median time of each backend after a warm-up, the
speed ratio ``svd_time / backend_time``, the relative Frobenius error against ``svd`` and the extreme
singular values and stable rank of the output. On the CPU, and on the GPU too when the run's device is CUDA.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from common import BACKENDS, log, median, time_calls
from overhead_settings import SPEEDUP_TARGET, Settings


def make_inputs(m: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    """A plain Gaussian matrix, and a collapsed one: noise plus a rank-3 part with stable rank ~2."""
    gen = torch.Generator().manual_seed(seed)
    gauss = torch.randn(m, n, generator=gen) / math.sqrt(n)  # ||.||_F^2 ~ m
    U, _ = torch.linalg.qr(torch.randn(m, 3, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, 3, generator=gen))
    rel = torch.tensor([1.0, 0.5, 0.25])
    s1 = math.sqrt(m / (1.0 - float((rel[1:] ** 2).sum())))  # (s1^2 * sum(rel^2) + m) / s1^2 = 2
    noise = torch.randn(m, n, generator=gen) / math.sqrt(n)
    collapsed = noise + (U * (s1 * rel)) @ V.T
    return {"gaussian": gauss, "collapsed": collapsed}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm((out - ref).double()) / torch.linalg.norm(ref.double()))


def run_backend_part(s: Settings) -> list[dict[str, Any]]:
    from lightning_msign.functional import msign, stable_rank

    rows = []
    for device in s.micro_devices:
        for m, n in s.micro_shapes:
            for kind, W_cpu in make_inputs(m, n, s.seed).items():
                W = W_cpu.to(device)
                srank_in = float(stable_rank(W_cpu.double()))
                ref = msign(W, backend="svd")
                svd_ms = float("nan")
                for backend in BACKENDS:
                    times = time_calls(lambda: msign(W, backend=backend), s.micro_repeats, s.micro_warmup, device)
                    out = msign(W, backend=backend)
                    sv = torch.linalg.svdvals(out.double().cpu())
                    t = median(times)
                    if backend == "svd":
                        svd_ms = t
                    rows.append({
                        "device": device, "shape": [m, n], "input": kind, "srank_in": srank_in, "backend": backend,
                        "median_ms": t, "min_ms": min(times), "times_ms": times, "speedup_vs_svd": svd_ms / t,
                        "rel_fro_err_vs_svd": _rel_err(out, ref),
                        "sv_min": float(sv.min()), "sv_max": float(sv.max()),
                        "srank_out": float((sv**2).sum() / sv.max() ** 2),
                    })
                log(f"  backends: {device} {m}x{n} {kind} done")
    return rows


def render_backends(s: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## 2. Backend micro-benchmark: `lightning_msign.functional.msign`, float32",
        "",
        f"Median of {s['micro_repeats']} calls after {s['micro_warmup']} warm-up call(s), {s['threads']} torch "
        "thread(s). Inputs: `gaussian` = N(0, 1/n) entries; `collapsed` = the same kind of noise + a rank-3 part "
        "(singular values s, s/2, s/4) scaled to a stable rank of ~2. Error and output singular values against the "
        "exact `svd` backend.",
        "",
        "| device | shape | input (srank) | backend | median ms | svd_time / time | rel. Frobenius err vs svd "
        "| sigma_min out | sigma_max out | srank out |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['device']} | {r['shape'][0]}x{r['shape'][1]} | {r['input']} ({r['srank_in']:.2f}) | {r['backend']} "
            f"| {r['median_ms']:.1f} | {r['speedup_vs_svd']:.2f}x | {r['rel_fro_err_vs_svd']:.2e} "
            f"| {r['sv_min']:.3g} | {r['sv_max']:.4g} | {r['srank_out']:.1f} |"
        )
    return lines


def backend_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    out = []
    for device in sorted({r["device"] for r in rows}):
        for shape in sorted({tuple(r["shape"]) for r in rows if r["device"] == device}):
            fast = [r for r in rows if r["device"] == device and tuple(r["shape"]) == shape and r["backend"] != "svd"]
            best = max(fast, key=lambda r: r["speedup_vs_svd"])
            met = best["speedup_vs_svd"] >= SPEEDUP_TARGET
            out.append(
                f"fast backend >= 5x faster than svd on {device}, {shape[0]}x{shape[1]}: best "
                f"{best['backend']} ({best['input']}) {best['speedup_vs_svd']:.2f}x: {'met' if met else 'NOT met'}."
            )
    return out
