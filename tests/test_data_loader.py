"""Tests for :mod:`lightning_msign.data.loader`: the seeded, rank-sharded sampler and the resumable loader."""

from __future__ import annotations

import lightning.pytorch as L
import pytest
import torch

from data_corpora import numbered_dm


def test_resumable_sampler_is_distributed_samplers_order_sharded_by_rank(tmp_path):
    from torch.utils.data import DistributedSampler

    from lightning_msign.data import ResumableShuffleSampler

    dataset = numbered_dm(tmp_path).train_dataset
    n = len(dataset)
    one = ResumableShuffleSampler(dataset, seed=11)
    assert isinstance(one, DistributedSampler) and len(one) == n
    for epoch in (0, 3):
        one.set_epoch(epoch)
        reference = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=11, drop_last=True)
        reference.set_epoch(epoch)
        g = torch.Generator().manual_seed(11 + epoch)
        assert list(one) == list(reference) == torch.randperm(n, generator=g).tolist()
    first = list(ResumableShuffleSampler(dataset, seed=11))
    assert first != list(one) and first != list(ResumableShuffleSampler(dataset, seed=12))

    shards = []
    for rank in range(3):
        sampler = ResumableShuffleSampler(dataset, seed=11, num_replicas=3, rank=rank)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert len(shards[-1]) == len(sampler) == n // 3
    assert not set(shards[0]) & set(shards[1]) and not set(shards[1]) & set(shards[2])
    g = torch.Generator().manual_seed(11 + 2)
    whole = torch.randperm(n, generator=g).tolist()[: 3 * (n // 3)]
    assert [x for triple in zip(*shards) for x in triple] == whole  # rank r gets positions r, r + 3, ...

    sampler = ResumableShuffleSampler(dataset, seed=11, num_replicas=3, rank=1)
    sampler.start_at(5)
    assert list(sampler) == list(ResumableShuffleSampler(dataset, seed=11, num_replicas=3, rank=1))[5:]
    assert len(list(sampler)) == n // 3  # start_at holds for one pass only
    bad = (({"seed": -1}, "seed"), ({"num_replicas": 0}, "num_replicas"), ({"rank": 2, "num_replicas": 2}, "rank"))
    for kwargs, name in bad:
        with pytest.raises(ValueError, match=f"`{name}`.*{kwargs[name]}"):
            ResumableShuffleSampler(dataset, **{"seed": 0, **kwargs})


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])  # (1: a worker process)
def test_train_loader_state_resumes_mid_epoch(tmp_path, num_workers):
    from lightning.fabric.utilities.types import _Stateful

    dm = numbered_dm(tmp_path, seed=5, num_workers=num_workers)
    loader = dm.train_dataloader()
    assert isinstance(loader, _Stateful) and dm.shuffle_seed == 5
    loader.sampler.set_epoch(1)
    epoch = [b["input_ids"] for b in loader]
    assert len(epoch) == len(loader)
    it = iter(loader)
    seen = [next(it)["input_ids"] for _ in range(3)]
    state = loader.state_dict()
    assert state == {"seed": 5, "epoch": 1, "batches": 3, "batch_size": 4, "num_replicas": 1}

    # A fresh module with another seed continues exactly there; the epoch is set after iter(), as Lightning does.
    other = numbered_dm(tmp_path, seed=6, num_workers=num_workers)
    resumed = other.train_dataloader()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    it = iter(resumed)
    resumed.sampler.set_epoch(1)
    rest = [b["input_ids"] for b in it]
    assert len(rest) == len(epoch) - 3
    assert all(torch.equal(a, b) for a, b in zip(seen + rest, epoch))
    assert resumed.state_dict()["batches"] == len(epoch)
    # Twice in one epoch: a state saved after the resume counts the skipped batches too.
    again = numbered_dm(tmp_path, seed=7, num_workers=num_workers).train_dataloader()
    again.load_state_dict({**state, "batches": 3})
    it = iter(again)
    next(it)
    third = numbered_dm(tmp_path, num_workers=num_workers).train_dataloader()
    third.load_state_dict(again.state_dict())
    assert third.state_dict()["batches"] == 4
    assert torch.equal(next(iter(third))["input_ids"], epoch[4])

    # A checkpoint that ended its epoch: Lightning resumes at the next epoch, which starts at its beginning.
    # Lightning calls iter() before set_epoch() there: the pass must not draw indices (or start workers) early.
    ended = numbered_dm(tmp_path, num_workers=num_workers).train_dataloader()
    ended.load_state_dict({**state, "batches": len(epoch)})
    it = iter(ended)
    ended.sampler.set_epoch(2)
    loader.sampler.set_epoch(2)
    assert torch.equal(next(it)["input_ids"], next(iter(loader))["input_ids"])


def test_train_loader_state_errors_and_warnings(tmp_path):
    loader = numbered_dm(tmp_path, seed=5).train_dataloader()
    good = loader.state_dict()
    with pytest.raises(ValueError, match=r"lacks the key\(s\) \['batches'\]"):
        loader.load_state_dict({k: v for k, v in good.items() if k != "batches"})
    with pytest.raises(ValueError, match=r"`state_dict\['epoch'\]`.*-1"):
        loader.load_state_dict({**good, "epoch": -1})
    with pytest.raises(ValueError, match="`state_dict`.*'not a dict'"):
        loader.load_state_dict("not a dict")
    with pytest.warns(UserWarning, match="batch_size=8.*cannot match"):
        loader.load_state_dict({**good, "batches": 2, "batch_size": 8})
    assert loader.state_dict()["batches"] == 4  # the same 16 samples, in batches of 4
    with pytest.warns(UserWarning, match="position is ignored"):
        loader.load_state_dict({**good, "seed": None, "batches": 2})


def test_lightning_keeps_the_sampler_under_ddp(tmp_path):
    """Lightning swaps in a DistributedSampler only where the loader's sampler is not one (2.6:
    ``_requires_distributed_sampler``); this one shards by the Trainer's data-parallel rank itself."""
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=str(tmp_path))
    assert trainer._accelerator_connector.use_distributed_sampler and trainer.distributed_sampler_kwargs == {
        "num_replicas": 2,
        "rank": 0,
    }
    dm = numbered_dm(tmp_path, seed=4)
    dm.trainer = trainer  # what Lightning's data connector does when it attaches a data module
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, 0)
    assert len(loader.sampler) == len(dm.train_dataset) // 2
    assert trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING) is loader
    # The evaluation loaders are plain ones: Lightning does shard those.
    val = dm.val_dataloader()
    assert trainer._data_connector._prepare_dataloader(val, shuffle=False, mode=RunningStage.VALIDATING) is not val
