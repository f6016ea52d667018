#!/usr/bin/env python
"""Overhead benchmark of lightning_msign: what MSign, StableRank and PSS cost a training run.

Runs the parts (one thread setting, ``torch.set_num_threads``, for all) and renders one report:

1. ``training`` (:mod:`overhead_training`, then :mod:`overhead_profiles`): training-step overhead of
   MSign (each backend) and StableRankMonitor against a baseline, real Trainers interleaved step by step;
   then, on the trained baseline model, ``MSign.apply()`` per preset, backend and ``log_stable_rank``,
   where the monitor's time goes, and PSS's detector and protection.
2. ``backends`` (:mod:`overhead_backends`): accuracy and speed of the msign backends.
3. ``distributed`` (:mod:`overhead_distributed`): time per MSign application, 1 vs 2 processes.
4. ``guards`` (:mod:`overhead_guards`): the guards' batched paths before/after, side by side: the monitor's
   per-target power iterations vs one batched call per shape; MSign's svd path with two extra
   decompositions for the logged stable ranks vs one SVD; ``MSign.apply()`` with ``log_stable_rank`` on/off.
5. ``curvature`` (:mod:`overhead_curvature`): a ``Curvature`` measurement (warm 1 and 5 HVPs, cold 20) against a
   training step, interleaved; the cost at ``every_n_steps`` 1, 10 and 100.

Usage::

    python benchmarks/overhead.py --threads 1          # full (~10 min on 2 CPU cores)
    python benchmarks/overhead.py --quick              # smoke version (~1-2 min), for CI
    python benchmarks/overhead.py --device cuda        # on a GPU machine
    python benchmarks/overhead.py --threads 1 --only guards    # before/after of the guards (~2 min)
    python benchmarks/overhead.py --threads 1 --only curvature # the curvature monitor's cost
    python benchmarks/overhead.py --threads 1 --skip-training --skip-backends --skip-guards \
        --out benchmarks/results/overhead_distributed.json   # the distributed part only (~30 s)

Writes JSON (``--out``; default ``benchmarks/results/overhead.json``, ``overhead_quick.json`` with
``--quick``, ``overhead_<parts>[_quick].json`` with ``--only``) and the same markdown next to it (``.md``),
and prints the tables. See ``benchmarks/README.md`` for how to read them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import common  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads)
import torch
from common import RESULTS_DIR, atomic_write, log, machine_description, machine_line, quiet_measured_code
from overhead_backends import backend_verdicts, render_backends, run_backend_part
from overhead_curvature import curvature_verdicts, render_curvature, run_curvature_part
from overhead_distributed import distributed_verdicts, render_distributed, run_distributed_part
from overhead_guards import guards_verdicts, render_guards, run_guards_part
from overhead_profiles import profile_verdicts, render_profiles, run_profiles
from overhead_settings import (
    MONITOR_TARGET,
    MSIGN_TARGET,
    PARTS,
    PSS_IDLE_TARGET,
    SPEEDUP_TARGET,
    build_settings,
)
from overhead_training import render_training, run_training_part, training_verdicts


def render_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in res.get("part_times_s", {}).items())
    lines = [
        f"# lightning_msign overhead benchmark ({s['mode']})",
        "",
        f"Machine: {machine_line(res['machine'])}.",
        f"Wall time of the benchmark: {res['wall_time_s']:.0f} s ({parts}). Command: `{res['command']}`",
    ]
    if s["mode"] == "quick":
        lines.append("Quick mode: a smoke test with a tiny model and small matrices; its verdicts mean nothing.")
    if res.get("training"):
        lines += render_training(s, res["training"])
        lines += render_profiles(s, res["training"])
    if res.get("backends"):
        lines += render_backends(s, res["backends"])
    if res.get("distributed"):
        lines += render_distributed(s, res["distributed"])
    if res.get("guards"):
        lines += render_guards(s, res["guards"])
    if res.get("curvature"):
        lines += render_curvature(s, res["curvature"])
    lines += ["", "## Against the targets", ""] + [f"- {v}" for v in res["verdicts"]]
    return "\n".join(lines) + "\n"


def verdicts(res: dict[str, Any]) -> list[str]:
    out: list[str] = []
    if res.get("training"):
        out += training_verdicts(res["training"]) + profile_verdicts(res["training"])
    if res.get("guards"):
        out += guards_verdicts(res["guards"])
    if res.get("curvature"):
        out += curvature_verdicts(res["curvature"])
    if res.get("distributed"):
        out += distributed_verdicts(res["distributed"])
    if res.get("backends"):
        out += backend_verdicts(res["backends"])
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke version: tiny models, few steps, small matrices")
    p.add_argument("--out", type=Path, default=None, help="JSON output (markdown beside it, .md); default "
                   "benchmarks/results/overhead.json (overhead_quick.json with --quick, overhead_<parts>.json "
                   "with --only)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device; the "
                   "micro-benchmark runs on the CPU and also on CUDA when this is cuda (default: auto)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable CPUs)")
    p.add_argument("--precision", default=None, help="Trainer precision (default 32-true on CPU, bf16-mixed on CUDA)")
    p.add_argument("--period", type=int, default=100, help="MSign period P the overhead is reported for (default 100)")
    p.add_argument("--timing-period", type=int, default=None, help="MSign period during the timed runs (k)")
    p.add_argument("--steps", type=int, default=None, help="exact number of timed steps per configuration "
                   "(default: as many as --train-budget-s allows, at least 20)")
    p.add_argument("--train-budget-s", type=float, default=None, help="no new cycle starts after this (s)")
    p.add_argument("--repeats", type=int, default=None, help="recorded rounds of the guards part (default 10; "
                   "2 with --quick; the monitor comparison does at least 50 / 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="data cache (default: $LIGHTNING_MSIGN_CACHE or a temp dir)")
    p.add_argument("--only", nargs="+", choices=PARTS, default=None, help="run only these parts")
    p.add_argument("--skip-training", action="store_true", help="skip the training part")
    p.add_argument("--skip-guards", action="store_true", help="skip the guards before/after part")
    p.add_argument("--skip-backends", action="store_true", help="skip the backend micro-benchmark")
    p.add_argument("--skip-distributed", action="store_true", help="skip the 1-vs-2-process MSign timing")
    p.add_argument("--skip-curvature", action="store_true", help="skip the curvature monitor's cost")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    parts = [p for p in (args.only or PARTS) if not getattr(args, f"skip_{p}")]
    wall0 = time.perf_counter()
    s = build_settings(args)
    torch.set_num_threads(s.threads)
    if args.out is not None:
        out = args.out
    elif args.only:
        out = RESULTS_DIR / f"overhead_{'_'.join(parts)}{'_quick' if args.quick else ''}.json"
    else:
        out = RESULTS_DIR / ("overhead_quick.json" if args.quick else "overhead.json")
    res: dict[str, Any] = {
        "settings": {**asdict(s), "micro_shapes": [list(x) for x in s.micro_shapes]},
        "parts": parts,
        "machine": machine_description(),
        "command": " ".join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "targets": {"msign_at_period": MSIGN_TARGET, "monitor_every_step": MONITOR_TARGET,
                    "backend_speedup": SPEEDUP_TARGET, "pss_without_trigger": PSS_IDLE_TARGET},
        "part_times_s": {},
    }
    log(f"lightning_msign overhead benchmark ({s.mode}; {', '.join(parts)}): {machine_line(res['machine'])}")

    if "training" in parts:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lightning_msign_bench_") as tmp:
            cache_dir = args.cache_dir or os.environ.get("LIGHTNING_MSIGN_CACHE") or tmp
            training, baseline = run_training_part(s, cache_dir)
        with quiet_measured_code():
            training.update(run_profiles(s, baseline, training["baseline_median_step_ms"]))
        res["training"] = training
        res["part_times_s"]["training, apply and profile"] = time.perf_counter() - t0
    for name, run in (("backends", run_backend_part), ("distributed", run_distributed_part),
                      ("guards", run_guards_part), ("curvature", run_curvature_part)):
        if name in parts:
            t0 = time.perf_counter()
            res[name] = run(s)
            res["part_times_s"][name] = time.perf_counter() - t0

    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_end"] = os.getloadavg()[0]
    res["wall_time_s"] = time.perf_counter() - wall0
    res["verdicts"] = verdicts(res)
    md = render_markdown(res)
    atomic_write(out, json.dumps(res, indent=2) + "\n")
    atomic_write(out.with_suffix(".md"), md)
    print(md)
    log(f"wrote {out} and {out.with_suffix('.md')} ({res['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
