"""A 2-process Lightning DDP run with CurvatureMonitor, used by tests/test_curvature.py (run as a script).

``python tests/curvature_ddp_job.py --out DIR`` trains the tiny LitGPT of tests/conftest.py for 4 steps on 2 CPU
processes (gloo, ``strategy="ddp"``) with ``CurvatureMonitor(every_n_steps=4)``: one measurement, after the last
step. Every process writes ``DIR/rank<r>.pt``: its batch of that step, the metrics, the monitor's state, the
weights and the optimizer's state (so one process can redo the measurement on the concatenated batch).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from lightning_msign import CurvatureMonitor  # noqa: E402

from conftest import tiny_data, tiny_module, trainer_kwargs  # noqa: E402

STEPS = 4


class Record(Callback):
    def __init__(self, out: str, monitor: CurvatureMonitor) -> None:
        self.out, self.monitor, self.batch = out, monitor, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batch = {k: v.detach().clone() for k, v in batch.items()} if isinstance(batch, dict) else \
            [t.detach().clone() for t in batch]

    def on_fit_end(self, trainer, pl_module):
        record: dict[str, Any] = {
            "rank": trainer.global_rank,
            "batch": self.batch,
            "latest": self.monitor.guard.latest,
            "state": self.monitor.state_dict(),
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "optimizer": trainer.optimizers[0].state_dict(),
        }
        torch.save(record, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(7, verbose=False)
    monitor = CurvatureMonitor(every_n_steps=STEPS, iterations=3, cold_iterations=8)
    trainer = Trainer(**trainer_kwargs(args.out, devices=2, strategy="ddp", max_steps=STEPS),
                      callbacks=[monitor, Record(args.out, monitor)])
    trainer.fit(tiny_module(max_steps=STEPS), tiny_data(num_workers=0))


if __name__ == "__main__":
    main()
