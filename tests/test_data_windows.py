"""Tests for :mod:`lightning_msign.data.windows`: non-overlapping next-token windows."""

from __future__ import annotations

import pytest
import torch

from lightning_msign.data import ShakespeareDataModule, TokenWindowDataset

from data_corpora import numbered_corpus


def test_windows_targets_shift_by_one(tmp_path):
    dm = ShakespeareDataModule(path=str(numbered_corpus(tmp_path)), seq_len=32, cache_dir=str(tmp_path))
    dm.setup("fit")
    ds, tokens, T = dm.train_dataset, dm.train_dataset.tokens, 32
    assert len(ds) == (tokens.numel() - 1) // T
    for i in (0, 1, 7, len(ds) - 1):
        item = ds[i]
        assert item["input_ids"].dtype == torch.int64 and item["targets"].dtype == torch.int64
        assert item["input_ids"].shape == (T,) and item["targets"].shape == (T,)
        assert torch.equal(item["input_ids"][1:], item["targets"][:-1])
        assert torch.equal(item["input_ids"], tokens[i * T : i * T + T].long())
        assert torch.equal(item["targets"], tokens[i * T + 1 : i * T + T + 1].long())
    # Non-overlapping, stride seq_len: the next window starts where this one's inputs end.
    assert torch.equal(ds[1]["input_ids"][0], ds[0]["targets"][-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_token_window_dataset_drops_remainder():
    ds = TokenWindowDataset(torch.arange(10), seq_len=3)
    assert len(ds) == 3  # windows [0..3], [3..6], [6..9]
    assert ds[2]["targets"].tolist() == [7, 8, 9]
    assert len(TokenWindowDataset(torch.arange(3), seq_len=3)) == 0
