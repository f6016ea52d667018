#!/usr/bin/env python
"""Overhead benchmark of lightning_msign: what MSign and StableRankMonitor cost a training run.

Three parts, one thread setting (``torch.set_num_threads``) for all:

1. **Training-step overhead.** One real ``lightning.Trainer`` per configuration (baseline, MSign with
   each backend, StableRankMonitor every step), each with its own ``LitGPTModule`` (same seed) on the
   shipped Shakespeare corpus (``ShakespeareDataModule``). The configurations are *interleaved step by
   step*: every Trainer runs ``fit`` in its own thread, and a baton lets exactly one of them train at a
   time, one optimizer step per turn, in a fresh random order every cycle (ABCDE, DBEAC, ...). So the
   steps being compared are seconds apart, not minutes, and see the same machine. A timing callback (the
   last in each callback list) measures each turn: from receiving the baton to the end of that step's
   ``on_train_batch_end`` (data loading, forward, backward, optimizer step and every callback hook).
   The first cycles are discarded as warm-up. Three numbers per configuration:

   - the *measured step-time ratio*: per cycle, the configuration's step time divided by the baseline's
     step in the same cycle; median over cycles, with its interquartile range and a bootstrap 95%
     confidence interval of the median (wall time, and CPU time of the process);
   - the *in-loop excess* of MSign steps: during the timed runs MSign applies every ``k`` steps (not 100:
     a 100-step period would hardly fire in a CPU-sized run); the step containing an application minus
     what the paired baseline step predicts (baseline step x the configuration's median ratio);
   - the *amortized estimate*: the callback's own cost, timed inside its hooks during training (MSign also
     logs it as ``msign/time_ms``), divided by ``P * median baseline step`` (MSign, ``P = --period``,
     default 100) or by the median baseline step (monitor, every step). A 0.5% effect is below the noise of
     step timing on a shared machine, so the targets are judged on this number.

2. **Backend micro-benchmark** of :func:`lightning_msign.functional.msign`: for each shape and input
   (plain Gaussian; a "collapsed" matrix = Gaussian noise + a strong rank-3 part, stable rank ~2, like a
   collapsed attention weight) the median time of each backend after a warm-up, the speed ratio
   ``svd_time / backend_time``, the relative Frobenius error against ``svd`` and the extreme singular
   values and stable rank of the output. Runs on the CPU, and also on the GPU when the run's device is CUDA.

3. **Distributed**: time per ``MSignCallback.apply()`` (attention targets, svd and polar_express) on 1
   process and on 2 processes (``torch.multiprocessing`` + gloo, 1 thread each): replicated weights as
   under DDP (each process signs its share and broadcasts it) and FSDP2 ``fully_shard`` DTensor weights
   (each whole matrix gathered on its owner, signed, scattered back); an application ends when the
   slowest process is done. Reports the speed-up over 1 process and each process's compute time.

Usage::

    python benchmarks/overhead.py --threads 1          # full (~8-10 min on 2 CPU cores)
    python benchmarks/overhead.py --quick              # smoke version (< 60 s), for CI
    python benchmarks/overhead.py --device cuda        # on a GPU machine
    python benchmarks/overhead.py --threads 1 --skip-training --skip-backends \
        --out benchmarks/results/overhead_distributed.json   # the distributed part only (~30 s)

Writes JSON (``--out``, default ``benchmarks/results/overhead.json``; ``overhead_quick.json`` with
``--quick``) and the same markdown tables next to it (``.md``), and prints the tables. See
``benchmarks/README.md`` for how to read them.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

# OpenMP threads that busy-wait make every parallel op wait for descheduled threads when other processes
# share the cores: on a loaded 2-core machine a tiny model's step went from 8 ms to 600 ms. Passive waiting
# (set before torch loads libgomp; an OMP_WAIT_POLICY already in the environment wins) keeps timings sane.
_OMP_POLICY_INHERITED = os.environ.get("OMP_WAIT_POLICY")
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _OMP_POLICY_EFFECTIVE = os.environ["OMP_WAIT_POLICY"]
else:  # imported from a process that already loaded torch: too late to change it
    _OMP_POLICY_EFFECTIVE = _OMP_POLICY_INHERITED

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MSIGN_TARGET = 0.005  # issue: MSign at P=100 costs <= 0.5% of training time
MONITOR_TARGET = 0.01  # issue: StableRankMonitor every step costs <= 1%
SPEEDUP_TARGET = 5.0  # issue: a fast backend >= 5x faster than svd
PSS_IDLE_TARGET = 0.001  # issue: PSSCallback costs <= 0.1% on steps where it does not trigger
PSS_PAPER_PROTECTION = 2.4  # PSS paper: one protection step ~2.4x a training step (a reference, not a target)
BACKENDS = ("svd", "polar_express", "newton_schulz")


# --------------------------------------------------------------------------- settings
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
            apply_repeats=2, micro_shapes=[(128, 128), (128, 512)], micro_repeats=3, micro_warmup=1, dist_repeats=2,
            **common,
        )
    else:
        s = Settings(
            mode="full", model={"n_layer": 6, "n_embd": 256, "n_head": 4}, seq_len=256, batch_size=16,
            timing_period=5, warmup_steps=5, min_timed_steps=20, max_timed_steps=200, train_budget_s=450.0,
            apply_repeats=2, micro_shapes=[(768, 768), (768, 3072)], micro_repeats=5, micro_warmup=1, dist_repeats=15,
            **common,
        )
    if args.timing_period is not None:
        s.timing_period = s.warmup_steps = args.timing_period
    if args.steps is not None:
        s.min_timed_steps = s.max_timed_steps = args.steps
    if args.train_budget_s is not None:
        s.train_budget_s = args.train_budget_s
    if s.timing_period < 2 or s.min_timed_steps < 2 * s.timing_period:
        raise SystemExit(
            f"need --timing-period >= 2 and --steps >= 2 x timing period, got {s.timing_period} and {s.min_timed_steps}"
        )
    s.micro_devices = ["cpu"] + (["cuda"] if device == "cuda" else [])
    return s


# --------------------------------------------------------------------------- small helpers
def _sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    _sync(device)
    return time.perf_counter()


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def _bootstrap_median_ci(xs: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap confidence interval of the median."""
    if len(xs) < 3:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


