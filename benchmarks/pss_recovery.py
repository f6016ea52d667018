#!/usr/bin/env python
"""PSS recovery benchmark: from a checkpoint just before a failure, does switching PSS on save the run?

1. A *failing* run (default: the stability benchmark's 12x64 LitGPT, byte Shakespeare, no gradient
   clipping, ``bf16-mixed``, peak lr 1.0, warm-up 100, linear decay over 1000 steps) is trained with a
   checkpoint every ``--ckpt-every`` steps until it fails. The *failure onset* is the first step whose
   training loss is more than ``--spike`` above the mean of the previous 20 steps; the run is stopped
   ``--after-onset`` steps later (enough to see it not recover).
2. From the last checkpoint at least ``--before`` steps before the onset, the run is resumed (exact
   resume: same weights, optimizer moments, LR schedule and data order) once per variant until step
   ``--until``, each variant adding only its own callback:

   ``control``             nothing (must fail again at the same step: checks the resume is exact)
   ``pss_qk``              ``PSSCallback(tau, warmup_steps=0, targets="qk")`` (smooth Q and K)
   ``pss_qk_skip``         the same with ``action="smooth_and_skip"`` (smooth, and skip the update)
   ``pss_all2d_skip``      ``targets="all_2d"``, ``action="smooth_and_skip"``
   ``skip_only``           ``action="skip"``: the detector's update skip alone, no smoothing
   ``msign_attn``          ``MSignCallback(period=10, targets="attention", backend="polar_express")``

A variant *resumes descending* when its final training loss (mean of the last ``--window`` steps) is
``--margin`` below the mean loss of the ``--window`` steps before the checkpoint; the table also gives
where it spiked (same onset test as the failing run), its worst ``--window``-step mean and its PSS
triggers, and the JSON keeps every variant's loss curve.

Usage::

    python benchmarks/pss_recovery.py                    # ~10 min on 2 CPU cores
    python benchmarks/pss_recovery.py --lr 0.7 --until 600

Writes ``--out`` (default ``benchmarks/results/pss_recovery``): ``pss_recovery.json``,
``pss_recovery.md`` and a ``lightning-msign report`` figure of all variants (``figures/report.png``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional

# A sibling module: Python puts the script's own folder (benchmarks/) first on sys.path.
from stability import MODEL_QUICK, MODEL_12x64, machine_line

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "pss_recovery"
VARIANTS = ["control", "pss_qk", "pss_qk_skip", "pss_all2d_skip", "skip_only", "msign_attn"]


def _callbacks(variant: str, tau: float) -> list[Any]:
    from lightning_msign import MSignCallback, PSSCallback

    if variant == "control":
        return []
    if variant == "pss_qk":
        return [PSSCallback(tau=tau, warmup_steps=0, targets="qk")]
    if variant == "pss_qk_skip":
        return [PSSCallback(tau=tau, warmup_steps=0, targets="qk", action="smooth_and_skip")]
    if variant == "pss_all2d_skip":
        return [PSSCallback(tau=tau, warmup_steps=0, targets="all_2d", action="smooth_and_skip")]
    if variant == "skip_only":
        return [PSSCallback(tau=tau, warmup_steps=0, targets="qk", action="skip")]
    if variant == "msign_attn":
        return [MSignCallback(period=10, targets="attention", backend="polar_express")]
    raise ValueError(f"`variant` must be one of {VARIANTS}, got {variant!r}")


def _train(args: argparse.Namespace, name: str, extra: list[Any], stop_at: int, ckpt_dir: Optional[Path],
           ckpt_path: Optional[str], stop_after_onset: bool, history: Optional[dict[int, float]] = None
           ) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from lightning_msign import DiagnosticsMonitor, LitGPTModule, PSSCallback, ShakespeareDataModule, StableRankMonitor

    class Watch(Callback):
        """Records every training loss and gradient norm; finds the onset; stops at ``stop_at``."""

        def __init__(self) -> None:
            self.losses: dict[int, float] = dict(history or {})  # a resumed run sees the steps before it
            self.grad_norms: dict[int, float] = {}
            self.onset: Optional[int] = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            if grads:
                self.grad_norms[trainer.global_step] = float(torch.nn.utils.get_total_norm(grads))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step  # after the update: the loss was computed at step - 1
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            self.losses[step - 1] = loss
            prev = [self.losses[s] for s in range(step - 21, step - 1) if s in self.losses]
            spiked = not math.isfinite(loss) or (len(prev) == 20 and loss > sum(prev) / 20 + args.spike)
            if self.onset is None and spiked:
                self.onset = step - 1
            if (stop_after_onset and self.onset is not None and step - 1 >= self.onset + args.after_onset) \
                    or not math.isfinite(loss) or step >= stop_at:
                trainer.should_stop = True

    class Spiking(LitGPTModule):
        """LitGPTModule whose training loss (hence gradient) is multiplied by ``--inject-factor`` at optimizer step
        ``--inject-spike``: a failure at a chosen step, the same on every CPU (a natural one is a chaotic path)."""

        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            if args.inject_spike is not None and self.trainer.global_step == args.inject_spike:
                loss = loss * args.inject_factor
            return loss

    pl.seed_everything(args.seed, verbose=False)
    module = Spiking(
        args.model, vocab_size=256, block_size=args.seq_len, lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95),
        warmup_steps=args.warmup, lr_decay="linear", min_lr_ratio=0.1, max_steps=args.steps,
    )
    data = ShakespeareDataModule(tokenizer="byte", seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    watch = Watch()
    callbacks: list[Any] = [watch, *extra,
                            StableRankMonitor(targets="attention", every_n_steps=5, log_grad_norm=True),
                            DiagnosticsMonitor(every_n_steps=5)]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step}", every_n_train_steps=args.ckpt_every,
                                         save_top_k=-1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision=args.precision, max_steps=args.steps, gradient_clip_val=None,
        val_check_interval=None, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        enable_checkpointing=ckpt_dir is not None, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, logger=CSVLogger(args.out / "runs", name=name, version=0),
    )
    t0 = time.perf_counter()
    trainer.fit(module, data, ckpt_path=ckpt_path)
    pss = next((c.guard for c in extra if isinstance(c, PSSCallback)), None)
    return {"name": name, "losses": watch.losses, "grad_norms": watch.grad_norms, "onset": watch.onset,
            "last_step": trainer.global_step, "wall_s": time.perf_counter() - t0,
            "triggers": list(pss.trigger_steps) if pss is not None else None,
            "log_dir": str(args.out / "runs" / name / "version_0")}


def _mean(losses: dict[int, float], lo: int, hi: int) -> float:
    vals = [v for s, v in losses.items() if lo <= s < hi]
    return sum(vals) / len(vals) if vals and all(math.isfinite(v) for v in vals) else float("nan")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny model, 2 variants (~1 min)")
    parser.add_argument("--model", type=json.loads, default=None, help="litgpt Config fields as JSON (default 12x64)")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000, help="max_steps of the LR schedule")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--tau", type=float, default=2.5)
    parser.add_argument("--ckpt-every", type=int, default=5)
    parser.add_argument("--spike", type=float, default=1.0, help="loss jump over the last 20 steps' mean = onset")
    parser.add_argument("--after-onset", type=int, default=40, help="steps the failing run goes on after the onset")
    parser.add_argument("--before", type=int, default=5, help="resume from a checkpoint at least this before the onset")
    parser.add_argument("--until", type=int, default=400, help="resumed variants run to this step")
    parser.add_argument("--window", type=int, default=20, help="steps averaged for the final loss")
    parser.add_argument("--margin", type=float, default=0.05, help="'descending': final loss this below the start")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--inject-spike", type=int, default=None, metavar="STEP",
                        help="multiply the training loss at optimizer step STEP by --inject-factor (default: none, "
                        "the run fails by itself; --quick: step 30)")
    parser.add_argument("--inject-factor", type=float, default=1000.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--render-only", action="store_true", help="rewrite the table from --out's saved JSON")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    for name in ("lr", "tau", "spike", "margin"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)!r}")

    if args.render_only:
        res = json.loads((args.out / "pss_recovery.json").read_text())
        figure = args.out / "figures" / "report.png"
        md = render(res) + ("\n![report](figures/report.png)\n" if figure.exists() else "")
        (args.out / "pss_recovery.md").write_text(md)
        print(md)
        return 0
    if args.quick:
        args.model = args.model or MODEL_QUICK
        # A healthy LR in fp32 with a spike injected at step 30: the onset and the trigger are the same on any CPU
        # (the natural LR-3 bf16 failure follows another path on another CPU's kernels).
        args.lr, args.warmup, args.steps, args.until, args.after_onset = 3e-3, 10, 200, 80, 10
        args.batch_size, args.seq_len, args.variants = 8, 64, ["control", "pss_qk_skip"]
        args.precision = "32-true"
        args.inject_spike = 30 if args.inject_spike is None else args.inject_spike
    args.model = args.model or MODEL_12x64
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = args.out / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    shutil.rmtree(args.out / "runs", ignore_errors=True)
    wall0 = time.perf_counter()

    failing = _train(args, "failing", [], stop_at=args.steps, ckpt_dir=ckpt_dir, ckpt_path=None, stop_after_onset=True)
    if failing["onset"] is None:
        print(f"the run did not fail in {args.steps} steps at lr {args.lr}: nothing to recover", file=sys.stderr)
        return 1
    onset = failing["onset"]
    ckpts = sorted((int(p.stem.split("=")[1]), p) for p in ckpt_dir.glob("step=*.ckpt"))
    usable = [(s, p) for s, p in ckpts if s <= onset - args.before]
    if not usable:
        print(f"no checkpoint {args.before} steps before the onset at step {onset}", file=sys.stderr)
        return 1
    resume_step, resume_path = usable[-1]
    base_loss = _mean(failing["losses"], resume_step - args.window, resume_step)
    onset_level = _mean(failing["losses"], onset, onset + args.window)
    print(f"failing run: onset at step {onset}, resuming from step {resume_step} (loss {base_loss:.3f})",
          file=sys.stderr, flush=True)

    results = []
    for variant in args.variants:
        history = {s: v for s, v in failing["losses"].items() if s < resume_step}
        run = _train(args, variant, _callbacks(variant, args.tau), stop_at=args.until, ckpt_dir=None,
                     ckpt_path=str(resume_path), stop_after_onset=False, history=history)
        losses = {s: v for s, v in run["losses"].items() if s >= resume_step}
        final = _mean(losses, run["last_step"] - args.window, run["last_step"])
        worst = max((_mean(losses, s, s + args.window) for s in range(resume_step, run["last_step"] - args.window + 1)),
                    key=lambda v: v if math.isfinite(v) else float("inf"), default=float("nan"))
        descending = run["last_step"] >= args.until and math.isfinite(final) and final < base_loss - args.margin
        results.append({"variant": variant, "spiked_at": run["onset"], "last_step": run["last_step"],
                        "final_train_loss": final, "worst_window_loss": worst, "descending": descending,
                        "triggers": run["triggers"],
                        "max_grad_norm": max(run["grad_norms"].values(), default=float("nan")),
                        "wall_s": run["wall_s"], "log_dir": run["log_dir"],
                        "losses": {str(k): v for k, v in sorted(losses.items())}})
        print(f"  {variant}: final {final:.3f}, spiked at {run['onset']}, descending {descending}", file=sys.stderr,
              flush=True)

    res = {
        "machine": machine_line(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python", "benchmarks/pss_recovery.py", *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "failing": {"onset": onset, "last_step": failing["last_step"], "resume_step": resume_step,
                    "loss_before": base_loss, "loss_after_onset": onset_level,
                    "max_grad_norm": max(failing["grad_norms"].values(), default=float("nan"))},
        "variants": results,
        "wall_time_s": time.perf_counter() - wall0,
    }
    (args.out / "pss_recovery.json").write_text(json.dumps(res, indent=2) + "\n")
    figure = None
    try:
        from lightning_msign.report import load_run, render_report

        runs = [load_run(failing["log_dir"], label="failing (no resume)")]
        runs += [load_run(r["log_dir"], label=r["variant"]) for r in results]
        figure, _ = render_report(runs, args.out / "figures", title=f"resume at step {resume_step}, lr {args.lr:g}")
    except ValueError as err:  # nothing drawable: the table still stands
        print(f"no figure: {err}", file=sys.stderr)
    md = render(res) + (f"\n![report]({figure.relative_to(args.out).as_posix()})\n" if figure else "")
    (args.out / "pss_recovery.md").write_text(md)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    print(md)
    return 0


def back_at(r: dict[str, Any], level: float, window: int) -> Optional[int]:
    """First step after the variant's spike from which the mean loss of ``window`` steps is back below ``level``."""
    losses = {int(k): v for k, v in r["losses"].items()}
    start = r["spiked_at"] if r["spiked_at"] is not None else min(losses)
    for step in range(start, max(losses) - window + 2):
        vals = [losses[s] for s in range(step, step + window) if s in losses]
        if len(vals) == window and all(math.isfinite(v) for v in vals) and sum(vals) / window < level:
            return step
    return None


