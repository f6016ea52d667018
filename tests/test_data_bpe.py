"""Tests for :mod:`lightning_msign.data.bpe`: a BPE trained on the train split, cached and reused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_msign.data import ShakespeareDataModule, strip_markdown_text
from lightning_msign.data.text import split_point

from data_corpora import small_md_corpus


def test_bpe_trains_caches_and_roundtrips(tmp_path, monkeypatch):
    corpus = small_md_corpus(tmp_path)
    cache = tmp_path / "cache"
    dm = ShakespeareDataModule(path=str(corpus), tokenizer="bpe", bpe_vocab_size=512, seq_len=64, cache_dir=str(cache))
    assert dm.vocab_size == 512
    dm.prepare_data()
    tok_file = dm.cache_path / "tokenizer.json"
    assert tok_file.is_file() and dm.cache_path.parent == cache and dm.cache_path.name.startswith("bpe-")
    assert {p.name for p in dm.cache_path.iterdir()} == {"tokenizer.json", "train.npy", "val.npy", "meta.json"}
    assert np.load(dm.cache_path / "train.npy").dtype == np.uint16
    mtime = tok_file.stat().st_mtime_ns
    dm.setup("fit")
    train = dm.train_dataset.tokens
    assert int(train.max()) < 512 and 256 < int(train.max())  # merges are used
    text = "Now, fair Hippolyta, our nuptial hour\nDraws on apace; ünïcode — ok"
    assert dm.decode(dm.encode(text)) == text
    docs = [strip_markdown_text(p.read_text(encoding="utf-8")) for p in dm.files]
    expected_train = "\n\n".join(d[: split_point(d, 0.05)] for d in docs)
    assert dm.decode(train) == expected_train
    assert train.numel() < 0.6 * len(expected_train)  # BPE actually compresses

    # A second module with the same corpus/settings reuses the cache: no training at all.
    def _no_training(self, texts):
        raise AssertionError("BPE was retrained although a cache entry exists")

    monkeypatch.setattr(ShakespeareDataModule, "_train_bpe", _no_training)
    dm2 = ShakespeareDataModule(path=str(corpus), tokenizer="bpe", bpe_vocab_size=512, seq_len=64, cache_dir=str(cache))
    dm2.prepare_data()
    dm2.setup("fit")
    assert tok_file.stat().st_mtime_ns == mtime
    assert torch.equal(dm2.train_dataset.tokens, train)
    assert dm2.decode(dm2.encode(text)) == text
    monkeypatch.undo()

    # A changed corpus gets a new cache entry (and is retrained).
    with open(corpus / dm.files[0].name, "a", encoding="utf-8") as f:
        f.write("\nA new line of verse.\n")
    dm3 = ShakespeareDataModule(path=str(corpus), tokenizer="bpe", bpe_vocab_size=512, seq_len=64, cache_dir=str(cache))
    dm3.setup("fit")
    assert dm3.cache_path != dm.cache_path
    assert len(list(cache.iterdir())) == 2
    assert not [p for p in cache.rglob("*") if p.name.endswith(".tmp")]  # atomic writes left no temp files


def test_bpe_setup_without_prepare_data_trains_on_train_split_only(tmp_path, monkeypatch):
    corpus = small_md_corpus(tmp_path, n=1)
    dm = ShakespeareDataModule(
        path=str(corpus), tokenizer="bpe", bpe_vocab_size=300, seq_len=32, cache_dir=str(tmp_path)
    )
    with pytest.raises(RuntimeError, match="prepare_data"):
        dm.decode([1, 2, 3])

    seen = []
    original = ShakespeareDataModule._train_bpe

    def _recording(self, texts):
        seen.extend(texts)
        return original(self, texts)

    monkeypatch.setattr(ShakespeareDataModule, "_train_bpe", _recording)
    dm.setup("fit")
    assert (dm.cache_path / "tokenizer.json").is_file()
    assert len(dm.train_dataset) > 0 and len(dm.val_dataset) > 0
    assert int(dm.train_dataset.tokens.max()) < 300
    assert "\n\n".join(seen) == dm.decode(dm.train_dataset.tokens)  # the BPE saw the train text only
