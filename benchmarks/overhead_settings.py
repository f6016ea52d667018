"""What defines a run of the overhead benchmark (``benchmarks/overhead.py``): settings, targets, models."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import ROOT

MSIGN_TARGET = 0.005  # issue: MSign at P=100 costs <= 0.5% of training time
MONITOR_TARGET = 0.01  # issue: StableRankMonitor every step costs <= 1%
SPEEDUP_TARGET = 5.0  # issue: a fast backend >= 5x faster than svd
PSS_IDLE_TARGET = 0.001  # issue: PSSCallback costs <= 0.1% on steps where it does not trigger
PSS_PAPER_PROTECTION = 2.4  # PSS paper: one protection step ~2.4x a training step (a reference, not a target)
PARTS = ("training", "backends", "distributed", "guards", "curvature")

# The main job's recipe: the guards part measures its model.
MAIN_RECIPE = ROOT / "recipes" / "shakespeare" / "msign.yaml"
# A tiny model of the same family for --quick.
QUICK_GUARDS_MODEL = {"n_layer": 2, "n_embd": 64, "n_head": 2, "intermediate_size": 256, "rotary_percentage": 1.0,
                      "parallel_residual": False, "bias": False}


@dataclass
class Settings:
    """Everything that defines a run; stored in the JSON."""

    mode: str
    device: str
    precision: str
    threads: int
    seed: int
    model: dict[str, int]
    seq_len: int
    batch_size: int
    timing_period: int  # k: MSign period during the timed runs (one application every k steps)
    warmup_steps: int  # steps per Trainer discarded (includes the first MSign application)
    min_timed_steps: int
    max_timed_steps: int
    train_budget_s: float  # no new cycle starts after this much training time (once min_timed_steps are done)
    period: int  # the P the MSign overhead is reported for
    msign_targets: str
    monitor_targets: str
    apply_repeats: int
    micro_shapes: list[tuple[int, int]]
    micro_repeats: int
    micro_warmup: int
    dist_repeats: int = 3
    micro_devices: list[str] = field(default_factory=list)
    guards_model: dict[str, Any] = field(default_factory=dict)  # litgpt Config fields + init options
    guards_seq_len: int = 256
    guards_seed: int = 0
    guards_repeats: int = 10  # recorded rounds of the MSign comparisons (after guards_warmup rounds)
    guards_monitor_repeats: int = 50  # recorded rounds of the (cheap) monitor comparison
    guards_warmup: int = 1
    guards_apply_backends: list[str] = field(default_factory=lambda: ["svd", "polar_express"])


def recipe_model(path: Path = MAIN_RECIPE) -> tuple[dict[str, Any], dict[str, Any], int, int]:
    """The model of a recipe: ``(litgpt Config fields, LitGPTModule init options, seq_len, seed)``."""
    import yaml

    recipe = yaml.safe_load(path.read_text())
    model = recipe["model"]
    config = {k: v for k, v in model["model_config"].items() if k != "name"}
    init = {k: model[k] for k in ("init_std", "zero_init_query", "scale_residual_init") if k in model}
    return config, init, int(recipe["data"]["seq_len"]), int(recipe.get("seed_everything", 0))


def build_settings(args: argparse.Namespace) -> Settings:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
    precision = args.precision or ("bf16-mixed" if device == "cuda" else "32-true")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    common = dict(device=device, precision=precision, threads=args.threads or usable, seed=args.seed,
                  period=args.period, msign_targets="attention", monitor_targets="all_2d")
    if args.quick:
        s = Settings(
            mode="quick", model={"n_layer": 2, "n_embd": 64, "n_head": 2}, seq_len=64, batch_size=4,
            timing_period=4, warmup_steps=4, min_timed_steps=12, max_timed_steps=12, train_budget_s=20.0,
            apply_repeats=2, micro_shapes=[(128, 128), (128, 512)], micro_repeats=3, micro_warmup=1,
            dist_repeats=2, guards_model={"config": QUICK_GUARDS_MODEL, "init": {}}, guards_seq_len=64,
            guards_repeats=2, guards_monitor_repeats=5, **common,
        )
    else:
        config, init, seq_len, seed = recipe_model()
        recipe = str(MAIN_RECIPE.relative_to(ROOT))
        s = Settings(
            mode="full", model={"n_layer": 6, "n_embd": 256, "n_head": 4}, seq_len=256, batch_size=16,
            timing_period=5, warmup_steps=5, min_timed_steps=20, max_timed_steps=200, train_budget_s=450.0,
            apply_repeats=2, micro_shapes=[(768, 768), (768, 3072)], micro_repeats=5, micro_warmup=1,
            dist_repeats=15, guards_model={"config": config, "init": init, "recipe": recipe},
            guards_seq_len=seq_len, guards_seed=seed, **common,
        )
    if args.timing_period is not None:
        s.timing_period = s.warmup_steps = args.timing_period
    if args.steps is not None:
        s.min_timed_steps = s.max_timed_steps = args.steps
    if args.train_budget_s is not None:
        s.train_budget_s = args.train_budget_s
    if args.repeats is not None:
        s.guards_repeats = args.repeats
        s.guards_monitor_repeats = max(args.repeats, s.guards_monitor_repeats)
    if s.timing_period < 2 or s.min_timed_steps < 2 * s.timing_period:
        raise SystemExit(
            f"need --timing-period >= 2 and --steps >= 2 x timing period, got {s.timing_period} and {s.min_timed_steps}"
        )
    s.micro_devices = ["cpu"] + (["cuda"] if device == "cuda" else [])
    return s
