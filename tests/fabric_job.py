"""A short Fabric training run used by tests/test_fabric.py (run as a script for each rank, not collected).

``python tests/fabric_job.py --out DIR --devices N`` trains the tiny LitGPT of tests/test_guards.py with AdamW
in a Fabric loop with MSign, PSS (forced to trigger by a loss scaled at one step) and StableRank attached to
the Fabric-wrapped model, on fixed random global batches of ``GLOBAL_BATCH`` sequences (process ``r`` of
``N`` trains on its ``r``-th slice), and every process writes ``DIR/rank<r>.pt``: the guards' target names,
owners and state, the metrics they returned at every step, the singular-value spread of every signed block
right after each MSign application, its final weights, and the guards' state read back from a checkpoint
written with ``fabric.save`` (into new guards, with ``fabric.load``).

With ``N > 1`` the test starts one process per rank with ``LOCAL_RANK`` set (as ``fabric run`` and ``torchrun``
do), so each has its own exit code and output; the process group is created here from a FileStore in
``DIR`` (no TCP store hosted by rank 0, whose exit could abort the other process), and ``fabric.launch()``
finds it. ``main`` can also be called in-process with ``--devices 1``.
"""

from __future__ import annotations

import argparse
import os
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.fabric import Fabric
from litgpt import GPT, Config

from lightning_msign import PSS, MSign, StableRank

GPT_CONFIG = dict(
    n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=16, vocab_size=64, padded_vocab_size=64, bias=False
)
GLOBAL_BATCH = 8


def make_guards(model: torch.nn.Module, period: int) -> dict[str, Any]:
    return {
        "msign": MSign(model, period=period, targets="attention"),
        "pss": PSS(model, tau=2.5, warmup_steps=2, cooldown_steps=2),
        "monitor": StableRank(model, every_n_steps=2),
    }


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--period", type=int, default=4)
    parser.add_argument("--spike", type=int, default=6, help="the optimizer step whose loss is scaled by 10")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)

    if args.devices > 1 and not dist.is_initialized():
        rank = int(os.environ["LOCAL_RANK"])
        dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=args.devices,
                                timeout=timedelta(seconds=120))
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto")
    fabric.launch()
    fabric.seed_everything(7, verbose=False)
    rank, world = fabric.global_rank, fabric.world_size

    model = GPT(Config(**GPT_CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    model, optimizer = fabric.setup(model, optimizer)
    guards = make_guards(model, args.period)  # attached to the wrapped model
    msign, pss, monitor = guards["msign"], guards["pss"], guards["monitor"]

    gen = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, GPT_CONFIG["vocab_size"], (args.steps, GLOBAL_BATCH, GPT_CONFIG["block_size"] + 1),
                           generator=gen)
    per_rank = GLOBAL_BATCH // world
    record: dict[str, Any] = {"rank": rank, "world": world, "metrics": {}, "flatness": {}}
    for step in range(1, args.steps + 1):
        batch = fabric.to_device(tokens[step - 1, rank * per_rank : (rank + 1) * per_rank])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        fabric.backward(loss * (10.0 if step == args.spike else 1.0))
        metrics = pss.before_optimizer_step(step)
        metrics.update(monitor.grad_norm(step))
        optimizer.step()
        optimizer.zero_grad()
        signed = msign.step(step)
        if signed:
            spread = {}
            for t in msign.matrices:
                s = torch.linalg.svdvals(t.matrix().double())
                spread[t.name] = float(s.max() / s.min())
            record["flatness"][step] = spread
        metrics.update(signed)
        metrics.update(monitor.step(step))
        record["metrics"][step] = {k: v for k, v in metrics.items() if not k.endswith("time_ms")}

    ckpt = out / "guards.ckpt"
    fabric.save(ckpt, {"model": model, "optimizer": optimizer, **guards, "step": args.steps})
    fresh = make_guards(model, args.period)
    remainder = fabric.load(ckpt, dict(fresh))
    record.update(
        names={k: g.target_names for k, g in guards.items()},
        owners={k: g.plan.owners() for k, g in guards.items()},
        share={k: g.plan.local_share() for k, g in guards.items()},
        state={k: g.state_dict() for k, g in guards.items()},
        loaded_state={k: g.state_dict() for k, g in fresh.items()},
        checkpoint_keys=sorted(remainder),
        params={n: p.detach().clone() for n, p in msign.module.named_parameters()},  # the user's names
        module_names=[n for n, _ in model.named_parameters()],
    )
    torch.save(record, out / f"rank{rank}.pt")
    fabric.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()  # a FileStore: no process hosts it, so no exit order matters
    return record


if __name__ == "__main__":
    main()
