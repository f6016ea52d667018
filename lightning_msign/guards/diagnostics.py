"""Diagnostics: which failure mode a run is in (attention or output logit growth, aligned Jacobians), any loop."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_msign._validation import (
    check_bool,
    check_non_negative_int,
    check_optional_positive_int,
    check_positive_int,
)
from lightning_msign.fsdp1 import FSDP1Units
from lightning_msign.functional.attention import output_logit_stats
from lightning_msign.functional.jacobian import jacobian_alignment, jacobian_top_singular
from lightning_msign.guards.base import Guard
from lightning_msign.guards.warmup import is_inactive
from lightning_msign.metric_keys import (
    DIAG_ATTN_LOGIT_MAX,
    DIAG_ATTN_LOGIT_MAX_PREFIX,
    DIAG_JACOBIAN_ALIGNMENT_MAX,
    DIAG_JACOBIAN_ALIGNMENT_PREFIX,
    DIAG_JACOBIAN_NORM_PREFIX,
    DIAG_OUTPUT_LOGIT_MAX,
    DIAG_OUTPUT_LOGIT_RMS,
    DIAG_TIME_MS,
)
from lightning_msign.models.base import (
    AttentionProbe,
    Decoder,
    attention_probe,
    block_output,
    find_decoder,
    has_no_lm_head,
    output_logits,
    supported_attention,
)

# Attention implementations of HF models whose blocks torch.func can differentiate forward and backward.
_JACOBIAN_ATTENTION = ("eager", "sdpa")


class Diagnostics(Guard):
    r"""Every ``every_n_steps`` optimizer steps, the quantities that tell transformer failure modes apart.

    On token ids (cut to ``max_batch_size`` sequences of at most ``max_seq_len`` tokens, and to the model's
    maximum length) it runs one forward pass of the decoder under ``torch.no_grad()`` in eval mode, with
    forward hooks (removed afterwards), and optionally the blocks' Jacobians. Decoders: LitGPT ``GPT``,
    Hugging Face GPT-2 and Llama-family causal LMs (:mod:`lightning_msign.models`).

    *Attention logits* (``attention_logits``). For layer :math:`i`, the largest pre-softmax attention
    logit in absolute value over the sampled sequences, heads and causally allowed (query, key) pairs
    (within the window for sliding-window layers; :func:`~lightning_msign.functional.attention_logit_max`):

    .. math::

        \text{attn\_logit\_max}_i = \max_{b,\,h,\,j \in A(t)} c\,|\langle q_{b,h,t},\, k_{b,g(h),j}\rangle|,

    with :math:`q, k` and the scale :math:`c` exactly as the model's attention forms them (rebuilt from the
    outputs of its projections: :class:`~lightning_msign.models.AttentionProbe`), in float32. Supported
    attention classes: those of the registered model families (:mod:`lightning_msign.families`).

    *Output logits* (``output_logits``). :math:`\max |z|` and :math:`\sqrt{\overline{z^2}}` over all entries
    of the model's output logits (a tensor, or the ``.logits`` of an HF output; after LitGPT's
    ``final_logit_softcapping`` if configured: what enters the loss).

    *Jacobians* (``jacobian``). Block :math:`l` maps its input hidden state :math:`h_l` (``(B, T, d)``, from
    the same forward pass, with the other arguments the model passed it) to :math:`h_{l+1}`.
    :func:`~lightning_msign.functional.jacobian.jacobian_top_singular` estimates
    :math:`\sigma_1(J_l) = \|J_l\|_2` (a lower bound) and the unit singular vectors by ``jacobian_iters``
    Lanczos steps (a seeded start, not the global RNG), and adjacent blocks give the alignment

    .. math::

        a_l = |\langle u_1(J_l),\, v_1(J_{l+1})\rangle| \in [0, 1],

    which tends to 1 with :math:`\sigma_1 > 1` when, per the MSign paper (arXiv 2602.01734), collapsed
    stable ranks make gradients grow exponentially with depth. Random directions give
    :math:`a \approx \sqrt{2/(\pi B T d)}`.

    Nothing of the training is disturbed: no parameter gets a ``.grad`` (gradients already there are left
    as they are), the optimizer and the global RNG are not touched, every module's train/eval mode is
    restored, a ``torch.compile``-d model is run uncompiled, and an HF model is called with
    ``use_cache=False``. Everything is computed in the parameters' dtype, outside autocast. Each process
    computes on its own ids; no collective is run (under FSDP2 the forward passes gather parameters
    themselves, so every process must call on the same steps). Measurements of convergence and cost:
    ``docs/diagnostics.md``.

    Usage in any loop::

        diagnostics = Diagnostics(model, every_n_steps=50)
        for input_ids, targets in loader:
            loss = loss_fn(model(input_ids), targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = diagnostics.step(input_ids)  # {} except after steps 50, 100, ...

    Args:
        module: the model, or a module holding it (or attach later with :meth:`attach`).
        every_n_steps: compute after every ``n``-th optimizer step.
        jacobian: estimate the blocks' Jacobian norms and adjacent alignments (costly: per block about
            ``jacobian_iters`` x 5 forward passes of the block).
        jacobian_iters: Lanczos steps per block.
        attention_logits: compute the attention-logit maxima.
        output_logits: compute the output-logit maximum and RMS.
        max_batch_size: sequences used (the first ones); ``None`` uses all.
        max_seq_len: tokens per sequence used (the first ones); ``None`` uses all. Longer ids than the
            model accepts (``T + 1``-token batches) are cut to its maximum length in any case.
        model_attr: dotted attribute path from the attached module to the decoder (``"model"`` for
            :class:`~lightning_msign.LitGPTModule`); ``None`` finds the first submodule with blocks at
            ``transformer.h`` or ``model.layers``.
        seed: seed of the Lanczos start vectors (block ``l`` uses ``seed + l``).

    Raises:
        ValueError: at construction, for any bad argument or when all three diagnostics are disabled;
            when attached, if no decoder is found (or ``model_attr`` does not lead to one), if
            ``attention_logits=True`` and a block's attention class is not supported, if
            ``output_logits=True`` and the model has no LM head, or if ``jacobian=True`` and an HF model
            runs an attention implementation other than eager or SDPA; at :meth:`step` / :meth:`compute`,
            when the ids are not integer ``(B, T)``.

    Metrics (returned by :meth:`step` / :meth:`compute`):
        ``diag/attn_logit_max/<i>`` per layer ``i`` and ``diag/attn_logit_max`` (max over layers);
        ``diag/output_logit_max``, ``diag/output_logit_rms``; ``diag/jacobian_norm/<i>`` per block,
        ``diag/jacobian_alignment/<i>`` for blocks ``(i, i+1)``, ``diag/jacobian_alignment_max`` (with at
        least two blocks); ``diag/time_ms``, the wall time of the whole computation.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
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
        self.max_batch_size = check_optional_positive_int(max_batch_size, "max_batch_size")
        self.max_seq_len = check_optional_positive_int(max_seq_len, "max_seq_len")
        if model_attr is not None and (not isinstance(model_attr, str) or not all(model_attr.split("."))):
            raise ValueError(f"`model_attr` must be None or a dotted attribute path like 'model', got {model_attr!r}")
        self.model_attr = model_attr
        self.seed = check_non_negative_int(seed, "seed")
        self._decoder: Optional[Decoder] = None
        if module is not None:
            self.attach(module)

    # -------------------------------------------------------------------------------------- attaching
    def _on_attach(self, module: nn.Module) -> None:
        decoder = find_decoder(module, self.model_attr)
        model = decoder.model
        if self._fsdp1 is not None:
            self._check_fsdp1(self._fsdp1)
        if self.jacobian and decoder.n_stacks > 1:
            raise ValueError(
                f"`jacobian=True` measures a chain of blocks, and {type(model).__name__} has {decoder.n_stacks} stacks"
                f" of them (`{decoder.blocks_path}`): pass jacobian=False"
            )
        if self.attention_logits:
            for i, block in enumerate(decoder.blocks):
                attns = decoder.attentions(i)
                missing = [a for a in attns if attention_probe(a) is None]
                if not attns or missing:
                    found = "no `attn` or `self_attn` module" if not attns else type(missing[0]).__name__
                    raise ValueError(
                        f"`attention_logits=True` needs an attention class whose logits can be rebuilt"
                        f" ({', '.join(supported_attention())}), got {found} in block {i} of"
                        f" `{decoder.blocks_path}`: pass attention_logits=False (output logits and Jacobians"
                        " work on any decoder)"
                    )
        if self.output_logits and has_no_lm_head(model):
            raise ValueError(
                f"`output_logits=True` needs a model with an LM head, got {type(model).__name__}, whose"
                " get_output_embeddings() is None: pass output_logits=False, or `model_attr` naming the causal LM"
            )
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
        if self.jacobian and implementation is not None and implementation not in _JACOBIAN_ATTENTION:
            raise ValueError(
                f"`jacobian=True` needs forward- and reverse-mode derivatives of the blocks, which the attention"
                f" implementation {implementation!r} of {type(model).__name__} does not promise: use one of"
                f" {_JACOBIAN_ATTENTION} (`attn_implementation=`) or pass jacobian=False"
            )
        self._decoder = decoder

    def _check_fsdp1(self, units: FSDP1Units) -> None:
        if self.jacobian:
            raise NotImplementedError(
                "Diagnostics(jacobian=True) does not support FSDP1 (FullyShardedDataParallel): the Jacobian products"
                " call the blocks under autograd, through FSDP's gather hooks, which is not implemented here. Pass"
                " jacobian=False (attention and output logits work), or use DDP / FSDP2."
            )
        mixed = [i for i, _ in enumerate(units.units) if units.mixed_precision(i)]
        if mixed:
            raise NotImplementedError(
                "Diagnostics does not support FSDP1 with MixedPrecision (found on"
                f" {type(getattr(units.units[mixed[0]], 'module', None)).__name__}): the probe would read the root's"
                " full-precision weights while the blocks compute in low precision, which is not the training"
                " forward. Use a 32-bit precision under FSDP1, or DDP / FSDP2 for the probe under mixed precision."
            )

    @property
    def model(self) -> Optional[nn.Module]:
        """The decoder the diagnostics run on (known once attached)."""
        return None if self._decoder is None else self._decoder.model

    @property
    def decoder(self) -> Optional[Decoder]:
        """The decoder, its blocks and its maximum length (known once attached)."""
        return self._decoder

    _no_optimizer_hooks = "its step needs the step's token ids (step(input_ids, step))"

    # ------------------------------------------------------------------------------------------ steps
    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) is followed by a computation."""
        return step % self.every_n_steps == 0

    def step(self, input_ids: Tensor, step: Optional[int] = None) -> dict[str, float]:
        """Call after each optimizer step with the ids just trained on; computes after steps ``n, 2n, ...``.

        Args:
            input_ids: integer token ids ``(B, T)`` (checked on every call, so a misfit fails at once).
            step: optimizer steps taken so far (``trainer.global_step`` after the step); default: the guard
                counts its calls. A step already seen does nothing (gradient accumulation).

        Returns:
            The metrics, or ``{}`` when not due.
        """
        self._require_module("step")
        check_input_ids(input_ids)
        current = self._advance(step)
        if current is None or not self.due(current):
            return {}
        return self.compute(input_ids)

    def compute(self, input_ids: Tensor) -> dict[str, float]:
        """All enabled diagnostics now, for token ids ``(B, T)`` (cut as described in the class docstring)."""
        module = self._require_module("compute")
        decoder = self._decoder
        if decoder is None:  # pragma: no cover - attach sets it
            raise RuntimeError("Diagnostics has no decoder")
        ids = self.cut(check_input_ids(input_ids))
        param = next(decoder.model.parameters(), None)
        if param is not None:
            ids = ids.to(param.device)
        modes = [(m, m.training) for m in module.modules()]
        metrics: dict[str, Tensor] = {}
        with self._timed(ids.device) as elapsed:
            try:
                decoder.model.eval()
                with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
                    output, block_inputs, logit_max = self._forward(decoder, ids)
                    if self.attention_logits:
                        ran = [(i, value) for i, value in enumerate(logit_max) if value is not None]
                        for i, value in ran:
                            metrics[f"{DIAG_ATTN_LOGIT_MAX_PREFIX}{i}"] = value
                        metrics[DIAG_ATTN_LOGIT_MAX] = torch.stack([value for _, value in ran]).max()
                    if self.output_logits:
                        z_max, z_rms = output_logit_stats(output_logits(output))
                        metrics[DIAG_OUTPUT_LOGIT_MAX], metrics[DIAG_OUTPUT_LOGIT_RMS] = z_max, z_rms
                    del output
                    if self.jacobian:
                        metrics.update(self._jacobians(decoder.blocks, block_inputs))
            finally:
                for m, training in modes:
                    m.training = training
            values = {key: float(value) for key, value in metrics.items()}
        values[DIAG_TIME_MS] = elapsed[0]
        return values

    def cut(self, input_ids: Tensor) -> Tensor:
        """The ids used: the first ``max_batch_size`` sequences, the first ``max_seq_len`` tokens, at most the
        model's maximum length."""
        decoder = self._decoder
        lengths = [n for n in (self.max_seq_len, None if decoder is None else decoder.max_length) if n is not None]
        return input_ids[: self.max_batch_size, : min(lengths) if lengths else None]

    def _forward(self, decoder: Decoder, ids: Tensor) -> tuple[Any, list[tuple[tuple, dict]], list[Tensor]]:
        """One hooked forward: the model's output, each block's arguments, each layer's attention-logit max."""
        blocks = decoder.blocks
        block_inputs: list[Optional[tuple[tuple, dict]]] = [None] * len(blocks)
        probes: list[list[AttentionProbe]] = []  # per block: its self-attention's, a decoder block's cross-attention's
        if self.attention_logits:
            probes = [[attention_probe(a) for a in decoder.attentions(i)] for i in range(len(blocks))]  # type: ignore[misc]
        handles: list[RemovableHandle] = []
        try:
            if self.jacobian:
                for i, block in enumerate(blocks):
                    handles.append(block.register_forward_pre_hook(partial(_store_inputs, block_inputs, i),
                                                                   with_kwargs=True))
            for probe in (p for block_probes in probes for p in block_probes):
                handles.extend(probe.attach())
            # FSDP1: gather the units above the decoder (those inside it gather in their own forward).
            with self._fsdp1.summon_above(decoder.model) if self._fsdp1 is not None else nullcontext():
                output = decoder(ids)
        finally:
            for handle in handles:
                handle.remove()
        # Blocks held inactive by an architecture warm-up compute the identity: no attention, no Jacobian.
        active = [not is_inactive(block) for block in blocks]
        if self.jacobian and any(entry is None for entry, on in zip(block_inputs, active) if on):
            raise RuntimeError(f"Diagnostics: the model's forward did not call every block of `{decoder.blocks_path}`")
        if any(p.value is None for ps, on in zip(probes, active) if on for p in ps):
            raise RuntimeError("Diagnostics: the model's forward did not call every block's attention")
        values = [torch.stack([p.value for p in ps]).amax() if on else None  # type: ignore[misc]
                  for ps, on in zip(probes, active)]
        return output, block_inputs, values  # type: ignore[return-value]

    def _jacobians(self, blocks: list[nn.Module], block_inputs: list[tuple[tuple, dict]]) -> dict[str, Tensor]:
        metrics: dict[str, Tensor] = {}
        alignments: list[Tensor] = []
        previous_u: Optional[Tensor] = None
        previous = -1
        for i, (block, inputs) in enumerate(zip(blocks, block_inputs)):
            if is_inactive(block):  # the identity of an architecture warm-up: adjacent active blocks are paired
                continue
            args, kwargs = inputs
            x = args[0] if args else kwargs["hidden_states"]
            f = partial(_call_block, block, args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"})
            sigma, u, v = jacobian_top_singular(f, x, num_iters=self.jacobian_iters, seed=self.seed + i)
            metrics[f"{DIAG_JACOBIAN_NORM_PREFIX}{i}"] = sigma
            if previous_u is not None:  # labelled by the first block of the pair
                alignments.append(jacobian_alignment(previous_u, v))
                metrics[f"{DIAG_JACOBIAN_ALIGNMENT_PREFIX}{previous}"] = alignments[-1]
            previous_u, previous = u, i
        if alignments:
            metrics[DIAG_JACOBIAN_ALIGNMENT_MAX] = torch.stack(alignments).max()
        return metrics


def check_input_ids(input_ids: Any) -> Tensor:
    """``input_ids`` if it is an integer tensor ``(B, T)``, else a ``ValueError`` naming what it is."""
    ids = input_ids
    if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point() or ids.is_complex() or ids.numel() == 0:
        desc = f"shape {tuple(ids.shape)}, dtype {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"Diagnostics needs non-empty integer token ids of shape (B, T), got {desc}")
    return ids


def batch_input_ids(batch: Any) -> Tensor:
    """Token ids ``(B, T)`` of a batch: a tensor, a dict with ``"input_ids"``, or a sequence starting with them.

    Raises:
        ValueError: the ids found are not an integer ``(B, T)`` tensor (the message says what they are).
    """
    if isinstance(batch, Tensor):
        ids = batch
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        ids = batch["input_ids"]
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) > 0:
        ids = batch[0]
    else:
        ids = batch
    try:
        return check_input_ids(ids)
    except ValueError as error:
        raise ValueError(f"{error} (the batch, its 'input_ids' or its first element)") from None


def _store_inputs(store: list, index: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    store[index] = (tuple(a.detach() if isinstance(a, Tensor) else a for a in args), dict(kwargs))


def _call_block(block: nn.Module, rest: tuple, kwargs: dict, x: Tensor) -> Tensor:
    return block_output(block(x, *rest, **kwargs))
