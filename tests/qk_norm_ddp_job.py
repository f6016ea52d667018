"""2-process Lightning DDP runs with QKNormRetrofitCallback, used by tests/test_qk_norm.py (run as a script).

``python tests/qk_norm_ddp_job.py --out DIR``: first ``strategy="ddp"`` (no ``find_unused_parameters``), which the
callback must refuse at ``on_fit_start`` on every process (the dormant gains get no gradient); then
``"ddp_find_unused_parameters_true"`` for 8 steps of the test's 3-layer LitGPT at a learning rate whose logits pass
the threshold. Every process writes ``DIR/rank<r>.pt``: the refusal, the switch steps, its own logit readings (before
the max-reduction) and the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightning.pytorch import Trainer, seed_everything  # noqa: E402
from test_qk_norm import THRESHOLD, module  # noqa: E402

from lightning_msign import QKNormRetrofitCallback  # noqa: E402

from conftest import fit_under_plain_ddp, tiny_data, trainer_kwargs  # noqa: E402

STEPS = 8


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    seed_everything(5, verbose=False)
    plain = QKNormRetrofitCallback(max_attn_logit=THRESHOLD)
    refused, refused_steps = fit_under_plain_ddp(args.out, plain, module(), STEPS)

    seed_everything(5, verbose=False)
    model = module()
    retrofit = QKNormRetrofitCallback(max_attn_logit=THRESHOLD, scope="layer")
    trainer = Trainer(**trainer_kwargs(args.out, devices=2, strategy="ddp_find_unused_parameters_true",
                                       max_steps=STEPS), callbacks=[retrofit])
    trainer.fit(model, tiny_data(num_workers=0))
    record = {
        "refused": refused,
        "refused_steps": refused_steps,
        "steps": trainer.global_step,
        "switch_steps": list(retrofit.guard.switch_steps),
        "on": [n.on for norms in retrofit.guard._norms for n in norms],
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
