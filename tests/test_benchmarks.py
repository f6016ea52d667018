"""The benchmark scripts run (quick mode) and write their result files."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *argv: str) -> int:
    """``benchmarks/<name>.py argv...`` in this process (its ``main``): no interpreter to start. The torch thread
    count the benchmark sets is restored afterwards."""
    import importlib

    import torch

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.insert(0, str(ROOT / "benchmarks"))
    threads = torch.get_num_threads()
    try:
        return importlib.import_module(name).main(list(argv))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_overhead_quick_runs_and_writes_results(tmp_path, capsys):
    """Every part, the distributed one included (its 2 processes are spawned: hence slow)."""
    out = tmp_path / "overhead_quick.json"
    assert run_benchmark("overhead", "--quick", "--threads", "1", "--out", str(out)) == 0
    stdout = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result and out.with_suffix(".md").read_text().startswith("# lightning_msign overhead benchmark")
    assert "MSign P=100, backend svd" in stdout and "svd_time / time" in stdout
    assert result["parts"] == ["training", "backends", "distributed", "guards", "curvature"]
    assert {"training", "backends", "distributed", "guards", "curvature"} <= set(result)
    assert "## 4. Guards: batched paths, before vs after" in stdout
    curvature = result["curvature"]
    assert set(curvature["arms"]) == {"step", "forward+backward", "measure, warm (1 HVP)", "measure, warm (5 HVPs)",
                                      "measure, cold (20 HVPs)"}
    assert curvature["per_hvp_ms"] > 0 and curvature["every_n"]["1"] > curvature["every_n"]["10"] > 1
    assert "## Curvature monitor" in stdout


def test_overhead_guards_part_measures_before_and_after(tmp_path):
    out = tmp_path / "guards.json"
    assert run_benchmark("overhead", "--quick", "--threads", "1", "--only", "guards", "--repeats", "2",
                         "--out", str(out)) == 0
    res = json.loads(out.read_text())
    assert res["parts"] == ["guards"] and "training" not in res and res["machine"]["torch_threads"] == 1
    g = res["guards"]
    assert g["repeats"] == 2

    def timed(entry, n):
        return len(entry["times_ms"]) == n and entry["median_ms"] > 0

    mon = g["monitor"]
    assert mon["targets"] == 12 and mon["shape_groups"] == 3  # the tiny model's all_2d: 2 layers x 6
    assert timed(mon["before"], 5) and timed(mon["after"], 5) and mon["speedup"]["median"] > 0
    assert mon["srank_max_rel_diff"] < 1e-4  # one step of each path from the same vectors
    assert [m["targets"] for m in g["msign"]] == ["attention", "all_2d"]
    for m in g["msign"]:
        assert timed(m["before"], 2) and timed(m["after"], 2) and timed(m["after_without_stable_ranks"], 2)
        # The one-SVD path gives the old path's matrices and stable ranks.
        assert m["all_written"]
        assert m["matrix_max_abs_diff"] <= 1e-5 * m["matrix_max_abs"]
        assert m["srank_before_max_rel_diff"] < 1e-4 and m["srank_after_max_rel_diff"] < 1e-4
    assert {(a["targets"], a["backend"]) for a in g["apply"]} == {
        (t, b) for t in ("attention", "all_2d") for b in ("svd", "polar_express")
    }
    for a in g["apply"]:
        assert timed(a["log_true"], 2) and timed(a["log_false"], 2)
    md = out.with_suffix(".md").read_text()
    assert "| StableRank monitor" in md and "| MSign svd + stable ranks" in md and "Machine: " in md


def test_stability_quick_runs_and_writes_results(tmp_path, capsys):
    """The cells train one after the other in this process (``--jobs 1``) and leave it as they found it."""
    import random

    import torch

    before = (torch.get_num_threads(), dict(os.environ), random.getstate(), torch.get_rng_state())
    assert run_benchmark("stability", "--quick", "--out", str(tmp_path / "stab")) == 0
    assert (torch.get_num_threads(), dict(os.environ), random.getstate()) == before[:3]
    assert torch.equal(torch.get_rng_state(), before[3])
    capsys.readouterr()
    result = json.loads((tmp_path / "stab" / "stability.json").read_text())
    cells = {(c["method"], c["lr"]) for c in result["cells"]}
    assert cells == {(m, lr) for m in ("baseline", "msign_attn_p10") for lr in (0.003, 0.1)}
    for c in result["cells"]:  # every cell trained to the end or stopped at a recorded divergence step
        assert c["steps_done"] == 40 or c["diverged_step"] is not None
        assert (tmp_path / "stab" / "runs" / c["name"] / "version_0" / "metrics.csv").exists()
    assert set(result["analysis"]["per_method"]) == {"baseline", "msign_attn_p10"}
    md = (tmp_path / "stab" / "stability.md").read_text()
    assert "| baseline |" in md and "![lr_sweep](figures/lr_sweep.png)" in md
    for figure in ("lr_sweep.png", "lr0.1/report.png", "lr0.1/report.html", "lr0.003/report.png"):
        assert (tmp_path / "stab" / "figures" / figure).stat().st_size > 1000, figure

    # Saved cells are reused, not retrained: a tabulation-only run gives back the same analysis.
    assert run_benchmark("stability", "--quick", "--reuse-only", "--out", str(tmp_path / "stab")) == 0
    assert capsys.readouterr().err.count(": reused ") == 4
    assert json.loads((tmp_path / "stab" / "stability.json").read_text())["analysis"] == result["analysis"]


def test_optimizers_quick_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "opt"
    assert run_benchmark("optimizers", "--quick", "--out", str(out)) == 0
    capsys.readouterr()
    res = json.loads((out / "optimizers.json").read_text())

    def finite(x):
        return isinstance(x, float) and math.isfinite(x)

    per = res["train"]["per_method"]
    assert set(per) == {"adamw", "muon", "numuon_r0.25"}
    for m, pm in per.items():
        assert pm["tuned_lr"] == 0.01, m
        a = pm["at_tuned"]
        assert a["diverged"] == 0 and finite(a["final_val_loss"]) and a["final_val_loss"] < math.log(256), m
        assert finite(a["srank_end_mean"]) and 1.0 <= a["srank_end_min"] <= a["srank_end_mean"], m
        for key in ("0.5", "0.25"):
            t = a["truncation"][key]
            assert finite(t["val_loss"]) and finite(t["increase"]) and 0 < t["energy_kept_mean"] <= 1, (m, key)
        assert [s for s, *_ in a["srank_series"]] == [10, 20, 30, 40], m
        assert all(finite(v) for _, *vs in a["srank_series"] for v in vs), m
    assert finite(per["numuon_r0.25"]["at_tuned"]["captured_energy_mean"])
    for c in res["cells"]:  # every cell trained to the end, its own evaluation agreeing with Lightning's
        assert c["steps_done"] == 40 and c["n_matrices"] == 12, c["name"]
        assert abs(c["val_loss_eval"] - c["final_val_loss"]) < 1e-4, c["name"]
        assert (out / "runs" / c["name"] / "version_0" / "metrics.csv").exists()
    # Part 2: one guard on each optimizer, beside the unguarded run; MSign acted on the last step, so the
    # weights it was given are measured as well.
    rows = {(r["base"], r["guard"]): r for r in res["guards"]["rows"]}
    assert set(rows) == {(b, g) for b in ("muon", "numuon_r0.25") for g in (None, "msign_qk_p10")}
    for (base, guard), r in rows.items():
        assert finite(r["agg"]["final_val_loss"]) and finite(r["agg"]["truncation"]["0.25"]["val_loss"])
        if guard:
            assert r["agg"]["msign_applications"] == 4
            assert r["agg"]["srank_end_by_role"]["qk"] > r["agg"]["before_last_guard"]["srank_end_by_role"]["qk"]
    # Part 3: step times and ratios to AdamW.
    over = res["overhead"]["methods"]
    assert set(over) == {"adamw", "muon", "numuon_r0.25"}
    for m, r in over.items():
        for key in ("optimizer_step_vs_adamw", "train_step_vs_adamw"):
            assert len(r[key]["ratios"]) == 3 and finite(r[key]["median"]) and r[key]["median"] > 0, (m, key)
        assert r["optimizer_step"]["median_ms"] > 0 and r["train_step"]["median_ms"] > 0
    md = (out / "optimizers.md").read_text()
    assert "Machine: " in md and "python benchmarks/optimizers.py --quick" in md and "| numuon_r0.25 |" in md
    assert (out / "figures" / "stable_rank.png").stat().st_size > 1000

    # Saved cells and timings are reused, not recomputed.
    assert run_benchmark("optimizers", "--quick", "--reuse-only", "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert err.count(": reused ") == 8 and "training" not in err
    assert json.loads((out / "optimizers.json").read_text())["train"] == res["train"]



def test_stability_recommended_is_the_recipes_guard_and_the_retrofit_records_its_switches(tmp_path, capsys):
    """`recommended` builds whatever guard the main job's guarded recipe holds (recorded in the cell's spec, so a
    changed recipe trains the cell again); `qk_norm_retrofit` records each layer's switch step."""
    import yaml

    out = tmp_path / "stab"
    assert run_benchmark("stability", "--quick", "--methods", "recommended", "qk_norm_retrofit", "--lrs", "0.3",
                         "--seeds", "0", "--out", str(out)) == 0
    capsys.readouterr()
    recipe = yaml.safe_load((ROOT / "recipes" / "shakespeare" / "high_lr_guarded.yaml").read_text())
    guards = [c for c in recipe["trainer"]["callbacks"] if c["class_path"] == "lightning_msign.MSignCallback"]
    saved = json.loads((out / "cells" / "recommended_lr0.3_s0.json").read_text())
    assert saved["spec"]["recommended"] == [{"class_path": g["class_path"], "init_args": g["init_args"]}
                                           for g in guards]
    cells = {c["method"]: c for c in json.loads((out / "stability.json").read_text())["cells"]}
    assert cells["recommended"]["msign_triggers"] is not None
    steps = cells["qk_norm_retrofit"]["qk_norm_switch_steps"]
    assert len(steps) == 2 and all(s is None or 1 <= s <= 40 for s in steps)
    assert "## qk-norm retrofit: when the q/k norms switched on" in (out / "stability.md").read_text()

