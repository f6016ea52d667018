#!/usr/bin/env python
"""What the recommended guard costs per optimizer step: its check alone (healthy run) and check + sign (failing run).

On the main job's model (recipes/shakespeare/high_lr.yaml: 12-layer, width-64 LitGPT, batch 16 x 128, AdamW,
32-true), these arms are timed side by side, each round in a fresh random order (``common.interleaved``):

- ``train steps``: ``n`` times forward, backward, clip at 1.0, ``AdamW.step``, ``zero_grad`` on one batch, where
  ``n`` is the recommended guard's ``check_every`` (read from recipes/shakespeare/high_lr_guarded.yaml);
- ``train steps, recommended guard``: the same steps on a twin model (same weights, own optimizer) to which the
  recommended guard is attached exactly as the recipe configures it, but with a threshold no logit reaches, then
  ``MSign.step`` after each: one of the ``n`` steps is a check step whose logits are read in its training forward,
  so this arm minus the train steps, per step, is what a healthy run pays;
- ``train step, check from its forward``: one step with the same guard checking after every step
  (``check_every=1``): what a check step itself pays;
- ``check by a second forward``: ``MSign.step`` of the same guard with ``logits_from="second_forward"`` (one more
  forward of 4 sequences after the step: what the check cost before the logits were read in the training forward);
- ``check + sign``: the second-forward guard with the threshold at 0 and ``period_after_trigger=1``, so it measures
  and signs every Q and K block after every step (weights restored before each call): what a failing run pays;
- ``check + sign + sranks``: the same with ``log_stable_rank=True`` (the default; with ``polar_express`` it pays
  one singular-value computation of every input and result for the logged stable ranks).

Medians and interquartile ranges over rounds, and the per-round ratios to the training step.

Usage::

    python benchmarks/trigger_cost.py                 # ~1 min on 2 CPU cores; writes results/trigger_cost.{json,md}
    python benchmarks/trigger_cost.py --quick         # CI smoke test: 2-layer model, few rounds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from common import (
    atomic_write,
    interleaved,
    log,
    machine_description,
    machine_line,
    ms_cell,
    paired_ratio,
    pct,
    ratio_cell,
)
from common import summary as time_summary

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"n_layer": 12, "n_embd": 64, "n_head": 4, "rotary_percentage": 0.0, "parallel_residual": False,
         "bias": False}
QUICK_MODEL = {**MODEL, "n_layer": 2}


RECIPE = ROOT / "recipes" / "shakespeare" / "high_lr_guarded.yaml"


def recommended_msign() -> dict[str, Any]:
    """The ``init_args`` of the recommended guard's ``MSignCallback`` in the main job's guarded recipe."""
    import yaml

    callbacks = yaml.safe_load(RECIPE.read_text())["trainer"]["callbacks"]
    found = [c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("MSignCallback")]
    if len(found) != 1:
        raise ValueError(f"{RECIPE} holds {len(found)} MSignCallback entries, expected exactly 1")
    return dict(found[0])


def pct_cell(st: dict[str, Any]) -> str:
    """``median [q1, q3]`` of a :func:`paired_ratio`, in percent."""
    return f"{pct(st['median'])} [{pct(st['q1'])}, {pct(st['q3'])}]"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: 2-layer model, 3 rounds")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--check-every", type=int, default=None,
                        help="measure the recommended guard with this check_every instead of the recipe's")
    parser.add_argument("--probe-batch-size", type=int, default=None,
                        help="measure the recommended guard reading this many sequences instead of the recipe's")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.warmup = 3, 1
    out = args.out or ROOT / "benchmarks" / "results" / ("trigger_cost_quick" if args.quick else "trigger_cost")
    torch.set_num_threads(args.threads)

    from lightning_msign import LitGPTModule, MSign

    torch.manual_seed(0)
    config = QUICK_MODEL if args.quick else MODEL
    module = LitGPTModule(dict(config), vocab_size=256, block_size=128, lr=0.03)
    model = module.model
    twin = LitGPTModule(dict(config), vocab_size=256, block_size=128, lr=0.03).model
    every = LitGPTModule(dict(config), vocab_size=256, block_size=128, lr=0.03).model
    for m in (twin, every):
        m.load_state_dict(model.state_dict())
    optimizers = {id(m): torch.optim.AdamW(m.parameters(), lr=0.03, betas=(0.9, 0.95), weight_decay=0.1)
                  for m in (model, twin, every)}
    ids = torch.randint(0, 256, (16, 129))
    x, y = ids[:, :-1], ids[:, 1:]

    def step_of(m: torch.nn.Module) -> None:
        logits = m(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizers[id(m)].step()
        optimizers[id(m)].zero_grad()

    recommended = recommended_msign()
    if args.check_every is not None:
        recommended["check_every"] = args.check_every
    if args.probe_batch_size is not None:
        recommended["probe_batch_size"] = args.probe_batch_size
    n_steps = int(recommended.get("check_every", 1))
    healthy = {**recommended, "max_attn_logit": 1e30}  # as the recipe, with a threshold no logit reaches
    in_forward = MSign(twin, **healthy)
    in_every = MSign(every, **{**healthy, "check_every": 1})
    assert in_forward.logits_from == "training_forward", "the recipe's guard is expected to read its forward"
    options = dict(period=None, targets="qk", backend="polar_express", min_spacing=1, log_stable_rank=False)
    second = dict(options, logits_from="second_forward")
    calm = MSign(model, max_attn_logit=1e30, **second)
    hot = MSign(model, max_attn_logit=1e-30, period_after_trigger=1, **second)
    logged = MSign(model, max_attn_logit=1e-30, period_after_trigger=1, **{**second, "log_stable_rank": True})
    steps = {"in_forward": 0, "every": 0, "calm": 0, "hot": 0, "logged": 0}
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}

    def restore() -> None:
        with torch.no_grad():
            for m in (model, twin, every):
                for n, p in m.named_parameters():
                    p.copy_(saved[n])

    def train_steps() -> None:
        for _ in range(n_steps):
            step_of(model)

    def train_steps_guarded() -> None:
        checked = 0
        for _ in range(n_steps):
            step_of(twin)
            steps["in_forward"] += 1
            metrics = in_forward.step(steps["in_forward"])  # no ids: the logits come from the forward just run
            checked += "msign/attn_logit_max" in metrics
            assert not metrics.get("msign/applications")
        assert checked == 1, checked

    def train_step_checked() -> None:
        step_of(every)
        steps["every"] += 1
        metrics = in_every.step(steps["every"])
        assert "msign/attn_logit_max" in metrics and not metrics.get("msign/applications")

    def check() -> None:
        steps["calm"] += 1
        assert not calm.step(steps["calm"], input_ids=x).get("msign/applications")

    def check_and_sign() -> None:
        steps["hot"] += 1
        assert hot.step(steps["hot"], input_ids=x)["msign/matrices"] == len(hot.matrices)

    def check_sign_sranks() -> None:
        steps["logged"] += 1
        assert "msign/srank_after_min" in logged.step(steps["logged"], input_ids=x)

    log(f"trigger_cost: {config['n_layer']}-layer model, {len(calm.matrices)} Q/K blocks, {args.rounds} rounds,"
        f" the recipe's guard checks after every {n_steps}. step")
    arms = {"train steps": train_steps, "train steps, recommended guard": train_steps_guarded,
            "train step, check from its forward": train_step_checked,
            "check by a second forward": check, "check + sign": check_and_sign,
            "check + sign + sranks": check_sign_sranks}
    times = interleaved(arms, args.rounds, args.warmup, seed=0, device="cpu", reset=restore)
    step_ms = [t / n_steps for t in times["train steps"]]  # one training step, per round
    stats = {name: time_summary(t) for name, t in times.items()}
    stats["train step"] = time_summary(step_ms)
    ratios = {name: paired_ratio(times[name], step_ms) for name in list(arms)[2:]}
    guarded = [(a - b) / n_steps for a, b in zip(times["train steps, recommended guard"], times["train steps"])]
    ratios["recommended guard"] = paired_ratio(guarded, step_ms)
    on_check = [a - b for a, b in zip(times["train step, check from its forward"], step_ms)]
    ratios["check from the training forward"] = paired_ratio(on_check, step_ms)
    machine = machine_description()
    res: dict[str, Any] = {"model": config, "batch": [16, 128], "rounds": args.rounds, "threads": args.threads,
                           "machine": machine, "recommended_guard": recommended, "check_every": n_steps,
                           "stats": stats, "ratios_to_train_step": ratios,
                           "command": "python " + " ".join(["benchmarks/trigger_cost.py", *(argv or sys.argv[1:])])}
    lines = [
        "# What the recommended guard costs per optimizer step",
        "",
        f"Machine: {machine_line(machine)}; {args.threads} torch thread(s). Command: `{res['command']}`.",
        f"Model: {json.dumps(config)}, batch 16 x 128, AdamW, 32-true; {args.rounds} interleaved rounds.",
        f"The recommended guard as {RECIPE.relative_to(ROOT)} configures it (threshold raised out of reach"
        f"{'' if args.check_every is None else ', check_every from the command line'}"
        f"{'' if args.probe_batch_size is None else ', probe_batch_size from the command line'}):"
        f" `{json.dumps(recommended)}`.",
        "",
        f"**What the recommended guard adds to a healthy run's step** (per-round difference of {n_steps} guarded"
        f" and {n_steps} plain training steps, per step, over a step): {pct_cell(ratios['recommended guard'])}.",
        "",
        "| arm | ms per call, median [IQR] | per call / training step |",
        "|---|---:|---:|",
        f"| train step | {ms_cell(stats['train step'])} | 1 |",
        f"| train step checking from its forward (a check step, `check_every=1`) | "
        f"{ms_cell(stats['train step, check from its forward'])} |"
        f" {ratio_cell(ratios['train step, check from its forward'])} |",
        f"| check by a second forward (healthy run, `logits_from=\"second_forward\"`) |"
        f" {ms_cell(stats['check by a second forward'])} | {ratio_cell(ratios['check by a second forward'])} |",
        f"| check + sign of every Q/K block (failing run) | {ms_cell(stats['check + sign'])} |"
        f" {ratio_cell(ratios['check + sign'])} |",
        f"| the same, logging every block's stable rank before and after | {ms_cell(stats['check + sign + sranks'])} |"
        f" {ratio_cell(ratios['check + sign + sranks'])} |",
        "",
        f"What a check step pays for the logits read in its forward (over a step):"
        f" {pct_cell(ratios['check from the training forward'])}; the recommended guard checks after every"
        f" {n_steps}. step.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out.with_suffix(".md"), text)
    atomic_write(out.with_suffix(".json"), json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
