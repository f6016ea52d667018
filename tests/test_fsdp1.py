"""FSDP1 without Lightning (2 CPU processes, gloo): a guard in a plain loop, the gradient norm, what is refused.

The Lightning runs (Lightning's wrapping and manual wrapping, resume) are in tests/test_distributed.py and
tests/test_msign_triggers.py. Here a litgpt GPT is wrapped by hand, one FSDP1 unit per Block plus the root, with
``use_orig_params=True`` and ``device_id=cpu`` (what Lightning's FSDPStrategy does on a GPU with its device).
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB

pytestmark = pytest.mark.slow  # every test reads the one 2-process launch of the fsdp1_records fixture


def _gpt(seed: int = 0):
    from litgpt import Config
    from litgpt.model import GPT

    torch.manual_seed(seed)
    config = Config(**TINY_CONFIG, vocab_size=TINY_VOCAB, padded_vocab_size=TINY_VOCAB, block_size=TINY_SEQ)
    model = GPT(config)
    model.apply(model._init_weights)
    return model


def _wrap(model, **kwargs):
    from litgpt.model import Block
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    kwargs.setdefault("use_orig_params", True)
    return FSDP(model, auto_wrap_policy=ModuleWrapPolicy({Block}), device_id=torch.device("cpu"), **kwargs)


def _batch(rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(100 + rank)
    return torch.randint(0, TINY_VOCAB, (4, TINY_SEQ + 1), generator=gen)


def _train_step(root, optimizer, ids):
    logits = root(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1))
    loss.backward()
    return loss


def _worker(rank: int, world: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp import MixedPrecision

        from lightning_msign import MSign, NuMuon
        from lightning_msign.distributed import global_grad_norm
        from lightning_msign.fsdp1 import FSDP1Units
        from lightning_msign.guards.curvature import Curvature
        from lightning_msign.guards.diagnostics import Diagnostics
        from lightning_msign.guards.stable_rank import StableRank
        from lightning_msign.optim import muon_param_groups

        record: dict = {"errors": {}}
        root = _wrap(_gpt())
        optimizer = torch.optim.AdamW(root.parameters(), lr=1e-2)
        units = FSDP1Units(root)
        for step in range(2):
            _train_step(root, optimizer, _batch(rank))
            if step == 1:
                record["norm"] = float(global_grad_norm(root.parameters(), units=units))
                with FSDP.summon_full_params(root, writeback=False, with_grads=True):
                    record["whole_grads"] = {n: p.grad.clone() for n, p in root.named_parameters()}
            optimizer.step()
            optimizer.zero_grad()
        # A guard in a plain loop, attached to the FSDP root; during each computation only one unit is gathered.
        msign = MSign(period=1, targets="attention", backend="svd", module=root)
        with FSDP.summon_full_params(root, writeback=False):
            record["before"] = {n: p.detach().clone() for n, p in root.named_parameters()}
        seen: list[list[str]] = []
        original = msign._sign

        def spy(owned):
            seen.append([n for n, p in root.named_parameters() if p.ndim == 2])
            return original(owned)

        msign._sign = spy
        record["metrics"] = msign.step()
        with FSDP.summon_full_params(root, writeback=False):
            record["after"] = {n: p.detach().clone() for n, p in root.named_parameters()}
        record["seen"] = seen
        record["owners"] = msign.plan.owners()
        monitor = StableRank(root, mode="exact")
        record["srank"] = monitor.step(1)
        # Diagnostics through the root (a plain loop calls the decoder inside it; the root gathers itself).
        probe = Diagnostics(root, every_n_steps=1, output_logits=True)
        record["diag"] = probe.compute(_batch(0)[:, :-1])

        def refused(key, fn):
            try:
                fn()
            except (NotImplementedError, ValueError) as err:
                record["errors"][key] = f"{type(err).__name__}: {err}"

        inner = root.module  # the GPT inside the root: its own parameters are slices the root gathers
        refused("inner", lambda: MSign(period=1, targets="attention", module=inner))
        refused("numuon", lambda: NuMuon(root.parameters(), lr=0.01))
        refused("groups", lambda: muon_param_groups(root))
        refused("curvature", lambda: Curvature(root))
        refused("jacobian", lambda: Diagnostics(root, jacobian=True))
        refused("flat", lambda: MSign(period=1, module=_wrap(_gpt(), use_orig_params=False)))
        bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        refused("mixed", lambda: Diagnostics(_wrap(_gpt(), mixed_precision=bf16)))
        torch.save(record, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def fsdp1_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp1")
    mp.spawn(functools.partial(_worker), args=(2, str(out)), nprocs=2)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_plain_loop_guard_signs_whole_matrices_one_unit_at_a_time(fsdp1_records):
    from lightning_msign.functional import msign_restore
    from lightning_msign.targets import clean_name

    r0, r1 = fsdp1_records
    for name, value in r0["after"].items():
        assert torch.equal(value, r1["after"][name]), name
    before = {clean_name(n): v for n, v in r0["before"].items()}
    after = {clean_name(n): v for n, v in r0["after"].items()}
    for i in range(TINY_CONFIG["n_layer"]):
        proj = f"transformer.h.{i}.attn.proj.weight"
        assert torch.equal(after[proj], msign_restore(before[proj])), proj
        qkv = f"transformer.h.{i}.attn.qkv.weight"
        q = TINY_CONFIG["n_head"] * TINY_CONFIG["n_embd"] // TINY_CONFIG["n_head"]
        assert torch.equal(after[qkv][:q], msign_restore(before[qkv][:q])), qkv
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])  # not a target
    assert set(r0["owners"].values()) == {0, 1}  # both processes compute
    # Every computation saw exactly one unit's matrices whole (one Block's), never the whole model.
    for rec in (r0, r1):
        assert rec["seen"]
        for whole in rec["seen"]:
            blocks = {n.split("transformer.h.")[1].split(".")[0] for n in whole}
            assert len(blocks) == 1 and all("lm_head" not in n and "wte" not in n for n in whole), whole


def test_gradient_norm_is_the_whole_gradient_norm(fsdp1_records):
    for rec in fsdp1_records:
        whole = sum(float(g.double().square().sum()) for g in rec["whole_grads"].values()) ** 0.5
        assert rec["norm"] == pytest.approx(whole, rel=1e-6)
    assert fsdp1_records[0]["norm"] == fsdp1_records[1]["norm"]


def test_monitor_and_probe_read_whole_matrices(fsdp1_records):
    from lightning_msign.functional import stable_rank
    from lightning_msign.targets import clean_name

    r0, r1 = fsdp1_records
    after = {clean_name(n): v for n, v in r0["after"].items()}
    mlp = {k: v for k, v in r0["srank"].items() if k.startswith("srank/transformer.h.0.mlp")}
    assert len(mlp) == 2, sorted(r0["srank"])  # fc and proj of block 0: the comparison below is not empty
    for key, value in mlp.items():
        name = key[len("srank/"):]
        assert value == pytest.approx(float(stable_rank(after[name])), rel=1e-5), key
    assert r0["srank"] == r1["srank"]
    assert r0["diag"]["diag/attn_logit_max"] > 0 and r0["diag"]["diag/output_logit_max"] > 0


def test_fsdp1_refusals_name_what_to_do(fsdp1_records):
    errors = fsdp1_records[0]["errors"]
    assert errors.keys() == {"inner", "numuon", "groups", "curvature", "jacobian", "flat", "mixed"}, errors
    assert "attach the guard to the FSDP root" in errors["inner"]
    assert "NuMuon and Muon work on whole matrices under DDP and FSDP2" in errors["numuon"]
    assert "muon_param_groups" in errors["groups"]
    assert "Curvature does not support FSDP1" in errors["curvature"]
    assert "jacobian=True" in errors["jacobian"]
    assert "use_orig_params=False" in errors["flat"]
    assert "MixedPrecision" in errors["mixed"]