@pytest.mark.slow
def test_stability_with_curvature_and_architecture_warmup(tmp_path):
    """The curvature series and both warm-up methods run in the benchmark's cells and reach its tables; the two
    cells train side by side (``--jobs 2``: one process each, the benchmark's other way of running a cell)."""
    assert run_benchmark("stability", "--quick", "--lrs", "0.1", "--methods", "arch_warmup", "arch_warmup_curv",
                         "--curvature-every", "5", "--jobs", "2", "--out", str(tmp_path / "stab")) == 0
    cells = {c["method"]: c for c in json.loads((tmp_path / "stab" / "stability.json").read_text())["cells"]}
    assert set(cells) == {"arch_warmup", "arch_warmup_curv"}
    for cell in cells.values():
        assert cell["max_stability_ratio"] > 0 and cell["steps_done"] == 40
    # 2 blocks: 1 active, 1 unlocked at the end of the LR warm-up (step 5) unless the curvature holds it back.
    assert cells["arch_warmup"]["unlock_steps"] == [5]
    assert len(cells["arch_warmup_curv"]["unlock_steps"]) == 1 and 5 <= cells["arch_warmup_curv"]["unlock_steps"][0]
    md = (tmp_path / "stab" / "stability.md").read_text()
    assert "## Curvature (CurvatureMonitor)" in md and "| arch_warmup_curv | 0.1 | 0 |" in md


