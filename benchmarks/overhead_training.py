"""Part 1 of the overhead benchmark: training-step overhead of MSign and StableRankMonitor, interleaved arms.

One real ``lightning.Trainer`` per configuration (baseline, MSign with each backend, StableRankMonitor
every step), each with its own ``LitGPTModule`` (same seed) on the shipped Shakespeare corpus. Every
Trainer runs ``fit`` in its own thread and a :class:`Baton` lets exactly one of them train at a time, one
optimizer step per turn, in a fresh random order every cycle; a timing callback (the last of each
callback list) measures each turn. See ``benchmarks/README.md`` for how to read the results.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from common import (
    BACKENDS,
    bootstrap_median_ci,
    clock,
    log,
    median,
    pct,
    quartiles,
    quiet_measured_code,
)
from overhead_settings import MONITOR_TARGET, MSIGN_TARGET, Settings


class Baton:
    """Turn-taking between the Trainers' threads: exactly one of them trains at any time.

    A cycle gives every configuration one turn (one optimizer step), in a fresh random order. Before each
    new cycle ``should_stop(completed_cycles, seconds_since_start, mean_cycle_seconds)`` decides whether
    to stop; then every waiting thread is released with ``False``.
    """

    def __init__(self, names: list[str], seed: int, should_stop: Callable[[int, float, float], bool]) -> None:
        self._cond = threading.Condition()
        self._names = list(names)
        self._queue: list[str] = []
        self._turn: Optional[str] = None
        self._rng = random.Random(seed)
        self._should_stop = should_stop
        self._start: Optional[float] = None
        self._cycle_starts: list[float] = []
        self.cycle = 0
        self.stopped = False

    def _advance(self) -> None:  # with the lock held
        if not self._queue:
            now = time.perf_counter()
            if self._start is None:
                self._start = now
            starts = self._cycle_starts
            mean_cycle = (now - starts[0]) / len(starts) if starts else 0.0
            if self._should_stop(self.cycle, now - self._start, mean_cycle):
                self.stopped, self._turn = True, None
                self._cond.notify_all()
                return
            self.cycle += 1
            self._cycle_starts.append(now)
            self._queue = self._names[:]
            self._rng.shuffle(self._queue)
        self._turn = self._queue.pop(0)
        self._cond.notify_all()

    def wait(self, name: str) -> bool:
        """Block until it is ``name``'s turn (True) or the run is over (False)."""
        with self._cond:
            if self._start is None and not self.stopped:  # the first thread ready to train starts the clock
                self._advance()
            while not self.stopped and self._turn != name:
                self._cond.wait()
            return not self.stopped

    def done(self, name: str) -> None:
        """``name`` finished its step: hand the baton on."""
        with self._cond:
            if self._turn == name:
                self._advance()

    def abort(self) -> None:
        with self._cond:
            self.stopped, self._turn = True, None
            self._cond.notify_all()


