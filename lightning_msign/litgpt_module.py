"""LitGPTModule: a LightningModule that pretrains a ``litgpt.GPT`` from scratch.

The module owns what the MSign paper's failure setup varies (initialisation, per-group learning
rates, the schedule) and nothing else: gradient clipping, precision and logging live in the
``Trainer``; weight repair and spectral monitoring live in callbacks.
"""

import dataclasses
import inspect
import math
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, Callable, Literal, Optional, Union

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from litgpt.config import Config
from litgpt.model import GPT, CausalSelfAttention, GptNeoxMLP, LLaMAMLP
from torch import Tensor, nn
from typing_extensions import override

from lightning_msign._validation import (
    check_betas,
    check_choice,
    check_non_negative_int,
    check_optional_positive_int,
    check_range,
)
from lightning_msign.distributed import is_sharded
from lightning_msign.metric_keys import TEST_LOSS, TRAIN_LOSS, TRAIN_Z_LOSS, VAL_LOSS
from lightning_msign.optim.groups import matrix_layouts
from lightning_msign.optim.numuon import Muon, NuMuon

__all__ = ["LitGPTModule", "build_config", "lr_schedule_factor"]

LRDecay = Literal["linear", "cosine", "constant"]
OptimizerName = Literal["adamw", "muon", "numuon"]
# Options of Muon / NuMuon the module sets itself from its own arguments.
_MODULE_OWNED_OPTIONS = ("lr", "weight_decay", "betas", "eps", "params")
_IGNORE_INDEX = -100


def build_config(
    model_config: Union[str, Mapping[str, Any], Config],
    vocab_size: Optional[int] = None,
    block_size: Optional[int] = None,
) -> Config:
    """Resolve ``model_config`` into a ``litgpt.Config``, applying vocabulary and context overrides.

    Args:
        model_config: A config name known to LitGPT (``"pythia-14m"``, resolved with
            ``Config.from_name``), a mapping of ``Config`` fields (``Config(**d)``), or a ``Config``.
        vocab_size: When given, sets both ``vocab_size`` and ``padded_vocab_size`` to this value, so
            the LM head has exactly one logit per token (no padding to ``padding_multiple``).
        block_size: When given, the model's maximum context length.

    Returns:
        A new ``Config``; a ``Config`` passed in is not modified.

    Raises:
        ValueError: If ``model_config`` is an unknown name, has an unknown field or inconsistent
            sizes, or is of an unsupported type.

    Example::

        >>> build_config({"n_layer": 2, "n_embd": 32, "n_head": 2}, vocab_size=256, block_size=64).padded_vocab_size
        256
    """
    overrides: dict[str, Any] = {}
    if vocab_size is not None:
        overrides.update(vocab_size=vocab_size, padded_vocab_size=vocab_size)
    if block_size is not None:
        overrides["block_size"] = block_size
    try:
        if isinstance(model_config, Config):
            return dataclasses.replace(model_config, **overrides)
        if isinstance(model_config, str):
            return Config.from_name(model_config, **overrides)
        if isinstance(model_config, Mapping):
            return Config(**{**model_config, **overrides})
    except (TypeError, ValueError, AssertionError) as err:
        # litgpt reports unknown names with ValueError, unknown fields with TypeError and
        # inconsistent sizes (n_embd % n_head) with bare asserts.
        raise ValueError(
            "`model_config` must be a litgpt config name, a dict of `litgpt.Config` fields or a `Config`"
            f" with consistent sizes, got {model_config!r}: {type(err).__name__}: {err}"
        ) from err
    raise ValueError(
        f"`model_config` must be a str, a dict or a `litgpt.Config`, got {type(model_config).__name__}:"
        f" {model_config!r}"
    )