def test_pss_recovery_quick_resumes_exactly_and_writes_results(tmp_path):
    """Quick mode injects the failure (the loss x1000 at step 30, fp32, healthy LR): the failing run's onset is that
    step, the control resumed from the checkpoint fails there again (exact resume), and PSS fires first at the
    optimizer step that takes that gradient (step 31 in PSS's count), on any CPU: no chaotic path is read."""
    out = tmp_path / "rec"
    assert run_benchmark("pss_recovery", "--quick", "--out", str(out)) == 0
    res = json.loads((out / "pss_recovery.json").read_text())
    failing, variants = res["failing"], {v["variant"]: v for v in res["variants"]}
    assert set(variants) == {"control", "pss_qk_skip"}
    assert failing["onset"] is not None and failing["resume_step"] <= failing["onset"] - 5
    # The control adds nothing to the resumed run: it must fail again exactly where the run failed.
    assert variants["control"]["spiked_at"] == failing["onset"]
    assert failing["onset"] == res["settings"]["inject_spike"] == 30
    assert variants["control"]["triggers"] is None and variants["pss_qk_skip"]["triggers"][0] == failing["onset"] + 1
    for v in variants.values():
        steps = [int(s) for s in v["losses"]]
        assert steps == list(range(failing["resume_step"], 80))
    assert (out / "figures" / "report.png").stat().st_size > 1000
    assert not (out / "checkpoints").exists()
    md = (out / "pss_recovery.md").read_text()
    assert run_benchmark("pss_recovery", "--render-only", "--out", str(out)) == 0
    assert (out / "pss_recovery.md").read_text() == md  # the table is the JSON's


