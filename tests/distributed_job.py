"""A short multi-process training run used by tests/test_distributed.py (run as a script, not collected).

``python tests/distributed_job.py --strategy ddp|ddp_spawn|fsdp2 --out DIR`` trains the tiny LitGPT of
tests/conftest.py on 2 CPU processes (gloo) with MSignCallback, PSSCallback (forced to trigger) and
StableRankMonitor, and every process writes ``DIR/rank<r>.pt``: whole target weights just before and
just after each MSign application and PSS protection, its own shards after them, its parameters at
the end, the callbacks' state, and (rank 0) everything logged.
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

from lightning_msign import MSignCallback, PSSCallback, StableRankMonitor  # noqa: E402
from lightning_msign.targets import is_sharded  # noqa: E402

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs  # noqa: E402


def whole(p: torch.Tensor) -> torch.Tensor:
    """The whole parameter (a collective for DTensors: every process calls it at the same point)."""
    return (p.full_tensor() if is_sharded(p) else p.data).detach().clone().cpu()


def local(p: torch.Tensor) -> torch.Tensor:
    return (p.to_local() if is_sharded(p) else p.data).detach().clone().cpu()


class Snapshot(Callback):
    """Records whole weights (and own shards) at MSign application and PSS trigger steps."""

    def __init__(self, tag: str, period: int, pss: PSSCallback, store: dict[str, Any]) -> None:
        self.tag, self.period, self.pss, self.store = tag, period, pss, store

    def _params(self, pl_module):
        return {n: p for n, p in pl_module.named_parameters() if p.ndim >= 2}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        # Before the optimizer step; PSS protects in this hook (this callback runs before and after it).
        step = trainer.global_step + 1
        params = self._params(pl_module)
        self.store.setdefault("pss_" + self.tag, {})[step] = {
            "whole": {n: whole(p) for n, p in params.items()},
            "local": {n: local(p) for n, p in params.items()},
            "triggers": self.pss.guard.triggers,
        }
        if self.tag == "before":
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            sq = sum(float(whole(g).double().square().sum()) for g in grads)
            self.store.setdefault("grad_norm", {})[step] = sq**0.5

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.period == 0:
            params = self._params(pl_module)
            self.store.setdefault("msign_" + self.tag, {})[trainer.global_step] = {
                "whole": {n: whole(p) for n, p in params.items()},
                "local": {n: local(p) for n, p in params.items()},
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
            params={n: local(p) for n, p in pl_module.named_parameters()},
            whole_params={n: whole(p) for n, p in pl_module.named_parameters()},
            owners={type(cb).__name__: cb.guard.plan.owners() for cb in cbs},
            share={type(cb).__name__: cb.guard.plan.local_share() for cb in cbs},
            msign_state=self.msign.state_dict(),
            pss_state=self.pss.state_dict(),
            pss_trigger_steps=list(self.pss.guard.trigger_steps),
            monitor_state=self.monitor.state_dict(),
            records=self.logger.records if rank == 0 else [],
        )
        torch.save(self.store, os.path.join(self.out, f"rank{rank}.pt"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=("ddp", "ddp_spawn", "fsdp2"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--backend", default="svd")
    parser.add_argument("--monitor-mode", default="power")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    torch.set_num_threads(1)
    seed_everything(7, verbose=False)
    strategy: Any = args.strategy
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)

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
        **trainer_kwargs(args.out, devices=2, strategy=strategy, max_steps=args.steps, logger=logger),
        callbacks=callbacks,
    )
    trainer.callbacks.append(Save(args.out, store, msign, pss, monitor, logger))
    trainer.fit(tiny_module(), tiny_data(num_workers=0))


if __name__ == "__main__":
    main()
