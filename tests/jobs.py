"""Every 2-process Trainer case of the test suite, one launch per strategy (run as a script, not collected).

``python tests/jobs.py --strategy ddp|fsdp2|fsdp1|ddp_spawn --out DIR [--cases NAME ...]`` runs, in the same two
processes one after the other, each case of :data:`CASES` for that strategy (default: all of them); case ``NAME``
writes its records under ``DIR/NAME``. Each case is the ``main`` of one job script of this folder, given the
arguments listed here, so a case can also be run alone: ``python tests/triggers_job.py --strategy ddp --out X``.

Lightning's ``ddp``, ``ModelParallelStrategy`` (FSDP2) and ``FSDPStrategy`` start the second process by running
this script again with the same arguments; later Trainers in the same processes find ``LOCAL_RANK`` set and the
process group initialised and reuse both, as a script that calls ``fit`` twice does. Every case seeds itself, so
what it computes does not depend on the cases before it. ``ddp_spawn`` spawns its own workers at every ``fit``.

The tests read these records through the session fixture ``two_process_job`` of tests/conftest.py, which launches a
strategy the first time one of its cases is asked for.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

# case -> (job script's module, its arguments); "{out}" is this launch's --out (a case may read an earlier one's).
CASES: dict[str, dict[str, tuple[str, list[str]]]] = {
    "ddp": {
        "distributed": ("distributed_job", ["--strategy", "ddp"]),
        "triggers": ("triggers_job", ["--strategy", "ddp"]),
        "rollback": ("rollback_job", ["--strategy", "ddp", "--nan-rank", "1"]),
        "optim_numuon": ("optim_distributed_job", ["--strategy", "ddp", "--optimizer", "numuon", "--steps", "4"]),
        "optim_muon": ("optim_distributed_job", ["--strategy", "ddp", "--optimizer", "muon", "--steps", "4"]),
        "curvature": ("curvature_ddp_job", []),
        "warmup": ("warmup_ddp_job", []),
        "qk_norm": ("qk_norm_ddp_job", []),
    },
    "fsdp2": {
        "distributed": ("distributed_job", ["--strategy", "fsdp2", "--monitor-mode", "exact"]),
        "triggers": ("triggers_job", ["--strategy", "fsdp2"]),
        "rollback": ("rollback_job", ["--strategy", "fsdp2", "--nan-rank", "1"]),
        # optim_numuon is also the straight run the resumed one is compared with
        "optim_numuon": ("optim_distributed_job", ["--strategy", "fsdp2", "--optimizer", "numuon", "--steps", "4"]),
        "optim_first": ("optim_distributed_job", ["--strategy", "fsdp2", "--optimizer", "numuon", "--steps", "2",
                                                  "--save-every", "2"]),
        "optim_resumed": ("optim_distributed_job", ["--strategy", "fsdp2", "--optimizer", "numuon", "--steps", "4",
                                                    "--ckpt-path", "{out}/optim_first/ckpt/epoch=0-step=2.ckpt"]),
    },
    "fsdp1": {
        "distributed": ("distributed_job", ["--strategy", "fsdp1", "--monitor-mode", "exact"]),
        "distributed_manual": ("distributed_job", ["--strategy", "fsdp1_manual", "--monitor-mode", "exact"]),
        "distributed_bf16": ("distributed_job", ["--strategy", "fsdp1", "--monitor-mode", "exact",
                                                 "--precision", "bf16-mixed"]),
        "triggers": ("triggers_job", ["--strategy", "fsdp1"]),
        # a first trigger by step 5, then every 3 steps: triggers on both sides of the checkpoint at step 6
        "triggers_straight": ("triggers_job", ["--strategy", "fsdp1", "--split-by", "5", "--period-after-trigger", "3",
                                               "--steps", "12", "--save-every", "6"]),
        "triggers_resumed": ("triggers_job", ["--strategy", "fsdp1", "--threshold-of", "{out}/triggers_straight",
                                              "--period-after-trigger", "3", "--steps", "12",
                                              "--ckpt-path", "{out}/triggers_straight/ckpt/epoch=0-step=6.ckpt"]),
        "rollback": ("rollback_job", ["--strategy", "fsdp1", "--nan-rank", "1"]),
    },
    "ddp_spawn": {
        "distributed": ("distributed_job", ["--strategy", "ddp_spawn"]),
    },
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=sorted(CASES))
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", nargs="+", default=None, help="a subset of the strategy's cases, in this order")
    args = parser.parse_args(argv)
    faulthandler.enable()  # a process killed by a signal (abort, segfault) prints where each thread was
    cases = CASES[args.strategy]
    names = args.cases or list(cases)
    unknown = [n for n in names if n not in cases]
    if unknown:
        parser.error(f"--cases: {unknown} are not cases of {args.strategy!r}; its cases are {list(cases)}")
    rank = os.environ.get("LOCAL_RANK", "0")
    for name in names:
        module, case_args = cases[name]
        start = time.perf_counter()
        print(f"[rank {rank}] case {name}: {module} {' '.join(case_args)}", flush=True)
        groups = process_groups()
        importlib.import_module(module).main(
            [a.replace("{out}", args.out) for a in case_args] + ["--out", os.path.join(args.out, name)]
        )
        release(process_groups() - groups)
        print(f"[rank {rank}] case {name}: done in {time.perf_counter() - start:.1f} s", flush=True)
    if torch.distributed.is_initialized():  # before exit, not in the interpreter's teardown (gloo's threads)
        torch.distributed.destroy_process_group()


def process_groups() -> set[Any]:
    """The process groups alive in this process besides the default one (none before it exists)."""
    if not torch.distributed.is_initialized():
        return set()
    from torch.distributed.distributed_c10d import _world  # no public list of the groups

    return {g for g in _world.pg_map if g is not torch.distributed.group.WORLD}


def release(groups: set[Any]) -> None:
    """Destroy the groups a case created: ``ModelParallelStrategy`` builds a device mesh, with its own gloo groups,
    at every fit; the cases of one launch would otherwise pile them up (each with its threads and connections)."""
    for group in groups:
        torch.distributed.destroy_process_group(group)


if __name__ == "__main__":
    main()
