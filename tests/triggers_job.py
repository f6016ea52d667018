"""A 2-process run for tests/test_msign_triggers.py (run as a script, not collected).

``python tests/triggers_job.py --strategy ddp|fsdp2|fsdp1 --out DIR`` trains the tiny LitGPT of tests/conftest.py at a
learning rate where its attention logits run away, with MSign triggered by them; every process writes
``DIR/rank<r>.pt``: the attention-logit maxima it measured on its own batch after each step (before MSign acts),
the steps MSign applied after, the guard's state and the whole parameters at the end. ``--save-every N`` writes
checkpoints to ``DIR/ckpt``; ``--ckpt-path`` resumes from one (``--steps`` is the total).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fsdp1 import job_strategy  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402
from test_msign_triggers import LogitRecorder  # noqa: E402

from lightning_msign import MSignCallback  # noqa: E402

from conftest import tiny_data, tiny_module, trainer_kwargs  # noqa: E402
from distributed_job import whole_params  # noqa: E402

# At step 5 layer 0's largest logit (one sequence each) is 21.5 on rank 0 and 24.7 on rank 1, layer 1's 32 on
# both, everything below 17 before: with 23 the processes see different hot layers at the first trigger.
THRESHOLD, SPACING, STEPS = 23.0, 3, 16


class Save(Callback):
    def __init__(self, out: str, msign: MSignCallback, recorder: LogitRecorder) -> None:
        self.out, self.msign, self.recorder = out, msign, recorder

    def on_fit_end(self, trainer, pl_module):
        whole = whole_params(trainer, pl_module)
        torch.save({
            "per_layer": self.recorder.per_layer, "trigger_steps": list(self.msign.guard.trigger_steps),
            "state": self.msign.guard.state_dict(), "whole_params": whole, "threshold": self.msign.guard.max_attn_logit,
            "spacing": SPACING, "target_names": self.msign.guard.target_names,
        }, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=("ddp", "fsdp2", "fsdp1"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--threshold", type=float, default=THRESHOLD)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--ckpt-path", default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(0, verbose=False)
    strategy = job_strategy(args.strategy)
    recorder = LogitRecorder(batch_size=1)
    msign = MSignCallback(period=None, targets="qk", max_attn_logit=args.threshold, min_spacing=SPACING,
                          probe_batch_size=1)
    callbacks: list[Any] = [recorder, msign]
    if args.save_every:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.save_every,
                                         save_top_k=-1))
    trainer = Trainer(**trainer_kwargs(args.out, devices=2, strategy=strategy, max_steps=args.steps,
                                       enable_checkpointing=bool(args.save_every)), callbacks=callbacks)
    trainer.callbacks.append(Save(args.out, msign, recorder))
    trainer.fit(tiny_module(lr=0.1), tiny_data(batch_size=8, num_workers=0), ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
