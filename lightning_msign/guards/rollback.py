"""Rollback: catch a divergence, return to a recent good state held in memory, repair, and go on.

A diverging run usually announces itself one step too late: the loss or the gradient norm is already
non-finite or far out of its recent range. Skipping that step (OLMo-core's skip-step) leaves the weights
where the instability built up; raising (Lightning's ``SpikeDetection``) or exiting (Megatron) costs a
restart from the last checkpoint, hours back on a cluster. :class:`Rollback` keeps the last ``keep``
*snapshots* of the training state in memory (every ``snapshot_every`` optimizer steps) and, when a step is
flagged, puts the run back to the last snapshot taken before it, repairs what is asked, and lets training
go on with the next batch: the batches since the snapshot are not replayed (they are *skipped*, and
recorded).

A snapshot holds, for this process only (under FSDP / FSDP2 each process its own shards): the parameters
and buffers, every optimizer's state and parameter-group settings, every LR scheduler's state, the RNG
states (torch CPU and CUDA, Python, NumPy), the guard's own detector history, and the data position the
loop reports. Its size is about the weights plus the optimizer state: for Adam / AdamW **3x the fp32
weights** (parameters and two moments) per snapshot, on the snapshot device (CPU by default), so ``keep=2``
holds 6x the fp32 weights of this process. Fewer snapshots (``keep=1``) halve it.

Detection after each optimizer step, the same decision on every process (signals max-reduced):

* a non-finite loss or gradient norm on any process (always);
* the loss or the gradient norm ``z_threshold`` standard deviations above the mean of the last ``window``
  accepted steps (OLMo-core's rule: 6 sigma over 128 steps, armed after ``min_history`` = 64 values);
  only upward excursions count;
* an external flag (:meth:`flag`): the Lightning callback raises it on a PSS trigger or a curvature ratio
  over ``max_curvature_ratio``.

Repairs (composable), after the state is restored:

* skip: always; the skipped optimizer steps and data positions are recorded (:attr:`skipped`);
* ``lr_factor`` < 1: the learning rate is multiplied by it for ``lr_steps`` optimizer steps, then ramped
  back linearly over ``lr_ramp_steps`` (applied around ``optimizer.step()`` by optimizer hooks, so
  schedulers see their own values);
* ``repair_msign``: MSign (sign, norm restored) of those targets;
* ``restart_moments``: the optimizer state of the parameters holding those targets is dropped, so the
  optimizer restarts them as at step 1 (for Adam: both moments and the step count).

A retry budget: when a step is flagged again before the next snapshot was taken (the repair did not hold),
the guard goes one snapshot further back (when it has one) and counts a retry; more than ``max_retries``
retries in a row, and it restores the last good snapshot and asks the loop to stop (:attr:`should_stop`,
:attr:`stop_reason`), never looping forever.

The guard's own state (counters, detector history, skipped steps, the repair window) resumes exactly with
:meth:`state_dict`; the snapshots themselves do not survive a restart (a checkpoint is one).
"""

from __future__ import annotations

import copy
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from lightning_msign import metric_keys as keys
from lightning_msign._validation import check_choice, check_non_negative_int, check_positive_int, check_range
from lightning_msign.distributed import local_tensor, max_over_processes
from lightning_msign.guards.base import Guard
from lightning_msign.guards.msign import MSign, MSignBackend
from lightning_msign.targets import TargetsArg, resolve_targets, validate_targets

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without DTensor
    DTensor = None  # type: ignore[assignment,misc]

Watch = Literal["loss", "grad_norm"]
WATCH: tuple[str, ...] = ("loss", "grad_norm")


@dataclass
class _Saved:
    """One tensor of a snapshot: this process's part (on the snapshot device), and how to rebuild a DTensor."""

    local: Tensor
    dtensor: Optional[tuple[Any, tuple, torch.Size, tuple]] = None  # (mesh, placements, shape, stride)


@dataclass
class Snapshot:
    """The training state after optimizer step :attr:`step` (this process's part of it)."""

    step: int
    position: Any
    tensors: list[_Saved]
    optimizers: list[tuple[dict[int, Optional[dict[str, Any]]], list[dict[str, Any]]]]
    schedulers: list[dict[str, Any]]
    rng: dict[str, Any]
    history: dict[str, list[float]]
    nbytes: int = 0