def lr_schedule_factor(
    step: int,
    warmup_steps: int,
    max_steps: int,
    decay: LRDecay = "cosine",
    min_lr_ratio: float = 0.1,
) -> float:
    """Learning-rate multiplier at optimizer step ``step``: linear warm-up, then decay to a floor.

    .. math::

        f(t) = \\begin{cases}
            (t + 1) / T_w & t < T_w \\\\
            r + (1 - r)\\,d(p), \\quad p = \\min\\!\\left(1, \\frac{t - T_w}{\\max(1, T - T_w)}\\right) & t \\ge T_w
        \\end{cases}

    with :math:`d(p) = 1 - p` (linear), :math:`\\tfrac12(1 + \\cos \\pi p)` (cosine) or :math:`1`
    (constant), :math:`r` = ``min_lr_ratio``, :math:`T_w` = ``warmup_steps``, :math:`T` = ``max_steps``.
    So :math:`f` reaches 1 on the last warm-up step and :math:`r` at step ``max_steps`` (and stays there).

    Args:
        step: Zero-based optimizer step (``LambdaLR``'s ``last_epoch``).
        warmup_steps: Steps of linear warm-up; 0 disables warm-up.
        max_steps: Step at which the decay reaches ``min_lr_ratio``.
        decay: Shape of the decay after warm-up.
        min_lr_ratio: Final multiplier, in ``[0, 1]``.

    Returns:
        The multiplier (a Python float) applied to every parameter group's base learning rate.

    Example::

        >>> lr_schedule_factor(0, warmup_steps=10, max_steps=100)
        0.1
        >>> round(lr_schedule_factor(100, warmup_steps=10, max_steps=100), 6)
        0.1
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class _HParam:
    """A LightningModule attribute that is its hyperparameter ``self.hparams[key]`` (read and written there), so an
    argument is kept once; ``convert`` normalises what is read (e.g. a YAML list of betas to a tuple of floats)."""

    def __init__(self, key: Optional[str] = None, convert: Optional[Callable[[Any], Any]] = None) -> None:
        self.key, self.convert = key, convert

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = self.key or name

    def __get__(self, obj: Any, owner: Optional[type] = None) -> Any:
        if obj is None:
            return self
        value = obj.hparams[self.key]
        return value if self.convert is None else self.convert(value)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.hparams[self.key] = value


class LitGPTModule(L.LightningModule):
    """Pretrain a ``litgpt.GPT`` with AdamW, per-group learning rates and warm-up + decay.

    The knobs follow the failure setup of the MSign paper (arXiv 2602.01734, "NanoGPT-5M"): a
    muP-like initialisation (init std of the matrices, zero-initialised queries, residual output
    projections divided by :math:`\\sqrt{2 L}`), learning-rate multipliers for 2D weights and embeddings, AdamW
    with weight decay on matrices only, and linear warm-up followed by a linear or cosine decay to
    ``min_lr_ratio * lr``. The objective is next-token cross-entropy, optionally plus a z-loss
    (PaLM; Wortsman et al. 2023, arXiv 2309.14322) that keeps the softmax normaliser near 1:

    .. math::

        \\mathcal{L} = \\mathrm{CE}(z, y) + \\lambda_z \\, \\overline{\\left(\\log \\sum_j e^{z_j}\\right)^2}

    The model is built in ``__init__`` (``self.model``), so parameters can be inspected at once;
    ``rotary_percentage=0.0`` in the config gives the paper's "no positional encoding" and
    ``parallel_residual=False`` its sequential pre-LN blocks.
    Parameter groups of the optimizer (their ``name`` key, used by ``LearningRateMonitor``):

    - ``"weights"``: every parameter with ``ndim >= 2`` except the embeddings and LM head
      (attention and MLP matrices); learning rate ``lr * lr_mult_2d``, weight decay.
    - ``"embeddings"``: ``transformer.wte.weight`` and ``lm_head.weight``; learning rate
      ``lr * lr_mult_embedding``, weight decay.
    - ``"no_decay"``: parameters with ``ndim < 2`` (norm weights, biases); learning rate ``lr``,
      no weight decay.

    With ``optimizer="muon"`` or ``"numuon"`` the ``"weights"`` group has ``use_muon=True`` (and the layouts of
    its fused weights), the others ``use_muon=False``. Empty groups are dropped. The learning rate is not
    logged here: add ``lightning.pytorch.callbacks.LearningRateMonitor``, which logs ``lr/<group>`` (the
    scheduler is named ``"lr"``).

    Args:
        model_config: A LitGPT config name (``"pythia-14m"``), a dict of ``litgpt.Config`` fields
            (``{"n_layer": 6, "n_embd": 256, "n_head": 8, ...}``) or a ``litgpt.Config``. A ``Config``
            is stored in ``hparams`` as a plain dict so checkpoints reload without pickled classes.
        vocab_size: When given, overrides both ``vocab_size`` and ``padded_vocab_size`` of the config
            (the CLI links it from the data module). A bare ``Config`` otherwise pads to 512.
        block_size: When given, overrides the config's ``block_size`` (the CLI links the data
            module's ``seq_len``).
        lr: Peak (base) learning rate, reached at the end of warm-up.
        weight_decay: AdamW decoupled weight decay, applied to parameters with ``ndim >= 2`` only.
        betas: AdamW ``(beta1, beta2)``.
        eps: AdamW epsilon.
        warmup_steps: Optimizer steps of linear warm-up from ``lr / warmup_steps`` to ``lr``.
        lr_decay: Decay after warm-up: ``"linear"``, ``"cosine"`` or ``"constant"`` (no decay).
        min_lr_ratio: Final learning rate as a fraction of ``lr``, reached at ``max_steps``.
        max_steps: Step at which the decay ends; ``None`` uses ``trainer.estimated_stepping_batches``.
        init_std: Standard deviation of the normal init of every ``Linear`` and ``Embedding`` weight;
            ``None`` keeps LitGPT's ``GPT._init_weights`` (std 0.02). Biases start at zero.
        zero_init_query: Zero the query rows ``[0, n_head * head_size)`` of every fused
            ``attn.qkv.weight`` (and bias), so attention starts uniform.
        scale_residual_init: Divide ``attn.proj.weight`` and the MLP output ``mlp.proj.weight`` by
            :math:`\\sqrt{2 \\cdot n\\_layer}` after init (GPT-2 / muP residual scaling).
        lr_mult_2d: Learning-rate multiplier of the ``"weights"`` group.
        lr_mult_embedding: Learning-rate multiplier of the ``"embeddings"`` group.
        z_loss: Weight :math:`\\lambda_z` of the z-loss; 0 disables it.
        compile: Compile the GPT with ``torch.compile`` (default backend, inductor), as LitGPT's own
            pretraining does. It is compiled in place (``nn.Module.compile``) in ``configure_model``,
            when a Trainer sets the module up: parameter names, ``state_dict`` keys and the callbacks'
            target names stay those of the uncompiled model, so checkpoints load either way. Outside a
            Trainer, call ``configure_model()`` first. The first step pays for the compilation (tens of
            seconds on a CPU, even for a tiny model); do not also ``torch.compile`` the whole module.
        optimizer: ``"adamw"`` (``torch.optim.AdamW``), ``"muon"`` (:class:`lightning_msign.optim.Muon`) or
            ``"numuon"`` (:class:`lightning_msign.optim.NuMuon`). With Muon / NuMuon the ``"weights"`` group
            (every hidden matrix; fused Q/K/V split by the model's layout) takes Muon steps at
            ``lr * lr_mult_2d`` (scaled per matrix shape, ``adjust_lr_fn``: by default a full-rank update's RMS
            matches AdamW's, so the same ``lr`` serves Muon; NuMuon's is ``sqrt(rank_fraction)`` of that, so
            tune its ``lr``), the other groups AdamW steps with ``betas`` and ``eps``; every
            group keeps its ``weight_decay``. The step's metrics (``numuon/rank_fraction``,
            ``numuon/captured_energy``, ...) are logged every step.
        optimizer_options: further arguments of Muon / NuMuon (``momentum``, ``nesterov``,
            ``rank_fraction`` -- a float or a schedule dict --, ``krylov_iterations``, ``oversample``,
            ``backend``, ``ns_steps``, ``adjust_lr_fn``), checked here; ``None`` with ``"adamw"``.

    Raises:
        ValueError: If an argument is out of range (the message names it, the valid range and the
            value received), if ``model_config`` cannot be resolved, or if ``zero_init_query`` is
            set for a model without fused ``attn.qkv`` projections.

    Logged metrics:
        - ``train/loss``: cross-entropy of the training batch, every step (progress bar).
        - ``train/z_loss``: the weighted z-loss term added to the objective (only if ``z_loss > 0``).
        - ``val/loss`` / ``test/loss``: cross-entropy averaged over the epoch, synced over ranks.
        - ``numuon/rank_fraction``, ``numuon/captured_energy``, ``numuon/skipped_nonfinite`` (``optimizer="numuon"``)
          or ``muon/skipped_nonfinite`` (``"muon"``): what the step did, every step.

    Example::

        from lightning.pytorch import Trainer
        from lightning_msign import LitGPTModule, MSignCallback, ShakespeareDataModule

        # The shape of the MSign paper's NanoGPT-5M failure setup: 24 pre-LN blocks of width 48,
        # no positional encoding, no biases, zero-initialised queries, scaled residual projections,
        # LR x16 for matrices and x4 for embeddings, 2000 warm-up steps, linear decay to lr / 10.
        module = LitGPTModule(
            {"n_layer": 24, "n_embd": 48, "n_head": 6, "intermediate_size": 192,
             "rotary_percentage": 0.0, "parallel_residual": False, "bias": False},
            lr=6e-4, zero_init_query=True, scale_residual_init=True, lr_mult_2d=16.0,
            lr_mult_embedding=4.0, warmup_steps=2000, lr_decay="linear", min_lr_ratio=0.1,
        )
        trainer = Trainer(max_steps=30_000, gradient_clip_val=1.0, callbacks=[MSignCallback(period=100)])
        trainer.fit(module, datamodule=ShakespeareDataModule(seq_len=256))
    """

    lr = _HParam()
    weight_decay = _HParam()
    betas = _HParam(convert=check_betas)
    eps = _HParam()
    warmup_steps = _HParam()
    lr_decay = _HParam()
    min_lr_ratio = _HParam()
    max_steps = _HParam()
    init_std = _HParam()
    zero_init_query = _HParam()
    scale_residual_init = _HParam()
    lr_mult_2d = _HParam()
    lr_mult_embedding = _HParam()
    z_loss = _HParam()
    compile_model = _HParam("compile")  # not `compile`: that is `nn.Module.compile`
    optimizer_name = _HParam("optimizer")

    def __init__(
        self,
        model_config: Union[str, dict[str, Any], Config],
        vocab_size: Optional[int] = None,
        block_size: Optional[int] = None,
        lr: float = 6e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        warmup_steps: int = 100,
        lr_decay: LRDecay = "cosine",
        min_lr_ratio: float = 0.1,
        max_steps: Optional[int] = None,
        init_std: Optional[float] = None,
        zero_init_query: bool = False,
        scale_residual_init: bool = False,
        lr_mult_2d: float = 1.0,
        lr_mult_embedding: float = 1.0,
        z_loss: float = 0.0,
        compile: bool = False,
        optimizer: OptimizerName = "adamw",
        optimizer_options: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        check_optional_positive_int(vocab_size, "vocab_size")
        check_optional_positive_int(block_size, "block_size")
        check_range(lr, "lr", low=0.0, low_open=True)
        check_range(weight_decay, "weight_decay", low=0.0)
        check_betas(betas)
        check_range(eps, "eps", low=0.0, low_open=True)
        check_non_negative_int(warmup_steps, "warmup_steps")
        check_choice(lr_decay, "lr_decay", LRDecay)
        check_range(min_lr_ratio, "min_lr_ratio", low=0.0, high=1.0)
        check_optional_positive_int(max_steps, "max_steps")
        if max_steps is not None and warmup_steps > max_steps:
            raise ValueError(
                f"`warmup_steps` must be at most `max_steps` ({max_steps}), got {warmup_steps!r}"
            )
        if init_std is not None:
            check_range(init_std, "init_std", low=0.0, low_open=True)
        check_range(lr_mult_2d, "lr_mult_2d", low=0.0)
        check_range(lr_mult_embedding, "lr_mult_embedding", low=0.0)
        check_range(z_loss, "z_loss", low=0.0)
        if not isinstance(compile, bool):
            raise ValueError(f"`compile` must be a bool, got {compile!r}")
        check_choice(optimizer, "optimizer", OptimizerName)
        options = _check_optimizer_options(optimizer, optimizer_options)

        config = build_config(model_config, vocab_size=vocab_size, block_size=block_size)

        self.save_hyperparameters()
        if isinstance(model_config, Config):
            # A plain dict reloads with `weights_only=True` and writes cleanly to hparams.yaml.
            self.save_hyperparameters({"model_config": dataclasses.asdict(model_config)})

        # The arguments are read from (and, as `lr_find` does for `lr`, written to) `self.hparams` through the
        # `_HParam` attributes below: one copy, the one the checkpoint and hparams.yaml hold.
        self.optimizer_options = options  # validated and normalised (not the argument as given)

        self.model = GPT(config)
        self.reset_parameters()

    @property
    def config(self) -> Config:
        """The resolved ``litgpt.Config`` of ``self.model``."""
        return self.model.config

    @override
    @torch.compiler.disable
    def log(self, *args: Any, **kwargs: Any) -> None:
        """``LightningModule.log``, kept out of ``torch.compile`` graphs.

        ``trainer.fit(torch.compile(module))`` traces ``training_step``; with torch 2.12/2.13 and lightning
        <= 2.6.6 tracing ``self.log`` fails (Lightning-AI/pytorch-lightning#21836, fixed upstream the same way).
        """
        super().log(*args, **kwargs)

    @override
    def configure_model(self) -> None:
        """Shard the model with FSDP2 under ``ModelParallelStrategy``; a no-op under any other strategy.

        Each transformer block, then the whole GPT, is wrapped with ``fully_shard`` over the strategy's
        ``"data_parallel"`` mesh dimension (as LitGPT's own FSDP recipes wrap per ``Block``): parameters
        become ``DTensor`` s sharded on their first dimension, which the suite's callbacks gather whole.
        Tensor parallelism (``tensor_parallel_size > 1``) is not implemented by this module.

        With ``compile=True`` the GPT is compiled here first (once; compilation is lazy, so it traces
        the sharded model at its first forward).
        """
        if self.compile_model and self.model._compiled_call_impl is None:  # dropped on pickling: redo then
            self.model.compile()
        mesh = self.device_mesh
        if mesh is None or is_sharded(self.model.lm_head.weight):  # not model-parallel, or already sharded
            return
        from torch.distributed.fsdp import fully_shard

        names = mesh.mesh_dim_names or ()
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise NotImplementedError(
                "LitGPTModule shards with FSDP2 only: use ModelParallelStrategy(tensor_parallel_size=1), got a"
                f" tensor-parallel size of {mesh['tensor_parallel'].size()}"
            )
        dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh
        for block in self.model.transformer.h:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(self.model, mesh=dp_mesh)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise the weights as configured (called once in ``__init__``).

        Order: normal init (``init_std`` or LitGPT's 0.02) of ``Linear``/``Embedding`` weights with
        zero biases; then the residual scaling; then zeroing of the query rows.
        """
        model = self.model
        if self.init_std is None:
            model.apply(model._init_weights)
        else:
            std = self.init_std
            for module in model.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                    if getattr(module, "bias", None) is not None:
                        nn.init.zeros_(module.bias)

        if self.scale_residual_init:
            scale = 1.0 / math.sqrt(2 * self.config.n_layer)
            for module in model.modules():
                # LLaMAMoE experts are LLaMAMLPs (GemmaMLP subclasses LLaMAMLP), so they are covered.
                if isinstance(module, (CausalSelfAttention, GptNeoxMLP, LLaMAMLP)):
                    module.proj.weight.mul_(scale)

        if self.zero_init_query:
            attentions = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
            if not attentions:
                raise ValueError(
                    "`zero_init_query` needs fused `attn.qkv` projections (litgpt CausalSelfAttention),"
                    f" got a model without any (config {self.config.name!r})"
                )
            query_size = self.config.n_head * self.config.head_size
            for attn in attentions:
                attn.qkv.weight[:query_size].zero_()  # (n_head * head_size, n_embd): the Q rows
                if attn.qkv.bias is not None:
                    attn.qkv.bias[:query_size].zero_()

    @override
    def forward(self, input_ids: Tensor) -> Tensor:
        """Logits of shape ``(B, T, padded_vocab_size)`` for ``input_ids`` of shape ``(B, T)``."""
        return self.model(input_ids)

    def _loss(self, batch: Any) -> tuple[Tensor, Tensor]:
        """Cross-entropy and (unweighted) mean squared log-normaliser of one batch."""
        input_ids, targets = _unpack_batch(batch)
        logits = self(input_ids).float()  # (B, T, V); float32 even under bf16 autocast
        logits = logits.reshape(-1, logits.size(-1))  # (B*T, V)
        targets = targets.reshape(-1)  # (B*T,)
        ce = F.cross_entropy(logits, targets, ignore_index=_IGNORE_INDEX)
        if self.z_loss > 0:
            valid = targets != _IGNORE_INDEX
            z_sq = torch.logsumexp(logits[valid], dim=-1).square().mean()
        else:
            z_sq = ce.new_zeros(())
        return ce, z_sq

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        ce, z_sq = self._loss(batch)
        self.log(TRAIN_LOSS, ce, on_step=True, on_epoch=False, prog_bar=True)
        if self.z_loss > 0:
            z_term = self.z_loss * z_sq
            self.log(TRAIN_Z_LOSS, z_term, on_step=True, on_epoch=False)
            return ce + z_term
        return ce

    def curvature_loss(self, batch: Any) -> Tensor:
        """The training objective of ``batch`` (cross-entropy plus the weighted z-loss), logging nothing.

        :class:`~lightning_msign.CurvatureMonitor` differentiates it twice to measure the curvature.
        """
        ce, z_sq = self._loss(batch)
        return ce + self.z_loss * z_sq if self.z_loss > 0 else ce

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Log what a Muon / NuMuon step did (:meth:`lightning_msign.optim.NuMuon.metrics`)."""
        if self.optimizer_name == "adamw" or self._trainer is None:
            return
        optimizer = self.optimizers(use_pl_optimizer=False)
        if isinstance(optimizer, NuMuon):
            metrics = optimizer.metrics()
            if metrics:
                self.log_dict(metrics, on_step=True, on_epoch=False)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        ce, _ = self._loss(batch)
        self.log(VAL_LOSS, ce, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return ce

    @override
    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        ce, _ = self._loss(batch)
        self.log(TEST_LOSS, ce, on_step=False, on_epoch=True, sync_dist=True)
        return ce

    def param_groups(self) -> list[dict[str, Any]]:
        """The optimizer parameter groups (``name``, ``params``, ``lr``, ``weight_decay``); see the class docstring."""
        embedding_params = {id(self.model.transformer.wte.weight), id(self.model.lm_head.weight)}
        weights: list[nn.Parameter] = []
        embeddings: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.model.parameters():  # deduplicated, so tied weights appear once
            if not param.requires_grad:
                continue
            if id(param) in embedding_params:
                embeddings.append(param)
            elif param.ndim >= 2:
                weights.append(param)
            else:
                no_decay.append(param)
        groups = [
            {"name": "weights", "params": weights, "lr": self.lr * self.lr_mult_2d, "weight_decay": self.weight_decay},
            {
                "name": "embeddings",
                "params": embeddings,
                "lr": self.lr * self.lr_mult_embedding,
                "weight_decay": self.weight_decay,
            },
            {"name": "no_decay", "params": no_decay, "lr": self.lr, "weight_decay": 0.0},
        ]
        if self.optimizer_name != "adamw":
            layouts = matrix_layouts(self.model)
            missing = [p for p in weights if id(p) not in layouts]
            if missing:  # not expected for a LitGPT model: its matrices are all in the catalog
                raise ValueError(f"{len(missing)} matrices of the model have no known layout for Muon")
            groups[0].update(use_muon=True, layouts=[layouts[id(p)][1] for p in weights])
            groups[1]["use_muon"] = groups[2]["use_muon"] = False
        return [group for group in groups if group["params"]]

    @override
    def configure_optimizers(self) -> dict[str, Any]:
        max_steps = self.max_steps
        if max_steps is None:
            estimated = self.trainer.estimated_stepping_batches
            if not math.isfinite(estimated):
                if self.lr_decay != "constant":
                    raise ValueError(
                        "`max_steps` must be set (or the Trainer must have finite `max_steps`/`max_epochs`)"
                        f" for `lr_decay={self.lr_decay!r}`, got max_steps=None and an infinite"
                        " `trainer.estimated_stepping_batches`"
                    )
                estimated = max(self.warmup_steps, 1)
            max_steps = int(estimated)
            if self.warmup_steps > max_steps:
                rank_zero_warn(
                    f"`warmup_steps` ({self.warmup_steps}) exceeds the {max_steps} optimizer steps of this run:"
                    " the learning rate never reaches `lr` and never decays"
                )
        optimizer: torch.optim.Optimizer
        if self.optimizer_name == "adamw":
            optimizer = torch.optim.AdamW(self.param_groups(), lr=self.lr, betas=self.betas, eps=self.eps)
        else:
            cls = Muon if self.optimizer_name == "muon" else NuMuon
            optimizer = cls(
                self.param_groups(), lr=self.lr, weight_decay=self.weight_decay, betas=self.betas, eps=self.eps,
                **self.optimizer_options,
            )
        factor = partial(
            lr_schedule_factor,
            warmup_steps=self.warmup_steps,
            max_steps=max_steps,
            decay=self.lr_decay,
            min_lr_ratio=self.min_lr_ratio,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }


def _check_optimizer_options(optimizer: str, options: Optional[dict[str, Any]]) -> dict[str, Any]:
    """Validate ``optimizer_options`` against the chosen optimizer now, not at the first step."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ValueError(f"`optimizer_options` must be None or a dict of Muon / NuMuon arguments, got {options!r}")
    options = dict(options)
    if optimizer == "adamw":
        if options:
            raise ValueError(
                "`optimizer_options` applies to optimizer='muon' or 'numuon'; AdamW takes the module's own `lr`,"
                f" `weight_decay`, `betas` and `eps`, got optimizer='adamw' with {options!r}"
            )
        return options
    owned = sorted(set(options) & set(_MODULE_OWNED_OPTIONS))
    if owned:
        raise ValueError(f"`optimizer_options` must not set {owned}: they are LitGPTModule arguments of their own")
    cls = Muon if optimizer == "muon" else NuMuon
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", *_MODULE_OWNED_OPTIONS}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"`optimizer_options` keys {unknown} are not arguments of {cls.__name__}: {sorted(allowed)}")
    cls([nn.Parameter(torch.zeros(2, 2))], **options)  # raises ValueError naming a bad value
    return options


def _unpack_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """``(input_ids, targets)`` from a ``{"input_ids", "targets"}`` dict or a 2-sequence."""
    if isinstance(batch, Mapping):
        if "input_ids" in batch and "targets" in batch:
            return batch["input_ids"], batch["targets"]
    elif isinstance(batch, Sequence) and len(batch) == 2:
        return batch[0], batch[1]
    keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
    raise ValueError(
        f"`batch` must be a dict with 'input_ids' and 'targets' or an (input_ids, targets) pair, got {keys!r}"
    )