def test_zclip_and_skip_step_controls_act_on_outliers_only():
    """The stability benchmark's ZClip-style and skip-step controls: calm norms pass untouched; an outlier is
    clipped to mean + z std (ZClip) or its step skipped (skip-step)."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stability

    module = torch.nn.Linear(4, 4)
    direction = [torch.randn_like(p) for p in module.parameters()]
    scale = float(torch.nn.utils.get_total_norm(direction))

    def set_norm(norm):
        for p, d in zip(module.parameters(), direction):
            p.grad = d * (norm / scale)

    def total():
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    calm = [1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.02]
    zclip = stability._zclip_callback(z=2.5, alpha=0.97, warmup=5)
    for norm in calm:
        set_norm(norm)
        zclip.on_before_optimizer_step(None, module, None)
        assert total() == pytest.approx(norm, rel=1e-5)
    mean, std = zclip.mean, math.sqrt(zclip.var)
    set_norm(50.0)
    zclip.on_before_optimizer_step(None, module, None)
    assert total() == pytest.approx(mean + 2.5 * std, rel=1e-4) and zclip.clips == 1

    skip = stability._skip_step_callback(sigma=6.0, window=128, min_window=5)
    for norm in calm:
        set_norm(norm)
        skip.on_before_optimizer_step(None, module, None)
        assert total() == pytest.approx(norm, rel=1e-5)
    set_norm(50.0)
    skip.on_before_optimizer_step(None, module, None)
    assert total() is None and skip.skips == 1 and len(skip.kept) == len(calm)


def test_qk_clip_control_brings_a_hot_head_to_tau_and_leaves_the_others():
    """The stability benchmark's QK-Clip control on a real LitGPT (multi-head): a head whose largest logit is above
    tau has its Q and K rows scaled so that its largest logit becomes tau exactly; the other heads' rows and every
    other weight are untouched."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stability

    from lightning_msign import LitGPTModule
    from lightning_msign.functional import attention_logit_max_per_head
    from lightning_msign.models.base import attention_module, attention_probe, find_decoder

    torch.manual_seed(0)
    module = LitGPTModule({"n_layer": 2, "n_head": 4, "n_embd": 32, "bias": False}, vocab_size=256, block_size=16)
    qkv = module.model.transformer.h[1].attn.qkv.weight
    with torch.no_grad():
        qkv[8:16].mul_(60.0)  # head 1's query rows: its logits grow 60x
    ids = torch.randint(0, 256, (4, 16))

    def per_head(block: int) -> torch.Tensor:
        probe = attention_probe(attention_module(find_decoder(module).blocks[block]), keep=True)
        handles = probe.attach()
        with torch.no_grad():
            module.model(ids)
        for h in handles:
            h.remove()
        return attention_logit_max_per_head(probe.query, probe.key, probe.scale)

    before = [per_head(0), per_head(1)]
    tau = float(before[1][1]) / 3
    others = torch.cat([before[0], before[1][[0, 2, 3]]])
    assert float(before[1].max()) == float(before[1][1]) and float(others.max()) < tau
    weights = {n: p.detach().clone() for n, p in module.named_parameters()}
    clip = stability._qk_clip_callback(tau=tau)
    clip.on_fit_start(None, module)
    clip.on_train_batch_end(None, module, None, (ids, ids), 0)
    after = per_head(1)
    assert float(after[1]) == pytest.approx(tau, rel=1e-5) and clip.clips == 1
    assert torch.allclose(after[[0, 2, 3]], before[1][[0, 2, 3]], rtol=1e-6)
    changed = {n for n, p in module.named_parameters() if not torch.equal(p, weights[n])}
    assert changed == {"model.transformer.h.1.attn.qkv.weight"}
    rows = torch.nonzero((qkv != weights["model.transformer.h.1.attn.qkv.weight"]).any(dim=1)).flatten().tolist()
    assert rows == list(range(8, 16)) + list(range(32 + 8, 32 + 16))  # head 1's Q rows and K rows


