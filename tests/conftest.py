"""Shared fixtures: a tiny real LitGPT model, the real shipped corpus, and a recording logger."""

from __future__ import annotations

import os
import warnings
from typing import Any

import pytest
import torch
from lightning.pytorch.loggers import Logger

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")

# A GQA config: 4 query heads share 2 key/value groups, so the Q block is twice the K and V blocks.
TINY_CONFIG: dict[str, Any] = {"n_layer": 2, "n_head": 4, "n_query_groups": 2, "n_embd": 32, "bias": False}
TINY_VOCAB = 256  # byte-level tokens of the shipped corpus
TINY_SEQ = 32


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test: tiny models run as fast on one thread, and far more steadily on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _corpus_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """One tokenisation cache for the whole session (the corpus is real, the cache is temporary)."""
    os.environ["LIGHTNING_MSIGN_CACHE"] = str(tmp_path_factory.mktemp("cache"))


def tiny_module(**kwargs: Any):
    from lightning_msign import LitGPTModule

    kwargs.setdefault("lr", 3e-3)
    kwargs.setdefault("warmup_steps", 2)
    return LitGPTModule(dict(TINY_CONFIG), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, **kwargs)


def tiny_data(**kwargs: Any):
    from lightning_msign import ShakespeareDataModule

    kwargs.setdefault("seq_len", TINY_SEQ)
    kwargs.setdefault("batch_size", 4)
    return ShakespeareDataModule(**kwargs)


def trainer_kwargs(tmp_path, **kwargs: Any) -> dict[str, Any]:
    base = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_steps=6,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    base.update(kwargs)
    return base


class RecordingLogger(Logger):
    """A real Logger that keeps every ``log_metrics`` call: ``records`` is a list of (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.records.append((step, dict(metrics)))

    def steps_with(self, key: str) -> list[int]:
        return [step for step, m in self.records if key in m]

    def values(self, key: str) -> list[float]:
        return [m[key] for _, m in self.records if key in m]
