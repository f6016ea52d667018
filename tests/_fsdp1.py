"""FSDP1 (``FullyShardedDataParallel``) on CPU processes, for the multi-process tests (imported, not collected).

Lightning's ``FSDPStrategy`` wraps with ``device_id=root_device.index``, which is ``None`` on CPU, and torch's
FSDP1 refuses that; on a GPU it is the device's index. Everything else here is Lightning's own path:

- :class:`CPUFSDPStrategy` wraps the whole LightningModule as Lightning does (``auto_wrap_policy``, sharding
  strategy, mixed precision from the precision plugin, ``use_orig_params=True``), passing the CPU device;
  Lightning accepts a subclass of ``FSDPStrategy`` on CPU (only the exact class is refused there).
- :class:`SelfWrappingLitGPT` wraps its blocks and its GPT itself in ``configure_model`` (Lightning's manual
  wrapping: the strategy then leaves it as it is), so the FSDP root lies inside the LightningModule.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, wrapping with ``device_id=torch.device("cpu")``."""

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
            return model
        return super()._setup_model(model)


def self_wrapping_module(**kwargs: Any):
    """A tiny LitGPT (tests/conftest.py's) that wraps each block, then its GPT, with FSDP1 in configure_model."""
    from lightning_msign import LitGPTModule

    from conftest import TINY_CONFIG, TINY_SEQ, TINY_VOCAB

    class SelfWrappingLitGPT(LitGPTModule):
        def configure_model(self) -> None:
            if isinstance(self.model, FSDP):
                return
            from torch.distributed.fsdp.wrap import wrap  # inside Lightning's enable_wrap: the strategy's settings

            for i, block in enumerate(self.model.transformer.h):
                self.model.transformer.h[i] = wrap(block, device_id=torch.device("cpu"))
            self.model = wrap(self.model, device_id=torch.device("cpu"))

    kwargs.setdefault("lr", 3e-3)
    kwargs.setdefault("warmup_steps", 2)
    return SelfWrappingLitGPT(dict(TINY_CONFIG), vocab_size=TINY_VOCAB, block_size=TINY_SEQ, **kwargs)


def job_strategy(name: str) -> Any:
    """The Trainer strategy of the 2-process test jobs: ``ddp`` / ``ddp_spawn`` as they are, ``fsdp2``
    (``ModelParallelStrategy``), ``fsdp1`` (a unit per ``Block``) and ``fsdp1_manual`` (the module wraps itself)."""
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "fsdp1":
        from litgpt.model import Block

        return CPUFSDPStrategy(auto_wrap_policy={Block}, state_dict_type="sharded")
    if name == "fsdp1_manual":
        return CPUFSDPStrategy(state_dict_type="sharded")
    return name


def roots(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The outermost FSDP units of ``model`` (the strategy's model)."""
    return FSDP.fsdp_modules(model, root_only=True) if not isinstance(model, FSDP) else [model]