def test_trigger_cost_quick_runs_and_writes_results(tmp_path):
    """The benchmark measures the guard the recipe recommends, as the recipe configures it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import trigger_cost

    assert run_benchmark("trigger_cost", "--quick", "--out", str(tmp_path / "tc")) == 0
    result = json.loads((tmp_path / "tc.json").read_text())
    assert result["recommended_guard"] == trigger_cost.recommended_msign()
    assert result["check_every"] == result["recommended_guard"].get("check_every", 1)
    assert set(result["stats"]) == {"train step", "train steps", "train steps, recommended guard",
                                    "train step, check from its forward", "check by a second forward",
                                    "check + sign", "check + sign + sranks"}
    assert all(len(s["times_ms"]) == 3 for s in result["stats"].values())
    ratios = result["ratios_to_train_step"]
    differences = ("check from the training forward", "recommended guard")  # differences of two arms: any sign
    assert all(r["median"] > 0 for name, r in ratios.items() if name not in differences)
    assert all(len(ratios[name]["ratios"]) == 3 for name in differences)
    text = (tmp_path / "tc.md").read_text()
    assert "| check + sign of every Q/K block" in text and "adds to a healthy run's step" in text


def test_lr_jump_is_reapplied_after_a_rollback_to_a_snapshot_from_before_it(tmp_path):
    """The benchmark's raised LR is a configuration change: a rollback to a pre-jump snapshot must not undo it."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import stability
    from lightning.pytorch import Trainer, seed_everything
    from test_rollback import Injecting, LRRecorder, data

    from lightning_msign import RollbackCallback

    from conftest import trainer_kwargs

    def run(callbacks, inject):
        seed_everything(3, verbose=False)
        recorder = LRRecorder()
        trainer = Trainer(**trainer_kwargs(tmp_path, max_steps=10), callbacks=[*callbacks, recorder])
        trainer.fit(Injecting(inject), data())
        return trainer, recorder

    # Snapshot after step 3, jump before step 4, NaN at step 5: the rollback restores the pre-jump schedule.
    guard = RollbackCallback(snapshot_every=3, z_threshold=None)
    trainer, rolled = run([guard, stability._lr_jump_callback(3, 10.0)], {5: float("nan")})
    assert guard.guard.rollback_steps == [5] and guard.guard.skipped[0]["restored_to"] == 3
    _, plain = run([], {})
    base = plain.lrs
    assert rolled.lrs[4] == pytest.approx(10 * base[4], rel=1e-12)
    for step in range(6, 11):  # the schedule resumed from step 3, at the raised rate
        assert rolled.lrs[step] == pytest.approx(10 * base[step - 2], rel=1e-12), step
    base_lrs = trainer.lr_scheduler_configs[0].scheduler.base_lrs
    assert base_lrs and all(lr == pytest.approx(10 * 3e-3, rel=1e-12) for lr in base_lrs)
