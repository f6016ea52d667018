"""Tests for :mod:`lightning_msign.data.shakespeare`: the data module, from corpus to loaders and checkpoints."""

from __future__ import annotations

import os

import lightning.pytorch as L
import numpy as np
import pytest
import torch

from lightning_msign.data import ShakespeareDataModule, strip_markdown_text
from lightning_msign.data.text import split_point

from conftest import tiny_module, trainer_kwargs
from data_corpora import numbered_corpus, numbered_dm


def test_default_corpus_byte_roundtrip(tmp_path):
    dm = ShakespeareDataModule(cache_dir=str(tmp_path))
    assert dm.vocab_size == 256 and dm.seq_len == 256
    assert len(dm.files) == 38 and dm.files == sorted(dm.files)
    dm.prepare_data()
    dm.setup("fit")
    train, val = dm.train_dataset.tokens, dm.val_dataset.tokens
    total = train.numel() + val.numel()
    assert 3_000_000 < total < 10_000_000  # millions of bytes
    assert int(train.max()) < 256 and int(train.min()) >= 0
    assert 0.04 < val.numel() / total < 0.06

    # The token streams are exactly the UTF-8 bytes of the stripped documents.
    docs = [strip_markdown_text(p.read_text(encoding="utf-8")) for p in dm.files]
    cuts = [split_point(d, dm.val_fraction) for d in docs]
    expected_train = "\n\n".join(d[:c] for d, c in zip(docs, cuts))
    expected_val = "\n\n".join(d[c:] for d, c in zip(docs, cuts))
    assert dm.decode(train) == expected_train
    assert dm.decode(val) == expected_val
    for d, c in zip(docs, cuts):
        assert c == 0 or d[c - 1] == "\n"  # val parts start at a line start
        assert 0.03 < (len(d) - c) / len(d) < 0.07
    assert "A Midsummer Night's Dream\n\nACT I" in dm.decode(train[:200])
    assert "**" not in expected_train and "_" not in expected_train


def test_byte_encode_decode_roundtrip(tmp_path):
    dm = ShakespeareDataModule(path=str(numbered_corpus(tmp_path, lines=50, files=1)), cache_dir=str(tmp_path))
    text = "Héllo — thou art\nmore lovely 🌹"
    ids = dm.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert dm.decode(ids) == text
    assert dm.decode(torch.tensor(ids)) == text
    assert dm.decode(np.asarray(ids)) == text


