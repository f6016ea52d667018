"""A 2-process run for tests/test_rollback.py (run as a script, not collected).

``python tests/rollback_job.py --strategy ddp|fsdp2|fsdp1 --out DIR [--nan-rank R]`` trains the tiny LitGPT of
tests/test_rollback.py on 2 CPU processes with RollbackCallback, the loss NaN at optimizer step 7 on process ``R``
only (default: both), then, in the same processes, the reference run that skips the batches the rollback
undoes. Every process writes ``DIR/rolled/rank<r>.pt`` and ``DIR/reference/rank<r>.pt``: the guard's state
and the whole parameters at the end.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fsdp1 import job_strategy  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from test_rollback import Injecting, SkippingData, data  # noqa: E402

from lightning_msign import RollbackCallback  # noqa: E402

from conftest import trainer_kwargs  # noqa: E402
from distributed_job import whole_params  # noqa: E402

BAD, EVERY, STEPS = 7, 4, 12


class Save(Callback):
    def __init__(self, out: str, guard: RollbackCallback | None) -> None:
        self.out, self.guard = out, guard

    def on_fit_end(self, trainer, pl_module):
        torch.save({
            "state": None if self.guard is None else self.guard.state_dict(),
            "whole_params": whole_params(trainer, pl_module), "global_step": trainer.global_step,
        }, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=("ddp", "fsdp2", "fsdp1"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--nan-rank", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # Two fits in the same processes (one launch): the guarded run with the NaN, then the reference that skips
    # the batches the rollback undoes, without NaN or guard.
    for name in ("rolled", "reference"):
        out = os.path.join(args.out, name)
        os.makedirs(out, exist_ok=True)
        seed_everything(3, verbose=False)
        strategy = job_strategy(args.strategy)
        if name == "reference":
            guard, callbacks, steps = None, [], STEPS
            module, datamodule = Injecting({}), SkippingData(set(range(EVERY, BAD)))
        else:
            guard = RollbackCallback(snapshot_every=EVERY, z_threshold=None)
            callbacks, steps = [guard], STEPS + BAD - EVERY
            module, datamodule = Injecting({BAD: float("nan")}, rank=args.nan_rank), data()
        trainer = Trainer(**trainer_kwargs(out, devices=2, strategy=strategy, max_steps=steps), callbacks=callbacks)
        trainer.callbacks.append(Save(out, guard))
        trainer.fit(module, datamodule)


if __name__ == "__main__":
    main()
