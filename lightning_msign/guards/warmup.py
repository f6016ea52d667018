"""Architecture warm-up: train part of a transformer's blocks first and unlock the rest in groups, any loop."""

from __future__ import annotations

import fnmatch
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_msign._validation import (
    check_choice,
    check_non_negative_int,
    check_optional_positive_int,
    check_positive_int,
    check_range,
)
from lightning_msign.families.base import HF_TUPLE, TENSOR
from lightning_msign.guards.base import Guard
from lightning_msign.metric_keys import WARMUP_ACTIVE_BLOCKS, WARMUP_DEFERRED, WARMUP_UNLOCKED
from lightning_msign.models.base import BLOCK_PATHS, find_decoder

WarmupOrder = Literal["stack", "interleave"]

# How an inactive block returns its hidden state.
_TENSOR = TENSOR  # the hidden state itself (LitGPT, nanoGPT, HF Llama family in transformers 4.57)
_HF_TUPLE = HF_TUPLE  # ``(hidden, [self-attention weights, [cross-attention weights]])`` (HF GPT-2 in 4.57)
_LEARN = "learn"  # unknown class: learned once from one real call (see :class:`InactiveForward`)


class InactiveForward:
    """The ``forward`` of an inactive block: its hidden state back, unchanged, with no compute.

    Set as an *instance* attribute of the block (``block.forward``), which ``nn.Module.__call__`` finds
    before the class's method, and deleted at unlock; parameters, names and ``state_dict`` keys are not
    touched. A module-level class, so a model holding it pickles (``ddp_spawn``) and deep-copies.

    The hidden state is the first positional argument, else the ``hidden_states`` (or ``x``) keyword.
    The output has the block's structure, known from its class (:data:`_TENSOR`, :data:`_HF_TUPLE`: HF
    GPT-2 returns ``(hidden,)``, one ``None`` more with ``output_attentions``, another with cross-attention
    inputs). A class declared only through ``output_projections`` has an unknown structure: at the first
    call the real forward runs once under ``torch.no_grad()`` with the random number generators forked
    (dropout draws do not shift the training's random stream), and the result's structure (a tensor, or a
    tuple of that length, padded with ``None``) is kept for every later call.
    """

    def __init__(self, kind: str, block: Optional[nn.Module] = None) -> None:
        self.kind = kind
        self.block = block if kind == _LEARN else None  # only to run the real forward once
        self.tuple_length: Optional[int] = None  # learned: None -> a tensor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden = args[0]
        elif "hidden_states" in kwargs:
            hidden = kwargs["hidden_states"]
        elif "x" in kwargs:
            hidden = kwargs["x"]
        else:
            raise TypeError("An inactive block needs its hidden state as first argument or as `hidden_states=`")
        if self.kind == _TENSOR:
            return hidden
        if self.kind == _HF_TUPLE:
            if not kwargs.get("output_attentions"):
                return (hidden,)
            cross = args[5] if len(args) > 5 else kwargs.get("encoder_hidden_states")
            return (hidden, None) + ((None,) if cross is not None else ())
        if self.tuple_length is None and self.block is not None:
            self.tuple_length = self._learn(self.block, *args, **kwargs)
            self.block = None
        return hidden if self.tuple_length in (None, 0) else (hidden,) + (None,) * (self.tuple_length - 1)

    @staticmethod
    def _learn(block: nn.Module, *args: Any, **kwargs: Any) -> int:
        """0 when the real forward returns a tensor, else the length of the tuple it returns."""
        devices = [a.device for a in args if isinstance(a, Tensor) and a.device.type == "cuda"][:1]
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            out = type(block).forward(block, *args, **kwargs)
        return len(out) if isinstance(out, (tuple, list)) else 0


def is_inactive(block: nn.Module) -> bool:
    """Whether ``block`` is held inactive (the identity, no compute) by a :class:`DepthWarmup`."""
    return isinstance(block.__dict__.get("forward"), InactiveForward)