def render(res: dict[str, Any]) -> str:
    f, s = res["failing"], res["settings"]
    level = f["loss_before"] + s["spike"] / 2
    lines = [
        "# lightning_msign PSS recovery benchmark", "",
        f"Machine: {res['machine']}. Wall time {res['wall_time_s']:.0f} s. Command: `{res['command']}`", "",
        f"Failing run: LitGPT {json.dumps(s['model'])}, lr {s['lr']:g}, {s['precision']}, no clipping, warm-up "
        f"{s['warmup']}, seed {s['seed']}. Loss spike onset at step {f['onset']} (mean of the next {s['window']} steps "
        f"{f['loss_after_onset']:.2f}; max gradient norm {f['max_grad_norm']:.3g}). Resumed from the checkpoint at "
        f"step {f['resume_step']} (mean training loss before it {f['loss_before']:.3f}) to step {s['until']}.", "",
        "| variant | spiked at | back below before + spike/2 from | reached step | final train loss "
        "| worst 20-step loss | PSS triggers | max grad norm | resumed descending | wall s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in res["variants"]:
        trig = "-" if r["triggers"] is None else str(len(r["triggers"]))
        back = back_at(r, level, s["window"])
        lines.append(f"| {r['variant']} | {r['spiked_at'] if r['spiked_at'] is not None else '-'} "
                     f"| {back if back is not None else 'never'} | {r['last_step']} "
                     f"| {r['final_train_loss']:.3f} | {r['worst_window_loss']:.3f} | {trig} "
                     f"| {r['max_grad_norm']:.3g} "
                     f"| {'yes' if r['descending'] else 'no'} | {r['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
