"""Shared fixtures: a tiny real LitGPT model, the real shipped corpus, and a recording logger."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from lightning.pytorch.loggers import Logger

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")

# A GQA config: 4 query heads share 2 key/value groups, so the Q block is twice the K and V blocks.
TINY_CONFIG: dict[str, Any] = {"n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 32, "bias": False}
TINY_VOCAB = 256  # byte-level tokens of the shipped corpus
TINY_SEQ = 32

DBRX_ATTENTION: dict[str, Any] = {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}
"""DBRX's attention config in the tests: transformers 5.25 reads ``rope_theta`` there and clamps with both bounds."""


def transformers_major() -> int:
    """The major version of the transformers the tests import (4 in the venv; 5 with ``make test-transformers5``)."""
    import transformers

    return int(transformers.__version__.split(".")[0])


def _check_transformers_major() -> None:
    """``LIGHTNING_MSIGN_TRANSFORMERS_MAJOR=5`` (``make test-transformers5``): the run must import that major, not
    fall back to the venv's without a word."""
    wanted = os.environ.get("LIGHTNING_MSIGN_TRANSFORMERS_MAJOR")
    if wanted is not None and transformers_major() != int(wanted):
        import transformers

        raise pytest.UsageError(f"LIGHTNING_MSIGN_TRANSFORMERS_MAJOR={wanted}, but the tests import transformers"
                                f" {transformers.__version__} from {transformers.__file__}: put its directory on"
                                " PYTHONPATH")


def pytest_report_header() -> str:
    try:
        import transformers
    except ImportError:  # pragma: no cover - a test extra
        return "transformers: not installed"
    return f"transformers {transformers.__version__} ({transformers.__file__})"


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test: tiny models run as fast on one thread, and far more steadily on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# jsonargparse's stub resolver (typeshed_client) asks a bare interpreter for its sys.path once per parser it builds:
# a few milliseconds, no import of torch or of this package, the same in every LightningCLI run; not a launch.
_SYS_PATH_PROBE = ["-c", "import sys, json; print(json.dumps(sys.path))"]


# Fixtures that hand a test the records of a launch shared with other tests (the launch happens once).
SHARED_LAUNCHES = ("two_process_job", "fsdp1_records")


class _Launches:
    """Every process a test starts, from the start of its setup (module fixtures included) to its end: new
    processes go through ``Popen._execute_child``, ``multiprocessing``'s ``BaseProcess.start`` or ``os.fork``."""

    item: pytest.Item | None = None
    started: list[str] = []

    @classmethod
    def install(cls) -> None:
        import multiprocessing.process

        for owner, name in ((subprocess.Popen, "_execute_child"), (multiprocessing.process.BaseProcess, "start"),
                            (os, "fork")):
            cls._wrap(owner, name)

    @classmethod
    def _wrap(cls, owner: Any, name: str) -> None:
        original = getattr(owner, name)
        label = f"{getattr(owner, '__name__', owner)}.{name}"

        def starting(*args: Any, **kwargs: Any) -> Any:
            what = args[1] if name == "_execute_child" else args[0] if args else ""
            if cls.item is not None and not (name == "_execute_child" and list(what)[1:] == _SYS_PATH_PROBE):
                cls.started.append(f"{label}({str(what)[:120]})")
                if cls.item.get_closest_marker("slow") is None:
                    raise RuntimeError(f"{label}: this test starts a process but is not marked slow")
            return original(*args, **kwargs)

        setattr(owner, name, starting)


def pytest_configure(config: pytest.Config) -> None:
    _check_transformers_major()
    _Launches.install()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _Launches.item, _Launches.started = item, []


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    _Launches.item = None


@pytest.fixture(autouse=True)
def _slow_marks_exactly_the_launching_tests(request: pytest.FixtureRequest):
    """The tiers mean what they say: a test not marked ``slow`` that starts a process (an interpreter, ranks, a
    compiler, a logger's service, data-loader workers) fails, even where a library caught the refusal; a ``slow``
    test starts one or reads a shared launch (:data:`SHARED_LAUNCHES`). ``make test-fast`` (``-m "not slow"``) is
    then the tier that launches nothing."""
    yield
    slow = request.node.get_closest_marker("slow") is not None
    if not slow:
        assert not _Launches.started, f"not marked slow, but started a process: {_Launches.started}"
    else:
        assert _Launches.started or set(SHARED_LAUNCHES) & set(request.fixturenames), \
            "marked slow, but starts no process and reads no shared launch: remove the mark"