@contextmanager
def _quiet_measured_code() -> Iterator[None]:
    """Filter the warnings Lightning and torch raise on every fit of a benchmark-sized run (and only those)."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PossibleUserWarning)  # few dataloader workers, log interval
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # torch pytree deprecation inside Lightning
        yield


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    def _version(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "litgpt": _version("litgpt"),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": _OMP_POLICY_EFFECTIVE or "unset (libgomp default)",
        "omp_wait_policy_set_by_benchmark": _OMP_POLICY_INHERITED is None and _OMP_POLICY_EFFECTIVE is not None,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "loadavg_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
    load = ""
    if m.get("loadavg_start") is not None:
        end = m.get("loadavg_end")
        load = f"; 1-min load average {m['loadavg_start']:.2f} at start" + (f", {end:.2f} at end" if end else "")
    return (
        f"{m['cpu']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs{gpu}; torch {m['torch']}, "
        f"lightning {m['lightning']}, litgpt {m['litgpt']}, python {m['python']}; {m['torch_threads']} torch "
        f"thread(s), OMP_WAIT_POLICY {m['omp_wait_policy']}; float32 matmul precision "
        f"{m['float32_matmul_precision']}; {m['date_utc']}{load}"
    )


# --------------------------------------------------------------------------- part 1: training
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


def _lightning_pieces() -> dict[str, Any]:
    """Import Lightning and the package lazily (so ``--help`` is instant) and build the timing classes."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.loggers.logger import Logger
    from typing_extensions import override

    from lightning_msign import LitGPTModule, MSignCallback, ShakespeareDataModule, StableRankMonitor

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
                self._start = (_clock(device), time.process_time())
            else:
                trainer.should_stop = True

        @override
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._take_turn(trainer, pl_module.device)

        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            wall, cpu = _clock(pl_module.device), time.process_time()  # CPU time of the process, all threads
            self.records.append({
                "cycle": self.baton.cycle, "step": trainer.global_step,
                "s": wall - self._start[0], "cpu_s": cpu - self._start[1],
            })
            self.baton.done(self.name)
            self._take_turn(trainer, pl_module.device)

    class TimedMSign(MSignCallback):
        """The real MSignCallback, with its ``on_train_batch_end`` hook timed at application steps."""

        hook_ms: list[tuple[int, float]]

        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            before, t0 = self.applications, _clock(pl_module.device)
            super().on_train_batch_end(trainer, pl_module, *args)
            if self.applications != before:
                self.hook_ms.append((trainer.global_step, (_clock(pl_module.device) - t0) * 1e3))

    class TimedMonitor(StableRankMonitor):
        """The real StableRankMonitor, with its two hooks and ``compute()`` timed, per optimizer step."""

        hook_ms: dict[int, dict[str, float]]  # step -> {"grad_norm", "batch_end", "compute"} (ms)

        @override
        def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
            t0 = _clock(pl_module.device)
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.hook_ms[trainer.global_step + 1]["grad_norm"] = (_clock(pl_module.device) - t0) * 1e3

        @override
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
            self._step = trainer.global_step
            t0 = _clock(pl_module.device)
            super().on_train_batch_end(trainer, pl_module, *args)
            self.hook_ms[trainer.global_step]["batch_end"] = (_clock(pl_module.device) - t0) * 1e3

        @override
        def compute(self) -> dict[str, Any]:
            device = self._targets[0].param.device
            t0 = _clock(device)
            out = super().compute()
            if getattr(self, "_step", None) is not None:
                self.hook_ms[self._step]["compute"] = (_clock(device) - t0) * 1e3
            return out

    return dict(
        L=L, LitGPTModule=LitGPTModule, ShakespeareDataModule=ShakespeareDataModule, MSignCallback=MSignCallback,
        StableRankMonitor=StableRankMonitor, RecordingLogger=RecordingLogger, TurnTimer=TurnTimer,
        TimedMSign=TimedMSign, TimedMonitor=TimedMonitor,
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
            # Timed runs apply every k steps, so that applications happen within the run (see module docstring).
            msign_cb = pieces["TimedMSign"](period=s.timing_period, targets=s.msign_targets, backend=backend)
            msign_cb.hook_ms = []
            callbacks.append(msign_cb)
        if monitor:
            monitor_cb = pieces["TimedMonitor"](targets=s.monitor_targets, every_n_steps=1, mode="power")
            monitor_cb.hook_ms = defaultdict(dict)
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
        with _quiet_measured_code():
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
    r = _median(ratios)
    residual = {c: arm_steps[c] - r * base_steps[c] for c in cycles if c in arm_steps and c in base_steps}
    excess = [residual[c] for c in cycles if c in app and c in residual]
    lo, hi = _quartiles(ratios)
    ci = _bootstrap_median_ci(ratios, seed)
    return {
        "median_step_ms": _median([arm_steps[c] for c in ordinary]),
        "ratio_median": r, "ratio_q1": lo, "ratio_q3": hi, "ratio_ci95": list(ci), "ratios": ratios,
        "excess_ms": _median(excess), "excess_per_application_ms": excess,
        "noise_ms": _median([abs(residual[c]) for c in ordinary]),  # typical |residual| of an ordinary step
    }


def analyse_training(s: Settings, arms: list[Arm]) -> dict[str, Any]:
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
    base_median = _median(base_ord)
    out: dict[str, Any] = {
        "timed_steps_per_config": len(cycles),
        "msign_applications_timed": len(app),
        "baseline_median_step_ms": base_median,
        "baseline_step_iqr_ms": list(_quartiles(base_ord)),
        "baseline_median_step_cpu_ms": _median([base["cpu_s"][c] for c in cycles if c not in app]),
        "configs": [],
    }
    for arm in arms:
        w = _paired_stats(steps[arm.name]["s"], base["s"], cycles, app, s.seed)
        c = _paired_stats(steps[arm.name]["cpu_s"], base["cpu_s"], cycles, app, s.seed)
        row: dict[str, Any] = {"name": arm.name, "label": arm.label, "wall": w, "cpu": c}
        if arm.msign is not None:
            hook = [ms for step, ms in arm.msign.hook_ms if step > warm]
            logged = [m["msign/time_ms"] for step, m in arm.logger.rows
                      if "msign/time_ms" in m and step is not None and step + 1 > warm]
            row.update(
                applications=arm.msign.applications,
                application_hook_ms=_median(hook),
                application_time_ms_logged=_median(logged),
                amortized_overhead=_median(hook) / (s.period * base_median),
                in_loop_overhead=w["excess_ms"] / (s.period * base_median),
                in_loop_overhead_cpu=c["excess_ms"] / (s.period * out["baseline_median_step_cpu_ms"]),
                target=MSIGN_TARGET,
            )
            row["met"] = bool(row["amortized_overhead"] <= MSIGN_TARGET)
        elif arm.monitor is not None:
            per_step = {st: v for st, v in arm.monitor.hook_ms.items() if st > warm and "batch_end" in v}
            parts = {key: _median([v.get(key, 0.0) for v in per_step.values()])
                     for key in ("grad_norm", "batch_end", "compute")}
            hook = _median([v.get("grad_norm", 0.0) + v["batch_end"] for v in per_step.values()])
            row.update(
                hook_ms_per_step=hook, hook_parts_ms=parts, amortized_overhead=hook / base_median,
                measured_overhead=w["ratio_median"] - 1.0, measured_overhead_cpu=c["ratio_median"] - 1.0,
                target=MONITOR_TARGET,
            )
            row["met"] = bool(row["amortized_overhead"] <= MONITOR_TARGET)
        out["configs"].append(row)
    return out


def _time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: str) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = _clock(device)
        fn()
        times.append((_clock(device) - t0) * 1e3)
    return times


