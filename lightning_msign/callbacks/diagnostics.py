"""DiagnosticsMonitor: which failure mode a run is in (attention or output logit growth, aligned Jacobians)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from litgpt.model import CausalSelfAttention, apply_rope, apply_rope_interleave
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_msign._validation import check_bool, check_positive_int
from lightning_msign.callbacks.base import log_to_loggers, refuse_strategies
from lightning_msign.guards.base import synchronize
from lightning_msign.functional.jacobian import jacobian_alignment, jacobian_top_singular

class DiagnosticsMonitor(Callback):
    r"""Log, every ``every_n_steps`` optimizer steps, the quantities that tell transformer failure modes apart.

    On the batch just trained on (cut to ``max_batch_size`` sequences of ``max_seq_len`` tokens) it runs
    one forward pass of the LitGPT ``GPT`` under ``torch.no_grad()`` in eval mode, with forward hooks
    (removed afterwards), and optionally the blocks' Jacobians:

    *Attention logits* (``attention_logits``). For layer :math:`i`, the largest pre-softmax attention
    logit in absolute value over the sampled sequences, heads and causally allowed (query, key) position
    pairs :math:`j \le t` (within the window for sliding-window layers):

    .. math::

        \text{attn\_logit\_max}_i
        = \max_{b,\,h,\,j \le t} \frac{|\langle q_{b,h,t},\, k_{b,g(h),j}\rangle|}{\sqrt{d_h}},

    with :math:`q, k` exactly as LitGPT 0.5.13's ``CausalSelfAttention`` computes them: the query and key
    blocks of the fused ``attn.qkv`` output, after the optional query/key norm (``norm_qk``, both types),
    with RoPE applied to the first ``rope_n_elem`` dimensions of each head (interleaved or not), and key
    group :math:`g(h) = \lfloor h / (n\_head / n\_query\_groups) \rfloor` for grouped-query attention.
    :math:`1/\sqrt{d_h}` is LitGPT's scale: ``1 / sqrt(attention_scores_scalar or head_size)`` times
    ``mscale**2`` (1 without YaRN), i.e. ``1 / sqrt(head_size)`` for the models of this package. With
    ``attention_logit_softcapping`` the value is before the cap. Computed in float32, one key group at a
    time (memory ``B * T**2 * n_head / n_query_groups`` floats). Softmax saturates once logits reach tens;
    a run failing by attention-logit growth shows values of thousands (1e4 seen on a 12-layer LitGPT at a
    too-high learning rate, against at most ~176 for a healthy one), often with no NaN in the loss.

    *Output logits* (``output_logits``). The maximum :math:`\max |z|` and the root mean square
    :math:`\sqrt{\overline{z^2}}` over all entries of the GPT's output logits ``(B, T, padded_vocab_size)``
    (after ``final_logit_softcapping`` if configured: what enters the loss). Growth of these without
    attention-logit growth is logit divergence at the head (what a z-loss counters).

    *Jacobians* (``jacobian``). Block :math:`l` maps the hidden state :math:`h_l` (its input in the same
    forward pass, shape ``(B, T, d)``) to :math:`h_{l+1}`. Its Jacobian :math:`J_l = \partial h_{l+1} /
    \partial h_l` (residual included) is never formed:
    :func:`~lightning_msign.functional.jacobian.jacobian_top_singular` estimates
    :math:`\sigma_1(J_l) = \|J_l\|_2` and the unit singular vectors :math:`u_1(J_l), v_1(J_l)` by
    ``jacobian_iters`` steps of Golub-Kahan-Lanczos bidiagonalization (each a ``torch.func`` JVP + VJP; a
    seeded start vector, not the global RNG). The vectors span the whole sampled batch space (all ``B * T * d``
    coordinates, not one token). :math:`u_1(J_l)` lives in the output space of block :math:`l`, which is
    the input space of block :math:`l+1`, so the alignment of adjacent blocks

    .. math::

        a_l = |\langle u_1(J_l),\, v_1(J_{l+1})\rangle| \in [0, 1]

    is well defined; :math:`a_l \to 1` with :math:`\sigma_1 > 1` is the mechanism by which, per the MSign
    paper (arXiv 2602.01734), collapsed stable ranks make gradients grow exponentially with depth. Random
    directions give :math:`a \approx \sqrt{2/(\pi B T d)}` (0.002 at ``4 x 128 x 256``).

    Convergence: the estimate of :math:`\sigma_1` is a lower bound. A first version used plain power
    iteration, whose vectors (hence :math:`a_l`) needed ~100 iterations on a 2 x 32 model after 150 steps
    at learning rate 3e-3 (5 gave :math:`a_0` = 0.005-0.08 against 0.84 converged); Lanczos had
    :math:`\sigma_1` converged to 4 digits after 10 steps and the alignment stable from 20 steps on
    (4 x 64 model, see :func:`~lightning_msign.functional.jacobian.jacobian_top_singular`), hence the
    default ``jacobian_iters=20``.
    :math:`\sigma_1(J_0)` is large whenever the token embeddings are small (the first block's pre-norm
    divides by their RMS: 15-30 on the tiny model at learning rate 3e-3, hundreds at 3e-2); compare
    blocks over time rather than against 1.

    Which failure mode: attention logits in the thousands = attention-logit growth (fix: QK-norm, lower
    LR); output logits growing alone = output-logit divergence (z-loss); Jacobian alignment near 1 with
    :math:`\sigma_1 > 1` and collapsing stable ranks (:class:`~lightning_msign.StableRankMonitor`) = the
    failure MSign repairs.

    Nothing of the training is disturbed: the forward runs under ``torch.no_grad()`` on a slice of the
    batch, the Jacobians differentiate with respect to the hidden states only (no parameter gets a
    ``.grad``; gradients already there are left as they are), the optimizer is not touched, the global RNG
    is not used, and every module's train/eval mode is restored. A ``torch.compile``-d GPT
    (``LitGPTModule(compile=True)``) is run uncompiled here, so its compiled graphs are neither reused nor
    invalidated by the hooks. ``F.scaled_dot_product_attention`` runs its math kernel during the Jacobian
    products (the fused kernels have no forward-mode derivative). Everything is computed in the
    parameters' dtype, outside autocast (float32 under ``bf16-mixed``).

    Cost: one no-grad forward of the cut batch, plus, with ``jacobian=True``, per block one forward that
    records the graph and ``jacobian_iters`` x (one JVP, ~2-3 forwards, + one VJP, ~2 forwards) of that
    block. Measured on the 6 x 256 LitGPT of ``recipes/shakespeare/baseline.yaml`` (1 CPU thread, batch
    cut to the default 4 x 128, the script at the end of this module; a shared 2-core machine), against
    0.9-1.0 s for a training step (forward, backward, clipping, AdamW) of the recipe's 8 x 256 batch in
    float32 and 0.61-0.65 s in ``bf16-mixed``: a call with the defaults (no Jacobians) takes 85-95 ms,
    0.3% of training time at ``every_n_steps=50``. Each Jacobian step adds ~0.35 s (~58 ms per block,
    three quarters of it the JVP): 20 Lanczos steps took 8.2 s (84 ms without Jacobians, 551 ms with one
    step, in the same run of the script), about 9 float32 training steps,
    so use ``every_n_steps`` of several hundred with ``jacobian=True``. The first call of a process
    pays ~0.4 s more (``torch.func`` warm-up).

    Distributed: each process computes on its own batch and only rank zero's loggers write; this
    callback runs no collective of its own. Under FSDP2 (``ModelParallelStrategy``) the forward passes of
    the GPT and of each block all-gather their parameters themselves, so every process runs the
    diagnostics on the same steps; nothing here reads a parameter, so nothing acts on a shard (FSDP2 is
    not tested with this callback).

    Args:
        every_n_steps: compute after every ``n``-th optimizer step (``trainer.global_step`` counts
            optimizer steps: gradient accumulation and resume are respected).
        jacobian: estimate the blocks' Jacobian norms and the alignments of adjacent blocks (off by
            default: it costs several training steps per call, see Cost).
        jacobian_iters: Lanczos steps per block.
        attention_logits: log the attention-logit maxima.
        output_logits: log the output-logit maximum and RMS.
        max_batch_size: sequences of the batch used (the first ones); ``None`` uses all.
        max_seq_len: tokens per sequence used (the first ones); ``None`` uses all.
        model_attr: dotted attribute path from the LightningModule to the GPT (``"model"`` for
            :class:`~lightning_msign.LitGPTModule`); ``None`` finds the first submodule with
            ``transformer.h`` (a ``ModuleList`` of blocks).
        seed: seed of the Lanczos start vectors (block ``l`` uses ``seed + l``).

    Raises:
        ValueError: at construction, for any bad argument (the message names it and the value) or when
            all three diagnostics are disabled; at ``setup``, when no GPT is found (or ``model_attr`` does
            not lead to one), or when ``attention_logits=True`` and a block's ``attn`` is not a LitGPT
            ``CausalSelfAttention`` (e.g. multi-head latent attention); at a logged step, when the batch
            holds no ``(B, T)`` integer token ids.
        NotImplementedError: at ``setup``, for FSDP1 (``FSDPStrategy``) and DeepSpeed.

    Logged metrics (straight to the Trainer's loggers on the steps this callback computes them, whatever
    ``log_every_n_steps`` is, at the step index of that batch's ``train/loss``):
        ``diag/attn_logit_max/<i>`` per layer ``i`` and ``diag/attn_logit_max`` (max over layers);
        ``diag/output_logit_max``, ``diag/output_logit_rms``; ``diag/jacobian_norm/<i>`` per block,
        ``diag/jacobian_alignment/<i>`` for blocks ``(i, i+1)``, ``diag/jacobian_alignment_max`` (with at
        least two blocks); ``diag/time_ms``, the wall time of the whole computation.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import DiagnosticsMonitor, StableRankMonitor

        trainer = Trainer(callbacks=[StableRankMonitor(every_n_steps=10), DiagnosticsMonitor(every_n_steps=50)])
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        jacobian: bool = False,
        jacobian_iters: int = 20,
        attention_logits: bool = True,
        output_logits: bool = True,
        max_batch_size: Optional[int] = 4,
        max_seq_len: Optional[int] = 128,
        model_attr: Optional[str] = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self._last_step = 0
        self.every_n_steps = check_positive_int(every_n_steps, "every_n_steps")
        self.jacobian = check_bool(jacobian, "jacobian")
        self.jacobian_iters = check_positive_int(jacobian_iters, "jacobian_iters")
        self.attention_logits = check_bool(attention_logits, "attention_logits")
        self.output_logits = check_bool(output_logits, "output_logits")
        if not (self.jacobian or self.attention_logits or self.output_logits):
            raise ValueError(
                "At least one of `jacobian`, `attention_logits` and `output_logits` must be True, got"
                f" jacobian={jacobian!r}, attention_logits={attention_logits!r}, output_logits={output_logits!r}"
            )
        self.max_batch_size = None if max_batch_size is None else check_positive_int(max_batch_size, "max_batch_size")
        self.max_seq_len = None if max_seq_len is None else check_positive_int(max_seq_len, "max_seq_len")
        if model_attr is not None and (not isinstance(model_attr, str) or not all(model_attr.split("."))):
            raise ValueError(f"`model_attr` must be None or a dotted attribute path like 'model', got {model_attr!r}")
        self.model_attr = model_attr
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"`seed` must be a non-negative int, got {seed!r}")
        self.seed = seed
        self._gpt: Optional[nn.Module] = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, model_attr=self.model_attr)

    @property
    def model(self) -> Optional[nn.Module]:
        """The GPT the diagnostics run on (known after ``setup``)."""
        return self._gpt

    def _resolve(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # No weight matrices are targeted: resolution finds the GPT (at setup, and again at fit start).
        refuse_strategies(trainer, "DiagnosticsMonitor")
        self._gpt = find_gpt(pl_module, self.model_attr, need_litgpt_attention=self.attention_logits)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and any(True for _ in pl_module.parameters()):
            self._resolve(trainer, pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._resolve(trainer, pl_module)
        if not trainer.loggers:
            rank_zero_warn(f"{type(self).__name__}: the Trainer has no logger, so nothing will be recorded.")

    def _optimizer_step_due(self, trainer: pl.Trainer, every: int) -> bool:
        if trainer.global_step <= self._last_step:
            return False
        self._last_step = trainer.global_step
        return trainer.global_step % every == 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._optimizer_step_due(trainer, self.every_n_steps):
            return
        metrics = self.compute(batch_input_ids(batch))
        log_to_loggers(trainer, metrics, step=trainer.global_step - 1)

    def compute(self, input_ids: Tensor) -> dict[str, Tensor]:
        """All enabled diagnostics for token ids ``(B, T)`` (cut to ``max_batch_size`` x ``max_seq_len``).

        Returns the logged metrics (0-dim tensors, ``diag/time_ms`` a float), keyed as in the class
        docstring. Needs the GPT, found at the Trainer's ``setup`` (or set with :meth:`attach`).
        """
        gpt = self._gpt
        if gpt is None:
            raise RuntimeError(
                "DiagnosticsMonitor.compute() needs the model: call it after the Trainer's setup or attach()"
            )
        ids = input_ids[: self.max_batch_size, : self.max_seq_len]
        synchronize(ids.device)
        start = time.perf_counter()
        blocks = list(gpt.transformer.h)
        modes = [(m, m.training) for m in gpt.modules()]
        metrics: dict[str, Any] = {}
        try:
            gpt.eval()
            with torch.no_grad():
                logits, block_inputs, logit_max = self._forward(gpt, blocks, ids)
                if self.attention_logits:
                    for i, value in enumerate(logit_max):
                        metrics[f"diag/attn_logit_max/{i}"] = value
                    metrics["diag/attn_logit_max"] = torch.stack(logit_max).max()
                if self.output_logits:
                    if not isinstance(logits, Tensor):
                        raise ValueError(f"The GPT must return a logits tensor, got {type(logits).__name__}")
                    z = logits.detach().float()
                    metrics["diag/output_logit_max"] = z.abs().max()
                    metrics["diag/output_logit_rms"] = z.square().mean().sqrt()
                del logits
                if self.jacobian:
                    metrics.update(self._jacobians(blocks, block_inputs))
        finally:
            for module, training in modes:
                module.training = training
        synchronize(ids.device)
        metrics["diag/time_ms"] = (time.perf_counter() - start) * 1e3
        return metrics

    def attach(self, pl_module: nn.Module) -> None:
        """Find the GPT in ``pl_module`` (as ``setup`` does) to use :meth:`compute` outside a Trainer."""
        self._gpt = find_gpt(pl_module, self.model_attr, need_litgpt_attention=self.attention_logits)

    def _forward(
        self, gpt: nn.Module, blocks: list[nn.Module], ids: Tensor
    ) -> tuple[Any, list[tuple[tuple, dict]], list[Tensor]]:
        """One hooked forward: the GPT's output, each block's inputs, each layer's attention-logit max."""
        block_inputs: list[Optional[tuple[tuple, dict]]] = [None] * len(blocks)
        probes = [_QueryKeyProbe(block.attn) for block in blocks] if self.attention_logits else []
        handles: list[RemovableHandle] = []
        try:
            if self.jacobian:
                for i, block in enumerate(blocks):
                    hook = partial(_store_inputs, block_inputs, i)
                    handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
            for probe in probes:
                handles.extend(probe.attach())
            # `_call_impl`, not `__call__`: runs the module's hooks (FSDP2's included) but never a
            # torch.compile-d version (`nn.Module.compile`), which the hooks would force to recompile.
            logits = gpt._call_impl(ids)
        finally:
            for handle in handles:
                handle.remove()
        if self.jacobian and any(entry is None for entry in block_inputs):
            raise RuntimeError("DiagnosticsMonitor: the GPT's forward did not call every block of `transformer.h` once")
        if any(p.value is None for p in probes):
            raise RuntimeError("DiagnosticsMonitor: the GPT's forward did not call every block's `attn` once")
        return logits, block_inputs, [p.value for p in probes]  # type: ignore[return-value]

    def _jacobians(self, blocks: list[nn.Module], block_inputs: list[tuple[tuple, dict]]) -> dict[str, Tensor]:
        metrics: dict[str, Tensor] = {}
        alignments: list[Tensor] = []
        previous_u: Optional[Tensor] = None
        for i, (block, (args, kwargs)) in enumerate(zip(blocks, block_inputs)):
            x, rest = args[0], args[1:]
            sigma, u, v = jacobian_top_singular(
                partial(_call_block, block, rest, kwargs), x, num_iters=self.jacobian_iters, seed=self.seed + i
            )
            metrics[f"diag/jacobian_norm/{i}"] = sigma
            if previous_u is not None:
                alignments.append(jacobian_alignment(previous_u, v))
                metrics[f"diag/jacobian_alignment/{i - 1}"] = alignments[-1]
            previous_u = u
        if alignments:
            metrics["diag/jacobian_alignment_max"] = torch.stack(alignments).max()
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict.get("last_step", 0))


def find_gpt(pl_module: nn.Module, model_attr: Optional[str] = None, need_litgpt_attention: bool = True) -> nn.Module:
    """The GPT in ``pl_module``: ``pl_module.<model_attr>``, or the first module with ``transformer.h``.

    Raises:
        ValueError: ``model_attr`` does not exist or is not such a module, none is found, or
            ``need_litgpt_attention`` and a block's ``attn`` is not a LitGPT ``CausalSelfAttention``.
    """
    if model_attr is not None:
        gpt: Any = pl_module
        for part in model_attr.split("."):
            if not hasattr(gpt, part):
                raise ValueError(
                    f"`model_attr` must lead from {type(pl_module).__name__} to the GPT, got {model_attr!r}:"
                    f" {type(gpt).__name__} has no attribute {part!r}"
                )
            gpt = getattr(gpt, part)
        if not _has_blocks(gpt):
            raise ValueError(
                f"`model_attr` must name a LitGPT GPT (a module with a non-empty `transformer.h` ModuleList),"
                f" got {model_attr!r}, a {type(gpt).__name__}"
            )
    else:
        gpt = next((m for m in pl_module.modules() if _has_blocks(m)), None)
        if gpt is None:
            raise ValueError(
                f"DiagnosticsMonitor needs a LitGPT GPT (a module with a non-empty `transformer.h` ModuleList of"
                f" blocks) in the LightningModule, found none in {type(pl_module).__name__}: pass `model_attr`"
            )
    if need_litgpt_attention:
        for i, block in enumerate(gpt.transformer.h):
            attn = getattr(block, "attn", None)
            if not isinstance(attn, CausalSelfAttention):
                raise ValueError(
                    "`attention_logits=True` needs LitGPT `CausalSelfAttention` in every block, got"
                    f" {type(attn).__name__} in block {i}: pass attention_logits=False"
                )
    return gpt


def batch_input_ids(batch: Any) -> Tensor:
    """Token ids ``(B, T)`` of a batch: a tensor, a dict with ``"input_ids"``, or a sequence starting with them."""
    if isinstance(batch, Tensor):
        ids = batch
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        ids = batch["input_ids"]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        ids = batch[0]
    else:
        ids = None
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.is_complex():
        desc = f"shape {tuple(ids.shape)}, dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(
            "DiagnosticsMonitor needs integer token ids of shape (B, T): the batch, its 'input_ids' or its"
            f" first element, got {desc}"
        )
    return ids