@pytest.fixture(scope="session", autouse=True)
def _corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One tokenisation cache for the whole session (the corpus is real, the cache is temporary)."""
    os.environ["LIGHTNING_MSIGN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session", autouse=True)
def _inductor_cache() -> None:
    """Inductor's compiled kernels in a cache of this instruction set's own (kept between sessions), not in the
    machine's shared ``/tmp/torchinductor_<user>``: a kernel built under another one (``ATEN_CPU_CAPABILITY=avx2``
    on an AVX-512 machine, measured here) and reused from the shared cache corrupted the heap."""
    import hashlib
    import tempfile

    import torch

    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    isa = [flags, torch.__version__] + [os.environ.get(v, "") for v in (
        "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")]
    key = hashlib.sha256("\n".join(isa).encode()).hexdigest()[:16]
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tempfile.gettempdir()) / "lightning_msign_inductor" / key)


TESTS = Path(__file__).resolve().parent
LAUNCH_TIMEOUT = 600


def launch(script: Path | str, *args: str, timeout: float = LAUNCH_TIMEOUT, env: dict[str, str] | None = None,
           cwd: Path | str | None = None) -> subprocess.CompletedProcess:
    """Run ``python script args...`` in a fresh interpreter (one thread per process, a free rendezvous port) and
    fail with the end of its output when it does not exit 0. Every multi-process test starts its processes here."""
    full_env = dict(os.environ if env is None else env, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    full_env.pop("MASTER_PORT", None)
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], env=full_env, capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, f"{script} {' '.join(map(str, args))} exited {proc.returncode}:\n" + \
        proc.stdout[-4000:] + "\n" + proc.stderr[-8000:]
    return proc


def load_ranks(out: Path, world: int = 2) -> list[dict[str, Any]]:
    """The ``rank<r>.pt`` records a multi-process job wrote under ``out``."""
    import torch

    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def fit_under_plain_ddp(out: str, callback: Any, module: Any, max_steps: int) -> tuple[Optional[str], int]:
    """In a 2-process job: fit ``module`` under ``strategy="ddp"`` (no ``find_unused_parameters``) with ``callback``;
    the ``ValueError`` it raised (``None``: none) and the steps trained."""
    from lightning.pytorch import Trainer

    trainer = Trainer(**trainer_kwargs(out, devices=2, strategy="ddp", max_steps=max_steps), callbacks=[callback])
    try:
        trainer.fit(module, tiny_data(num_workers=0))
    except ValueError as err:
        return str(err), trainer.global_step
    return None, trainer.global_step


def load_script(path: Path):
    """A script of the repository (not a package module: a benchmark, an example, a docs hook) as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def two_process_job(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """``two_process_job(strategy, case)``: the folder of that case's records (tests/jobs.py). The first call for a
    strategy launches all its cases at once (one 2-process launch per strategy for the whole session); a failed
    launch fails every test that asks for that strategy, with the launch's output."""
    done: dict[str, Path | Exception] = {}

    def get(strategy: str, case: str) -> Path:
        if strategy not in done:
            out = tmp_path_factory.mktemp(f"jobs_{strategy}")
            try:
                launch(TESTS / "jobs.py", "--strategy", strategy, "--out", out)
                done[strategy] = out
            except (AssertionError, subprocess.TimeoutExpired) as err:
                done[strategy] = err
        result = done[strategy]
        if isinstance(result, Exception):
            raise result
        assert (result / case).is_dir(), f"tests/jobs.py has no case {case!r} for {strategy!r}"
        return result / case

    return get


def tiny_module(**kwargs: Any):
    from lightning_msign import LitGPTModule

    kwargs.setdefault("lr", 3e-3)
    kwargs.setdefault("warmup_steps", 2)
    return LitGPTModule(dict(TINY_CONFIG), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, **kwargs)


def tiny_data(**kwargs: Any):
    from lightning_msign import ShakespeareDataModule

    kwargs.setdefault("seq_len", TINY_SEQ)
    kwargs.setdefault("batch_size", 4)
    return ShakespeareDataModule(**kwargs)


def trainer_kwargs(tmp_path, **kwargs: Any) -> dict[str, Any]:
    base = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=6,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    base.update(kwargs)
    return base


class RecordingLogger(Logger):
    """A real Logger that keeps every ``log_metrics`` call: ``records`` is a list of (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def steps_with(self, key: str) -> list[int]:
        return [step for step, m in self.records if key in m]

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.records if key in m]