def _resolve(module: Any, targets: str) -> list[Any]:
    from lightning_msign import resolve_targets

    return resolve_targets(module, targets, split_qkv=True)


def msign_apply_breakdown(s: Settings, pieces: dict[str, Any], arm: Arm, base_ms: float) -> list[dict[str, Any]]:
    """Time ``MSignCallback.apply()`` (public) on a trained model: targets x backend x log_stable_rank.

    The trained weights are restored before every call, so each application acts on trained weights (as in
    training), not on weights this loop has already signed. A failing call is recorded, not raised.
    """
    snapshot = {k: v.detach().clone() for k, v in arm.module.state_dict().items()}
    rows = []
    for targets in ("attention", "all_2d"):
        shapes = sorted({tuple(t.shape) for t in _resolve(arm.module, targets)})
        for backend in BACKENDS:
            for log_srank in (True, False):
                cb = pieces["MSignCallback"](period=s.period, targets=targets, backend=backend, log_stable_rank=log_srank)
                cb.setup(arm.trainer, arm.module, "fit")
                times: list[float] = []
                error = None
                for i in range(1 + s.apply_repeats):  # the first call is a warm-up
                    arm.module.load_state_dict(snapshot)  # in place: the callback's target views stay valid
                    try:
                        t0 = _clock(s.device)
                        cb.apply()
                        if i:
                            times.append((_clock(s.device) - t0) * 1e3)
                    except Exception as err:  # noqa: BLE001 - reported in the table and the JSON
                        error = f"{type(err).__name__}: {err}"
                        print(f"  apply() failed ({targets}, {backend}, log_stable_rank={log_srank}): {error}",
                              file=sys.stderr, flush=True)
                        break
                rows.append({
                    "targets": targets, "backend": backend, "log_stable_rank": log_srank,
                    "matrices": len(cb.target_names), "shapes": [list(x) for x in shapes], "times_ms": times,
                    "apply_ms": _median(times), "overhead_at_period": _median(times) / (s.period * base_ms),
                    "error": error,
                })
    arm.module.load_state_dict(snapshot)
    return rows


