"""A short 2-process training run with Muon / NuMuon, used by tests/test_optim_distributed.py (not collected).

``python tests/optim_distributed_job.py --strategy ddp|fsdp2 --optimizer numuon|muon --out DIR`` trains the tiny
LitGPT of tests/conftest.py on 2 CPU processes (gloo), and every process writes ``DIR/rank<r>.pt``: at every
optimizer step the whole parameters before and after the step, the whole gradients it stepped with and the
groups' learning rates; at the end its own parameters (whole), the optimizer's Krylov warm-start state, the
groups' counters and (rank 0) everything logged.
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

from lightning_msign.distributed import is_sharded  # noqa: E402

from conftest import RecordingLogger, tiny_data, tiny_module, trainer_kwargs  # noqa: E402


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective for DTensors: every process calls it at the same point)."""
    return (t.full_tensor() if is_sharded(t) else t.data).detach().clone().cpu()


class Record(Callback):
    def __init__(self, store: dict[str, Any]) -> None:
        self.store = store

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        step = trainer.global_step + 1
        self.store.setdefault("steps", {})[step] = {
            "before": {n: whole(p) for n, p in pl_module.named_parameters()},
            "grads": {n: whole(p.grad) for n, p in pl_module.named_parameters() if p.grad is not None},
            "lrs": [g["lr"] for g in optimizer.param_groups],
        }

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.store["steps"][trainer.global_step]["after"] = {n: whole(p) for n, p in pl_module.named_parameters()}


class Save(Callback):
    def __init__(self, out: str, store: dict[str, Any], logger: RecordingLogger) -> None:
        self.out, self.store, self.logger = out, store, logger

    def on_fit_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        krylov = {
            names[id(p)]: {k: whole(v) for k, v in state.items() if k.startswith("krylov_right")}
            for p, state in opt.state.items() if id(p) in names and any(k.startswith("krylov_right") for k in state)
        }
        torch.save({
            "rank": trainer.global_rank, "world": trainer.world_size, **self.store,
            "params": {n: whole(p) for n, p in pl_module.named_parameters()},
            "krylov": krylov,
            "groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
            "group_names": [[names[id(p)] for p in g["params"]] for g in opt.param_groups],
            "records": self.logger.records,
        }, os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=("ddp", "fsdp2"))
    parser.add_argument("--optimizer", required=True, choices=("muon", "numuon"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (ModelCheckpoint)")
    parser.add_argument("--ckpt-path", default=None, help="resume from this checkpoint")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    torch.set_num_threads(1)
    seed_everything(7, verbose=False)
    strategy: Any = args.strategy
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    store: dict[str, Any] = {}
    logger = RecordingLogger()
    options = {"rank_fraction": 0.25, "oversample": 2, "krylov_iterations": 1} if args.optimizer == "numuon" else {}
    callbacks: list[Callback] = [Record(store)]
    if args.save_every:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=os.path.join(args.out, "ckpt"), every_n_train_steps=args.save_every,
                                         save_top_k=-1))
    trainer = Trainer(
        **trainer_kwargs(args.out, devices=2, strategy=strategy, max_steps=args.steps, logger=logger,
                         log_every_n_steps=1, enable_checkpointing=bool(args.save_every)),
        callbacks=callbacks,
    )
    trainer.callbacks.append(Save(args.out, store, logger))
    # max_steps fixed: one LR schedule whatever the Trainer's max_steps (a resumed run continues the same one)
    module = tiny_module(optimizer=args.optimizer, optimizer_options=options, lr=1e-2, max_steps=8)
    trainer.fit(module, tiny_data(num_workers=0), ckpt_path=args.ckpt_path)


if __name__ == "__main__":
    main()
