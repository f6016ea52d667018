"""Train a tiny LitGPT on Shakespeare in a plain PyTorch loop, guarded by MSign, PSS and StableRank.

    python examples/plain_loop.py --steps 60

The guards need no Trainer: build them on the model, then call

* ``pss.before_optimizer_step(step)`` after ``loss.backward()`` and before clipping and ``optimizer.step()``
  (it reads the gradient norm, and smooths the dominant singular values of Q and K on a spike);
* ``msign.step(step)`` after ``optimizer.step()`` (it signs Q and K after steps ``period, 2 * period, ...``);
* ``monitor.grad_norm(step)`` before and ``monitor.step(step)`` after the optimizer step (measurements).

``step`` counts optimizer steps (1-based); each call returns the metrics of that step as a dict (often empty).
Checkpoint the guards with their ``state_dict()`` / ``load_state_dict()``, as the model and the optimizer.
"""

from __future__ import annotations

import argparse
from typing import Any, Optional

import torch
import torch.nn.functional as F
from litgpt import GPT, Config

from lightning_msign import PSS, MSign, ShakespeareDataModule, StableRank


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--period", type=int, default=10, help="MSign: optimizer steps between applications")
    parser.add_argument("--tau", type=float, default=2.5, help="PSS: trigger threshold on the gradient-norm ratio")
    parser.add_argument("--pss-warmup", type=int, default=5, help="PSS: optimizer steps before the detector is armed")
    parser.add_argument("--log-every", type=int, default=5, help="print (and measure stable ranks) every n steps")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--checkpoint", default=None, help="save model, optimizer and guards here at the end")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = ShakespeareDataModule(seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed)
    data.setup("fit")  # tokenizes the corpus once (cached), outside any Trainer
    batches = iter(data.train_dataloader())  # one epoch holds tens of thousands of batches

    config = Config(n_layer=2, n_head=4, n_query_groups=2, n_embd=64, block_size=args.seq_len, bias=False,
                    vocab_size=data.vocab_size, padded_vocab_size=data.vocab_size)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)

    msign = MSign(model, period=args.period, targets="qk")
    pss = PSS(model, tau=args.tau, warmup_steps=args.pss_warmup, targets="qk")
    monitor = StableRank(model, targets="attention", every_n_steps=args.log_every)

    for step in range(1, args.steps + 1):
        batch = next(batches)
        logits = model(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())
        loss.backward()

        metrics = pss.before_optimizer_step(step)  # gradient-norm spike? smooth Q and K now
        metrics.update(monitor.grad_norm(step))
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        metrics.update(msign.step(step))  # after steps period, 2 * period, ...: flat Q and K spectra
        metrics.update(monitor.step(step))

        if metrics.get("pss/triggered"):
            print(f"step {step}: PSS triggered (gradient norm {metrics['pss/ratio']:.1f} x its average)")
        if "msign/applications" in metrics:
            print(f"step {step}: msign/applications={metrics['msign/applications']:.0f}, smallest stable rank"
                  f" {metrics['msign/srank_before_min']:.1f} -> {metrics['msign/srank_after_min']:.1f}")
        if step % args.log_every == 0:
            print(f"step {step}: loss={loss.item():.3f} grad_norm/total={metrics['grad_norm/total']:.3f}"
                  f" srank/min={metrics['srank/min']:.2f} srank/mean={metrics['srank/mean']:.2f}")

    if args.checkpoint:  # the guards' state is plain values (and StableRank's power-iteration vectors)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "msign": msign.state_dict(),
                    "pss": pss.state_dict(), "monitor": monitor.state_dict()}, args.checkpoint)
    return {"model": model, "msign": msign, "pss": pss, "monitor": monitor}


if __name__ == "__main__":
    main()