def test_user_folder_of_txt_files(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("B " * 400 + "\n")
    (folder / "sub" / "c.txt").write_text("C **kept** _kept_ " * 40 + "\n")
    (folder / "a.txt").write_text("A " * 400 + "\n")
    (folder / "ignored.py").write_text("print('not text')\n")
    dm = ShakespeareDataModule(path=str(folder), seq_len=8, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    assert [p.relative_to(folder).as_posix() for p in dm.files] == ["a.txt", "b.txt", "sub/c.txt"]
    dm.setup()
    train = dm.decode(dm.train_dataset.tokens)
    assert train.startswith("A A ") and "\n\nB B " in train and "not text" not in train
    assert "**kept** _kept_" in train  # .txt files are never markdown-stripped

    single = ShakespeareDataModule(path=str(folder / "a.txt"), seq_len=8, cache_dir=str(tmp_path / "cache"))
    assert single.files == [folder / "a.txt"]
    single.setup()
    assert set(single.decode(single.train_dataset.tokens)) <= {"A", " "}


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="`path`.*nope"):
        ShakespeareDataModule(path=str(tmp_path / "nope"), cache_dir=str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "data.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="`path`.*empty"):
        ShakespeareDataModule(path=str(empty), cache_dir=str(tmp_path))


def test_tiny_corpus_raises_clear_error(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("To be, or not to be: that is the question.\n" * 3)
    dm = ShakespeareDataModule(path=str(tiny), seq_len=64, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"corpus too small.*`seq_len`=64.*val"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"seq_len": 0}, "seq_len"),
        ({"seq_len": 2.5}, "seq_len"),
        ({"seq_len": True}, "seq_len"),
        ({"batch_size": -1}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": "0.1"}, "val_fraction"),
        ({"bpe_vocab_size": 256}, "bpe_vocab_size"),
        ({"num_workers": -1}, "num_workers"),
        ({"tokenizer": "char"}, "tokenizer"),
        ({"strip_markdown": "yes"}, "strip_markdown"),
        ({"seed": -1}, "seed"),
        ({"seed": 2.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**63}, "seed"),
    ],
)
def test_bad_arguments_raise(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`") as err:
        ShakespeareDataModule(cache_dir=str(tmp_path), **kwargs)
    assert repr(next(iter(kwargs.values()))) in str(err.value)


def test_dataloader_batches(tmp_path):
    dm = ShakespeareDataModule(
        path=str(numbered_corpus(tmp_path)), seq_len=24, batch_size=5, val_fraction=0.2, cache_dir=str(tmp_path)
    )
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "targets"}
    for v in batch.values():
        assert v.dtype == torch.int64 and v.shape == (5, 24)
    assert torch.equal(batch["input_ids"][:, 1:], batch["targets"][:, :-1])

    val_batch = next(iter(dm.val_dataloader()))  # in order, not shuffled
    assert torch.equal(val_batch["input_ids"], torch.stack([dm.val_dataset[i]["input_ids"] for i in range(5)]))

    L.seed_everything(7, verbose=False)
    first = next(iter(dm.train_dataloader()))["input_ids"]
    L.seed_everything(7, verbose=False)
    again = next(iter(dm.train_dataloader()))["input_ids"]
    assert torch.equal(first, again)
    assert not torch.equal(first, torch.stack([dm.train_dataset[i]["input_ids"] for i in range(5)]))


def test_jsonargparse_builds_datamodule(tmp_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ShakespeareDataModule, "data")
    data = {"tokenizer": "bpe", "bpe_vocab_size": 1024, "seq_len": 128, "cache_dir": str(tmp_path)}
    cfg = parser.parse_object({"data": data})
    assert cfg.data.path is None and cfg.data.val_fraction == 0.05
    dm = parser.instantiate_classes(cfg).data
    assert isinstance(dm, ShakespeareDataModule)
    assert dm.vocab_size == 1024 and dm.seq_len == 128 and dm.tokenizer == "bpe"
    with pytest.raises(Exception):
        parser.parse_object({"data": {"tokenizer": "char"}})


class _TinyLM(L.LightningModule):
    def __init__(self, vocab_size: int = 1, n_embd: int = 8) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.emb = torch.nn.Embedding(vocab_size, n_embd)
        self.head = torch.nn.Linear(n_embd, vocab_size)

    def _loss(self, batch):
        logits = self.head(self.emb(batch["input_ids"]))
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten())

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_cli_links_vocab_size_and_fits(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["lightning-msign"])

    class _CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.vocab_size", "model.vocab_size", apply_on="instantiate")

    corpus = numbered_corpus(tmp_path, lines=400, files=2)
    cli = _CLI(
        _TinyLM,
        ShakespeareDataModule,
        run=False,
        args={
            "data": {"path": str(corpus), "seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path / "cache")},
            "trainer": {
                "fast_dev_run": 2,
                "accelerator": "cpu",
                "logger": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "default_root_dir": str(tmp_path),
            },
        },
    )
    assert cli.model.vocab_size == 256 == cli.datamodule.vocab_size
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert os.path.isfile(cli.datamodule.cache_path / "meta.json")


def test_seed_from_global_rng_saved_and_restored(tmp_path):
    L.seed_everything(1, verbose=False)
    a = numbered_dm(tmp_path)
    L.seed_everything(1, verbose=False)
    b = numbered_dm(tmp_path)
    L.seed_everything(2, verbose=False)
    c = numbered_dm(tmp_path)
    assert a.seed is None and a.shuffle_seed == b.shuffle_seed != c.shuffle_seed
    assert a.state_dict() == {"seed": a.shuffle_seed}  # no loader yet
    assert numbered_dm(tmp_path, seed=3).shuffle_seed == 3
    a.setup("validate")  # only fitting draws a new seed
    assert a.shuffle_seed == b.shuffle_seed

    loader = a.train_dataloader()
    it = iter(loader)
    next(it), next(it)
    state = a.state_dict()
    assert state == loader.state_dict() and state["batches"] == 2
    third_batch = next(it)["input_ids"]

    # load_state_dict (Lightning calls it after setup) reaches a current train loader and the next one built.
    existing = c.train_dataloader()
    c.load_state_dict(state)
    assert c.shuffle_seed == a.shuffle_seed and existing.state_dict() == state
    built = c.train_dataloader()
    assert built.state_dict() == state
    assert c.train_dataloader().state_dict()["batches"] == 0  # handed to one loader only
    assert torch.equal(next(iter(built))["input_ids"], third_batch)
    assert torch.equal(next(iter(existing))["input_ids"], third_batch)

    fixed = numbered_dm(tmp_path, seed=3)
    with pytest.warns(UserWarning, match=f"seed {a.shuffle_seed}.*`seed`=3"):
        fixed.load_state_dict({"seed": a.shuffle_seed})
    assert fixed.shuffle_seed == a.shuffle_seed
    with pytest.raises(ValueError, match="lacks the key"):
        fixed.load_state_dict({"epoch": 0})


def test_test_dataloader_serves_the_validation_windows(tmp_path):
    dm = numbered_dm(tmp_path, seq_len=32)
    test_batch, val_batch = next(iter(dm.test_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(test_batch["input_ids"], val_batch["input_ids"])
    trainer = L.Trainer(**trainer_kwargs(tmp_path, limit_test_batches=2))
    (result,) = trainer.test(tiny_module(), datamodule=dm, verbose=False)
    assert set(result) == {"test/loss"} and 0 < result["test/loss"] < 10


def test_setup_for_fit_drops_a_position_restored_earlier(tmp_path):
    dm = numbered_dm(tmp_path, seed=3)
    state = {"seed": 8, "epoch": 0, "batches": 2, "batch_size": 4, "num_replicas": 1}
    with pytest.warns(UserWarning, match="seed 8"):
        dm.load_state_dict(state)
    dm.setup("validate")
    assert dm.shuffle_seed == 8 and dm.train_dataloader().state_dict() == state
    with pytest.warns(UserWarning, match="seed 8"):
        dm.load_state_dict(state)  # as `trainer.validate(ckpt_path=...)` would
    dm.setup("fit")  # a new fit (a resume calls load_state_dict after setup)
    assert dm.shuffle_seed == 3 and dm.train_dataloader().state_dict() == {
        "seed": 3, "epoch": 0, "batches": 0, "batch_size": 4, "num_replicas": 1
    }


def test_package_reexports_and_class_paths_resolve(tmp_path):
    """``lightning_msign.data`` still offers every name the single module did, and YAML class paths resolve."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    import lightning_msign
    import lightning_msign.data as data
    from lightning_msign.data import cache, loader, shakespeare, text, windows

    expected = {
        "ResumableDataLoader": loader.ResumableDataLoader,
        "ResumableShuffleSampler": loader.ResumableShuffleSampler,
        "ShakespeareDataModule": shakespeare.ShakespeareDataModule,
        "TokenWindowDataset": windows.TokenWindowDataset,
        "default_cache_dir": cache.default_cache_dir,
        "strip_markdown_text": text.strip_markdown_text,
    }
    assert sorted(data.__all__) == sorted(expected)
    assert all(getattr(data, name) is obj for name, obj in expected.items())
    assert lightning_msign.ShakespeareDataModule is ShakespeareDataModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    for class_path in ("lightning_msign.data.ShakespeareDataModule", "lightning_msign.ShakespeareDataModule"):
        cfg = parser.parse_object(
            {"data": {"class_path": class_path, "init_args": {"seq_len": 8, "cache_dir": str(tmp_path)}}}
        )
        dm = parser.instantiate_classes(cfg).data
        assert type(dm) is ShakespeareDataModule and dm.seq_len == 8
