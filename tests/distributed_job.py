"""A short multi-process training run used by tests/test_distributed.py (run as a script, not collected).

``python tests/distributed_job.py --strategy ddp|ddp_spawn|fsdp2|fsdp1|fsdp1_manual --out DIR`` trains the
tiny LitGPT of tests/conftest.py on 2 CPU processes (gloo) with MSignCallback, PSSCallback (forced to
trigger) and StableRankMonitor, and every process writes ``DIR/rank<r>.pt``: whole target weights just
before and just after each MSign application and PSS protection, its own shards after them, its parameters
at the end, the callbacks' state, and (rank 0) everything logged. Whole weights are keyed by the parameter
names of the unwrapped model (FSDP1's ``_fsdp_wrapped_module`` segments dropped). ``fsdp1`` wraps like
Lightning's FSDPStrategy (the root around the LightningModule, one unit per Block); ``fsdp1_manual`` has the
module wrap itself in ``configure_model`` (tests/_fsdp1.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _fsdp1 import job_strategy, roots, self_wrapping_module  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from lightning_msign import MSignCallback, PSSCallback, StableRankMonitor  # noqa: E402
from lightning_msign.targets import clean_name, is_sharded  # noqa: E402

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs  # noqa: E402


def whole(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter (a collective for DTensors: every process calls it at the same point)."""
    return (p.full_tensor() if is_sharded(p) else p.data).detach().clone().cpu()


def local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if is_sharded(p) else p.data).detach().clone().cpu()


def whole_params(trainer, pl_module, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient), whole, keyed by clean name; FSDP1 units are gathered (every process)."""
    fsdp1 = [m for m in pl_module.modules() if isinstance(m, FSDP)]
    if not fsdp1 and not isinstance(trainer.strategy.model, FSDP):
        values = {n: (p.grad if grads else p) for n, p in pl_module.named_parameters()}
        return {clean_name(n): whole(v) for n, v in values.items() if v is not None}
    out = {}
    with ExitStack() as stack:
        for root in roots(trainer.strategy.model):
            stack.enter_context(FSDP.summon_full_params(root, writeback=False, with_grads=grads))
        for n, p in pl_module.named_parameters():
            value = p.grad if grads else p
            if value is not None:
                out[clean_name(n)] = value.detach().clone().cpu()
    return out


def local_params(pl_module) -> dict[str, torch.Tensor]:
    return {clean_name(n): local(p) for n, p in pl_module.named_parameters()}


class Snapshot(Callback):
    """Records whole weights (and own shards) at MSign application and PSS trigger steps."""

    def __init__(self, tag: str, period: int, pss: PSSCallback, store: dict[str, Any]) -> None:
        self.tag, self.period, self.pss, self.store = tag, period, pss, store

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Before the optimizer step; PSS protects in this hook (this callback runs before and after it).
        step = trainer.global_step + 1
        self.store.setdefault("pss_" + self.tag, {})[step] = {
            "whole": {n: v for n, v in whole_params(trainer, pl_module).items() if v.ndim >= 2},
            "local": local_params(pl_module),
            "triggers": self.pss.guard.triggers,
        }
        if self.tag == "before":
            sq = sum(float(g.double().square().sum()) for g in whole_params(trainer, pl_module, grads=True).values())
            self.store.setdefault("grad_norm", {})[step] = sq**0.5

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.period == 0:
            self.store.setdefault("msign_" + self.tag, {})[trainer.global_step] = {
                "whole": {n: v for n, v in whole_params(trainer, pl_module).items() if v.ndim >= 2},
                "local": local_params(pl_module),
            }


class Save(Callback):
    """Writes this process's record at the end of fit (inside the worker processes for ddp_spawn)."""

    def __init__(self, out, store, msign, pss, monitor, logger) -> None:
        self.out, self.store, self.msign, self.pss, self.monitor, self.logger = out, store, msign, pss, monitor, logger

    def on_fit_end(self, trainer, pl_module):
        cbs = (self.msign, self.pss, self.monitor)
        rank = trainer.global_rank
        self.store.update(
            rank=rank,
            world=trainer.world_size,
            params=local_params(pl_module),
            whole_params=whole_params(trainer, pl_module),
            owners={type(cb).__name__: cb.guard.plan.owners() for cb in cbs},
            share={type(cb).__name__: cb.guard.plan.local_share() for cb in cbs},
            msign_state=self.msign.state_dict(),
            pss_state=self.pss.state_dict(),
            pss_trigger_steps=list(self.pss.guard.trigger_steps),
            monitor_state=self.monitor.state_dict(),
            records=self.logger.records if rank == 0 else [],
        )
        torch.save(self.store, os.path.join(self.out, f"rank{rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=("ddp", "ddp_spawn", "fsdp2", "fsdp1", "fsdp1_manual"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--backend", default="svd")
    parser.add_argument("--monitor-mode", default="power")
    parser.add_argument("--precision", default="32-true")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    torch.set_num_threads(1)
    seed_everything(7, verbose=False)
    strategy = job_strategy(args.strategy)

    store: dict[str, Any] = {}
    msign = MSignCallback(period=args.period, targets="attention", backend=args.backend)
    # A tiny tau with a short warm-up makes PSS trigger (on qk) a few times in a short run.
    pss = PSSCallback(tau=1.0001, warmup_steps=2, cooldown_steps=2, alpha=0.5)
    monitor = StableRankMonitor(mode=args.monitor_mode)
    logger = RecordingLogger()
    callbacks = [
        Snapshot("before", args.period, pss, store),
        pss,
        msign,
        Snapshot("after", args.period, pss, store),
        monitor,
    ]
    trainer = Trainer(
        **trainer_kwargs(args.out, devices=2, strategy=strategy, max_steps=args.steps, logger=logger,
                         precision=args.precision),
        callbacks=callbacks,
    )
    trainer.callbacks.append(Save(args.out, store, msign, pss, monitor, logger))
    module = self_wrapping_module() if args.strategy == "fsdp1_manual" else tiny_module()
    trainer.fit(module, tiny_data(num_workers=0))


if __name__ == "__main__":
    main()