def monitor_profile(s: Settings, pieces: dict[str, Any], arm: Arm) -> dict[str, Any]:
    """Where StableRankMonitor's time goes, outside training: ``compute()``, each target, the gradient norm.

    Per-target times are taken in sweeps over all targets in model order (as ``compute()`` walks them), so
    each matrix comes from memory as cold as in ``compute()``, not from a cache warmed by timing it alone.
    """
    from lightning_msign.functional import stable_rank_estimate

    reps = 20 if s.mode == "full" else 5
    mon = pieces["StableRankMonitor"](targets=s.monitor_targets, every_n_steps=1, mode="power")
    mon.setup(arm.trainer, arm.module, "fit")
    compute_ms = _time_calls(mon.compute, reps, 2, s.device)  # the first call is the 20-iteration cold start
    targets = _resolve(arm.module, s.monitor_targets)
    vectors = [stable_rank_estimate(t.matrix(), None, mon.warmup_iters)[1] for t in targets]
    per_target: list[list[float]] = [[] for _ in targets]
    for _ in range(reps):
        for i, (t, v) in enumerate(zip(targets, vectors)):
            t0 = _clock(s.device)
            stable_rank_estimate(t.matrix(), v, mon.power_iters)
            per_target[i].append((_clock(s.device) - t0) * 1e3)
    groups: dict[tuple[str, tuple[int, int]], list[float]] = defaultdict(list)
    for t, times in zip(targets, per_target):
        groups[(t.role, tuple(t.shape))].append(_median(times))
    tiny = torch.randn(8, 8, device=s.device)
    tiny_v = stable_rank_estimate(tiny, None, 5)[1]
    tiny_ms = _time_calls(lambda: stable_rank_estimate(tiny, tiny_v, mon.power_iters), reps, 2, s.device)
    grads = [torch.randn_like(p) for p in arm.module.parameters() if p.requires_grad]
    grad_ms = _time_calls(lambda: torch.nn.utils.get_total_norm(grads), reps, 2, s.device)
    by_group = [
        {"role": role, "shape": list(shape), "count": len(v), "per_target_us": _median(v) * 1e3, "total_ms": sum(v)}
        for (role, shape), v in sorted(groups.items())
    ]
    return {
        "targets": len(targets),
        "compute_ms": _median(compute_ms),
        "per_target_sum_ms": sum(g["total_ms"] for g in by_group),
        "by_group": by_group,
        "tiny_8x8_us": _median(tiny_ms) * 1e3,  # the same call on an 8x8 matrix: dispatch and Python only
        "grad_norm_ms": _median(grad_ms),
        "grad_norm_elements": sum(g.numel() for g in grads),
    }


