"""Tests for :mod:`lightning_msign.data.cache`: the cache folder, entry keys and atomic writes."""

from __future__ import annotations

import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_msign.data import ShakespeareDataModule, default_cache_dir
from lightning_msign.data.cache import atomic_save_npy, atomic_write_bytes, cache_key, hash_corpus

from data_corpora import numbered_corpus, small_md_corpus


def test_cache_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MSIGN_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    dm = ShakespeareDataModule(path=str(numbered_corpus(tmp_path, lines=300, files=1)), seq_len=16)
    assert dm.cache_dir == tmp_path / "env_cache"
    dm.prepare_data()
    assert dm.cache_path.parent == tmp_path / "env_cache" and (dm.cache_path / "meta.json").is_file()
    monkeypatch.delenv("LIGHTNING_MSIGN_CACHE")
    assert default_cache_dir() == Path("~/.cache/lightning_msign").expanduser()


def test_concurrent_prepare_data_same_cache(tmp_path):
    import threading

    corpus = small_md_corpus(tmp_path, n=1)
    dms = [ShakespeareDataModule(path=str(corpus), seq_len=32, cache_dir=str(tmp_path / "c")) for _ in range(3)]
    errors = []

    def _run(dm):
        try:
            dm.prepare_data()
            dm.setup("fit")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=_run, args=(dm,)) for dm in dms]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(torch.equal(dm.train_dataset.tokens, dms[0].train_dataset.tokens) for dm in dms)
    assert not [p for p in (tmp_path / "c").rglob("*") if p.name.endswith(".tmp")]


# Keys of cache version 1 for the corpus built in the test below: the names existing cache entries carry.
PINNED_KEYS = {
    "byte": "34a2ff2ff692f8e3ad260468b93d6ba5a67c136adbdf90a99447326d2538485d",
    "bpe": "db0c88b03f9ed6f346f2c79423285d5d11e00facfcf12a136b48764354e03b0d",
    "byte-raw-0.1": "7e2e77f10eadb20c4fb62a03682d03872a4a6249150e0c70f714b124b27aa422",
}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "byte"),
        ({"tokenizer": "bpe", "bpe_vocab_size": 512}, "bpe"),
        ({"val_fraction": 0.1, "strip_markdown": False}, "byte-raw-0.1"),
    ],
)
def test_cache_keys_are_pinned(tmp_path, kwargs, name):
    """A changed key silently rebuilds every user's cache: the computation must keep giving these keys."""
    key = PINNED_KEYS[name]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("To be, or not to be.\nThat is the question.\n")
    (corpus / "b.md").write_text("# Title\n\n**HAMLET** speaks.\n")
    dm = ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp_path / "cache"), **kwargs)
    raws = [f.read_bytes() for f in dm.files]
    corpus_hash = hash_corpus(dm.files, raws)
    assert corpus_hash == "7d9397b5bef1a41b635e6b2de3730004b8a64fbc65d29fb7cbca54cce7ac7833"
    assert cache_key(corpus_hash, dm.tokenizer, dm.bpe_vocab_size, dm.strip_markdown, dm.val_fraction) == key
    if dm.tokenizer == "byte":  # the entry's folder name (BPE training would need a larger corpus)
        dm.prepare_data()
        assert dm.cache_path == tmp_path / "cache" / f"byte-{key[:16]}"


def test_atomic_write_replaces_whole_files(tmp_path):
    target = tmp_path / "entry" / "meta.json"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second" and stat.S_IMODE(target.stat().st_mode) == 0o644
    atomic_save_npy(tmp_path / "entry" / "train.npy", np.arange(5, dtype=np.uint16))
    loaded = np.load(tmp_path / "entry" / "train.npy", allow_pickle=False)
    assert loaded.dtype == np.uint16 and loaded.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # a failed write leaves the old file and no temporary one
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json", "train.npy"]
