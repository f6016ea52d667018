"""Whole-matrix operations on replicated and sharded parameters, spread over the processes of a run.

The matrix sign, the stable rank and the dominant singular directions of a weight are properties of
the *whole* matrix: the sign of a shard is not a shard of the sign (an O(1) error). This module runs a
per-matrix computation so that

* every matrix is computed exactly once per replica group, by one *owner* process, on the whole
  matrix; owners are assigned by a deterministic greedy balance of the cost ``m * n * min(m, n)``
  (largest first, to the least-loaded process), so each process computes about ``1 / world`` of the
  work and every process knows, without communication, who owns what;
* **replicated** parameters (one process, or DDP: every process holds the whole weight) need no
  gathering; after the computation each owner broadcasts the new values of its parameters, so all
  processes hold bit-identical weights;
* **sharded** parameters (``DTensor`` with one ``Shard(d)`` placement and ``Replicate()`` on any other
  mesh dimension: FSDP2's ``fully_shard``, HSDP) are gathered whole onto their owner (one
  ``gather`` per owner over the shard group), computed there, and the owner's result is cut into the
  same shards and sent back (one ``scatter`` per owner); each process writes its own shard;
* per-matrix results are dataclasses (:class:`MatrixResult`: stable ranks, power-iteration vectors,
  flags); the owners' results are packed into one buffer per process group that every process receives
  (one ``all_reduce``) and unpacked into the same named results everywhere, so guards hold identical
  state on all ranks.

Collectives are issued in the same order on every process of a group, whatever the data, so a
callback that runs the plan at the same optimizer steps on every process cannot deadlock. Nothing
here imports Lightning.

Not supported (``NotImplementedError`` naming the parameter): DTensors with a ``Partial`` placement
or sharded on more than one mesh dimension (tensor parallelism combined with FSDP).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

if TYPE_CHECKING:
    from lightning_msign.fsdp1 import FSDP1Units
    from lightning_msign.targets import TargetMatrix

try:
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = Replicate = Shard = None  # type: ignore[assignment,misc]


def is_sharded(tensor: Tensor) -> bool:
    """True for a tensor that holds only a shard of the logical one (a ``DTensor``: FSDP2, HSDP)."""
    return DTensor is not None and (isinstance(tensor, DTensor) or isinstance(getattr(tensor, "data", None), DTensor))


def local_tensor(param: Tensor) -> Tensor:
    """The tensor this process stores for ``param`` (its shard for a DTensor), detached, sharing storage."""
    if DTensor is not None and isinstance(param, DTensor):
        return param.to_local().detach()
    return param.detach()


def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_grad_norm(params: Iterable[torch.nn.Parameter], units: Optional["FSDP1Units"] = None) -> Optional[Tensor]:
    """Total 2-norm of the gradients of ``params`` over the whole model, the same on every process.

    Under DDP gradients are already synchronised; DTensor (FSDP2) gradients are shards, whose norm
    ``torch.nn.utils.get_total_norm`` reduces over their mesh; FSDP1 gradients (``units`` given) are the
    slices of their unit's flat gradient, whose squares are summed over the unit's process group.
    ``None`` when no process has a gradient.
    """
    plain: list[Tensor] = []
    sharded: dict[tuple, list[Tensor]] = {}
    sliced: dict[int, list[Tensor]] = {}
    groups: dict[int, object] = {}
    for p in params:
        index = units.unit_of(p) if units is not None else None
        if index is not None and units is not None and units.sharded(index):
            group = units.process_group(index)
            groups[id(group)] = group
            sliced.setdefault(id(group), [])
            if p.grad is not None:
                sliced[id(group)].append(p.grad)
            continue
        g = p.grad
        if g is None:
            continue
        if is_sharded(g):
            sharded.setdefault((id(g.device_mesh), tuple(g.placements)), []).append(g)
        else:
            plain.append(g)
    if not plain and not sharded and not groups:
        return None
    squares: list[Tensor] = []
    if plain:
        squares.append(torch.nn.utils.get_total_norm(plain).float().square())
    for grads in sharded.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norm = norm.full_tensor() if is_sharded(norm) else norm
        squares.append(norm.float().square().to(squares[0].device if squares else norm.device))
    for key, grads in sliced.items():  # every process takes part, with or without a slice of its own
        group = groups[key]
        local = torch.zeros(2, dtype=torch.float64)  # (sum of squares, gradients present)
        if grads:
            local[0] = torch.nn.utils.get_total_norm(grads).double().square().cpu()
            local[1] = len(grads)
        device = torch.device("cpu")
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        total = local.to(device)
        dist.all_reduce(total, group=group)
        if float(total[1]) > 0:
            squares.append(total[0].float().to(squares[0].device if squares else total.device))
    if not squares:
        return None
    return torch.stack(squares).sum().sqrt()


def any_process(flag: bool, device: Optional[torch.device] = None) -> bool:
    """``flag`` OR-ed over every process (one ``all_reduce``), so a decision is identical on all of them."""
    if not is_distributed():
        return bool(flag)
    backend = dist.get_backend()
    dev = device if device is not None and backend != "gloo" else torch.device("cpu")
    if backend == "nccl" and (device is None or device.type != "cuda"):
        dev = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([1.0 if flag else 0.0], device=dev)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def max_over_processes(values: Sequence[float], device: Optional[torch.device] = None) -> list[float]:
    """Element-wise maximum of ``values`` over every process (one ``all_reduce``; a NaN loses to a number).

    Every process must pass a list of the same length, so a decision taken from the result is the same on
    all of them. On a single process the values come back as floats.
    """
    out = [float(v) for v in values]
    if not is_distributed() or not out:
        return out
    backend = dist.get_backend()
    dev = device if device is not None and backend != "gloo" else torch.device("cpu")
    if backend == "nccl" and (device is None or device.type != "cuda"):
        dev = torch.device("cuda", torch.cuda.current_device())
    tensor = torch.tensor([-math.inf if math.isnan(v) else v for v in out], dtype=torch.float64, device=dev)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [math.nan if v == -math.inf else v for v in tensor.tolist()]


class MatrixResult:
    """Base of the per-matrix results a computation returns (subclasses are dataclasses).

    Fields annotated ``float``, ``int`` or ``bool`` hold one value; fields annotated ``Tensor`` hold a
    vector whose length :meth:`vector_length` gives for a target (default: the matrix's columns, the
    length of a right singular vector). The plan packs results into one float64 buffer to share them
    between processes and unpacks them into instances again, so every process holds the same results.
    """

    @classmethod
    def vector_length(cls, field_name: str, target: "TargetMatrix") -> int:
        return target.shape[1]

    @classmethod
    def _kinds(cls) -> list[tuple[str, str]]:
        """``(field name, kind)`` in declaration order; read once per class from the annotations."""
        cached = cls.__dict__.get("_kinds_cache")
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = []
            for f in dataclasses.fields(cls):  # type: ignore[arg-type]
                hint = hints[f.name]
                if hint in (float, int, bool):
                    cached.append((f.name, hint.__name__))
                elif hint is Tensor:
                    cached.append((f.name, "tensor"))
                else:
                    raise TypeError(f"{cls.__name__}.{f.name}: a MatrixResult field must be float, int, bool or Tensor")
            cls._kinds_cache = cached  # type: ignore[attr-defined]
        return cached

    @classmethod
    def _fields(cls, target: "TargetMatrix") -> list[tuple[str, str, int]]:
        return [(name, kind, cls.vector_length(name, target) if kind == "tensor" else 1) for name, kind in cls._kinds()]

    @classmethod
    def width(cls, target: "TargetMatrix") -> int:
        """Slots of one packed result (one more for the 'present' flag)."""
        return 1 + sum(n for _, _, n in cls._fields(target))

    def pack(self, target: "TargetMatrix") -> Tensor:
        parts = [torch.ones(1, dtype=torch.float64)]
        for name, kind, n in self._fields(target):
            value = getattr(self, name)
            if kind == "tensor":
                vec = value.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
                if vec.numel() != n:
                    raise ValueError(f"{type(self).__name__}.{name} has {vec.numel()} values, expected {n}")
                parts.append(vec)
            else:
                parts.append(torch.tensor([float(value)], dtype=torch.float64))
        return torch.cat(parts)

    @classmethod
    def unpack(cls, flat: Tensor, target: "TargetMatrix") -> Optional["MatrixResult"]:
        if flat[0] != 1:
            return None
        values, offset = {}, 1
        for name, kind, n in cls._fields(target):
            chunk = flat[offset : offset + n]
            offset += n
            if kind == "tensor":
                values[name] = chunk.float()
            elif kind == "bool":
                values[name] = bool(chunk[0] != 0)
            elif kind == "int":
                values[name] = int(round(float(chunk[0])))
            else:
                values[name] = float(chunk[0])
        return cls(**values)  # type: ignore[call-arg]


R = TypeVar("R", bound=MatrixResult)


@dataclass
class OwnedMatrix:
    """One target handed to a computation on its owner: its index, and the whole parameter it lives in.

    ``whole`` is the whole parameter as the owner holds it (the parameter's own data when it is
    replicated, a gathered copy when it is sharded). Read with :attr:`matrix`, write with :meth:`write`:
    the plan sends what was written back to every process.
    """

    index: int
    target: "TargetMatrix"
    whole: Tensor

    @property
    def matrix(self) -> Tensor:
        """The 2D matrix (a view into ``whole`` where the layout allows, else a copy)."""
        return self.target.matrix(self.whole)

    def write(self, value: Tensor) -> None:
        """Write the 2D ``value`` into the matrix's place in ``whole``."""
        self.target.write(value.to(self.whole.dtype), self.whole)