def pss_profile(s: Settings, arm: Arm, base_ms: float) -> dict[str, Any]:
    """PSSCallback's cost: its detector on a step that does not trigger, and one protection.

    Measured on the baseline configuration's trained model, with its stopped Trainer. The detector is
    the real ``on_before_optimizer_step`` hook (total gradient norm of all parameters, the decision made
    identical across processes, the logger call) on gradients of the model's shapes; ``tau`` is set so
    high that it never triggers. The protection is the real ``protect()`` with the default ``"qk"``
    targets, ``rank="stable"`` and softplus smoothing; the weights are restored after it.
    """
    from lightning_msign import PSSCallback

    reps = 20 if s.mode == "full" else 5
    module, trainer = arm.module, arm.trainer
    optimizer = trainer.optimizers[0]
    idle = PSSCallback(tau=1e12, warmup_steps=0)
    idle.setup(trainer, module, "fit")
    for p in module.parameters():
        p.grad = torch.randn_like(p) * 1e-2

    def detect() -> None:
        idle._last_step = -1  # the stopped Trainer's global_step does not advance: detect again each call
        idle.on_before_optimizer_step(trainer, module, optimizer)

    idle_ms = _time_calls(detect, reps, 2, s.device)
    for p in module.parameters():
        p.grad = None
    assert idle.triggers == 0

    pss = PSSCallback()
    pss.setup(trainer, module, "fit")
    saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
    protect_ms = []
    for _ in range(max(3, reps // 4)):
        t0 = _clock(s.device)
        metrics = pss.protect()
        protect_ms.append((_clock(s.device) - t0) * 1e3)
        module.load_state_dict(saved)
    ranks = [int(v) for k, v in metrics.items() if k.startswith("pss/rank/")]
    return {
        "targets": len(pss._targets),
        "ranks": ranks,
        "idle_ms": _median(idle_ms),
        "idle_overhead": _median(idle_ms) / base_ms,
        "idle_met": _median(idle_ms) / base_ms <= PSS_IDLE_TARGET,
        "protect_ms": _median(protect_ms),
        "protect_vs_step": _median(protect_ms) / base_ms,
    }


def run_training_part(s: Settings, cache_dir: str) -> dict[str, Any]:
    pieces = _lightning_pieces()  # imports Lightning, which configures its loggers: quieten them afterwards
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
    print(
        f"training part: {len(arms)} configurations interleaved step by step, LitGPT {cfg.n_layer}x{cfg.n_embd} "
        f"({n_params / 1e6:.2f}M params), batch {s.batch_size}x{s.seq_len}, {s.precision} on {s.device}",
        file=sys.stderr, flush=True,
    )
    elapsed = run_interleaved(arms, baton)
    result = analyse_training(s, arms)
    result.update(train_time_s=elapsed, cycles=baton.cycle)
    result["model"] = {
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "vocab_size": cfg.padded_vocab_size,
        "mlp_class": cfg.mlp_class_name, "intermediate_size": cfg.intermediate_size, "parameters": n_params,
    }
    print(f"  {baton.cycle} cycles in {elapsed:.0f} s; timing MSignCallback.apply() and profiling "
          "StableRankMonitor ...", file=sys.stderr, flush=True)
    baseline = arms[0]
    with _quiet_measured_code():
        result["monitor_profile"] = monitor_profile(s, pieces, baseline)
        result["msign_apply"] = msign_apply_breakdown(s, pieces, baseline, result["baseline_median_step_ms"])
        result["pss"] = pss_profile(s, baseline, result["baseline_median_step_ms"])
    return result


# --------------------------------------------------------------------------- part 2: backends
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
                    times = _time_calls(lambda: msign(W, backend=backend), s.micro_repeats, s.micro_warmup, device)
                    out = msign(W, backend=backend)
                    sv = torch.linalg.svdvals(out.double().cpu())
                    t = _median(times)
                    if backend == "svd":
                        svd_ms = t
                    rows.append({
                        "device": device, "shape": [m, n], "input": kind, "srank_in": srank_in, "backend": backend,
                        "median_ms": t, "min_ms": min(times), "times_ms": times, "speedup_vs_svd": svd_ms / t,
                        "rel_fro_err_vs_svd": float(torch.linalg.norm((out - ref).double()) / torch.linalg.norm(ref.double())),
                        "sv_min": float(sv.min()), "sv_max": float(sv.max()),
                        "srank_out": float((sv**2).sum() / sv.max() ** 2),
                    })
                print(f"  backends: {device} {m}x{n} {kind} done", file=sys.stderr, flush=True)
    return rows


# --------------------------------------------------------------------------- report
# --------------------------------------------------------------------------- part 3: distributed
def _dist_worker(rank: int, world: int, layout: str, cfg: dict[str, Any], out_dir: str) -> None:
    """One process of the distributed part: time ``MSignCallback.apply()`` on a (sharded) LitGPT model."""
    import torch.distributed as dist

    # A FileStore in the run's temporary folder: no port to find, and no store server on rank 0 whose exit
    # could abort the other process in destroy_process_group.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    torch.set_num_threads(cfg["threads"])
    try:
        from lightning_msign import LitGPTModule, MSignCallback, resolve_targets
        from lightning_msign.distributed import WholeMatrixPlan, _local

        torch.manual_seed(cfg["seed"])
        module = LitGPTModule(dict(cfg["model"]), vocab_size=256, block_size=cfg["seq_len"])
        if layout == "fsdp2" and world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for block in module.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(module.model, mesh=mesh)
        params = [p for p in module.parameters() if p.ndim >= 2]
        local = [_local(p) for p in params]
        snapshot = [x.clone() for x in local]
        rows = []
        for backend in cfg["backends"]:
            cb = MSignCallback(period=100, targets="attention", backend=backend, log_stable_rank=False)
            cb._targets = resolve_targets(module, "attention")
            cb._plan = WholeMatrixPlan(cb._targets, distributed=world > 1)
            compute_ms: list[float] = []
            sign_blocks = cb._sign_blocks

            def timed(blocks, _f=sign_blocks):
                t0 = time.perf_counter()
                out = _f(blocks)
                compute_ms.append((time.perf_counter() - t0) * 1e3)
                return out

            cb._sign_blocks = timed
            times = []
            for i in range(1 + cfg["repeats"]):  # the first call is a warm-up
                for x, y in zip(local, snapshot):
                    x.copy_(y)  # sign the same (unsigned) weights every time
                dist.barrier()
                t0 = time.perf_counter()
                cb.apply()
                elapsed = (time.perf_counter() - t0) * 1e3
                slowest = torch.tensor([elapsed])
                dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # an application ends when the last process is done
                if i:
                    times.append(float(slowest))
            rows.append({"backend": backend, "apply_ms": times, "compute_ms": compute_ms[1:],
                         "share": cb._plan.local_share(), "matrices": len(cb._targets)})
        torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed_part(s: Settings) -> list[dict[str, Any]]:
    """Time per MSign application (attention) on 1 process vs 2 processes, replicated (DDP) and FSDP2."""
    import torch.multiprocessing as mp

    cfg = {"model": s.model, "seq_len": s.seq_len, "seed": s.seed, "threads": 1, "repeats": s.dist_repeats,
           "backends": ["svd", "polar_express"]}
    out: list[dict[str, Any]] = []
    for world, layout in ((1, "single"), (2, "ddp"), (2, "fsdp2")):
        print(f"  distributed: {world} process(es), {layout}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory(prefix="lightning_msign_dist_") as tmp:
            mp.spawn(_dist_worker, args=(world, layout, cfg, tmp), nprocs=world)
            ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world)]
        for i, backend in enumerate(cfg["backends"]):
            per_rank = [r[i] for r in ranks]
            out.append({
                "layout": layout, "processes": world, "backend": backend, "matrices": per_rank[0]["matrices"],
                "apply_ms": _median(per_rank[0]["apply_ms"]),
                "compute_ms_per_rank": [_median(r["compute_ms"]) for r in per_rank],
                "share_per_rank": [r["share"] for r in per_rank],
            })
    single = {r["backend"]: r["apply_ms"] for r in out if r["processes"] == 1}
    for r in out:
        r["speedup_vs_1"] = single[r["backend"]] / r["apply_ms"]
    return out


def render_distributed(res: dict[str, Any]) -> list[str]:
    s = res["settings"]
    lines = [
        "",
        "## 3. Distributed: time per MSign application, 1 vs 2 processes (CPU, gloo)",
        "",
        f"`MSignCallback.apply()` on the attention matrices of a {s['model']['n_layer']} x {s['model']['n_embd']} "
        f"LitGPT ({s['model']['n_head']} heads; fresh init, restored before every "
        f"call), 1 torch thread per process, median of {s['dist_repeats']} calls after a warm-up; an application "
        "ends when the slowest process is done. `ddp`: replicated weights, each process signs its share and "
        "broadcasts it; `fsdp2`: `fully_shard`ed DTensor weights, each whole matrix gathered on its owner, "
        "signed, scattered back.",
        "",
        "| layout | processes | backend | matrices | ms per application | speed-up vs 1 process "
        "| compute ms per process | cost share per process |",
        "|---|---:|---|---:|---:|---:|---|---|",
    ]
    for r in res["distributed"]:
        lines.append(
            f"| {r['layout']} | {r['processes']} | {r['backend']} | {r['matrices']} | {r['apply_ms']:.1f} "
            f"| {r['speedup_vs_1']:.2f}x | {' / '.join(f'{x:.1f}' for x in r['compute_ms_per_rank'])} "
            f"| {' / '.join(f'{x:.2f}' for x in r['share_per_rank'])} |"
        )
    lines += [
        "",
        "Expected on N GPUs (not measured here): compute per process falls as ~1/N while there are many more",
        "matrices than processes (owners are balanced by m*n*min(m, n), one parameter at a time, so a fused QKV",
        "weight is one unit); communication per application is one broadcast of every target matrix (DDP: each",
        "process receives the (N-1)/N it did not compute) or a gather plus a scatter of each matrix (FSDP2: each",
        "process sends and receives ~2/N of the target bytes), i.e. about the traffic of one optimizer step's",
        "gradient all-reduce restricted to the target matrices, once every P steps.",
    ]
    return lines


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.2f}%"