@dataclass
class _Decision:
    reasons: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)


def _save(t: Tensor, device: torch.device) -> _Saved:
    meta = None
    if DTensor is not None and isinstance(t, DTensor):
        meta = (t.device_mesh, tuple(t.placements), t.shape, t.stride())
    return _Saved(local_tensor(t).to(device, copy=True), meta)


def _rebuild(saved: _Saved, device: torch.device) -> Tensor:
    local = saved.local.to(device, copy=True)
    if saved.dtensor is None:
        return local
    mesh, placements, shape, stride = saved.dtensor
    return DTensor.from_local(local, mesh, placements, shape=shape, stride=stride, run_check=False)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a torch dependency in practice
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


class Rollback(Guard):
    """Snapshots in memory, divergence detection, rollback and repair, for any training loop.

    Args:
        module: the model (or attach later); under FSDP1 the FSDP root.
        optimizers: the optimizer(s) whose state is saved and restored (or :meth:`set_optimizers` later).
        schedulers: LR schedulers (anything with ``state_dict`` / ``load_state_dict``) saved and restored.
        snapshot_every: take a snapshot after every ``snapshot_every``-th optimizer step that is not flagged.
        keep: snapshots held (the oldest is dropped); each costs about 3x the fp32 weights under Adam.
        snapshot_device: where snapshots live (``"cpu"``, the default, keeps accelerator memory free).
        window: length of the rolling history of accepted steps the z-scores use.
        z_threshold: flag a step whose loss or gradient norm is this many standard deviations above the
            history's mean (``None``: only non-finite values and external flags).
        min_history: values needed before the z-score rule is armed.
        watch: which of ``"loss"`` and ``"grad_norm"`` the z-score rule watches.
        max_retries: flagged steps in a row (no snapshot taken in between) that are rolled back before the
            guard gives up and asks the loop to stop.
        lr_factor: learning-rate multiplier after a rollback (1.0: no change).
        lr_steps: optimizer steps at ``lr_factor`` after a rollback.
        lr_ramp_steps: optimizer steps of the linear ramp from ``lr_factor`` back to 1.
        repair_msign: targets (preset, pattern or list) signed with MSign after a rollback, or ``None``.
        restart_moments: targets whose parameters' optimizer state is dropped after a rollback, or ``None``.
        msign_backend: backend of ``repair_msign``.

    Raises:
        ValueError: a bad argument (named, with its value).

    Example (a plain loop)::

        guard = Rollback(model, optimizers=opt, schedulers=sched, snapshot_every=50, lr_factor=0.5, lr_steps=50)
        guard.snapshot(0)
        for step, batch in enumerate(loader, 1):
            loss = model(batch).loss
            loss.backward()
            guard.before_optimizer_step(step)       # reads the global gradient norm
            opt.step(); sched.step(); opt.zero_grad()
            metrics = guard.after_step(loss, step, position=step)   # may roll back
            if guard.should_stop:
                raise SystemExit(guard.stop_reason)
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        optimizers: Any = None,
        schedulers: Any = None,
        snapshot_every: int = 100,
        keep: int = 2,
        snapshot_device: str = "cpu",
        window: int = 128,
        z_threshold: Optional[float] = 6.0,
        min_history: int = 64,
        watch: Union[str, Sequence[str]] = WATCH,
        max_retries: int = 3,
        lr_factor: float = 1.0,
        lr_steps: int = 0,
        lr_ramp_steps: int = 0,
        repair_msign: Optional[TargetsArg] = None,
        restart_moments: Optional[TargetsArg] = None,
        msign_backend: str = "polar_express",
    ) -> None:
        super().__init__()
        self.snapshot_every = check_positive_int(snapshot_every, "snapshot_every")
        self.keep = check_positive_int(keep, "keep")
        try:
            self.snapshot_device = torch.device(snapshot_device)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"`snapshot_device` must name a torch device, got {snapshot_device!r}") from err
        self.window = check_positive_int(window, "window")
        if z_threshold is not None:
            check_range(z_threshold, "z_threshold", low=0.0, low_open=True)
        self.z_threshold = None if z_threshold is None else float(z_threshold)
        self.min_history = check_positive_int(min_history, "min_history")
        if self.min_history > self.window:
            raise ValueError(f"`min_history` ({min_history!r}) cannot exceed `window` ({window!r})")
        watched = [watch] if isinstance(watch, str) else list(watch) if isinstance(watch, Sequence) else None
        if not watched or any(w not in WATCH for w in watched):
            raise ValueError(f"`watch` must be a non-empty list of {WATCH}, got {watch!r}")
        self.watch = tuple(dict.fromkeys(watched))
        self.max_retries = check_non_negative_int(max_retries, "max_retries")
        self.lr_factor = check_range(lr_factor, "lr_factor", low=0.0, high=1.0, low_open=True)
        self.msign_backend = check_choice(msign_backend, "msign_backend", MSignBackend)
        self.lr_steps = check_non_negative_int(lr_steps, "lr_steps")
        self.lr_ramp_steps = check_non_negative_int(lr_ramp_steps, "lr_ramp_steps")
        if self.lr_factor < 1.0 and self.lr_steps + self.lr_ramp_steps == 0:
            raise ValueError(
                f"`lr_factor`={lr_factor!r} needs `lr_steps` or `lr_ramp_steps` > 0 (how long the lower rate lasts)"
            )
        self.repair_msign = None if repair_msign is None else validate_targets(repair_msign, True, "repair_msign")
        self.restart_moments = (
            None if restart_moments is None else validate_targets(restart_moments, True, "restart_moments")
        )
        self._optimizers: list[torch.optim.Optimizer] = []
        self._schedulers: list[Any] = []
        self._hooks: list[Any] = []
        self._snapshots: deque[Snapshot] = deque(maxlen=self.keep)
        self._history: dict[str, deque[float]] = {w: deque(maxlen=self.window) for w in WATCH}
        self._grad_reading: Optional[tuple[int, float]] = None
        self._external: dict[int, list[str]] = {}
        self._scaled: Optional[list[list[float]]] = None
        self._msign: Any = None
        self._restart_params: list[nn.Parameter] = []
        self._reduce_device = torch.device("cpu")
        # State that resumes.
        self.retries = 0  # flagged steps since the last snapshot after a rollback
        # One record per rollback: {"flagged_at", "restored_to", "positions", "reasons"}; the counters derive from it.
        self.skipped: list[dict[str, Any]] = []
        self._lr_window: Optional[tuple[int, int, int]] = None  # (first step, last low step, last ramp step)
        self.should_stop = False
        self.stop_reason: Optional[str] = None
        self._positions: dict[int, Any] = {}  # data positions of the steps since the newest snapshot
        if module is not None:
            self.attach(module)
        if optimizers is not None:
            self.set_optimizers(optimizers, schedulers)

    # -------------------------------------------------------------------------------------- attaching
    def _on_attach(self, module: nn.Module) -> None:
        param = next(module.parameters(), None)
        self._reduce_device = local_tensor(param).device if param is not None else torch.device("cpu")
        if self.repair_msign is not None:
            self._msign = MSign(period=1, targets=self.repair_msign, backend=self.msign_backend,
                                log_stable_rank=False)
            self._msign.attach_unwrapped(module, self._distributed, self._fsdp1)
        if self.restart_moments is not None:
            matrices = resolve_targets(module, self.restart_moments, units=self._fsdp1)
            self._restart_params = list({id(t.param): t.param for t in matrices}.values())

    def set_optimizers(self, optimizers: Any, schedulers: Any = None) -> "Rollback":
        """The optimizer(s) and LR scheduler(s) whose state the snapshots hold; hooks the LR repair in."""
        opts = [optimizers] if isinstance(optimizers, torch.optim.Optimizer) else list(optimizers or [])
        if not opts or not all(isinstance(o, torch.optim.Optimizer) for o in opts):
            raise ValueError(f"`optimizers` must be a torch optimizer or a list of them, got {optimizers!r}")
        scheds = [] if schedulers is None else [schedulers] if hasattr(schedulers, "state_dict") else list(schedulers)
        if not all(hasattr(s, "state_dict") and hasattr(s, "load_state_dict") for s in scheds):
            raise ValueError(f"`schedulers` must have state_dict/load_state_dict, got {schedulers!r}")
        for hook in self._hooks:
            hook.remove()
        self._optimizers, self._schedulers, self._hooks = opts, scheds, []
        for opt in opts:
            self._hooks.append(opt.register_step_pre_hook(self._scale_lr))
            self._hooks.append(opt.register_step_post_hook(self._unscale_lr))
        return self

    # ----------------------------------------------------------------------------------- LR repair
    def lr_scale(self, step: int) -> float:
        """The learning-rate multiplier the repair applies at optimizer step ``step`` (1.0 outside a repair)."""
        if self._lr_window is None:
            return 1.0
        first, low_end, ramp_end = self._lr_window
        if step < first or step > ramp_end:
            return 1.0
        if step <= low_end:
            return self.lr_factor
        return self.lr_factor + (1.0 - self.lr_factor) * (step - low_end) / (ramp_end - low_end + 1)

    def _scale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scale = self.lr_scale(self._last_step + 1)
        if scale == 1.0:
            return
        saved = [g["lr"] for g in optimizer.param_groups]
        self._scaled = (self._scaled or []) + [saved]
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * scale if not isinstance(g["lr"], Tensor) else g["lr"].mul(scale)

    def _unscale_lr(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._scaled:
            return
        saved = self._scaled.pop(0)
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr

    # ----------------------------------------------------------------------------------- snapshots
    @property
    def snapshots(self) -> list[Snapshot]:
        """The snapshots held, oldest first."""
        return list(self._snapshots)

    def snapshot(self, step: int, position: Any = None) -> Snapshot:
        """Take a snapshot of the state after optimizer step ``step`` (every process calls it; no collective)."""
        module = self._require_module("snapshot")
        if not self._optimizers:
            raise RuntimeError("Rollback.snapshot() needs the optimizers: pass them or call set_optimizers() first")
        device = self.snapshot_device
        tensors = [_save(t, device) for t in self._tensors(module)]
        optimizers = []
        for opt in self._optimizers:
            params = [p for g in opt.param_groups for p in g["params"]]
            state: dict[int, Optional[dict[str, Any]]] = {}
            for i, p in enumerate(params):
                st = opt.state.get(p)
                state[i] = None if st is None else {
                    k: _save(v, device) if isinstance(v, Tensor) else copy.deepcopy(v) for k, v in st.items()
                }
            groups = [copy.deepcopy({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups]
            optimizers.append((state, groups))
        snap = Snapshot(
            step=int(step), position=copy.deepcopy(position), tensors=tensors, optimizers=optimizers,
            schedulers=[copy.deepcopy(s.state_dict()) for s in self._schedulers], rng=_rng_state(),
            history={k: list(v) for k, v in self._history.items()},
        )
        snap.nbytes = sum(s.local.numel() * s.local.element_size() for s in tensors) + sum(
            s.local.numel() * s.local.element_size()
            for state, _ in optimizers for st in state.values() if st for s in st.values() if isinstance(s, _Saved)
        )
        self._snapshots.append(snap)
        self._positions = {}
        self.retries = 0  # a clean snapshot after a rollback: the incident is over
        return snap

    @staticmethod
    def _tensors(module: nn.Module) -> list[Tensor]:
        return [*module.parameters(), *module.buffers()]

    @torch.no_grad()
    def _restore(self, snap: Snapshot) -> None:
        module = self._require_module("restore")
        for t, saved in zip(self._tensors(module), snap.tensors):
            local_tensor(t).copy_(saved.local)
        for opt, (state, groups) in zip(self._optimizers, snap.optimizers):
            params = [p for g in opt.param_groups for p in g["params"]]
            for i, p in enumerate(params):
                saved_state = state.get(i)
                if saved_state is None:
                    opt.state.pop(p, None)
                    continue
                current = opt.state.get(p)
                device = local_tensor(p).device
                restored: dict[str, Any] = {}
                for k, v in saved_state.items():
                    if isinstance(v, _Saved):
                        cur = None if current is None else current.get(k)
                        if isinstance(cur, Tensor) and local_tensor(cur).shape == v.local.shape:
                            local_tensor(cur).copy_(v.local)
                            restored[k] = cur
                        else:
                            restored[k] = _rebuild(v, v.local.device if k == "step" else device)
                    else:
                        restored[k] = copy.deepcopy(v)
                opt.state[p] = restored
            for g, saved_group in zip(opt.param_groups, groups):
                for k, v in saved_group.items():
                    g[k] = copy.deepcopy(v)
        for sched, saved_sched in zip(self._schedulers, snap.schedulers):
            sched.load_state_dict(copy.deepcopy(saved_sched))
        _set_rng_state(snap.rng)
        self._history = {k: deque(snap.history.get(k, []), maxlen=self.window) for k in WATCH}

    # ------------------------------------------------------------------------------------ detection
    def flag(self, reason: str, step: Optional[int] = None) -> None:
        """Flag optimizer step ``step`` (default: the next one) for a rollback, e.g. from another guard's trigger."""
        self._external.setdefault(self._last_step + 1 if step is None else int(step), []).append(str(reason))

    _no_optimizer_hooks = "it needs the step's loss (after_step(loss, step)), which an optimizer step does not see"

    def before_optimizer_step(self, step: Optional[int] = None) -> dict[str, float]:
        """After the backward pass, before ``optimizer.step()``: read the global gradient norm (a collective)."""
        module = self._require_module("before_optimizer_step")
        current = self._last_step + 1 if step is None else int(step)
        if current <= self._last_step:
            return {}
        total = self._grad_norm(module, current)
        self._grad_reading = (current, math.nan if total is None else float(total))
        return {}

    def _z(self, name: str, value: float) -> float:
        hist = self._history[name]
        if self.z_threshold is None or name not in self.watch or len(hist) < self.min_history:
            return -math.inf
        mean = sum(hist) / len(hist)
        std = math.sqrt(sum((x - mean) ** 2 for x in hist) / len(hist))
        if std <= 1e-12 * max(abs(mean), 1.0):
            return math.inf if value > mean * (1 + 1e-6) + 1e-12 else -math.inf
        return (value - mean) / std

    def _decide(self, step: int, loss: Optional[float]) -> _Decision:
        grad = self._grad_reading[1] if self._grad_reading is not None and self._grad_reading[0] == step else None
        bad_loss = loss is not None and not math.isfinite(loss)
        nonfinite = float(bad_loss or (grad is not None and not math.isfinite(grad)))
        external = float(bool(self._external.pop(step, None)))
        local = [nonfinite, external, -math.inf if loss is None or not math.isfinite(loss) else loss,
                 -math.inf if grad is None or not math.isfinite(grad) else grad]
        nonfinite, external, loss_max, grad_max = (
            max_over_processes(local, self._reduce_device) if self._distributed else local
        )
        values = {"loss": loss_max, "grad_norm": grad_max}
        reasons = []
        if nonfinite > 0:
            reasons.append("non-finite loss or gradient norm")
        if external > 0:
            reasons.append("flagged by another guard")
        for name in self.watch:
            value = values[name]
            if value is None or not math.isfinite(value):
                continue
            z = self._z(name, value)
            if z > (self.z_threshold or math.inf):
                reasons.append(f"{name} {value:.4g} is {z:.1f} sigma above its last {len(self._history[name])} steps")
        return _Decision(reasons, values)

    # -------------------------------------------------------------------------------------- the step
    def after_step(self, loss: Any, step: Optional[int] = None, position: Any = None) -> dict[str, float]:
        """After ``optimizer.step()`` (and the scheduler's): detect, and roll back or snapshot.

        Args:
            loss: this process's loss of the step (a tensor or float; the mean over micro-batches under
                gradient accumulation), or ``None`` when only the gradient norm is watched.
            step: the optimizer step just taken, 1-based (``trainer.global_step``); default: counted.
            position: where the data stands after this step (anything copyable: a batch index, an epoch
                and batch index); recorded with the skipped steps.

        Returns:
            The metrics of the step (``rollback/*``); ``rollback/rolled_back`` is 1.0 at a rollback. When the
            retry budget is spent the state is restored, :attr:`should_stop` is set and the metrics say so.
        """
        self._require_module("after_step")
        current = self._advance(step)
        if current is None:
            return {}
        value = None if loss is None else float(loss.detach().float().mean() if isinstance(loss, Tensor) else loss)
        self._positions[current] = copy.deepcopy(position)
        decision = self._decide(current, value)
        metrics = {keys.ROLLBACK_ROLLED_BACK: 0.0}
        if decision.flagged:
            metrics.update(self._roll_back(current, decision))
        else:
            for name in WATCH:
                v = decision.values[name]
                if v is not None and math.isfinite(v):
                    self._history[name].append(v)
            if current % self.snapshot_every == 0:
                self.snapshot(current, position)
        metrics.update({
            keys.ROLLBACK_ROLLBACKS: float(self.rollbacks), keys.ROLLBACK_STEPS_LOST: float(self.steps_lost),
            keys.ROLLBACK_LR_SCALE: self.lr_scale(current + 1),
        })
        return metrics

    def _roll_back(self, step: int, decision: _Decision) -> dict[str, float]:
        snaps = list(self._snapshots)
        if not snaps:
            self._stop(step, decision, "no snapshot was taken before it (call snapshot() at the start)")
            return {keys.ROLLBACK_ROLLED_BACK: 0.0}
        if self.retries >= self.max_retries:
            self._restore(snaps[-1])
            self._stop(step, decision, f"{self.retries} rollbacks in a row did not hold (max_retries="
                                       f"{self.max_retries}); the state was restored to step {snaps[-1].step}")
            return {keys.ROLLBACK_ROLLED_BACK: 0.0}
        # A retry goes one snapshot further back, when there is one.
        snap = snaps[max(0, len(snaps) - 1 - self.retries)]
        positions = [self._positions[s] for s in sorted(self._positions)]
        self._restore(snap)
        lost = step - snap.step
        self.retries += 1
        self.skipped.append({"flagged_at": step, "restored_to": snap.step, "positions": positions,
                             "reasons": list(decision.reasons)})
        # Only snapshots up to the restored one stay valid.
        while self._snapshots and self._snapshots[-1].step > snap.step:
            self._snapshots.pop()
        self._positions = {}
        if self.lr_factor < 1.0:
            low_end = step + self.lr_steps
            self._lr_window = (step + 1, low_end, low_end + self.lr_ramp_steps)
        if self._msign is not None:
            self._msign.apply()
        for p in self._restart_params:
            for opt in self._optimizers:
                opt.state.pop(p, None)
        return {keys.ROLLBACK_ROLLED_BACK: 1.0, keys.ROLLBACK_RESTORED_TO: float(snap.step),
                keys.ROLLBACK_LOST: float(lost)}

    def _stop(self, step: int, decision: _Decision, why: str) -> None:
        self.should_stop = True
        self.stop_reason = (
            f"Rollback: optimizer step {step} was flagged ({'; '.join(decision.reasons)}) and {why}. Training"
            f" stops here after {self.rollbacks} rollback(s) and {self.steps_lost} lost step(s); skipped steps:"
            f" {[(s['restored_to'], s['flagged_at']) for s in self.skipped]}."
        )

    @property
    def rollbacks(self) -> int:
        """Rollbacks so far."""
        return len(self.skipped)

    @property
    def rollback_steps(self) -> list[int]:
        """The optimizer steps that were flagged and rolled back."""
        return [s["flagged_at"] for s in self.skipped]

    @property
    def steps_lost(self) -> int:
        """Optimizer steps undone by the rollbacks so far."""
        return sum(s["flagged_at"] - s["restored_to"] for s in self.skipped)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update({
            "retries": self.retries, "skipped": copy.deepcopy(self.skipped),  # rollbacks, steps lost: from skipped
            "history": {k: list(v) for k, v in self._history.items()},
            "lr_window": None if self._lr_window is None else list(self._lr_window),
            "should_stop": self.should_stop, "stop_reason": self.stop_reason,
        })
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.retries = int(state_dict.get("retries", 0))
        self.skipped = copy.deepcopy(state_dict.get("skipped", []))
        history = state_dict.get("history", {})
        self._history = {k: deque((float(x) for x in history.get(k, [])), maxlen=self.window) for k in WATCH}
        window = state_dict.get("lr_window")
        self._lr_window = None if window is None else (int(window[0]), int(window[1]), int(window[2]))
        self.should_stop = bool(state_dict.get("should_stop", False))
        self.stop_reason = state_dict.get("stop_reason")


__all__ = ["Rollback", "Snapshot"]