Compute = Callable[[list[OwnedMatrix]], "dict[int, MatrixResult]"]


@dataclass
class _Unit:
    """One parameter and the targets inside it (a fused QKV weight holds up to three)."""

    param: Tensor
    blocks: list[tuple[int, "TargetMatrix"]]
    sharded: bool
    shard_dim: int = 0
    group: Optional[object] = None  # a ProcessGroup, or None for a single process
    owner: int = 0  # rank in ``group``
    cost: float = 0.0
    scope: Optional[int] = None  # the FSDP1 unit to gather around it (index in FSDP1Units.units)


@dataclass
class _Group:
    """The units that share one process group and dtype: their collectives are issued together."""

    group: Optional[object]
    dtype: torch.dtype
    device: torch.device
    units: list[_Unit] = field(default_factory=list)
    scope: Optional[int] = None


def _cost(shape: Sequence[int]) -> float:
    m, n = shape[0], math.prod(shape[1:])
    return float(m) * n * min(m, n)


def _shard_layout(param: Tensor, name: str) -> tuple[int, object]:
    """``(tensor dim, process group)`` of a DTensor sharded on one mesh dimension, replicated on the rest."""
    shard_dims = [(i, p.dim) for i, p in enumerate(param.placements) if isinstance(p, Shard)]
    others = [p for p in param.placements if not isinstance(p, (Shard, Replicate))]
    if others or len(shard_dims) > 1:
        raise NotImplementedError(
            f"Parameter {name!r} is a DTensor with placements {tuple(param.placements)}: only one Shard(d) placement"
            " (FSDP2 / HSDP) plus Replicate() is supported; whole-matrix gathering across several sharded mesh"
            " dimensions (tensor parallelism with FSDP) or of a Partial() tensor is not implemented."
        )
    if not shard_dims:
        return -1, None
    mesh_dim, tensor_dim = shard_dims[0]
    return tensor_dim, param.device_mesh.get_group(mesh_dim)


