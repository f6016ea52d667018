"""2-process Lightning DDP runs with DepthWarmupCallback, used by tests/test_warmup.py (run as a script).

``python tests/warmup_ddp_job.py --out DIR``: first ``strategy="ddp"`` (DDP without ``find_unused_parameters``),
which the callback must refuse at ``on_fit_start`` on every process; then ``"ddp_find_unused_parameters_true"``
for 3 steps of a 4-block LitGPT that starts with blocks 0 and 1 and unlocks block 2 after step 1. Every process
writes ``DIR/rank<r>.pt``: the refusal's message, the steps trained, the active blocks, the weights before and
after.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402

from lightning_msign import DepthWarmupCallback, LitGPTModule  # noqa: E402

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB, fit_under_plain_ddp, tiny_data, trainer_kwargs  # noqa: E402

STEPS = 3


def module() -> LitGPTModule:
    return LitGPTModule(dict(TINY_CONFIG, n_layer=4), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, lr=3e-3,
                        warmup_steps=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(3, verbose=False)
    refused, refused_steps = fit_under_plain_ddp(args.out, DepthWarmupCallback(interval=100), module(), STEPS)

    seed_everything(3, verbose=False)
    model = module()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    warmup = DepthWarmupCallback(interval=100)
    trainer = Trainer(**trainer_kwargs(args.out, devices=2, strategy="ddp_find_unused_parameters_true",
                                       max_steps=STEPS), callbacks=[warmup])
    trainer.fit(model, tiny_data(num_workers=0))
    record = {
        "refused": refused,
        "refused_steps": refused_steps,
        "steps": trainer.global_step,
        "active_blocks": warmup.active_blocks,
        "before": before,
        "after": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
