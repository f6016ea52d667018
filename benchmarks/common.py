"""What the benchmarks share: the OpenMP wait policy, timing, statistics, the machine line, atomic writes.

Import this module before anything that imports torch (the entry scripts import it first): it sets
``OMP_WAIT_POLICY=PASSIVE`` unless the environment already sets it. OpenMP threads that busy-wait make
every parallel op wait for descheduled threads when other processes share the cores: on a loaded 2-core
machine a tiny model's step went from 8 ms to 600 ms.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

_OMP_POLICY_INHERITED = os.environ.get("OMP_WAIT_POLICY")
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _OMP_POLICY_EFFECTIVE: Optional[str] = os.environ["OMP_WAIT_POLICY"]
else:  # torch is loaded already: too late to change it
    _OMP_POLICY_EFFECTIVE = _OMP_POLICY_INHERITED

import torch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("svd", "polar_express", "newton_schulz")


# --------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device | str) -> float:
    """``time.perf_counter()`` after the device's queued work is done."""
    sync(device)
    return time.perf_counter()


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device | str) -> list[float]:
    """Milliseconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock(device)
        fn()
        times.append((clock(device) - t0) * 1e3)
    return times


def interleaved(
    arms: dict[str, Callable[[], Any]], repeats: int, warmup: int, seed: int, device: torch.device | str,
    reset: Optional[Callable[[], None]] = None,
) -> dict[str, list[float]]:
    """Time the ``arms`` round by round: each round calls every arm once, in a fresh random order.

    So the calls being compared are milliseconds apart and see the same machine; a drift of the
    machine's speed hits every arm alike. ``reset`` (untimed) runs before every call (e.g. restoring
    weights an arm writes). The first ``warmup`` rounds are not recorded. Returns milliseconds per arm,
    one value per recorded round, in round order (so ``times[a][i] / times[b][i]`` pairs calls).
    """
    rng = random.Random(seed)
    names = list(arms)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            if reset is not None:
                reset()
            t0 = clock(device)
            arms[name]()
            ms = (clock(device) - t0) * 1e3
            if i >= warmup:
                out[name].append(ms)
    return out


# --------------------------------------------------------------------------- statistics
def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 4:
        return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def bootstrap_median_ci(xs: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """95% percentile-bootstrap confidence interval of the median."""
    if len(xs) < 3:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def summary(times_ms: list[float]) -> dict[str, Any]:
    """Median and interquartile range of a list of timings (ms), with the raw values."""
    q1, q3 = quartiles(times_ms)
    return {"median_ms": median(times_ms), "q1_ms": q1, "q3_ms": q3, "times_ms": list(times_ms)}


def paired_ratio(num_ms: list[float], den_ms: list[float]) -> dict[str, Any]:
    """Per-round ratios ``num[i] / den[i]`` of two interleaved arms: median and interquartile range."""
    ratios = [a / b for a, b in zip(num_ms, den_ms) if b > 0]
    q1, q3 = quartiles(ratios)
    return {"median": median(ratios), "q1": q1, "q3": q3, "ratios": ratios}


# --------------------------------------------------------------------------- formatting
def pct(x: Optional[float]) -> str:
    return "n/a" if x is None or x != x else f"{100 * x:.2f}%"


def ms_cell(st: dict[str, Any], digits: int = 2) -> str:
    """``median [q1, q3]`` of a :func:`summary`."""
    return f"{st['median_ms']:.{digits}f} [{st['q1_ms']:.{digits}f}, {st['q3_ms']:.{digits}f}]"


def ratio_cell(st: dict[str, Any]) -> str:
    """``median [q1, q3]`` of a :func:`paired_ratio`."""
    return f"{st['median']:.2f}x [{st['q1']:.2f}, {st['q3']:.2f}]"


# --------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; elsewhere what ``platform`` knows): the figures depend on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()  # (runs `uname -p` on Linux: only where cpuinfo is not)


def _platform() -> str:
    """``platform.platform()``'s string, read without the ``uname -p`` process it starts on Linux."""
    if not hasattr(os, "uname"):
        return platform.platform()
    u = os.uname()
    libc = "".join(platform.libc_ver())
    return f"{u.sysname}-{u.release}-{u.machine}" + (f"-with-{libc}" if libc else "")


def machine_description() -> dict[str, Any]:
    cpu = cpu_model()
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
        "platform": _platform(),
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


# --------------------------------------------------------------------------- misc
@contextmanager
def quiet_measured_code() -> Iterator[None]:
    """Filter the warnings Lightning and torch raise on every fit of a benchmark-sized run (and only those)."""
    from lightning.fabric.utilities.warnings import PossibleUserWarning

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=PossibleUserWarning)  # few dataloader workers, log interval
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")  # torch pytree deprecation inside Lightning
        yield


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log(msg: str) -> None:
    """Progress to stderr (stdout holds the tables)."""
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- training cells
@contextmanager
def isolated_cell(threads: int) -> Iterator[None]:
    """Run a training cell in this process and leave the process as the cell found it: the torch thread count,
    the global random generators (Python, NumPy, torch), the environment (Lightning's ``seed_everything`` writes
    ``PL_GLOBAL_SEED``), the warning filters and Lightning's log level. A cell sets its own seed, so its result
    does not depend on what ran before it in the same process."""
    import logging

    import numpy as np

    saved_threads, saved_env = torch.get_num_threads(), dict(os.environ)
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    lightning_logger = logging.getLogger("lightning.pytorch")
    saved_level = lightning_logger.level
    torch.set_num_threads(threads)
    lightning_logger.setLevel(logging.WARNING)  # "GPU available: ..." and the like, once per cell
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what PYTHONWARNINGS=ignore gives a cell in its own process
            yield
    finally:
        torch.set_num_threads(saved_threads)
        lightning_logger.setLevel(saved_level)
        os.environ.clear()
        os.environ.update(saved_env)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])


def run_cell_here(run_cell: Callable[[dict[str, Any]], dict[str, Any]], spec: dict[str, Any]) -> dict[str, Any]:
    """``run_cell(spec)`` in this process (:func:`isolated_cell`); a cell that raises comes back as
    ``{"error": traceback}`` so that the other cells go on and the failure is reported with them."""
    import traceback

    try:
        with isolated_cell(spec["threads"]):
            return run_cell(spec)
    except Exception:  # recorded by the caller, which reports it and exits non-zero
        return {"error": traceback.format_exc()[-4000:]}


def run_cell_in_process_of_its_own(script: Path | str, spec: dict[str, Any]) -> dict[str, Any]:
    """``python script --cell SPEC`` (the script prints ``run_cell(spec)`` as JSON on its last line): for cells
    trained side by side, one process and ``spec["threads"]`` threads each. Failure as in :func:`run_cell_here`."""
    import json
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), "--cell", json.dumps(spec)], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    if proc.returncode != 0:
        return {"error": proc.stderr[-4000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])
