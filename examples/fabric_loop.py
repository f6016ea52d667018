"""Train a tiny LitGPT on Shakespeare with Lightning Fabric, guarded by MSign, PSS and StableRank.

    python examples/fabric_loop.py --steps 60                  # one CPU process
    python examples/fabric_loop.py --steps 60 --devices 2      # DDP over 2 CPU processes (gloo)
    python examples/fabric_loop.py --steps 90 --resume runs/fabric/step-60.ckpt

The guards are attached to the model Fabric returns (they look through its wrapper: metric names carry no
``_forward_module.``). Under DDP each whole matrix is signed or smoothed on one process and shared, so every
process holds the same weights, and the guards make the same decisions on every process. Metrics go to a
CSV file through ``fabric.log_dict``; the guards' state goes into Fabric checkpoints beside the model's (a
guard has ``state_dict`` / ``load_state_dict``, so ``fabric.save`` / ``fabric.load`` handle it like a module).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from litgpt import GPT, Config

from lightning_msign import PSS, MSign, ShakespeareDataModule, StableRank
from lightning_msign.data import ResumableDataLoader


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps (in all, when resuming)")
    parser.add_argument("--devices", type=int, default=1, help="CPU processes (DDP when more than one)")
    parser.add_argument("--period", type=int, default=10, help="MSign: optimizer steps between applications")
    parser.add_argument("--tau", type=float, default=2.5, help="PSS: trigger threshold on the gradient-norm ratio")
    parser.add_argument("--pss-warmup", type=int, default=5, help="PSS: optimizer steps before the detector is armed")
    parser.add_argument("--log-every", type=int, default=5, help="measure stable ranks every n steps")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint every n steps (0: only at the end)")
    parser.add_argument("--resume", default=None, help="a checkpoint written by this script")
    parser.add_argument("--out", default="runs/fabric", help="folder of the CSV logs and checkpoints")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per process")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def forever(loader: ResumableDataLoader) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of epoch after epoch; the sampler shuffles by ``(seed, epoch)`` and shards by rank itself."""
    while True:
        yield from loader
        loader.sampler.set_epoch(loader.sampler.epoch + 1)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                    loggers=CSVLogger(args.out, name="logs"))
    fabric.launch()
    fabric.seed_everything(args.seed)

    data = ShakespeareDataModule(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    with fabric.rank_zero_first():
        data.setup("fit")  # rank zero tokenizes the corpus into the cache, the others read it
    loader = data.train_dataloader()  # each process gets its shard of every epoch's permutation

    config = Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=64, block_size=args.seq_len, bias=False,
                    vocab_size=data.vocab_size, padded_vocab_size=data.vocab_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    model, optimizer = fabric.setup(model, optimizer)

    msign = MSign(model, period=args.period, targets="qk")
    pss = PSS(model, tau=args.tau, warmup_steps=args.pss_warmup, targets="qk")
    monitor = StableRank(model, targets="attention", every_n_steps=args.log_every)

    state = {"model": model, "optimizer": optimizer, "data": loader,
             "msign": msign, "pss": pss, "monitor": monitor, "step": 0}
    if args.resume:
        fabric.load(args.resume, state)  # restores everything in place, the guards included; sets state["step"]

    batches = forever(loader)
    for step in range(state["step"] + 1, args.steps + 1):
        batch = fabric.to_device(next(batches))
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        fabric.backward(loss)  # DDP averages the gradients over the processes

        metrics = pss.before_optimizer_step(step)  # the global gradient norm; on a spike, smooth Q and K
        metrics.update(monitor.grad_norm(step))
        fabric.clip_gradients(model, optimizer, max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad()
        metrics.update(msign.step(step))  # after steps period, 2 * period, ...: flat Q and K spectra
        metrics.update(monitor.step(step))

        fabric.log_dict({"train/loss": loss.item(), **metrics}, step=step)  # rank zero writes
        if "msign/applications" in metrics:
            fabric.print(f"step {step}: MSign, smallest stable rank {metrics['msign/srank_before_min']:.1f}"
                         f" -> {metrics['msign/srank_after_min']:.1f}")
        if metrics.get("pss/triggered"):
            fabric.print(f"step {step}: PSS triggered (gradient norm {metrics['pss/ratio']:.1f} x its average)")
        state["step"] = step
        if step == args.steps or (args.save_every and step % args.save_every == 0):
            fabric.save(Path(args.out) / f"step-{step}.ckpt", state)

    fabric.print(f"done: {state['step']} steps, {msign.applications} MSign applications, {pss.triggers} PSS triggers")
    fabric.logger.finalize("success")
    return state


if __name__ == "__main__":
    main()