def lightning_pieces() -> dict[str, Any]:
    """Import Lightning and the package lazily (so ``--help`` is instant) and build the timing classes.

    The timed callbacks override public hooks only (and call them); the monitor's guard is a subclass of
    :class:`~lightning_msign.StableRank` whose public ``step`` is timed, handed to the callback with
    ``StableRankMonitor.from_guard``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers.logger import Logger
    from typing_extensions import override

    from lightning_msign import LitGPTModule, MSignCallback, ShakespeareDataModule, StableRank, StableRankMonitor

    class RecordingLogger(Logger):
        """In-memory logger (every configuration has one, so the cost of Lightning's own logging is equal)."""

        def __init__(self) -> None:
            super().__init__()
            self.rows: list[tuple[Optional[int], dict[str, float]]] = []

        @property
        def name(self) -> str:
            return "recording"

        @property
        def version(self) -> int:
            return 0

        @override
        def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
            self.rows.append((step, dict(metrics)))

        @override
        def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
            pass

    class TurnTimer(Callback):
        """Takes turns on the baton and times each turn; must be the last callback of its Trainer."""

        def __init__(self, name: str, baton: Baton) -> None:
            self.name = name
            self.baton = baton
            self.records: list[dict[str, Any]] = []
            self._start: tuple[float, float] = (0.0, 0.0)

        def _take_turn(self, trainer: L.Trainer, device: torch.device) -> None:
            if self.baton.wait(self.name):
                self._start = (clock(device), time.process_time())
            else:
                trainer.should_stop = True

        @override
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._take_turn(trainer, pl_module.device)

        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            wall, cpu = clock(pl_module.device), time.process_time()  # CPU time of the process, all threads
            self.records.append({
                "cycle": self.baton.cycle, "step": trainer.global_step,
                "s": wall - self._start[0], "cpu_s": cpu - self._start[1],
            })
            self.baton.done(self.name)
            self._take_turn(trainer, pl_module.device)

    class TimedMSign(MSignCallback):
        """The real MSignCallback, with its ``on_train_batch_end`` hook timed at application steps."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.hook_ms: list[tuple[int, float]] = []

        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            before, t0 = self.guard.applications, clock(pl_module.device)
            super().on_train_batch_end(trainer, pl_module, *args)
            if self.guard.applications != before:
                self.hook_ms.append((trainer.global_step, (clock(pl_module.device) - t0) * 1e3))

    class TimedStableRank(StableRank):
        """The real StableRank guard, with its public ``step`` (measurement + metrics) timed."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.step_ms: dict[int, float] = {}
            super().__init__(*args, **kwargs)

        @override
        def step(self, step: Optional[int] = None) -> dict[str, float]:
            device = self.matrices[0].param.device if self.matrices else torch.device("cpu")
            t0 = clock(device)
            out = super().step(step)
            if out and step is not None:
                self.step_ms[int(step)] = (clock(device) - t0) * 1e3
            return out

    class TimedMonitor(StableRankMonitor):
        """The real StableRankMonitor (over a :class:`TimedStableRank`), with its two hooks timed per step."""

        hook_ms: dict[int, dict[str, float]]  # step -> {"grad_norm", "batch_end"} (ms)

        @override
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            t0 = clock(pl_module.device)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.hook_ms[trainer.global_step + 1]["grad_norm"] = (clock(pl_module.device) - t0) * 1e3

        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            t0 = clock(pl_module.device)
            super().on_train_batch_end(trainer, pl_module, *args)
            self.hook_ms[trainer.global_step]["batch_end"] = (clock(pl_module.device) - t0) * 1e3

    def timed_monitor(targets: str) -> TimedMonitor:
        callback = TimedMonitor.from_guard(TimedStableRank(None, targets=targets, every_n_steps=1, mode="power"))
        callback.hook_ms = defaultdict(dict)
        return callback

    return dict(
        L=L, LitGPTModule=LitGPTModule, ShakespeareDataModule=ShakespeareDataModule, RecordingLogger=RecordingLogger,
        TurnTimer=TurnTimer, TimedMSign=TimedMSign, timed_monitor=timed_monitor,
    )


@dataclass
class Arm:
    """One configuration: its model, data, Trainer, callbacks and timer."""

    name: str
    label: str
    module: Any
    datamodule: Any
    trainer: Any
    timer: Any
    logger: Any
    msign: Any = None
    monitor: Any = None


def build_arms(s: Settings, pieces: dict[str, Any], cache_dir: str, baton: Baton) -> list[Arm]:
    L = pieces["L"]
    specs: list[tuple[str, str, Optional[str], bool]] = [
        ("baseline", "no callback (baseline)", None, False),
        *((f"msign_{b}", f"MSign P={s.period}, backend {b}", b, False) for b in BACKENDS),
        ("monitor", "StableRankMonitor every step (power, all_2d)", None, True),
    ]
    arms = []
    for name, label, backend, monitor in specs:
        L.seed_everything(s.seed, verbose=False)  # the same initial weights for every configuration
        # One data module each (they read the cache built in `run_training_part`; no shared state across threads).
        datamodule = pieces["ShakespeareDataModule"](seq_len=s.seq_len, batch_size=s.batch_size, cache_dir=cache_dir)
        module = pieces["LitGPTModule"](
            dict(s.model), vocab_size=datamodule.vocab_size, block_size=s.seq_len,
            lr=6e-4, warmup_steps=10, max_steps=100_000,
        )
        callbacks: list[Any] = []
        msign_cb = monitor_cb = None
        if backend is not None:
            # Timed runs apply every k steps, so that applications happen within the run (see the README).
            msign_cb = pieces["TimedMSign"](period=s.timing_period, targets=s.msign_targets, backend=backend)
            callbacks.append(msign_cb)
        if monitor:
            monitor_cb = pieces["timed_monitor"](s.monitor_targets)
            callbacks.append(monitor_cb)
        timer = pieces["TurnTimer"](name, baton)
        callbacks.append(timer)  # last: its on_train_batch_end runs after the other callbacks'
        logger = pieces["RecordingLogger"]()
        trainer = L.Trainer(
            accelerator="gpu" if s.device == "cuda" else "cpu", devices=1, precision=s.precision,
            max_steps=s.warmup_steps + s.max_timed_steps + 1,  # the baton stops it earlier
            logger=logger, callbacks=callbacks, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        )
        arms.append(Arm(name, label, module, datamodule, trainer, timer, logger, msign_cb, monitor_cb))
    return arms


def run_interleaved(arms: list[Arm], baton: Baton) -> float:
    """Fit every Trainer in its own thread; the baton makes them take turns. Returns the elapsed seconds."""
    errors: list[BaseException] = []

    def fit(arm: Arm) -> None:
        try:
            arm.trainer.fit(arm.module, datamodule=arm.datamodule)
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
            errors.append(err)
            baton.abort()

    start = time.perf_counter()
    threads = [threading.Thread(target=fit, args=(arm,), name=f"fit-{arm.name}", daemon=True) for arm in arms]
    try:
        with quiet_measured_code():
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(timeout=0.5)
    except BaseException:
        baton.abort()
        raise
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def _paired_stats(arm_steps: dict[int, float], base_steps: dict[int, float], cycles: list[int], app: set[int],
                  seed: int) -> dict[str, Any]:
    """Ratios to the baseline's step of the same cycle, and the residual of application steps."""
    ordinary = [c for c in cycles if c not in app and c in arm_steps and c in base_steps]
    ratios = [arm_steps[c] / base_steps[c] for c in ordinary]
    r = median(ratios)
    residual = {c: arm_steps[c] - r * base_steps[c] for c in cycles if c in arm_steps and c in base_steps}
    excess = [residual[c] for c in cycles if c in app and c in residual]
    lo, hi = quartiles(ratios)
    ci = bootstrap_median_ci(ratios, seed)
    return {
        "median_step_ms": median([arm_steps[c] for c in ordinary]),
        "ratio_median": r, "ratio_q1": lo, "ratio_q3": hi, "ratio_ci95": list(ci), "ratios": ratios,
        "excess_ms": median(excess), "excess_per_application_ms": excess,
        "noise_ms": median([abs(residual[c]) for c in ordinary]),  # typical |residual| of an ordinary step
    }


def analyse_training(s: Settings, arms: list[Arm]) -> dict[str, Any]:
    from lightning_msign import metric_keys as keys

    k, warm = s.timing_period, s.warmup_steps
    steps: dict[str, dict[str, dict[int, float]]] = {}
    for arm in arms:
        steps[arm.name] = {
            key: {rec["step"]: rec[key] * 1e3 for rec in arm.timer.records if rec["step"] > warm}
            for key in ("s", "cpu_s")
        }
    base = steps["baseline"]
    cycles = sorted(set.intersection(*(set(v["s"]) for v in steps.values())))
    app = {c for c in cycles if c % k == 0}
    base_ord = [base["s"][c] for c in cycles if c not in app]
    base_median = median(base_ord)
    out: dict[str, Any] = {
        "timed_steps_per_config": len(cycles),
        "msign_applications_timed": len(app),
        "baseline_median_step_ms": base_median,
        "baseline_step_iqr_ms": list(quartiles(base_ord)),
        "baseline_median_step_cpu_ms": median([base["cpu_s"][c] for c in cycles if c not in app]),
        "configs": [],
    }
    for arm in arms:
        w = _paired_stats(steps[arm.name]["s"], base["s"], cycles, app, s.seed)
        c = _paired_stats(steps[arm.name]["cpu_s"], base["cpu_s"], cycles, app, s.seed)
        row: dict[str, Any] = {"name": arm.name, "label": arm.label, "wall": w, "cpu": c}
        if arm.msign is not None:
            hook = [ms for step, ms in arm.msign.hook_ms if step > warm]
            logged = [m[keys.MSIGN_TIME_MS] for step, m in arm.logger.rows
                      if keys.MSIGN_TIME_MS in m and step is not None and step + 1 > warm]
            row.update(
                applications=arm.msign.guard.applications,
                application_hook_ms=median(hook),
                application_time_ms_logged=median(logged),
                amortized_overhead=median(hook) / (s.period * base_median),
                in_loop_overhead=w["excess_ms"] / (s.period * base_median),
                in_loop_overhead_cpu=c["excess_ms"] / (s.period * out["baseline_median_step_cpu_ms"]),
                target=MSIGN_TARGET,
            )
            row["met"] = bool(row["amortized_overhead"] <= MSIGN_TARGET)
        elif arm.monitor is not None:
            step_ms = arm.monitor.guard.step_ms
            per_step = {st: {**v, "step": step_ms.get(st, 0.0)} for st, v in arm.monitor.hook_ms.items()
                        if st > warm and "batch_end" in v}
            parts = {key: median([v.get(key, 0.0) for v in per_step.values()])
                     for key in ("grad_norm", "batch_end", "step")}
            hook = median([v.get("grad_norm", 0.0) + v["batch_end"] for v in per_step.values()])
            row.update(
                hook_ms_per_step=hook, hook_parts_ms=parts, amortized_overhead=hook / base_median,
                measured_overhead=w["ratio_median"] - 1.0, measured_overhead_cpu=c["ratio_median"] - 1.0,
                target=MONITOR_TARGET,
            )
            row["met"] = bool(row["amortized_overhead"] <= MONITOR_TARGET)
        out["configs"].append(row)
    return out


def run_training_part(s: Settings, cache_dir: str) -> tuple[dict[str, Any], Any]:
    """Train the configurations interleaved; returns the analysis and the trained baseline LitGPTModule."""
    pieces = lightning_pieces()  # imports Lightning, which configures its loggers: quieten them afterwards
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    # Build the token cache once, here, before the Trainers' threads read it.
    pieces["ShakespeareDataModule"](seq_len=s.seq_len, batch_size=s.batch_size, cache_dir=cache_dir).prepare_data()

    def should_stop(completed: int, elapsed: float, mean_cycle: float) -> bool:
        timed = completed - s.warmup_steps
        if timed >= s.max_timed_steps:
            return True
        return timed >= s.min_timed_steps and elapsed + mean_cycle > s.train_budget_s

    names = ["baseline", *(f"msign_{b}" for b in BACKENDS), "monitor"]
    baton = Baton(names, s.seed, should_stop)
    arms = build_arms(s, pieces, cache_dir, baton)
    n_params = sum(p.numel() for p in arms[0].module.parameters())
    cfg = arms[0].module.config
    log(f"training part: {len(arms)} configurations interleaved step by step, LitGPT {cfg.n_layer}x{cfg.n_embd} "
        f"({n_params / 1e6:.2f}M params), batch {s.batch_size}x{s.seq_len}, {s.precision} on {s.device}")
    elapsed = run_interleaved(arms, baton)
    result = analyse_training(s, arms)
    result.update(train_time_s=elapsed, cycles=baton.cycle)
    result["model"] = {
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab_size": cfg.padded_vocab_size,
        "mlp_class": cfg.mlp_class_name, "intermediate_size": cfg.intermediate_size, "parameters": n_params,
    }
    log(f"  {baton.cycle} cycles in {elapsed:.0f} s")
    return result, arms[0].module


# --------------------------------------------------------------------------- report
def _ratio_cell(st: dict[str, Any]) -> str:
    lo, hi = st["ratio_ci95"]
    return f"{st['ratio_median']:.3f} [{st['ratio_q1']:.3f}, {st['ratio_q3']:.3f}] ({lo:.3f}-{hi:.3f})"


def render_training(s: dict[str, Any], tr: dict[str, Any]) -> list[str]:
    md, k, P = tr["model"], s["timing_period"], s["period"]
    lines = [
        "",
        "## 1. Training-step overhead",
        "",
        f"LitGPT {md['n_layer']} layers, n_embd {md['n_embd']}, {md['n_head']} heads, {md['mlp_class']} "
        f"{md['intermediate_size']}, byte vocabulary {md['vocab_size']} ({md['parameters'] / 1e6:.2f}M parameters); "
        f"ShakespeareDataModule seq {s['seq_len']} x batch {s['batch_size']}; AdamW; precision `{s['precision']}` on "
        f"`{s['device']}`; {s['threads']} torch thread(s). MSign targets `{s['msign_targets']}`; monitor targets "
        f"`{s['monitor_targets']}` (mode power, 1 iteration).",
        f"Interleaved step by step: {len(tr['configs'])} Trainers in threads take turns, one optimizer step each per "
        f"cycle, in a random order every cycle; {tr['timed_steps_per_config']} timed steps per configuration after "
        f"{s['warmup_steps']} warm-up steps; {tr['train_time_s']:.0f} s of training. Baseline step: median "
        f"{tr['baseline_median_step_ms']:.0f} ms (IQR {tr['baseline_step_iqr_ms'][0]:.0f}-"
        f"{tr['baseline_step_iqr_ms'][1]:.0f} ms). In the timed runs MSign applies every {k} steps "
        f"({tr['msign_applications_timed']} timed applications each); the overheads are for P = {P}.",
        "",
        "| configuration | median step, wall / CPU (ms) | step-time ratio vs baseline, wall: median [IQR] (95% CI) "
        "| same, CPU time | excess of MSign steps (ms) +- typical residual | callback time (ms) "
        "| overhead measured in the loop | overhead amortized | target | met |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for c in tr["configs"]:
        w, cp = c["wall"], c["cpu"]
        head = (f"| {c['label']} | {w['median_step_ms']:.0f} / {cp['median_step_ms']:.0f} | {_ratio_cell(w)} "
                f"| {_ratio_cell(cp)} ")
        excess = f"{w['excess_ms']:+.0f} +- {w['noise_ms']:.0f}"
        if c["name"] == "baseline":
            lines.append(head + "| - | - | - | - | - | - |")
        elif c["name"] == "monitor":
            lines.append(
                head + f"| {excess} (no application: noise) | {c['hook_ms_per_step']:.1f} per step "
                f"| {pct(c['measured_overhead'])} wall, {pct(c['measured_overhead_cpu'])} CPU (ratio - 1) "
                f"| {pct(c['amortized_overhead'])} | <= {100 * c['target']:g}% | {'yes' if c['met'] else 'NO'} |"
            )
        else:
            lines.append(
                head + f"| {excess} | {c['application_hook_ms']:.0f} per application "
                f"(`msign/time_ms` {c['application_time_ms_logged']:.0f}) "
                f"| {pct(c['in_loop_overhead'])} wall, {pct(c['in_loop_overhead_cpu'])} CPU (excess / {P} steps) "
                f"| {pct(c['amortized_overhead'])} | <= {100 * c['target']:g}% | {'yes' if c['met'] else 'NO'} |"
            )
    lines += [
        "",
        "Ratio: the configuration's step / the baseline's step of the same cycle, over the steps without an MSign "
        "application; median, interquartile range and bootstrap 95% confidence interval of the median; in wall time "
        "and in CPU time of the process. Excess: an application step minus what the paired baseline step predicts "
        "(baseline step x the median ratio), median over applications, next to the typical |residual| of ordinary "
        f"steps (the noise). In-loop overhead = excess / ({P} x baseline median step). Amortized: the callback's own "
        f"time, measured inside its hooks during training, / ({P} x baseline median step) for MSign and / baseline "
        "median step for the monitor. The targets are judged on the amortized figure.",
    ]
    return lines


def training_verdicts(tr: dict[str, Any]) -> list[str]:
    out = []
    for c in tr["configs"]:
        if c["name"].startswith("msign_"):
            out.append(
                f"{c['label']}: amortized {pct(c['amortized_overhead'])} (in the loop {pct(c['in_loop_overhead'])}) "
                f"vs target <= 0.5%: {'met' if c['met'] else 'NOT met'}."
            )
        elif c["name"] == "monitor":
            lo, hi = c["wall"]["ratio_ci95"]
            out.append(
                f"{c['label']}: amortized {pct(c['amortized_overhead'])}; measured step ratio - 1 = "
                f"{pct(c['measured_overhead'])} (95% CI {pct(lo - 1)} to {pct(hi - 1)}) vs target <= 1%: "
                f"{'met' if c['met'] else 'NOT met'}."
            )
    return out