def _chunk_sizes(length: int, parts: int) -> list[int]:
    """Sizes of ``torch.chunk(length, parts)`` padded with empty chunks: DTensor's ``Shard`` layout."""
    size = -(-length // parts)
    return [max(0, min(size, length - i * size)) for i in range(parts)]


class WholeMatrixPlan:
    """Who computes which target matrix, and the collectives that move whole matrices to and from it.

    Args:
        targets: the targets, in an order that is the same on every process (resolution order).
        distributed: whether the run has several processes (``trainer.world_size > 1`` and
            ``torch.distributed`` initialized). ``False``: everything is computed locally, in place.
        units: the model's FSDP1 units (:class:`~lightning_msign.fsdp1.FSDP1Units`), when it has any: each
            :meth:`run` gathers them one at a time (``summon_full_params``), runs the targets of that unit as
            replicated ones, and lets FSDP keep each process's slice of the result. Owners are balanced
            within each unit (a gather is a synchronisation point), ties broken by the load of the units before.

    Raises:
        NotImplementedError: a sharded parameter with a layout that cannot be gathered whole.
    """

    def __init__(
        self, targets: Sequence["TargetMatrix"], distributed: bool, units: Optional["FSDP1Units"] = None
    ) -> None:
        self.targets = list(targets)
        self.distributed = bool(distributed and dist.is_available() and dist.is_initialized())
        self._fsdp1 = units
        members: dict[int, _Unit] = {}
        for i, t in enumerate(self.targets):
            unit = members.get(id(t.param))
            if unit is None:
                unit = members[id(t.param)] = self._unit(t)
            unit.blocks.append((i, t))
        self._groups: list[_Group] = []
        by_key: dict[tuple, _Group] = {}
        for unit in members.values():
            local = local_tensor(unit.param)
            key = (unit.scope, id(unit.group), unit.param.dtype)
            if key not in by_key:
                by_key[key] = _Group(unit.group, unit.param.dtype, local.device, scope=unit.scope)
                self._groups.append(by_key[key])
            by_key[key].units.append(unit)
        self._groups.sort(key=lambda g: -1 if g.scope is None else g.scope)  # one gather per FSDP1 unit
        # Owners: balanced within each FSDP1 unit (a gather is a synchronisation point, so a unit takes as long
        # as its busiest process), ties broken by the load carried from the units before; without FSDP1 units,
        # balanced over everything that shares a process group and dtype.
        carried: dict[tuple, list[float]] = {}
        for g in self._groups:
            key = (id(g.group), g.dtype)
            world = dist.get_world_size(g.group) if g.group is not None else 1
            carried.setdefault(key, [0.0] * world)
            self._assign_owners(g.units, carried[key], per_call=g.scope is not None)

    def _unit(self, t: "TargetMatrix") -> _Unit:
        p, cost = t.param, _cost(t.param_shape)
        scope = self._fsdp1.unit_of(p) if self._fsdp1 is not None else None
        if DTensor is not None and isinstance(p, DTensor):
            dim, group = _shard_layout(p, t.param_name)  # raises for layouts that cannot be gathered whole
            if dim >= 0 and self.distributed:
                return _Unit(p, [], sharded=True, shard_dim=dim, group=group, cost=cost)
        group = dist.group.WORLD if self.distributed else None
        return _Unit(p, [], sharded=False, group=group, cost=cost, scope=scope)

    @staticmethod
    def _assign_owners(units: list[_Unit], carried: list[float], per_call: bool) -> None:
        """Largest first, each to the least-loaded process; ``carried`` (the load so far) is updated.

        ``per_call``: the load that counts is this call's (ties broken by ``carried``), else ``carried``.
        """
        local = [0.0] * len(carried)
        order = sorted(range(len(units)), key=lambda i: (-units[i].cost, i))
        for i in order:
            if per_call:
                owner = min(range(len(carried)), key=lambda r: (local[r], carried[r], r))
            else:
                owner = min(range(len(carried)), key=lambda r: (carried[r], r))
            units[i].owner = owner
            local[owner] += units[i].cost
            carried[owner] += units[i].cost

    # ----------------------------------------------------------------------------------------- info
    def owners(self) -> dict[str, int]:
        """Target name -> rank (in its process group) of the process that computes it."""
        return {t.name: u.owner for g in self._groups for u in g.units for _, t in u.blocks}

    def local_share(self) -> float:
        """Fraction of the total cost this process computes (1.0 on a single process)."""
        total = mine = 0.0
        for g in self._groups:
            rank = dist.get_rank(g.group) if g.group is not None else 0
            for u in g.units:
                total += u.cost
                mine += u.cost if u.owner == rank else 0.0
        return mine / total if total else 1.0

    # ------------------------------------------------------------------------------------------ run
    @torch.no_grad()
    def run(self, compute: Compute, result: Optional[type[R]] = None, write: bool = True) -> dict[str, R]:
        """Run ``compute`` on whole matrices, on their owners; write back and share the results.

        Args:
            compute: called on each process with the :class:`OwnedMatrix` es it owns (possibly none); may
                write them (:meth:`OwnedMatrix.write`); returns ``{owned.index: result}`` with results of
                type ``result`` (a :class:`MatrixResult` dataclass), for some or all of them.
            result: the result type (``None``: the computation returns nothing to share).
            write: send changed weights back (``False`` for read-only computations: no weight traffic).

        Returns:
            ``{target name: result}`` in target order, for the targets that returned one; identical on
            every process.
        """
        packed: dict[int, Tensor] = {}
        direct: dict[int, MatrixResult] = {}
        scopes: dict[Optional[int], list[_Group]] = {}
        for g in self._groups:
            scopes.setdefault(g.scope, []).append(g)
        for scope, groups in scopes.items():
            units = self._fsdp1
            with units.summon(scope, writeback=write) if scope is not None and units is not None else nullcontext():
                for g in groups:
                    self._run_group(g, compute, result, write, packed, direct)
        if result is None:
            return {}
        out: dict[str, R] = {}
        for index, t in enumerate(self.targets):
            if index in direct:
                out[t.name] = direct[index]  # type: ignore[assignment]
            elif index in packed:
                value = result.unpack(packed[index], t)
                if value is not None:
                    out[t.name] = value  # type: ignore[assignment]
        return out

    def _run_group(
        self,
        g: _Group,
        compute: Compute,
        result: Optional[type[MatrixResult]],
        write: bool,
        packed: dict[int, Tensor],
        direct: dict[int, MatrixResult],
    ) -> None:
        rank = dist.get_rank(g.group) if g.group is not None else 0
        world = dist.get_world_size(g.group) if g.group is not None else 1
        full = self._gather(g, rank, world)
        owned = [OwnedMatrix(index, t, full[id(u)]) for u in g.units if u.owner == rank for index, t in u.blocks]
        results = compute(owned) if owned else {}
        if write:
            self._write_back(g, rank, world, full)
        if result is None:
            return
        if g.group is None:  # one process: nothing to share, the results are already named here
            direct.update(results)
            return
        indices = [index for u in g.units for index, _ in u.blocks]
        widths = [result.width(self.targets[i]) for i in indices]
        buf = torch.zeros(sum(widths), dtype=torch.float64)
        offset = 0
        for index, width in zip(indices, widths):
            if index in results:
                buf[offset : offset + width] = results[index].pack(self.targets[index])
            offset += width
        device = g.device if dist.get_backend(g.group) != "gloo" else torch.device("cpu")
        moved = buf.to(device)
        dist.all_reduce(moved, group=g.group)
        buf = moved.cpu()
        offset = 0
        for index, width in zip(indices, widths):
            packed[index] = buf[offset : offset + width]
            offset += width

    def _gather(self, g: _Group, rank: int, world: int) -> dict[int, Tensor]:
        full: dict[int, Tensor] = {}
        for u in g.units:
            if not u.sharded and u.owner == rank:
                full[id(u)] = local_tensor(u.param)
        if world == 1:  # a shard group of one process: the local shard is the whole matrix
            full.update({id(u): local_tensor(u.param) for u in g.units if u.sharded})
            return full
        if not any(u.sharded for u in g.units):
            return full
        for owner in range(world):
            units = [u for u in g.units if u.sharded and u.owner == owner]
            if not units:
                continue
            pieces = []
            for u in units:
                local = local_tensor(u.param).movedim(u.shard_dim, 0)  # (rows here, ...)
                rows = u.param.shape[u.shard_dim]
                width = u.param.numel() // rows if rows else 0
                pad = -(-rows // world) - local.shape[0]
                flat = local.reshape(local.shape[0], width)
                pieces.append(torch.nn.functional.pad(flat, (0, 0, 0, pad)).reshape(-1))
            send = torch.cat(pieces)
            recv = [torch.empty_like(send) for _ in range(world)] if rank == owner else None
            dist.gather(send, recv, dst=dist.get_global_rank(g.group, owner), group=g.group)
            if rank != owner:
                continue
            offset = 0
            for u in units:
                shape = u.param.shape
                moved = (shape[u.shard_dim],) + tuple(s for d, s in enumerate(shape) if d != u.shard_dim)
                chunk = -(-moved[0] // world)
                width = math.prod(moved[1:])
                parts = [
                    buf[offset : offset + chunk * width].view(chunk, *moved[1:])[:size]
                    for buf, size in zip(recv, _chunk_sizes(moved[0], world))
                ]
                offset += chunk * width
                full[id(u)] = torch.cat(parts).movedim(0, u.shard_dim).contiguous()
        return full

    def _write_back(self, g: _Group, rank: int, world: int, full: dict[int, Tensor]) -> None:
        if world == 1:  # the computation wrote into the parameters (or their only shard) in place
            return
        for owner in range(world):
            replicated = [u for u in g.units if not u.sharded and u.owner == owner]
            if replicated:
                if rank == owner:
                    buf = torch.cat([full[id(u)].reshape(-1) for u in replicated])
                else:
                    buf = torch.empty(sum(u.param.numel() for u in replicated), dtype=g.dtype, device=g.device)
                dist.broadcast(buf, src=dist.get_global_rank(g.group, owner), group=g.group)
                if rank != owner:
                    offset = 0
                    for u in replicated:
                        dst = local_tensor(u.param)
                        dst.copy_(buf[offset : offset + dst.numel()].view_as(dst))
                        offset += dst.numel()
            sharded = [u for u in g.units if u.sharded and u.owner == owner]
            if not sharded:
                continue
            sizes = [
                -(-u.param.shape[u.shard_dim] // world) * (u.param.numel() // u.param.shape[u.shard_dim])
                for u in sharded
            ]
            recv = torch.empty(sum(sizes), dtype=g.dtype, device=g.device)
            send = None
            if rank == owner:
                per_rank: list[list[Tensor]] = [[] for _ in range(world)]
                for u, size in zip(sharded, sizes):
                    moved = full[id(u)].movedim(u.shard_dim, 0)
                    for r, part in enumerate(torch.split(moved, _chunk_sizes(moved.shape[0], world))):
                        flat = part.reshape(-1)
                        per_rank[r].append(torch.nn.functional.pad(flat, (0, size - flat.numel())))
                send = [torch.cat(parts) for parts in per_rank]
            dist.scatter(recv, send, src=dist.get_global_rank(g.group, owner), group=g.group)
            offset = 0
            for u, size in zip(sharded, sizes):
                moved = local_tensor(u.param).movedim(u.shard_dim, 0)
                n = moved.numel()
                moved.copy_(recv[offset : offset + n].view(moved.shape))
                offset += size