@dataclass(frozen=True)
class BlockPlan:
    """One block as the warm-up sees it.

    Attributes:
        index: position in the block list.
        name: its name in the attached module (``model.transformer.h.3``).
        module: the block.
        output_projections: names, relative to the block, of the modules writing into the residual stream.
        kind: how its forward returns the hidden state (see :class:`InactiveForward`).
    """

    index: int
    name: str
    module: nn.Module
    output_projections: tuple[str, ...]
    kind: str


def known_block(block: nn.Module) -> Optional[tuple[tuple[str, ...], str]]:
    """``(output projections, output kind)`` of a block class a registered model family knows, else ``None``
    (:func:`lightning_msign.families.block_info`: LitGPT ``Block``, HF ``GPT2Block``, HF Llama / Mistral / Qwen2 /
    Qwen3 decoder layers, nanoGPT's ``Block``)."""
    from lightning_msign.families import block_info

    info = block_info(block)
    return None if info is None else (info.output_projections, info.output)


def unlock_plan(n_blocks: int, start_fraction: float, groups: int, order: str) -> tuple[list[int], list[list[int]]]:
    """The blocks active at the start and the groups unlocked after, in unlock order.

    ``n0 = max(1, ceil(start_fraction * n_blocks))`` blocks start active: ``0 .. n0 - 1`` (``"stack"``) or
    ``floor(i * n_blocks / n0)`` for ``i < n0`` (``"interleave"``: spread over depth, every other block at
    ``start_fraction=0.5``). The others are split, bottom-up, into ``min(groups, n_blocks - n0)`` contiguous
    groups of near-equal sizes (the first groups one larger when it does not divide).

    >>> unlock_plan(8, 0.5, 2, "stack")
    ([0, 1, 2, 3], [[4, 5], [6, 7]])
    >>> unlock_plan(8, 0.5, 4, "interleave")
    ([0, 2, 4, 6], [[1], [3], [5], [7]])
    """
    n0 = min(n_blocks, max(1, math.ceil(start_fraction * n_blocks - 1e-9)))
    if order == "stack":
        active = list(range(n0))
    else:
        active = sorted({(i * n_blocks) // n0 for i in range(n0)})
    rest = [i for i in range(n_blocks) if i not in set(active)]
    n_groups = min(groups, len(rest))
    plan, start = [], 0
    for g in range(n_groups):
        size = len(rest) // n_groups + (1 if g < len(rest) % n_groups else 0)
        plan.append(rest[start:start + size])
        start += size
    return active, plan


class DepthWarmup(Guard):
    r"""Grow a transformer's depth during training: some blocks first, the rest unlocked in groups.

    Per "Taming Curvature" (arXiv 2606.16768), training a deep transformer from the start puts the
    curvature that Adam's preconditioner sees above its stability threshold early on; starting with part of
    the blocks and adding the rest over training keeps it below. An *inactive* block computes the exact
    identity with no compute (:class:`InactiveForward` replaces its ``forward``); its parameters keep their
    names and ``state_dict`` keys, get no gradient and no update (:meth:`clear_inactive_grads`).

    *Which blocks start active.* ``n0 = max(1, ceil(start_fraction * n))`` of the ``n`` blocks
    (:func:`unlock_plan`). ``order="stack"``: the bottom ``n0``; the others are unlocked bottom-up, so each new
    block sits on top of the trained ones and reads the residual stream that the final norm and the head
    were trained on, and a block always follows the blocks it was trained after. ``order="interleave"``:
    ``n0`` blocks spread over depth (every other one at ``start_fraction=0.5``), so the depth positions
    of the full model are represented from the start; the others are unlocked bottom-up.

    *Unlocking is function-preserving and trainable.* At unlock the block's output projections (the modules
    writing into the residual stream) get zero weights and biases, so the block adds exactly
    :math:`0` and the model's output does not change at the unlock step. Its other weights stay at their
    initialisation (they never moved while inactive). The trap avoided: an all-zero block is a stationary
    point, every gradient of it exactly 0, and it never trains; with only the output projection
    :math:`W_o = 0`, its gradient :math:`\partial L / \partial W_o = g^\top h` (``g`` the gradient at the
    residual stream, ``h`` the block's inner activation, non-zero) is not zero, so :math:`W_o` moves at the
    first step and the inner weights follow.

    *Optimizer.* With a ``None`` gradient ``torch.optim.AdamW`` (and Adam, SGD) skips a parameter
    entirely: no update, no weight decay, no state. Inactive blocks are not run, so their gradients are
    ``None`` already; :meth:`clear_inactive_grads` makes sure (e.g. after ``zero_grad(set_to_none=False)``).
    A newly unlocked block's Adam state starts fresh (first and second moments from its first gradient).

    *Schedule.* Group ``g`` (0-based) is due after optimizer step ``start_step + g * interval``, at most one
    group per step. With ``curvature_margin``, a due unlock happens only when the latest measured stability
    ratio (``curvature/stability_ratio`` of the curvature monitor: :math:`\lambda_{\max}` of Adam's
    preconditioned Hessian over its threshold) is below the margin; otherwise it is deferred, at most
    ``max_defer_steps`` steps past its due step when that is set, and the next group is then due
    ``interval`` steps after the actual unlock.

    Usage in any loop::

        warmup = DepthWarmup(model, start_fraction=0.5, groups=2, interval=200, start_step=100)
        for input_ids, targets in loader:
            loss = loss_fn(model(input_ids), targets)
            loss.backward()
            warmup.clear_inactive_grads()
            optimizer.step()
            optimizer.zero_grad()
            metrics = warmup.step()  # {"warmup/active_blocks": ...} (+ "warmup/unlocked" at unlocks)

    Args:
        module: the model, or a module holding it (or attach later with :meth:`attach`).
        start_fraction: fraction of the blocks active at the start, in ``(0, 1]``; ``1`` unlocks nothing.
        groups: number of groups the other blocks are unlocked in (fewer when fewer blocks remain).
        interval: optimizer steps between group unlocks.
        start_step: optimizer step after which the first group is due (a non-negative int); ``None`` only
            while the caller has yet to set it (the Lightning callback sets the end of the LR warm-up):
            attaching or stepping with ``None`` raises.
        order: ``"stack"`` or ``"interleave"`` (see above).
        blocks_attr: dotted path from the attached module to the ``nn.ModuleList`` of blocks; ``None`` finds
            the first module with blocks at ``transformer.h`` (LitGPT, GPT-2, nanoGPT) or ``model.layers``
            (HF Llama family).
        output_projections: names (``fnmatch`` patterns allowed: ``"mlp.experts.*.proj"``), relative to a
            block, of the modules that write into the residual stream; ``None`` reads them from the block
            class (:func:`known_block`).
        curvature_margin: unlock only when the stability ratio passed to :meth:`step` is below this, in
            ``(0, inf)``; ``None`` unlocks on schedule.
        max_defer_steps: with ``curvature_margin``, unlock anyway this many steps past the due step;
            ``None`` waits for the curvature however long.

    Raises:
        ValueError: at construction, for any bad argument; when attached, if ``start_step`` is ``None``, no
            block list is found (or ``blocks_attr`` does not lead to a non-empty ``nn.ModuleList``), a block
            class is unknown and ``output_projections`` is not given, or a projection name matches no module
            with a ``weight``.

    Metrics (returned by :meth:`step`):
        ``warmup/active_blocks`` at every new step; ``warmup/unlocked`` (blocks unlocked) at unlock steps;
        ``warmup/deferred`` (1.0) at steps where a due unlock waited for the curvature.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        start_fraction: float = 0.5,
        groups: int = 4,
        interval: int = 500,
        start_step: Optional[int] = None,
        order: WarmupOrder = "stack",
        blocks_attr: Optional[str] = None,
        output_projections: Optional[list[str]] = None,
        curvature_margin: Optional[float] = None,
        max_defer_steps: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.start_fraction = check_range(start_fraction, "start_fraction", 0.0, 1.0, low_open=True)
        self.groups = check_positive_int(groups, "groups")
        self.interval = check_positive_int(interval, "interval")
        self.start_step = None if start_step is None else check_non_negative_int(start_step, "start_step")
        self.order = check_choice(order, "order", WarmupOrder)
        if blocks_attr is not None and (not isinstance(blocks_attr, str) or not all(blocks_attr.split("."))):
            raise ValueError(
                f"`blocks_attr` must be None or a dotted attribute path like 'model.transformer.h', got {blocks_attr!r}"
            )
        self.blocks_attr = blocks_attr
        if output_projections is not None and (
            isinstance(output_projections, str)
            or not isinstance(output_projections, (list, tuple))
            or not output_projections
            or not all(isinstance(n, str) and n for n in output_projections)
        ):
            raise ValueError(
                "`output_projections` must be None or a non-empty list of module names relative to a block"
                f" (like ['attn.proj', 'mlp.proj']), got {output_projections!r}"
            )
        self.output_projections = None if output_projections is None else list(output_projections)
        self.curvature_margin = (
            None if curvature_margin is None
            else check_range(curvature_margin, "curvature_margin", 0.0, math.inf, low_open=True)
        )
        self.max_defer_steps = check_optional_positive_int(max_defer_steps, "max_defer_steps")
        if self.max_defer_steps is not None and self.curvature_margin is None:
            raise ValueError(
                f"`max_defer_steps` bounds the deferral of the curvature-driven variant: set `curvature_margin`"
                f" too, or leave it None, got max_defer_steps={max_defer_steps!r} with curvature_margin=None"
            )
        self._blocks: list[BlockPlan] = []
        self._groups: list[list[int]] = []
        self._active: Optional[set[int]] = None  # None until attached or loaded
        self._unlock_steps: list[int] = []
        self._next_due: Optional[int] = None  # step the next group is due at; None: start_step
        self._deferred_steps = 0  # steps the pending group has waited so far
        if module is not None:
            self.attach(module)

    # -------------------------------------------------------------------------------------- attaching
    def _on_attach(self, module: nn.Module) -> None:
        if self.start_step is None:
            raise ValueError(
                "`start_step` must be set (a non-negative int) before DepthWarmup is attached, got None: pass it"
                " to the constructor (the Lightning callback sets it from the module's `warmup_steps`)"
            )
        blocks = self._find_blocks(module)
        names = {id(m): n for n, m in module.named_modules()}
        plans = []
        for i, block in enumerate(blocks):
            name = names.get(id(block), str(i))
            plans.append(BlockPlan(i, name, block, *self._resolve_projections(block, name)))
        active, groups = unlock_plan(len(plans), self.start_fraction, self.groups, self.order)
        if self._active is not None and any(i >= len(plans) for i in self._active):
            raise ValueError(
                f"The restored warm-up state has active blocks {sorted(self._active)}, but the model has"
                f" {len(plans)} blocks"
            )
        first = not self._blocks
        self._blocks, self._groups = plans, groups
        if self._active is None:
            self._active = set(active)
            if not groups and first:
                warnings.warn(
                    f"DepthWarmup: all {len(plans)} blocks start active (start_fraction={self.start_fraction:g}),"
                    " so there is nothing to unlock and the warm-up does nothing",
                    UserWarning,
                )
        self._apply()

    def _find_blocks(self, module: nn.Module) -> list[nn.Module]:
        if self.blocks_attr is not None:
            obj: Any = module
            for part in self.blocks_attr.split("."):
                if not hasattr(obj, part):
                    raise ValueError(
                        f"`blocks_attr` must lead from {type(module).__name__} to an nn.ModuleList of blocks, got"
                        f" {self.blocks_attr!r}: {type(obj).__name__} has no attribute {part!r}"
                    )
                obj = getattr(obj, part)
            if not isinstance(obj, nn.ModuleList) or len(obj) == 0:
                raise ValueError(
                    f"`blocks_attr` must lead to a non-empty nn.ModuleList of blocks, got {self.blocks_attr!r},"
                    f" a {type(obj).__name__}" + (" of length 0" if isinstance(obj, nn.ModuleList) else "")
                )
            return list(obj)
        try:
            return find_decoder(module).blocks
        except ValueError:
            paths = " or ".join(f"`{p}`" for p in BLOCK_PATHS)
            raise ValueError(
                f"DepthWarmup needs a list of transformer blocks: looked for a non-empty nn.ModuleList at {paths}"
                f" (LitGPT, GPT-2, nanoGPT, HF Llama family) in {type(module).__name__} and found none: pass"
                " `blocks_attr`"
            ) from None

    def _resolve_projections(self, block: nn.Module, name: str) -> tuple[tuple[str, ...], str]:
        known = known_block(block)
        if self.output_projections is None:
            if known is None:
                raise ValueError(
                    f"DepthWarmup does not know the output projections of block class {type(block).__qualname__}"
                    f" ({name}): pass `output_projections`, the names relative to a block of the modules that"
                    " write into the residual stream (like ['attn.proj', 'mlp.proj'])"
                )
            projections, kind = known
        else:
            modules = dict(block.named_modules())
            projections = ()
            for pattern in self.output_projections:
                matched = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
                if not matched:
                    raise ValueError(
                        f"`output_projections` entry {pattern!r} matches no module of block {name}"
                        f" ({type(block).__qualname__})"
                    )
                projections += tuple(n for n in matched if n not in projections)
            kind = _LEARN if known is None else known[1]
        modules = dict(block.named_modules())
        for proj in projections:
            if not isinstance(getattr(modules.get(proj), "weight", None), Tensor):
                raise ValueError(
                    f"Output projection {proj!r} of block {name} ({type(block).__qualname__}) must be a module with"
                    " a `weight` (e.g. nn.Linear): check `output_projections`"
                )
        return projections, kind

    def _apply(self) -> None:
        """Identity forward on the inactive blocks, the class's forward on the active ones."""
        active = self._active or set()
        for plan in self._blocks:
            current = plan.module.__dict__.get("forward")
            if plan.index in active:
                if isinstance(current, InactiveForward):
                    del plan.module.forward
            elif not isinstance(current, InactiveForward):
                if current is not None:
                    raise ValueError(
                        f"Block {plan.name} already has an instance-level `forward` ({current!r}, set by another"
                        " tool): DepthWarmup replaces it while the block is inactive and cannot share it"
                    )
                plan.module.forward = InactiveForward(plan.kind, plan.module)

    # ----------------------------------------------------------------------------------------- state
    @property
    def active_blocks(self) -> tuple[int, ...]:
        """Indices of the active blocks (known once attached)."""
        return tuple(sorted(self._active or ()))

    @property
    def inactive_blocks(self) -> tuple[int, ...]:
        """Indices of the inactive blocks (known once attached)."""
        active = self._active or set()
        return tuple(p.index for p in self._blocks if p.index not in active)

    @property
    def unlock_steps(self) -> tuple[int, ...]:
        """The optimizer steps after which groups were unlocked, in order."""
        return tuple(self._unlock_steps)

    @property
    def fully_unlocked(self) -> bool:
        """Whether every block is active (known once attached)."""
        return bool(self._blocks) and not self.inactive_blocks

    @property
    def blocks(self) -> list[BlockPlan]:
        """The blocks with their output projections (known once attached)."""
        return list(self._blocks)

    @property
    def groups_plan(self) -> list[list[int]]:
        """The block indices of each group, in unlock order (known once attached)."""
        return [list(g) for g in self._groups]

    def _pending_group(self) -> Optional[list[int]]:
        active = self._active or set()
        return next((g for g in self._groups if not set(g) <= active), None)

    def next_due(self) -> Optional[int]:
        """The optimizer step after which the next group is due, or ``None`` when all are unlocked."""
        if self._pending_group() is None:
            return None
        if self._next_due is not None:
            return self._next_due
        if self.start_step is None:
            raise ValueError("`start_step` must be set (a non-negative int), got None")
        return self.start_step

    def unlock_due(self, step: int) -> bool:
        """Whether a group is due at optimizer step ``step`` (before any curvature condition)."""
        due = self.next_due()
        return due is not None and step >= due

    _no_optimizer_hooks = "with `curvature_margin` its step needs the latest stability ratio (call step(step, ratio))"

    def _optimizer_calls(self) -> tuple[Any, Any]:
        if self.curvature_margin is not None:
            return None, None

        def before() -> dict[str, float]:
            self.clear_inactive_grads()
            return {}

        return before, self.step

    # ------------------------------------------------------------------------------------------ steps
    def clear_inactive_grads(self) -> None:
        """Set ``.grad = None`` on every parameter of an inactive block (call before ``optimizer.step()``)."""
        active = self._active or set()
        for plan in self._blocks:
            if plan.index not in active:
                for p in plan.module.parameters():
                    p.grad = None

    def step(self, step: Optional[int] = None, stability_ratio: Optional[float] = None) -> dict[str, float]:
        """Call after each optimizer step: unlocks the next group when it is due (and the curvature allows).

        Args:
            step: optimizer steps taken so far (``trainer.global_step`` after the step); default: the guard
                counts its calls. A step already seen does nothing (gradient accumulation).
            stability_ratio: the latest measured ``curvature/stability_ratio`` (used with ``curvature_margin``).

        Returns:
            The metrics of this step (``{}`` for a step already seen).
        """
        self._require_module("step")
        current = self._advance(step)
        if current is None:
            return {}
        metrics: dict[str, float] = {}
        group, due = self._pending_group(), self.next_due()
        if group is not None and due is not None and current >= due:
            allowed = self.curvature_margin is None or (
                stability_ratio is not None and math.isfinite(stability_ratio)
                and stability_ratio < self.curvature_margin
            )
            forced = self.max_defer_steps is not None and current - due >= self.max_defer_steps
            if allowed or forced:
                self.unlock(group)
                self._unlock_steps.append(current)
                deferred = self._deferred_steps > 0 or current > due
                self._next_due = (current if deferred else due) + self.interval
                self._deferred_steps = 0
                metrics[WARMUP_UNLOCKED] = float(len(group))
            else:
                self._deferred_steps += 1
                metrics[WARMUP_DEFERRED] = 1.0
        metrics[WARMUP_ACTIVE_BLOCKS] = float(len(self.active_blocks))
        return metrics

    @torch.no_grad()
    def unlock(self, indices: list[int]) -> None:
        """Activate blocks ``indices`` now: zero their output projections and restore their forward.

        :meth:`step` calls this on schedule; call it directly only to take the schedule into your own hands.
        """
        self._require_module("unlock")
        active = self._active if self._active is not None else set()
        by_index = {p.index: p for p in self._blocks}
        for i in indices:
            if i not in by_index:
                raise ValueError(f"`indices` must be block indices in [0, {len(self._blocks)}), got {i!r}")
            if i in active:
                continue
            plan = by_index[i]
            modules = dict(plan.module.named_modules())
            for name in plan.output_projections:
                proj = modules[name]
                proj.weight.zero_()
                bias = getattr(proj, "bias", None)
                if isinstance(bias, Tensor):
                    bias.zero_()
            active.add(i)
        self._active = active
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state: last step, active blocks, unlock steps, deferral (weights are the model's)."""
        return {
            **super().state_dict(),
            "start_step": self.start_step,
            "active": None if self._active is None else sorted(self._active),
            "unlock_steps": list(self._unlock_steps),
            "next_due": self._next_due,
            "deferred_steps": self._deferred_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`: the active set, with the identity forward back on the inactive blocks."""
        super().load_state_dict(state_dict)
        if self.start_step is None and state_dict.get("start_step") is not None:
            self.start_step = int(state_dict["start_step"])
        active = state_dict.get("active")
        if active is not None:
            self._active = {int(i) for i in active}
        self._unlock_steps = [int(s) for s in state_dict.get("unlock_steps", [])]
        next_due = state_dict.get("next_due")
        self._next_due = None if next_due is None else int(next_due)
        self._deferred_steps = int(state_dict.get("deferred_steps", 0))
        if self._blocks:
            if any(i >= len(self._blocks) for i in self._active or ()):
                raise ValueError(
                    f"The restored warm-up state has active blocks {sorted(self._active or ())}, but the model has"
                    f" {len(self._blocks)} blocks"
                )
            self._apply()