def _has_blocks(module: Any) -> bool:
    transformer = getattr(module, "transformer", None)
    blocks = getattr(transformer, "h", None)
    return isinstance(module, nn.Module) and isinstance(blocks, nn.ModuleList) and len(blocks) > 0


def _store_inputs(store: list, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    store[index] = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs))


def _call_block(block: nn.Module, rest: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return block(x, *rest, **kwargs)


def _argument(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


class _QueryKeyProbe:
    """Forward hooks on one ``CausalSelfAttention`` that recover its ``q`` and ``k`` and keep the logit max.

    The hooks record the ``attn.qkv`` output, the ``norm_q``/``norm_k`` outputs (with ``norm_qk``) and the
    RoPE ``cos``/``sin`` passed to the attention; when the attention returns, :func:`litgpt_query_key`
    rebuilds ``q``, ``k`` from them and :func:`attention_logit_max` reduces; tensors are then dropped.
    """

    def __init__(self, attn: CausalSelfAttention) -> None:
        self.attn = attn
        self.value: Optional[Tensor] = None
        self._seen: dict[str, Any] = {}

    def attach(self) -> list[RemovableHandle]:
        attn = self.attn
        handles = [
            attn.register_forward_pre_hook(self._pre, with_kwargs=True),
            attn.qkv.register_forward_hook(partial(self._store, "qkv")),
            attn.register_forward_hook(self._post),
        ]
        if attn.norm_q is not None:
            handles.append(attn.norm_q.register_forward_hook(partial(self._store, "q")))
            handles.append(attn.norm_k.register_forward_hook(partial(self._store, "k")))
        return handles

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._seen = {"cos": _argument(args, kwargs, 1, "cos"), "sin": _argument(args, kwargs, 2, "sin")}

    def _store(self, key: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        self._seen[key] = output

    def _post(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        seen, self._seen = self._seen, {}
        q, k = litgpt_query_key(self.attn, seen["qkv"], seen["cos"], seen["sin"], seen.get("q"), seen.get("k"))
        config = self.attn.config
        window = config.sliding_window_size if self.attn.apply_sliding_window_attention else None
        self.value = attention_logit_max(q, k, litgpt_attention_scale(self.attn), window=window)


def litgpt_query_key(
    attn: CausalSelfAttention,
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    q_normed: Optional[Tensor] = None,
    k_normed: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Queries ``(B, n_head, T, hs)`` and keys ``(B, n_query_groups, T, hs)`` as LitGPT 0.5.13's attention forms them.

    Follows ``CausalSelfAttention.forward`` (no KV cache): split of the fused ``qkv`` output
    ``(B, T, (n_head + 2 n_query_groups) hs)``, then the query/key norm outputs in place of ``q``/``k``
    when the attention has ``norm_qk`` (``q_normed``/``k_normed``, the outputs of ``attn.norm_q`` /
    ``attn.norm_k``: ``(B, T, n hs)`` for ``"olmo2"``, ``(B, n, T, hs)`` for ``"default"``), then RoPE
    (LitGPT's own ``apply_rope`` / ``apply_rope_interleave``) on the first ``rope_n_elem`` dimensions of
    each head. Keys are returned per group, before LitGPT's ``repeat_interleave`` over the heads of a
    group. Float32 (float64 stays float64).
    """
    config = attn.config
    B, T, _ = qkv.shape
    hs, n_head, n_groups = config.head_size, config.n_head, config.n_query_groups
    q, k, _ = qkv.split((n_head * hs, n_groups * hs, n_groups * hs), dim=-1)
    if config.norm_qk:
        if q_normed is None or k_normed is None:
            raise ValueError("`q_normed` and `k_normed` are needed for an attention with `norm_qk`")
        if config.norm_qk_type == "olmo2":
            q, k = q_normed, k_normed
    q = q.reshape(B, T, n_head, hs).transpose(1, 2)
    k = k.reshape(B, T, n_groups, hs).transpose(1, 2)
    if config.norm_qk and config.norm_qk_type == "default":
        q, k = q_normed, k_normed
    n = config.rope_n_elem
    if n > 0:
        rope = apply_rope_interleave if config.rope_interleave else apply_rope
        q = torch.cat((rope(q[..., :n], cos, sin), q[..., n:]), dim=-1)
        k = torch.cat((rope(k[..., :n], cos, sin), k[..., n:]), dim=-1)
    dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.to(dtype), k.to(dtype)


def litgpt_attention_scale(attn: CausalSelfAttention) -> float:
    """The factor LitGPT multiplies ``q @ k.mT`` by: ``mscale**2 / sqrt(attention_scores_scalar or head_size)``."""
    config = attn.config
    return attn.mscale * attn.mscale / math.sqrt(config.attention_scores_scalar or config.head_size)


def attention_logit_max(q: Tensor, k: Tensor, scale: float, window: Optional[int] = None) -> Tensor:
    r"""``max |q.k| * scale`` over sequences, heads and causally allowed pairs (key position <= query position).

    Args:
        q: queries ``(B, n_head, T, hs)``.
        k: keys ``(B, n_groups, T, hs)``; query head ``h`` attends with key group
            ``h // (n_head // n_groups)`` (LitGPT's ``repeat_interleave``).
        scale: factor of the logits (``1 / sqrt(hs)``).
        window: with a sliding window of this size, only keys ``t - window < j <= t`` count.

    Returns:
        A 0-dim tensor of ``q``'s dtype; computed one key group at a time.
    """
    B, n_head, T, hs = q.shape
    n_groups = k.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    if window is not None:
        allowed &= torch.ones_like(allowed).triu(diagonal=1 - window)
    q = q.reshape(B, n_groups, n_head // n_groups, T, hs)
    best = q.new_zeros(())
    for g in range(n_groups):
        scores = q[:, g] @ k[:, g, None].mT  # (B, heads per group, T, T)
        best = torch.maximum(best, scores.abs().masked_fill(~allowed, 0).amax())
    return best * scale


# Cost measurement quoted in DiagnosticsMonitor's docstring (run from the repository root):
#
#   .venv/bin/python - <<'EOF'
#   import time, torch
#   from lightning_msign import DiagnosticsMonitor, LitGPTModule
#   torch.set_num_threads(1); torch.manual_seed(0)
#   config = dict(n_layer=6, n_embd=256, n_head=8, intermediate_size=1024, rotary_percentage=1.0,
#                 parallel_residual=False, bias=False)
#   m = LitGPTModule(config, vocab_size=256, block_size=256, scale_residual_init=True)
#   m.log = lambda *args, **kwargs: None  # training_step outside a Trainer
#   opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
#   b = {"input_ids": torch.randint(0, 256, (8, 256)), "targets": torch.randint(0, 256, (8, 256))}
#   def step(amp):
#       with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
#           loss = m.training_step(b, 0)
#       loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad()
#   runs = [("step fp32", lambda: step(False)), ("step bf16-mixed", lambda: step(True))]
#   for kwargs in ({}, {"jacobian": True, "jacobian_iters": 1}, {"jacobian": True, "jacobian_iters": 20}):
#       d = DiagnosticsMonitor(**kwargs); d.attach(m)
#       runs.append((f"diagnostics {kwargs}", lambda d=d: d.compute(b["input_ids"])))
#   for name, call in runs:
#       call(); times = []
#       for _ in range(3):
#           t = time.perf_counter(); call(); times.append(time.perf_counter() - t)
#       print(f"{name}: {1e3 * min(times):.0f} ms")
#   EOF
