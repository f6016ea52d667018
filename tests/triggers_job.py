"""A 2-process run for tests/test_msign_triggers.py (run as a script, not collected).

``python tests/triggers_job.py --strategy ddp|fsdp2|fsdp1 --out DIR`` trains the tiny LitGPT of tests/conftest.py at a
learning rate where its attention logits run away, with MSign triggered by them; every process writes
``DIR/rank<r>.pt``: the attention-logit maxima it measured on its own batch after each step (before MSign acts),
the steps MSign applied after, the guard's state and the whole parameters at the end. ``--save-every N`` writes
checkpoints to ``DIR/ckpt``; ``--ckpt-path`` resumes from one (``--steps`` is the total).

``--threshold split`` reads the threshold off this machine's own trajectory instead of a number written down from
another machine's: a first run without MSign records both processes' logits; the threshold is put between the two
processes' values at a step where one process's own batch crosses it and the other's does not, above everything
before (at or before ``--split-by``); the guarded run then follows the calm one bit for bit up to that step and
triggers there. ``--threshold-of DIR`` takes the threshold an earlier case chose.
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

SPACING, STEPS = 3, 16


class Save(Callback):
    def __init__(self, out: str, msign: MSignCallback, recorder: LogitRecorder, chosen: dict[str, Any]) -> None:
        self.out, self.msign, self.recorder, self.chosen = out, msign, recorder, chosen

    def on_fit_end(self, trainer, pl_module):
        whole = whole_params(trainer, pl_module)
        torch.save({
            "per_layer": self.recorder.per_layer, "trigger_steps": list(self.msign.guard.trigger_steps),
            "state": self.msign.guard.state_dict(), "whole_params": whole, "threshold": self.msign.guard.max_attn_logit,
            "spacing": SPACING, "target_names": self.msign.guard.target_names, **self.chosen,
        }, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def split_threshold(per_rank: list[dict[int, list[float]]], split_by: int) -> tuple[float, int]:
    """``(threshold, step)``: at ``step`` (<= ``split_by``) one process's largest logit is above ``threshold`` and
    the other processes' are not, and every logit of every earlier step is below it, so a run that follows these
    logits first triggers at ``step`` on one process's measurement only. The widest such gap is taken (hotter steps
    have wider ones); the guarded run replays the calm one bit for bit, so any gap above zero splits the processes."""
    best: tuple[float, float, int] | None = None
    before = float("-inf")  # the largest logit of any layer and process so far
    for step in sorted(per_rank[0]):
        tops = [max(values[step]) for values in per_rank]
        top = max(tops)
        if step <= split_by and top > before:
            low = max(before, max(t for r, t in enumerate(tops) if r != tops.index(top)))
            if top > low and (best is None or top - low > best[0]):
                best = (top - low, (low + top) / 2, step)
        before = max(before, top)
    if best is None:
        raise SystemExit(f"--threshold split: at no step up to {split_by} does one process's largest attention logit "
                         f"rise above the others' and above every earlier one: {per_rank}")
    return best[1], best[2]


def fit(args: argparse.Namespace, out: str, threshold: float | None, chosen: dict[str, Any]) -> LogitRecorder:
    """One run: the logit recorder, and MSign triggered by ``threshold`` unless it is None (the calm run)."""
    os.makedirs(out, exist_ok=True)
    seed_everything(0, verbose=False)
    recorder = LogitRecorder(batch_size=1)
    callbacks: list[Any] = [recorder]
    if threshold is not None:
        msign = MSignCallback(period=None, targets="qk", max_attn_logit=threshold, min_spacing=SPACING,
                              probe_batch_size=1, period_after_trigger=args.period_after_trigger)
        callbacks += [msign, Save(out, msign, recorder, chosen)]
    if args.save_every and threshold is not None:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.insert(-1, ModelCheckpoint(dirpath=os.path.join(out, "ckpt"), every_n_train_steps=args.save_every,
                                             save_top_k=-1))
    trainer = Trainer(**trainer_kwargs(out, devices=2, strategy=job_strategy(args.strategy), max_steps=args.steps,
                                       enable_checkpointing=bool(args.save_every) and threshold is not None),
                      callbacks=callbacks)
    trainer.fit(tiny_module(lr=0.1), tiny_data(batch_size=8, num_workers=0),
                ckpt_path=args.ckpt_path if threshold is not None else None)
    return recorder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=("ddp", "fsdp2", "fsdp1"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--threshold", default="split", help="a number, or 'split' (see the module's docstring)")
    parser.add_argument("--threshold-of", default=None,
                        help="the threshold an earlier case chose (its records' folder; this process's record)")
    parser.add_argument("--split-by", type=int, default=None, help="latest step of the split (default: --steps)")
    parser.add_argument("--period-after-trigger", type=int, default=None, help="MSign's period_after_trigger")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--ckpt-path", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    chosen: dict[str, Any] = {}
    if args.threshold_of is not None:
        # this process's own record: written before it left that case (the other process's may still be on its way)
        dist = torch.distributed
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("LOCAL_RANK", 0))
        own = torch.load(os.path.join(args.threshold_of, f"rank{rank}.pt"), weights_only=False)
        threshold = float(own["threshold"])
    elif args.threshold == "split":
        calm = fit(args, os.path.join(args.out, "calm"), None, chosen)
        per_rank: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(per_rank, calm.per_layer)
        threshold, step = split_threshold(per_rank, args.split_by or args.steps)
        chosen.update(calm_per_layer=per_rank, split_step=step)
    else:
        threshold = float(args.threshold)
    fit(args, args.out, threshold, chosen)


if __name__ == "__main__":
    main()
