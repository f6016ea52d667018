"""MSign: periodic matrix-sign restoration of the stable rank of weight matrices, for any training loop."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor, nn

from lightning_msign import metric_keys as keys
from lightning_msign._validation import (
    check_bool,
    check_choice,
    check_non_negative_int,
    check_optional_positive_int,
    check_positive_int,
    check_range,
)
from lightning_msign.distributed import MatrixResult, OwnedMatrix, max_over_processes
from lightning_msign.functional.msign import Backend, sign_and_restore
from lightning_msign.functional.precision import as_compute
from lightning_msign.functional.spectral import stable_rank
from lightning_msign.guards.base import TargetedGuard
from lightning_msign.guards.diagnostics import Diagnostics
from lightning_msign.models.capture import ForwardLogits, LayerLogits
from lightning_msign.targets import LayoutsArg, TargetsArg

MSignBackend = Backend  # the functional backends
LogitSource = Literal["training_forward", "second_forward"]
"""Where ``max_attn_logit`` reads the logits: the step's own training forward, or one more forward after the step."""


@dataclass
class SignResult(MatrixResult):
    """One matrix of an MSign application: whether it was written, and its stable rank before and after."""

    written: bool
    srank_before: float
    srank_after: float


@dataclass
class StableRankResult(MatrixResult):
    """One matrix's exact stable rank (NaN when it holds NaN/Inf)."""

    srank: float


