"""QKNormRetrofit: switch qk-norm on in a running model when its attention logits run away."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional

from torch import Tensor, nn

from lightning_msign import metric_keys as keys
from lightning_msign._validation import check_choice, check_optional_positive_int, check_positive_int, check_range
from lightning_msign.distributed import max_over_processes
from lightning_msign.families import install_qk_norm, qk_norm_classes, qualified_name
from lightning_msign.families.qk_norm import SwitchedNorm
from lightning_msign.guards.base import Guard
from lightning_msign.guards.diagnostics import Diagnostics
from lightning_msign.models import find_decoder
from lightning_msign.models.capture import ForwardLogits, LayerLogits

Scope = Literal["all", "layer"]

__all__ = ["QKNormRetrofit"]


class QKNormRetrofit(Guard):
    r"""Turn on query/key normalisation in a model that was built without it, once its attention logits run away.

    At attach, every attention layer gets a query and a key norm where its family's own qk-norm would sit (LitGPT:
    ``config.norm_class(head_size)`` on each head's q and k, before RoPE, as ``norm_qk=True`` builds), *dormant*:
    exactly the identity, no operation at all (:class:`~lightning_msign.families.qk_norm.SwitchedNorm`), so a run
    in which the logits never pass the threshold is bit-identical to one without the guard. After each check step
    the largest attention logit ``max |q.k| / sqrt(head_size)`` of every layer is read from the step's own training
    forward (as :class:`~lightning_msign.MSign`'s ``max_attn_logit`` reads it); when a layer's exceeds
    ``max_attn_logit``, the norms are switched on: in every layer (``scope="all"``, the default) or in the layers
    past the threshold (``scope="layer"``, the others checked on). From then on q and k are normalised per head
    with their gains at their initial value (1; a bias at 0): the model is, from that step, the same function as
    the one LitGPT builds with ``norm_qk=True`` from the same weights (the switch is not function-preserving: the
    loss jumps, then the run trains on with bounded logits). The gains train from the switch on; they need no
    gradient before, so an optimizer built after attach holds them from the start (a Lightning callback attaches
    before ``configure_optimizers``).

    Why: a repair of the weights alone (MSign keeps ``||W_q||_F`` and ``||W_k||_F``) cannot undo the norm growth that
    drives the logits; qk-norm bounds the logits whatever the norms are (docs/stability.md, "Why MSign closes only
    part of the gap").

    Families: those with a qk-norm retrofit (:meth:`~lightning_msign.families.Family.install_qk_norm`): LitGPT
    ``CausalSelfAttention`` (LitGPT's own qk-norm) and Hugging Face Llama, Mistral, Qwen2 and Mixtral attention
    (Qwen3's: the family's RMS norm over each head of the ``q_proj`` / ``k_proj`` outputs, before RoPE; once on, the
    model is Qwen3's function of the same weights) and GPT-2 self-attention (LayerNorm over each head of the query and
    key columns of ``c_attn``). Any other attention, or one that normalises q and k already (Qwen3, OLMo 2), is
    refused at attach, naming it.

    Under DDP the dormant gains receive no gradient, so DDP must look for unused parameters
    (``find_unused_parameters=True``); the decision is max-reduced over processes, so every process switches the
    same layers at the same step. FSDP1 / FSDP2 are not supported (the callback refuses them).

    Example::

        guard = QKNormRetrofit(model, max_attn_logit=100.0)   # before the optimizer is built
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for step, batch in enumerate(loader, start=1):
            loss_fn(model, batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            metrics = guard.step(step)          # reads the logits the step's forward computed

    Args:
        module: the model (or attach later).
        max_attn_logit: the threshold on a layer's largest attention logit (positive).
        scope: ``"all"``: every layer's norms switch at the first crossing; ``"layer"``: only the layers past the
            threshold, the others are checked on.
        check_every: read the logits of every ``n``-th optimizer step only.
        probe_batch_size: sequences of the batch read (the first ones; ``None``: all).
        probe_seq_len: tokens per sequence read (the first ones; ``None``: all).
        model_attr: attribute path of the decoder inside ``module`` (default: found).

    Raises:
        ValueError: at construction, for any bad argument; at attach, for an attention without a qk-norm retrofit
            or with qk-norm already, or a model without a decoder this package reads.
    """

    def __init__(
        self,
        module: Optional[nn.Module] = None,
        max_attn_logit: float = 100.0,
        scope: Scope = "all",
        check_every: int = 1,
        probe_batch_size: Optional[int] = 4,
        probe_seq_len: Optional[int] = 128,
        model_attr: Optional[str] = None,
    ) -> None:
        super().__init__()
        self.max_attn_logit = check_range(max_attn_logit, "max_attn_logit", 0.0, low_open=True)
        self.scope = check_choice(scope, "scope", Scope)
        self.check_every = check_positive_int(check_every, "check_every")
        self.probe_batch_size = check_optional_positive_int(probe_batch_size, "probe_batch_size")
        self.probe_seq_len = check_optional_positive_int(probe_seq_len, "probe_seq_len")
        self.model_attr = model_attr
        self._reader: Optional[LayerLogits] = None  # the training forward's reading, else a second forward
        self._norms: list[tuple[SwitchedNorm, ...]] = []  # per block: the norms of its attention(s)
        # per block: the optimizer step after which its norms were switched on; whether they are on is the model's
        # state (the norms' extra state, in every model checkpoint)
        self.switch_steps: list[Optional[int]] = []
        if module is not None:
            self.attach(module)

    # -------------------------------------------------------------------------------------- attaching
    def _on_attach(self, module: nn.Module) -> None:
        if self._reader is not None:  # attached again: the hooks of the last attach go
            self._reader.remove()
            self._reader = None
        decoder = find_decoder(module, self.model_attr)
        norms: list[tuple[SwitchedNorm, ...]] = []
        for i in range(len(decoder.blocks)):
            pairs = []
            for attn in decoder.attentions(i):
                found = install_qk_norm(attn)
                if found is None:
                    raise ValueError(
                        f"QKNormRetrofit has no qk-norm retrofit for {qualified_name(attn)} (block {i} of"
                        f" `{decoder.blocks_path}`); the attention classes with one: {', '.join(qk_norm_classes())}"
                    )
                pairs.extend(found)
            norms.append(tuple(pairs))  # type: ignore[arg-type]
        self._norms = norms
        if len(self.switch_steps) != len(norms):
            self.switch_steps = [None] * len(norms)
        # the logit probe is built after the norms exist, so it reads q and k after them (the identity until on)
        probe = Diagnostics(
            None, every_n_steps=1, attention_logits=True, output_logits=False,
            max_batch_size=self.probe_batch_size, max_seq_len=self.probe_seq_len, model_attr=self.model_attr,
        )
        probe.attach_unwrapped(module, self._distributed, self._fsdp1)
        forward = ForwardLogits(
            probe.decoder, self._next_check, batch_size=self.probe_batch_size, seq_len=self.probe_seq_len
        )
        self._reader = LayerLogits(probe, forward, "QKNormRetrofit")

    def _next_check(self) -> Optional[int]:
        step = self._last_step + 1
        return step if step % self.check_every == 0 and not self.all_switched else None

    def _apply_switches(self, layers: Optional[list[int]] = None) -> None:
        """Switch on the norms of ``layers`` (default: every layer with a recorded switch step)."""
        if layers is None:
            layers = [i for i, when in enumerate(self.switch_steps) if when is not None]
        for i in layers:
            for norm in self._norms[i]:
                if not norm.on:
                    norm.switch_on()

    # ------------------------------------------------------------------------------------------ state
    def _layer_on(self, i: int) -> bool:
        return all(norm.on for norm in self._norms[i])

    @property
    def switched_layers(self) -> list[int]:
        """The blocks whose q/k norms are on, read off the model (a model checkpoint carries the switch; a rollback
        to weights from before it does not undo it: the norms stay on, their gains as the snapshot held them)."""
        return [i for i in range(len(self._norms)) if self._layer_on(i)]

    @property
    def all_switched(self) -> bool:
        """Whether every block's norms are on (nothing is checked any more)."""
        return bool(self._norms) and all(self._layer_on(i) for i in range(len(self._norms)))

    def gains(self) -> list[nn.Parameter]:
        """The parameters of the retrofitted norms (every block's; they train once switched on)."""
        return [p for norms in self._norms for norm in norms for p in norm.parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "switch_steps": list(self.switch_steps)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        steps = state_dict.get("switch_steps")
        if steps is not None:
            if self._norms and len(steps) != len(self._norms):
                raise ValueError(
                    f"QKNormRetrofit state has {len(steps)} layers, the attached model {len(self._norms)}"
                )
            self.switch_steps = [None if s is None else int(s) for s in steps]
            self._apply_switches()

    def _optimizer_calls(self) -> tuple[Any, Any]:
        return None, self.step

    # ------------------------------------------------------------------------------------------ steps
    def step(self, step: Optional[int] = None, input_ids: Optional[Tensor] = None) -> dict[str, float]:
        """Call after each optimizer step: reads the layers' logits and switches the norms on past the threshold.

        Args:
            step: optimizer steps taken so far (``trainer.global_step`` after the step); default: the guard counts
                its calls. A step already seen does nothing (gradient accumulation).
            input_ids: the token ids ``(B, T)`` just trained on, read by a second forward only for a check step
                whose training forward the guard did not see.

        Returns:
            The metrics of the check (``{}`` on steps without one, and once every layer is switched).
        """
        self._require_module("step")
        current = self._advance(step)
        if current is None or self.all_switched or current % self.check_every:
            return {}
        n_layers = len(self._norms)
        logits = max_over_processes(self._reader.read(current, input_ids), self._device())
        hot = [i for i, v in enumerate(logits) if v > self.max_attn_logit]
        now = []
        if hot:
            now = [i for i in (range(n_layers) if self.scope == "all" else hot) if not self._layer_on(i)]
            for i in now:
                self.switch_steps[i] = current
            self._apply_switches(now)
        return {
            keys.QKNORM_ATTN_LOGIT_MAX: max((v for v in logits if not math.isnan(v)), default=math.nan),
            keys.QKNORM_SWITCHED_LAYERS: float(len(self.switched_layers)),
            keys.QKNORM_SWITCHED_NOW: float(len(now)),
        }

    def _device(self) -> Any:
        gains = self.gains()
        return gains[0].device if gains else None

