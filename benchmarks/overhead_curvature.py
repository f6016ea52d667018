"""Part "curvature" of the overhead benchmark: what ``Curvature`` / ``CurvatureMonitor`` cost a training step.

On the main job's model (the LitGPT of ``recipes/shakespeare/msign.yaml``; ``--quick``: a 2-layer one), batch
``batch_size x guards_seq_len`` of random byte ids, AdamW (the module's own groups), interleaved round by round
(each round calls every arm once, in a fresh random order; warm-up rounds excluded):

- ``step``: one training step (forward, backward, ``AdamW.step``): the unit;
- ``forward+backward``: the same without the optimizer (to express a Hessian-vector product in backward passes);
- ``measure, warm (k HVPs)``: ``Curvature.compute()`` warm-started from the previous round's vector, for
  ``k = 1`` (power iteration: Lanczos needs 2) and ``k = 5`` (the default: Lanczos); their difference over 4 is
  one HVP's marginal cost (Lanczos's reorthogonalisation included);
- ``measure, cold (20 HVPs)``: a fresh guard (a cold start, the default ``cold_iterations``), in two rounds of
  its own with a training step each (it costs four warm measurements).

The cost of the monitor at ``every_n_steps = n`` is then ``(n x step + measure) / (n x step)``: reported for
``n = 1`` and ``n = 10`` with the default 5 iterations.
"""

from __future__ import annotations

from typing import Any

import torch
from common import interleaved, log, ms_cell, paired_ratio, ratio_cell, summary
from overhead_settings import Settings

COLD_REPEATS = 2


def run_curvature_part(s: Settings) -> dict[str, Any]:
    from overhead_guards import build_model

    from lightning_msign import Curvature

    module = build_model(s)
    module.train()
    device = torch.device(s.device)
    generator = torch.Generator().manual_seed(s.seed)
    ids = torch.randint(0, 256, (s.batch_size, s.guards_seq_len + 1), generator=generator).to(device)
    batch = (ids[:, :-1], ids[:, 1:])
    optimizer = torch.optim.AdamW(module.param_groups(), lr=1e-3, betas=(0.9, 0.95))
    loss_fn = lambda: module.curvature_loss(batch)  # noqa: E731

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()

    def forward_backward() -> None:
        module.zero_grad(set_to_none=True)
        loss_fn().backward()

    train_step()  # Adam state exists from here on
    warm = {k: Curvature(module, optimizer, iterations=k, cold_iterations=20, method="power" if k == 1 else "lanczos")
            for k in (1, 5)}
    for guard in warm.values():
        guard.compute(loss_fn)  # the cold start, untimed: the rounds are warm
    hvps: dict[str, list[float]] = {}

    def measure(name: str, guard: Any) -> None:
        hvps.setdefault(name, []).append(guard.compute(loss_fn)["curvature/hvps"])

    arms = {
        "step": train_step,
        "forward+backward": forward_backward,
        "measure, warm (1 HVP)": lambda: measure("warm1", warm[1]),
        "measure, warm (5 HVPs)": lambda: measure("warm5", warm[5]),
    }
    repeats = 3 if s.mode == "quick" else 5
    log(f"curvature: {repeats} interleaved rounds of {len(arms)} arms, then {COLD_REPEATS} cold starts with steps")
    times = interleaved(arms, repeats=repeats, warmup=1, seed=s.seed, device=device)
    # A cold start costs four warm ones: interleaved with training steps in rounds of their own.
    cold = interleaved({"step": train_step, "measure, cold (20 HVPs)": lambda: measure(
        "cold", Curvature(module, optimizer, cold_iterations=20))}, repeats=COLD_REPEATS, warmup=0, seed=s.seed,
        device=device)
    times["measure, cold (20 HVPs)"] = cold["measure, cold (20 HVPs)"]
    cold_ratio = paired_ratio(cold["measure, cold (20 HVPs)"], cold["step"])
    assert set(hvps["warm5"]) == {5.0} and set(hvps["cold"]) == {20.0} and set(hvps["warm1"]) == {1.0}
    step_ms = summary(times["step"])["median_ms"]
    backward = summary(times["forward+backward"])["median_ms"]
    warm1 = summary(times["measure, warm (1 HVP)"])["median_ms"]
    warm5 = summary(times["measure, warm (5 HVPs)"])["median_ms"]
    per_hvp = (warm5 - warm1) / 4
    return {
        "model": s.guards_model.get("recipe", "quick model"),
        "parameters": sum(p.numel() for p in module.parameters()),
        "batch": [s.batch_size, s.guards_seq_len],
        "repeats": repeats,
        "arms": {name: summary(t) for name, t in times.items()},
        "measure_over_step": {**{name: paired_ratio(t, times["step"]) for name, t in times.items()
                                 if name not in ("step", "measure, cold (20 HVPs)")},
                              "measure, cold (20 HVPs)": cold_ratio},
        "per_hvp_ms": per_hvp,
        "per_hvp_in_forward_backward": per_hvp / backward,
        "every_n": {str(n): (n * step_ms + warm5) / (n * step_ms) for n in (1, 10, 100)},
    }


def render_curvature(s: dict[str, Any], cv: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Curvature monitor",
        "",
        f"Model: {cv['model']} ({cv['parameters']:,} parameters), batch {cv['batch'][0]} x {cv['batch'][1]}, "
        f"{cv['repeats']} interleaved rounds (medians, interquartile ranges; the cold start in 2 rounds of its own"
        " with a training step).",
        "",
        "| arm | time | / training step |",
        "|---|---|---|",
    ]
    for name, st in cv["arms"].items():
        ratio = "1" if name == "step" else ratio_cell(cv["measure_over_step"][name])
        lines.append(f"| {name} | {ms_cell(st)} | {ratio} |")
    lines += [
        "",
        f"One Hessian-vector product (marginal, from the 5- and 1-HVP arms): {cv['per_hvp_ms']:.1f} ms = "
        f"{cv['per_hvp_in_forward_backward']:.2f} x a forward+backward pass.",
        "",
        "| every_n_steps (5 HVPs, warm) | training time x |",
        "|---|---|",
    ] + [f"| {n} | {x:.2f} |" for n, x in cv["every_n"].items()]
    return lines


def curvature_verdicts(cv: dict[str, Any]) -> list[str]:
    return [
        f"Curvature (5 warm HVPs) every 10 steps costs {100 * (cv['every_n']['10'] - 1):.0f}% of training time, every"
        f" step {100 * (cv['every_n']['1'] - 1):.0f}%; one HVP = {cv['per_hvp_in_forward_backward']:.2f} forward+"
        "backward passes (no target was set by the issue: reported)."
    ]