def _ratio_cell(st: dict[str, Any]) -> str:
    lo, hi = st["ratio_ci95"]
    return f"{st['ratio_median']:.3f} [{st['ratio_q1']:.3f}, {st['ratio_q3']:.3f}] ({lo:.3f}-{hi:.3f})"


def render_training(res: dict[str, Any]) -> list[str]:
    s, tr = res["settings"], res["training"]
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
                f"| {_pct(c['measured_overhead'])} wall, {_pct(c['measured_overhead_cpu'])} CPU (ratio - 1) "
                f"| {_pct(c['amortized_overhead'])} | <= {100 * c['target']:g}% | {'yes' if c['met'] else 'NO'} |"
            )
        else:
            lines.append(
                head + f"| {excess} | {c['application_hook_ms']:.0f} per application "
                f"(`msign/time_ms` {c['application_time_ms_logged']:.0f}) "
                f"| {_pct(c['in_loop_overhead'])} wall, {_pct(c['in_loop_overhead_cpu'])} CPU (excess / {P} steps) "
                f"| {_pct(c['amortized_overhead'])} | <= {100 * c['target']:g}% | {'yes' if c['met'] else 'NO'} |"
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
        "",
        f"### MSignCallback.apply() on the trained baseline model (median of {s['apply_repeats']} after 1 warm-up; "
        "weights restored before each call)",
        "",
        f"| targets | matrices (shapes) | backend | log_stable_rank | apply (ms) | overhead at P = {P} |",
        "|---|---|---|---|---:|---:|",
    ]
    for a in tr["msign_apply"]:
        shapes = ", ".join("x".join(map(str, sh)) for sh in a["shapes"])
        cost = f"{a['apply_ms']:.0f} | {_pct(a['overhead_at_period'])}" if a["times_ms"] else "failed | -"
        if a["error"]:
            cost += f" (error: {a['error'][:160]})"
        lines.append(f"| {a['targets']} | {a['matrices']} ({shapes}) | {a['backend']} | {a['log_stable_rank']} | {cost} |")
    mp = tr["monitor_profile"]
    mon = next(c for c in tr["configs"] if c["name"] == "monitor")
    parts = mon["hook_parts_ms"]
    lines += [
        "",
        "### Where StableRankMonitor's time goes (per step)",
        "",
        f"In training (medians per step): `on_before_optimizer_step` (total gradient norm) {parts['grad_norm']:.2f} ms; "
        f"`on_train_batch_end` {parts['batch_end']:.2f} ms, of which `compute()` {parts['compute']:.2f} ms and "
        f"{parts['batch_end'] - parts['compute']:.2f} ms for the torchmetrics min/mean, `float()` of "
        f"{mp['targets'] + 2} values and the logger call; both hooks {mon['hook_ms_per_step']:.2f} ms.",
        f"Outside training: `compute()` over {mp['targets']} targets {mp['compute_ms']:.2f} ms; the per-target "
        f"`stable_rank_estimate` calls (1 power iteration; medians) sum to {mp['per_target_sum_ms']:.2f} ms; the "
        f"same call on an 8x8 matrix (dispatch and Python only) takes {mp['tiny_8x8_us']:.0f} us; the gradient norm "
        f"over {mp['grad_norm_elements'] / 1e6:.2f}M elements {mp['grad_norm_ms']:.2f} ms.",
        "",
        "| role | shape | targets | per target (us) | total (ms) |",
        "|---|---|---:|---:|---:|",
    ]
    for g in mp["by_group"]:
        lines.append(f"| {g['role']} | {'x'.join(map(str, g['shape']))} | {g['count']} | {g['per_target_us']:.0f} "
                     f"| {g['total_ms']:.2f} |")
    return lines