class MSign(TargetedGuard):
    r"""Restore the stable rank of target matrices every ``period`` optimizer steps, or when a precursor says so.

    An application replaces each chosen target matrix :math:`W = U S V^\top` by its matrix sign rescaled to
    keep its Frobenius norm (arXiv 2602.01734):

    .. math::

        W \leftarrow \frac{\|W\|_F}{\|U V^\top\|_F}\, U V^\top,
        \qquad \|U V^\top\|_F = \sqrt{\operatorname{rank}(W)}.

    Row and column spaces are kept; the spectrum becomes flat. Optimizer state is left as it is, as in
    the paper. Fused weights are cut into their blocks by their layout (Q, K, V separately; each expert
    its own matrix; see :mod:`lightning_msign.layouts`); ``split_qkv=False`` signs a fused attention
    projection as one matrix, which mixes the blocks' scales. Computation is in float32 (float64 stays
    float64), results are written back in the parameter's dtype; a matrix holding NaN/Inf is skipped and
    counted, and a non-finite result is never written. Matrices of one shape are signed in one batched call.

    *When.* ``period`` applies to every target after the steps ``P, 2P, ...`` (the paper). The triggers apply
    only to the targets a measured precursor flags, checked after every ``check_every``-th optimizer step:

    - ``max_attn_logit``: the targets in a layer whose largest attention logit
      (:class:`~lightning_msign.Diagnostics`' ``attn_logit_max``, on the first ``probe_batch_size``
      sequences of the batch, their first ``probe_seq_len`` tokens) is above it. An absolute number: softmax
      saturates at logits of tens whatever the model's size (Kimi K2's QK-Clip uses 100, the default here).
      ``logits_from="training_forward"`` (the default) reads them in the step's own training forward
      (:class:`~lightning_msign.models.capture.ForwardLogits`: the queries and keys the forward computes anyway,
      reduced under ``torch.no_grad()``; every micro-batch of the step under gradient accumulation), so they are
      the logits of the weights *before* the optimizer step, and no second forward pass is run. A check step
      whose training forward the guard did not see (the forward ran outside the attached module, in eval mode or
      without gradients) falls back, with a warning, to one forward of ``input_ids`` after the step, which is what
      ``logits_from="second_forward"`` always does (the logits of the updated weights, at the cost of that
      forward).
    - ``min_srank_fraction``: a matrix whose exact stable rank is below this fraction of its own stable
      rank at the first check at or after ``warmup_steps`` (relative: a stable rank depends on the shape).
    - ``max_grad_ratio``: every target, when :math:`\|g_t\| / \bar g_{t-1}` (EWMA with weight
      ``grad_alpha`` of the earlier norms, as :class:`~lightning_msign.PSS` forms it) reaches it. Needs
      :meth:`before_optimizer_step` after each backward pass.
    - ``max_curvature_ratio``: every target, when the curvature monitor's stability ratio (passed to
      :meth:`step`) reaches it.

    The relative triggers (stable rank, gradient ratio, curvature) are armed after ``warmup_steps``; the
    attention-logit threshold from the first step. With ``period_after_trigger`` the first trigger also
    switches the guard to periodic application of every target from that step on (its steps
    ``s_0, s_0 + n, s_0 + 2n, ...``), so a run that has shown it is failing is treated as a whole.
    A trigger applies to a matrix at most once per ``min_spacing`` steps (counted from its last application,
    whatever caused that). Under ``torch.distributed`` every signal is reduced to its maximum over the
    processes (the stable ranks are computed once, on whole matrices) before the decision, so every process
    takes the same one. A run on which no trigger fires is bit-identical to a run without the guard: the
    checks run under ``torch.no_grad()`` in eval mode, draw no random numbers and write nothing.

    Usage in any loop::

        msign = MSign(model, period=None, max_attn_logit=100.0, targets="qk", backend="polar_express")
        for input_ids, targets in loader:
            loss = loss_fn(model(input_ids), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = msign.step(input_ids=input_ids)  # applies to the Q/K of layers whose logits exceed 100

    Args:
        module: the model (or attach later with :meth:`attach`).
        period: optimizer steps between applications to every target (the paper's ``P``): after steps
            ``P, 2P, ...``; ``None``: only the triggers apply it.
        targets: a preset (``"attention"``, ``"qk"``, ``"mlp"``, ``"all_2d"``), a glob on parameter names,
            or a list of both (:mod:`lightning_msign.targets`).
        backend: ``"svd"`` (exact), ``"polar_express"`` or ``"newton_schulz"`` (approximations, see
            :func:`lightning_msign.functional.msign`).
        steps: iterations of a polynomial backend (``None``: its default); must be ``None`` for ``"svd"``.
        split_qkv: sign fused Q/K/V blocks separately.
        log_stable_rank: return the exact stable rank of every matrix before and after (free with
            ``"svd"``: it reuses the decomposition; one singular-value computation each otherwise).
        layouts: layouts of fused weights the readers do not know, ``{glob on parameter names: layout}``.
        max_attn_logit: attention-logit trigger (> 0), or ``None``.
        min_srank_fraction: stable-rank trigger, in (0, 1), or ``None``.
        max_grad_ratio: gradient-norm-ratio trigger (> 1), or ``None``.
        max_curvature_ratio: stability-ratio trigger (> 0), or ``None``.
        check_every: optimizer steps between checks of the triggers.
        min_spacing: least number of optimizer steps between two applications to one matrix.
        warmup_steps: steps before the relative triggers are armed (their references are learned meanwhile).
        grad_alpha: EWMA weight of the gradient norm, in (0, 1].
        probe_batch_size: sequences of the batch the attention-logit check runs on (``None``: all).
        probe_seq_len: tokens per sequence it runs on (``None``: all).
        model_attr: dotted path to the decoder for the attention-logit check (as for
            :class:`~lightning_msign.Diagnostics`); ``None`` finds it.
        period_after_trigger: once a trigger has fired, also apply to every target every this many steps
            from that step on (the run has shown it is failing); ``None``: only what the triggers flag.
        logits_from: where ``max_attn_logit`` reads the logits: ``"training_forward"`` (the step's own forward)
            or ``"second_forward"`` (a forward of ``input_ids`` after the step).

    Raises:
        ValueError: at construction, for any bad argument or when neither ``period`` nor a trigger is set;
            when attached, for targets that match no matrix or include a fused weight whose layout is
            unknown, and with ``max_attn_logit`` when the model's attention logits cannot be rebuilt or no
            target lies in a block; at :meth:`step`, with ``max_attn_logit`` and no ``input_ids`` when they are
            needed (``logits_from="second_forward"``, or a check step whose training forward was not seen).

    Metrics (returned by :meth:`step` / :meth:`apply`):
        ``msign/applications``, ``msign/time_ms``, ``msign/skipped_nonfinite`` (count so far),
        ``msign/triggers`` (applications a trigger caused, so far), ``msign/matrices`` (matrices in this
        application), and with ``log_stable_rank`` ``msign/srank_before/<name>``, ``msign/srank_after/<name>``,
        ``msign/srank_before_min``, ``msign/srank_after_min``. On every check, the signals it read:
        ``msign/attn_logit_max``, ``msign/srank_fraction_min``, ``msign/grad_ratio``, ``msign/curvature_ratio``.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        period: Optional[int] = 100,
        targets: TargetsArg = "attention",
        backend: MSignBackend = "svd",
        steps: Optional[int] = None,
        split_qkv: bool = True,
        log_stable_rank: bool = True,
        layouts: LayoutsArg = None,
        max_attn_logit: Optional[float] = None,
        min_srank_fraction: Optional[float] = None,
        max_grad_ratio: Optional[float] = None,
        max_curvature_ratio: Optional[float] = None,
        check_every: int = 1,
        min_spacing: int = 10,
        warmup_steps: int = 100,
        grad_alpha: float = 0.1,
        probe_batch_size: Optional[int] = 4,
        probe_seq_len: Optional[int] = 128,
        model_attr: Optional[str] = None,
        period_after_trigger: Optional[int] = None,
        logits_from: LogitSource = "training_forward",
    ) -> None:
        super().__init__(targets, split_qkv, layouts)
        self.period = check_optional_positive_int(period, "period")
        self.backend = check_choice(backend, "backend", MSignBackend)
        if backend == "svd" and steps is not None:
            raise ValueError(f"`steps` must be None with backend 'svd' (it is exact), got {steps!r}")
        self.steps = None if steps is None else check_positive_int(steps, "steps")
        self.log_stable_rank = check_bool(log_stable_rank, "log_stable_rank")
        self.max_attn_logit = _optional(max_attn_logit, "max_attn_logit", 0.0)
        self.min_srank_fraction = _optional(min_srank_fraction, "min_srank_fraction", 0.0, 1.0)
        if self.min_srank_fraction == 1.0:
            raise ValueError("`min_srank_fraction` must be below 1 (a fraction of the reference stable rank), got 1.0")
        self.max_grad_ratio = _optional(max_grad_ratio, "max_grad_ratio", 1.0)
        self.max_curvature_ratio = _optional(max_curvature_ratio, "max_curvature_ratio", 0.0)
        if self.period is None and not self.has_triggers:
            raise ValueError(
                "MSign needs `period` or a trigger (`max_attn_logit`, `min_srank_fraction`, `max_grad_ratio`,"
                " `max_curvature_ratio`), got period=None and no trigger"
            )
        self.check_every = check_positive_int(check_every, "check_every")
        self.min_spacing = check_positive_int(min_spacing, "min_spacing")
        self.warmup_steps = check_non_negative_int(warmup_steps, "warmup_steps")
        self.grad_alpha = check_range(grad_alpha, "grad_alpha", 0.0, 1.0, low_open=True)
        self.probe_batch_size = check_optional_positive_int(probe_batch_size, "probe_batch_size")
        self.probe_seq_len = check_optional_positive_int(probe_seq_len, "probe_seq_len")
        self.model_attr = model_attr
        self.period_after_trigger = check_optional_positive_int(period_after_trigger, "period_after_trigger")
        if self.period_after_trigger is not None and not self.has_triggers:
            raise ValueError(
                f"`period_after_trigger` ({period_after_trigger!r}) needs a trigger (`max_attn_logit`,"
                " `min_srank_fraction`, `max_grad_ratio` or `max_curvature_ratio`)"
            )
        self.logits_from = check_choice(logits_from, "logits_from", LogitSource)
        self._probe: Any = None  # a Diagnostics computing attention logits only (max_attn_logit)
        self._forward_logits: Optional[ForwardLogits] = None  # logits_from="training_forward"
        self._logits: Optional[LayerLogits] = None
        self._layer_of: list[Optional[int]] = []  # block index of each target, None outside the blocks
        self._applications = 0
        self._skipped_nonfinite = 0
        self._last_applied: dict[str, int] = {}
        self._reference_srank: Optional[dict[str, float]] = None
        self._grad_ewma: Optional[float] = None
        self._grad_reading: Optional[tuple[int, float]] = None  # (step, ratio) of the latest gradient norm
        self.trigger_steps: list[int] = []  # optimizer steps (1-based) after which a trigger applied MSign
        if module is not None:
            self.attach(module)

    # -------------------------------------------------------------------------------------- attaching
    @property
    def has_triggers(self) -> bool:
        """Whether any precursor trigger is set."""
        return any(v is not None for v in (self.max_attn_logit, self.min_srank_fraction, self.max_grad_ratio,
                                           self.max_curvature_ratio))

    def _on_attach(self, module: nn.Module) -> None:
        super()._on_attach(module)
        if self._forward_logits is not None:  # attached again: the hooks of the last attach go
            self._forward_logits.remove()
            self._forward_logits = None
        if self.max_attn_logit is None:
            return
        probe = Diagnostics(
            None, every_n_steps=1, attention_logits=True, output_logits=False,
            max_batch_size=self.probe_batch_size, max_seq_len=self.probe_seq_len, model_attr=self.model_attr,
        )
        probe.attach_unwrapped(module, self._distributed, self._fsdp1)
        blocks = probe.decoder.blocks  # type: ignore[union-attr]
        owner = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
        self._layer_of = [owner.get(id(t.param)) for t in self._matrices]
        if all(i is None for i in self._layer_of):
            raise ValueError(
                f"`max_attn_logit` flags the targets of a layer, but none of the targets {self.targets!r} lies in a"
                f" block of `{probe.decoder.blocks_path}`: target the attention matrices (e.g. targets='qk')"  # type: ignore[union-attr]
            )
        self._probe = probe
        if self.logits_from == "training_forward":
            self._forward_logits = ForwardLogits(
                probe.decoder, self._next_check, batch_size=self.probe_batch_size, seq_len=self.probe_seq_len
            )
        self._logits = LayerLogits(probe, self._forward_logits, "MSign(max_attn_logit=...)",
                                   hint=" Pass logits_from='second_forward' to say so.")

    def _next_check(self) -> Optional[int]:
        """The step about to be taken when it is a check step (read by the training forward's hooks)."""
        step = self._last_step + 1
        return step if step % self.check_every == 0 else None

    @property
    def applications(self) -> int:
        """Applications so far (restored on resume)."""
        return self._applications

    @property
    def triggers(self) -> int:
        """Applications caused by a trigger so far (restored on resume)."""
        return len(self.trigger_steps)

    @property
    def skipped_nonfinite(self) -> int:
        """Matrices skipped so far because they held NaN/Inf (restored on resume)."""
        return self._skipped_nonfinite

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is followed by a periodic application."""
        return self.period is not None and step % self.period == 0

    def _latched(self, step: int, triggered_now: bool) -> bool:
        """Whether ``period_after_trigger`` applies every target after ``step`` (the first trigger came at or
        before it)."""
        n = self.period_after_trigger
        first = self.trigger_steps[0] if self.trigger_steps else (step if triggered_now else None)
        return n is not None and first is not None and (step - first) % n == 0

    def _optimizer_calls(self) -> tuple[Any, Any]:
        if self.max_attn_logit is not None and self.logits_from == "second_forward":
            return None, None
        return (self.before_optimizer_step if self.max_grad_ratio is not None else None), self.step

    _no_optimizer_hooks = "logits_from='second_forward' needs the step's token ids (call step(step, input_ids=ids))"

    # ------------------------------------------------------------------------------------------ steps
    def before_optimizer_step(self, step: Optional[int] = None) -> dict[str, float]:
        """With ``max_grad_ratio``: read the gradient norm before the optimizer step (after the backward pass,
        accumulation and unscaling, before clipping); does nothing otherwise.

        Args:
            step: the optimizer step about to be taken, 1-based (``trainer.global_step + 1``); default: the
                step after the last one :meth:`step` saw.

        Returns:
            ``{}`` (the ratio is reported by :meth:`step` on check steps).
        """
        module = self._require_module("before_optimizer_step")
        if self.max_grad_ratio is None:
            return {}
        current = self._last_step + 1 if step is None else int(step)
        if current <= self._last_step or (self._grad_reading is not None and self._grad_reading[0] == current):
            return {}
        total = self._grad_norm(module, current)
        if total is None:
            return {}
        norm = float(total)
        if not math.isfinite(norm):
            self._grad_reading = (current, math.inf)
            return {}
        ratio = norm / self._grad_ewma if self._grad_ewma else math.nan
        self._grad_reading = (current, ratio)
        armed = current > self.warmup_steps
        if not (armed and ratio >= self.max_grad_ratio):  # a triggering norm does not enter the average
            self._grad_ewma = norm if self._grad_ewma is None else (
                (1 - self.grad_alpha) * self._grad_ewma + self.grad_alpha * norm)
        return {}

    def step(
        self,
        step: Optional[int] = None,
        input_ids: Optional[Tensor] = None,
        curvature_ratio: Optional[float] = None,
    ) -> dict[str, float]:
        """Call after each optimizer step; applies MSign when periodic or a trigger fires.

        Args:
            step: optimizer steps taken so far (``trainer.global_step`` after the step); default: the
                guard counts its calls. A step already seen does nothing (gradient accumulation).
            input_ids: the token ids ``(B, T)`` just trained on (needed with ``max_attn_logit``).
            curvature_ratio: the latest stability ratio of a curvature monitor (with ``max_curvature_ratio``;
                ``None``: no measurement yet).

        Returns:
            The metrics of the check and of the application, or ``{}`` when there was neither.
        """
        self._require_module("step")
        if self.max_attn_logit is not None and input_ids is None and self.logits_from == "second_forward":
            raise ValueError(
                "MSign(max_attn_logit=..., logits_from='second_forward') needs the token ids just trained on: call"
                " step(step, input_ids=ids)"
            )
        current = self._advance(step)
        if current is None:
            return {}
        metrics: dict[str, float] = {}
        chosen: set[str] = set()
        triggered = False
        if self.has_triggers and current % self.check_every == 0:
            flagged, metrics = self._check(current, input_ids, curvature_ratio)
            chosen = {n for n in flagged if current - self._last_applied.get(n, -self.min_spacing) >= self.min_spacing}
            triggered = bool(chosen)
        if self.due(current) or self._latched(current, triggered):
            chosen = set(self.target_names)
        if chosen:
            if triggered:
                self.trigger_steps.append(current)
            metrics.update(self.apply(None if len(chosen) == len(self._matrices) else chosen, current))
        return metrics

    def _check(
        self, current: int, input_ids: Optional[Tensor], curvature_ratio: Optional[float]
    ) -> tuple[set[str], dict[str, float]]:
        """The targets the precursors flag after step ``current``, and the signals read (same on every process)."""
        armed = current > self.warmup_steps
        n_layers = 0
        signals: list[float] = []
        if self.max_attn_logit is not None:
            n_layers = len(self._probe.decoder.blocks)  # a block held inactive by a warm-up reports no value
            signals += self._attention_logits(current, input_ids, n_layers)
        reading = self._grad_reading
        grad_ratio = reading[1] if reading is not None and reading[0] == current else None
        if self.max_grad_ratio is not None and grad_ratio is None:
            raise RuntimeError(
                f"MSign(max_grad_ratio=...) has no gradient norm for optimizer step {current}: call"
                " before_optimizer_step() after each backward pass, before optimizer.step()"
            )
        if self.max_curvature_ratio is not None:
            signals.append(math.nan if curvature_ratio is None else float(curvature_ratio))
        signals = max_over_processes(signals, self._device())
        flagged: set[str] = set()
        metrics: dict[str, float] = {}
        if self.max_attn_logit is not None:
            per_layer = signals[:n_layers]
            metrics[keys.MSIGN_ATTN_LOGIT_MAX] = max((v for v in per_layer if not math.isnan(v)), default=math.nan)
            hot = {i for i, v in enumerate(per_layer) if v > self.max_attn_logit}
            flagged |= {t.name for t, layer in zip(self._matrices, self._layer_of) if layer in hot}
        if self.min_srank_fraction is not None:
            sranks = {n: r.srank for n, r in self.plan.run(self._stable_ranks, StableRankResult, write=False).items()}
            if self._reference_srank is None:
                if current >= self.warmup_steps:
                    self._reference_srank = dict(sranks)
            else:
                fractions = {n: s / self._reference_srank[n] for n, s in sranks.items()
                             if self._reference_srank.get(n, 0.0) > 0 and math.isfinite(s)}
                if fractions:
                    metrics[keys.MSIGN_SRANK_FRACTION_MIN] = min(fractions.values())
                if armed:
                    flagged |= {n for n, f in fractions.items() if f < self.min_srank_fraction}
        if self.max_grad_ratio is not None:
            metrics[keys.MSIGN_GRAD_RATIO] = grad_ratio  # type: ignore[assignment]
            if armed and grad_ratio >= self.max_grad_ratio and math.isfinite(grad_ratio):  # type: ignore[operator]
                flagged |= set(self.target_names)
        if self.max_curvature_ratio is not None:
            ratio = signals[-1]
            metrics[keys.MSIGN_CURVATURE_RATIO] = ratio
            if armed and not math.isnan(ratio) and ratio >= self.max_curvature_ratio:
                flagged |= set(self.target_names)
        return flagged, metrics

    def _attention_logits(self, current: int, input_ids: Optional[Tensor], n_layers: int) -> list[float]:
        """Each layer's attention-logit max for check step ``current`` (NaN for a layer that did not run)."""
        return self._logits.read(current, input_ids)

    def _stable_ranks(self, owned: list[OwnedMatrix]) -> dict[int, StableRankResult]:
        out: dict[int, StableRankResult] = {}
        for o in owned:
            X = as_compute(o.matrix)
            out[o.index] = StableRankResult(float(stable_rank(X)) if bool(torch.isfinite(X).all()) else math.nan)
        return out

    @torch.no_grad()
    def apply(self, names: Optional[Iterable[str]] = None, step: Optional[int] = None) -> dict[str, float]:
        """Apply MSign now, to every target or to the targets ``names``; returns the metrics. Every process
        must call it, with the same names.

        Args:
            names: target names (:attr:`target_names`); ``None``: all.
            step: the optimizer step it follows (recorded for ``min_spacing``); default: the last one seen.
        """
        self._require_module("apply")
        chosen = set(self.target_names) if names is None else set(names)
        unknown = sorted(chosen - set(self.target_names))
        if unknown:
            raise ValueError(f"`names` must be target names of this guard, got unknown {unknown[:5]}")
        with self._timed(self._device()) as elapsed:
            results = self.plan.run(lambda owned: self._sign([o for o in owned if o.target.name in chosen]), SignResult)
        self._applications += 1
        at = self._last_step if step is None else int(step)
        for name in chosen:
            self._last_applied[name] = at
        written = {name: r for name, r in results.items() if r.written}
        skipped = [t.name for t in self._matrices if t.name in chosen and t.name not in written]
        self._skipped_nonfinite += len(skipped)
        if skipped:
            warnings.warn(f"MSign skipped {len(skipped)} matrices holding NaN/Inf: {skipped[:5]}", RuntimeWarning)
        metrics: dict[str, float] = {}
        if self.log_stable_rank and written:
            for name, r in written.items():
                metrics[keys.per_matrix(keys.MSIGN_SRANK_BEFORE_PREFIX, name)] = r.srank_before
                metrics[keys.per_matrix(keys.MSIGN_SRANK_AFTER_PREFIX, name)] = r.srank_after
            metrics[keys.MSIGN_SRANK_BEFORE_MIN] = min(r.srank_before for r in written.values())
            metrics[keys.MSIGN_SRANK_AFTER_MIN] = min(r.srank_after for r in written.values())
        metrics[keys.MSIGN_APPLICATIONS] = float(self._applications)
        metrics[keys.MSIGN_TRIGGERS] = float(self.triggers)
        metrics[keys.MSIGN_MATRICES] = float(len(chosen))
        metrics[keys.MSIGN_TIME_MS] = elapsed[0]
        metrics[keys.MSIGN_SKIPPED_NONFINITE] = float(self._skipped_nonfinite)
        return metrics

    def _sign(self, owned: list[OwnedMatrix]) -> dict[int, SignResult]:
        """Sign the whole matrices this process owns, batched by shape and dtype."""
        groups: dict[tuple, list[tuple[OwnedMatrix, torch.Tensor]]] = {}
        for o in owned:
            m = o.matrix
            groups.setdefault((tuple(m.shape), m.dtype), []).append((o, m))
        results: dict[int, SignResult] = {}
        for group in groups.values():
            batch = sign_and_restore(
                torch.stack([m for _, m in group]), self.backend, self.steps, stable_ranks=self.log_stable_rank
            )
            flags = batch.written.tolist()
            before, after = batch.srank_before.tolist(), batch.srank_after.tolist()
            for i, (o, _) in enumerate(group):
                if flags[i]:
                    o.write(batch.matrices[i])
                results[o.index] = SignResult(bool(flags[i]), before[i], after[i])
        return results

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "applications": self._applications,
            "skipped_nonfinite": self._skipped_nonfinite,
            "trigger_steps": list(self.trigger_steps),
            "last_applied": dict(self._last_applied),
            "reference_srank": None if self._reference_srank is None else dict(self._reference_srank),
            "grad_ewma": self._grad_ewma,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._applications = int(state_dict.get("applications", 0))
        self._skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.trigger_steps = [int(s) for s in state_dict.get("trigger_steps", [])]
        self._last_applied = {str(k): int(v) for k, v in state_dict.get("last_applied", {}).items()}
        reference = state_dict.get("reference_srank")
        self._reference_srank = None if reference is None else {str(k): float(v) for k, v in reference.items()}
        ewma = state_dict.get("grad_ewma")
        self._grad_ewma = None if ewma is None else float(ewma)
        self._grad_reading = None


def _optional(value: Any, argument: str, low: float, high: float = math.inf) -> Optional[float]:
    """``None``, or a finite float above ``low`` (and at most ``high``)."""
    return None if value is None else check_range(value, argument, low, high, low_open=True)
