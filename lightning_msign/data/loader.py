"""Train order that resumes mid-epoch: a seeded, rank-sharded sampler and a loader that saves its position."""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Sized, Tuple

from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_msign._validation import check_int, check_seed

__all__ = ["ResumableDataLoader", "ResumableShuffleSampler"]

#: The keys of :meth:`ResumableDataLoader.state_dict`.
STATE_KEYS = ("seed", "epoch", "batches", "batch_size", "num_replicas")


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
        check_seed(seed)
        check_int(num_replicas, "num_replicas", 1)
        check_int(rank, "rank", 0)
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
        check_int(position, "position", 0)
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
        state = check_resume_state(state_dict, required=STATE_KEYS)
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


def check_resume_state(state_dict: Any, required: Sequence[str]) -> Dict[str, Any]:
    """Validate a loader/data-module state: a mapping whose ``required`` (and other known) keys hold ints.

    ``seed`` may also be ``None`` (a loader whose sampler has no seed).
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"`state_dict` must be a dict with keys {STATE_KEYS}, got {state_dict!r}")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"`state_dict` lacks the key(s) {missing}, got {dict(state_dict)!r}")
    state: Dict[str, Any] = {}
    for key in STATE_KEYS:
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