def render_backends(res: dict[str, Any]) -> list[str]:
    s = res["settings"]
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
    for r in res["backends"]:
        lines.append(
            f"| {r['device']} | {r['shape'][0]}x{r['shape'][1]} | {r['input']} ({r['srank_in']:.2f}) | {r['backend']} "
            f"| {r['median_ms']:.1f} | {r['speedup_vs_svd']:.2f}x | {r['rel_fro_err_vs_svd']:.2e} "
            f"| {r['sv_min']:.3g} | {r['sv_max']:.4g} | {r['srank_out']:.1f} |"
        )
    return lines


def render_pss(res: dict[str, Any]) -> list[str]:
    p, base = res["training"]["pss"], res["training"]["baseline_median_step_ms"]
    return [
        "",
        "### PSSCallback (on the trained baseline model)",
        "",
        "Detector: the real `on_before_optimizer_step` (total gradient norm, cross-process decision, logging) on a",
        "step that does not trigger. Protection: the real `protect()`, targets `qk`, rank `stable`, softplus.",
        "",
        "| what | time (ms) | relative to a training step | reference |",
        "|---|---:|---:|---|",
        f"| detector, step without trigger | {p['idle_ms']:.2f} | {_pct(p['idle_overhead'])} | target <= 0.1%: "
        f"{'met' if p['idle_met'] else 'NOT met'} |",
        f"| one protection ({p['targets']} matrices, k = {sorted(set(p['ranks']))}) | {p['protect_ms']:.1f} | "
        f"{p['protect_vs_step']:.3f}x | paper: ~{PSS_PAPER_PROTECTION}x a step |",
        "",
        f"Baseline step: {base:.0f} ms.",
    ]


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
        lines += render_training(res)
    if res.get("training") and res["training"].get("pss"):
        lines += render_pss(res)
    if res.get("backends"):
        lines += render_backends(res)
    if res.get("distributed"):
        lines += render_distributed(res)
    lines += ["", "## Against the targets", ""] + [f"- {v}" for v in res["verdicts"]]
    return "\n".join(lines) + "\n"


