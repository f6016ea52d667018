"""Whole parameters under FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``), one unit at a time.

FSDP1 (Lightning's ``FSDPStrategy``) flattens the parameters of each wrapped module (a *unit*: usually one
transformer block, plus the root for what is left) into one flat buffer and keeps a 1/world slice of it on
every process. With ``use_orig_params=True`` (Lightning's default) the module's parameters stay the same
``nn.Parameter`` objects, but outside forward and backward each is a 1-D view of the part of it that falls in
this process's slice (possibly empty): its shape is not the matrix's, and its values are a fragment. The
matrix sign or stable rank of such a fragment means nothing.

:class:`FSDP1Units` finds the units of a model, which unit manages which parameter, and gathers one unit at a
time with ``FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=...)``: inside, every
process holds the unit's whole parameters (full precision under ``MixedPrecision``: the sharded fp32 values,
not the low-precision compute copy). A guard computes each matrix on one owner and broadcasts it, so every
process writes the same whole values; on exit each keeps its own slice of them (the write-back). Peak extra
memory is one unit's whole parameters in full precision plus the broadcast buffer of the matrices one owner
computed in that unit, never the whole model.

Refused (``NotImplementedError`` naming the unit): ``use_orig_params=False`` (parameters are replaced by new
objects at every gather) and ``CPUOffload(offload_params=True)`` (not tested here: it needs a GPU). Nothing
here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Optional

import torch
from torch import Tensor, nn

_FLATTENED = "_fsdp_flattened"  # the attribute FSDP1 sets on every parameter it has flattened


_OUTSIDE = (
    "{} holds parameters sharded by an FSDP1 unit outside it ({!r}, ...): attach the guard to the FSDP root (in"
    " Lightning: `trainer.strategy.model`, which the callbacks pass), whose gathers reach those parameters"
)


def is_fsdp1_managed(param: Tensor) -> bool:
    """True for a parameter that an FSDP1 unit has flattened (its data is a slice of a flat buffer)."""
    return bool(getattr(param, _FLATTENED, False))


def fsdp_class() -> Optional[type]:
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return FullyShardedDataParallel


def _describe(unit: nn.Module) -> str:
    return f"the FSDP unit wrapping {type(getattr(unit, 'module', unit)).__name__}"


class FSDP1Units:
    """The FSDP1 units of a model, the parameters each manages, and gathering them whole one unit at a time.

    Args:
        module: the model as the training loop holds it: the FSDP root itself (Lightning's
            ``trainer.strategy.model`` when the strategy wrapped the LightningModule), or a module that
            contains FSDP units (a LightningModule that wraps its blocks in ``configure_model``).

    Raises:
        ValueError: ``module`` contains no FSDP1 unit.
        NotImplementedError: a unit built with ``use_orig_params=False`` or with parameters offloaded to CPU.
    """

    def __init__(self, module: nn.Module) -> None:
        fsdp = fsdp_class()
        order = {id(m): i for i, m in enumerate(module.modules())}
        units = [m for m in module.modules() if fsdp is not None and isinstance(m, fsdp)]
        if not units:
            raise ValueError(f"{type(module).__name__} contains no FullyShardedDataParallel (FSDP1) unit")
        self.units: list[nn.Module] = sorted(units, key=lambda u: order[id(u)])  # pre-order: a root comes first
        for unit in self.units:
            flat = [n for n, p in unit.named_parameters() if getattr(p, "_is_flat_param", False)]
            if flat:
                raise NotImplementedError(
                    f"{_describe(unit)} was built with use_orig_params=False: its parameters are replaced by new"
                    " objects at every gather, so a guard cannot hold them. Use use_orig_params=True (the default of"
                    " Lightning's FSDPStrategy)."
                )
            offload = getattr(unit, "cpu_offload", None)
            if offload is not None and getattr(offload, "offload_params", False):
                raise NotImplementedError(
                    f"{_describe(unit)} offloads its parameters to CPU (CPUOffload(offload_params=True)): gathering"
                    " and writing whole matrices of offloaded units has not been tested (it needs a GPU machine); use"
                    " FSDP without parameter offloading, or FSDP2 (ModelParallelStrategy)."
                )
        # A parameter belongs to the innermost unit whose subtree holds it (reverse pre-order: inner first).
        self._unit_of: dict[int, int] = {}
        for index in range(len(self.units) - 1, -1, -1):
            for p in self.units[index].parameters():
                if is_fsdp1_managed(p):
                    self._unit_of.setdefault(id(p), index)
        outside = [n for n, p in module.named_parameters() if is_fsdp1_managed(p) and id(p) not in self._unit_of]
        if outside:
            raise ValueError(_OUTSIDE.format(type(module).__name__, outside[0]))
        self._initialized = False
        self._above: dict[int, list[int]] = {}  # id(module) -> the units above it (summon_above), read once

    def unit_of(self, param: Tensor) -> Optional[int]:
        """Index (in :attr:`units`) of the unit managing ``param``, or ``None`` for a parameter no unit manages."""
        return self._unit_of.get(id(param))

    def sharded(self, index: int) -> bool:
        """Whether unit ``index`` keeps slices (every strategy but ``NO_SHARD``, on more than one process)."""
        unit = self.units[index]
        strategy = getattr(unit, "sharding_strategy", None)
        return getattr(strategy, "name", "") != "NO_SHARD" and int(getattr(unit, "world_size", 1)) > 1

    def process_group(self, index: int) -> object:
        """The process group unit ``index`` shards over (the intra-node group of hybrid sharding)."""
        return self.units[index].process_group

    def mixed_precision(self, index: int) -> bool:
        """Whether unit ``index`` computes in a lower precision than it stores (``MixedPrecision.param_dtype``)."""
        mp = getattr(self.units[index], "mixed_precision", None)
        dtype = getattr(mp, "param_dtype", None)
        stored = next((p.dtype for p in self.units[index].parameters() if is_fsdp1_managed(p)), None)
        return dtype is not None and stored is not None and dtype != stored

    @contextmanager
    def summon(self, index: int, writeback: bool) -> Iterator[None]:
        """Inside: unit ``index``'s own parameters are whole on every process (a collective: all must call it).

        ``writeback=True``: on exit each process keeps its slice of what it holds, so every process must hold
        the same whole values. Must not be entered inside forward or backward.
        """
        fsdp = fsdp_class()
        assert fsdp is not None
        if not self._initialized and index != 0:
            # FSDP1 takes the first unit it initialises lazily for the root: let the root be that one.
            with fsdp.summon_full_params(self.units[0], recurse=False, writeback=False):
                pass
        self._initialized = True
        with torch.no_grad(), fsdp.summon_full_params(self.units[index], recurse=False, writeback=writeback):
            yield

    @contextmanager
    def summon_above(self, module: nn.Module) -> Iterator[list[int]]:
        """Gather the units that hold ``module`` but are not inside it (read-only), so ``module`` can be called.

        The units inside ``module`` gather themselves in their own forward; those above it (a root wrapping the
        whole LightningModule) are never called when ``module`` is called directly. Yields their indices.
        """
        above = self._above.get(id(module))
        if above is None:
            above = [i for i, u in enumerate(self.units) if u is not module and any(m is module for m in u.modules())]
            self._above[id(module)] = above
        with ExitStack() as stack:
            for i in above:
                stack.enter_context(self.summon(i, writeback=False))
            yield above


def fsdp1_units(module: nn.Module) -> Optional[FSDP1Units]:
    """The :class:`FSDP1Units` of ``module``, or ``None`` when it holds no FSDP1 unit.

    Raises:
        ValueError: ``module`` holds parameters that FSDP1 has flattened but no unit (a module taken from
            inside an FSDP root): a guard must be given the root, whose gathers reach those parameters.
    """
    fsdp = fsdp_class()
    if fsdp is not None and any(isinstance(m, fsdp) for m in module.modules()):
        return FSDP1Units(module)
    managed = [n for n, p in module.named_parameters() if is_fsdp1_managed(p)]
    if managed:
        raise ValueError(_OUTSIDE.format(type(module).__name__, managed[0]))
    return None


__all__ = ["FSDP1Units", "fsdp1_units", "is_fsdp1_managed"]