def verdicts(res: dict[str, Any]) -> list[str]:
    out = []
    tr = res.get("training")
    if tr:
        for c in tr["configs"]:
            if c["name"].startswith("msign_"):
                out.append(
                    f"{c['label']}: amortized {_pct(c['amortized_overhead'])} (in the loop {_pct(c['in_loop_overhead'])}) "
                    f"vs target <= 0.5%: {'met' if c['met'] else 'NOT met'}."
                )
            elif c["name"] == "monitor":
                lo, hi = c["wall"]["ratio_ci95"]
                out.append(
                    f"{c['label']}: amortized {_pct(c['amortized_overhead'])}; measured step ratio - 1 = "
                    f"{_pct(c['measured_overhead'])} (95% CI {_pct(lo - 1)} to {_pct(hi - 1)}) vs target <= 1%: "
                    f"{'met' if c['met'] else 'NOT met'}."
                )
        if tr.get("pss"):
            p = tr["pss"]
            out.append(
                f"PSSCallback without trigger: {_pct(p['idle_overhead'])} of a step vs target <= 0.1%: "
                f"{'met' if p['idle_met'] else 'NOT met'}; one protection = {p['protect_vs_step']:.3f}x a step "
                f"(paper ~{PSS_PAPER_PROTECTION}x)."
            )
    for r in res.get("distributed") or []:
        if r["processes"] > 1:
            out.append(
                f"MSign ({r['backend']}) on {r['processes']} processes, {r['layout']}: {r['apply_ms']:.0f} ms per "
                f"application, {r['speedup_vs_1']:.2f}x the 1-process speed (cost share per process "
                f"{' / '.join(f'{x:.2f}' for x in r['share_per_rank'])})."
            )
    rows = res.get("backends") or []
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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke version (< 60 s): tiny model, few steps, small matrices")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (markdown beside it, .md); default "
                        "benchmarks/results/overhead.json (overhead_quick.json with --quick)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="training device; the "
                        "micro-benchmark runs on the CPU and also on CUDA when this is cuda (default: auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: usable CPUs)")
    parser.add_argument("--precision", default=None, help="Trainer precision (default 32-true on CPU, bf16-mixed on CUDA)")
    parser.add_argument("--period", type=int, default=100, help="MSign period P the overhead is reported for (default 100)")
    parser.add_argument("--timing-period", type=int, default=None, help="MSign period during the timed runs (k)")
    parser.add_argument("--steps", type=int, default=None, help="exact number of timed steps per configuration "
                        "(default: as many as --train-budget-s allows, at least 20)")
    parser.add_argument("--train-budget-s", type=float, default=None, help="no new cycle starts after this (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None, help="data cache (default: $LIGHTNING_MSIGN_CACHE or a temp dir)")
    parser.add_argument("--skip-training", action="store_true", help="skip the training part")
    parser.add_argument("--skip-backends", action="store_true", help="skip the backend micro-benchmark")
    parser.add_argument("--skip-distributed", action="store_true", help="skip the 1-vs-2-process MSign timing")
    args = parser.parse_args(argv)

    wall0 = time.perf_counter()
    s = build_settings(args)
    torch.set_num_threads(s.threads)
    out = args.out or RESULTS_DIR / ("overhead_quick.json" if args.quick else "overhead.json")
    res: dict[str, Any] = {
        "settings": {**asdict(s), "micro_shapes": [list(x) for x in s.micro_shapes]},
        "machine": machine_description(),
        "command": " ".join(["python", "benchmarks/overhead.py", *(sys.argv[1:] if argv is None else argv)]),
        "targets": {"msign_at_period": MSIGN_TARGET, "monitor_every_step": MONITOR_TARGET, "backend_speedup": SPEEDUP_TARGET,
                    "pss_without_trigger": PSS_IDLE_TARGET},
        "part_times_s": {},
    }
    print(f"lightning_msign overhead benchmark ({s.mode}): {machine_line(res['machine'])}", file=sys.stderr, flush=True)

    if not args.skip_training:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="lightning_msign_bench_") as tmp:
            cache_dir = args.cache_dir or os.environ.get("LIGHTNING_MSIGN_CACHE") or tmp
            res["training"] = run_training_part(s, cache_dir)
        res["part_times_s"]["training, apply and profile"] = time.perf_counter() - t0
    if not args.skip_backends:
        t0 = time.perf_counter()
        res["backends"] = run_backend_part(s)
        res["part_times_s"]["backends"] = time.perf_counter() - t0
    if not args.skip_distributed:
        t0 = time.perf_counter()
        res["distributed"] = run_distributed_part(s)
        res["part_times_s"]["distributed"] = time.perf_counter() - t0

    if hasattr(os, "getloadavg"):
        res["machine"]["loadavg_end"] = os.getloadavg()[0]
    res["wall_time_s"] = time.perf_counter() - wall0
    res["verdicts"] = verdicts(res)
    md = render_markdown(res)
    _atomic_write(out, json.dumps(res, indent=2) + "\n")
    _atomic_write(out.with_suffix(".md"), md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} ({res['wall_time_s']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
