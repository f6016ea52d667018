"""What the suite knows of each model family, one module per family (see :mod:`lightning_msign.families.base`).

Built in, asked in this order (a family registered with :func:`register_family` comes first): LitGPT,
``torch.nn.MultiheadAttention``, HF GPT-2, HF GPTBigCode, HF GPT-NeoX, HF Phi-3, HF Llama / Mistral / Qwen2 / Qwen3 /
Mixtral, HF Qwen2-MoE, HF T5 / mT5, HF DBRX, HF DeepSeek-V2 / V3 (MLA), HF Falcon / BLOOM / MPT, HF GPT-J, HF BERT /
RoBERTa / ViT, HF BART / mBART / Marian / Whisper / OPT, HF CLIP / SigLIP / Phi, transformers-5 expert tensors, the
attention and MLP classes of any other HF family with separate projections (checked against its config), nanoGPT.

A user's family, in a few lines::

    from lightning_msign.families import Family, linears, register_family

    class MyNet(Family):
        name = "MyNet"

        def read(self, module):
            if type(module).__name__ == "MyAttention" and type(module).__module__ == "mynet.model":
                return {**linears(module, "q", "to_q"), **linears(module, "k", "to_k"),
                        **linears(module, "v", "to_v"), **linears(module, "attn_out", "to_out")}
            return None

    register_family(MyNet())
"""

from lightning_msign.families.bart import BART
from lightning_msign.families.base import (
    HF_TUPLE,
    ROLES,
    TENSOR,
    BlockInfo,
    Family,
    Found,
    attention_probe,
    block_attentions,
    block_info,
    block_stack,
    install_qk_norm,
    int_attr,
    is_transformers,
    linears,
    qk_norm_classes,
    qualified_name,
    read_model,
    readme_table,
    register_family,
    registered_families,
    rows,
    supported_attention,
    unregister_family,
    weight_of,
)
from lightning_msign.families.bert import BERT
from lightning_msign.families.bigcode import GPTBigCode
from lightning_msign.families.clip import CLIP
from lightning_msign.families.dbrx import DBRX
from lightning_msign.families.deepseek import DeepSeekMLA
from lightning_msign.families.falcon_bloom_mpt import FalconBloomMPT
from lightning_msign.families.gpt2 import GPT2
from lightning_msign.families.gptj import GPTJ
from lightning_msign.families.hf_experts import ExpertTensors
from lightning_msign.families.hf_generic import HFSeparateProjections
from lightning_msign.families.litgpt import LitGPT
from lightning_msign.families.llama import LlamaLike
from lightning_msign.families.nanogpt import NanoGPT
from lightning_msign.families.neox import GPTNeoX
from lightning_msign.families.phi3 import Phi3
from lightning_msign.families.qk_norm import SwitchedNorm
from lightning_msign.families.qwen2_moe import Qwen2MoE
from lightning_msign.families.t5 import T5
from lightning_msign.families.torch_mha import TorchMultiheadAttention

BUILT_IN: tuple[Family, ...] = (
    LitGPT(), TorchMultiheadAttention(), GPT2(), GPTBigCode(), GPTNeoX(), Phi3(), LlamaLike(), Qwen2MoE(), T5(), DBRX(),
    DeepSeekMLA(), FalconBloomMPT(), GPTJ(), BERT(), BART(), CLIP(), ExpertTensors(), HFSeparateProjections(),
    NanoGPT(),
)
"""The built-in families, in the order they are asked."""

for _family in BUILT_IN:
    register_family(_family, first=False)

__all__ = [
    "BUILT_IN",
    "HF_TUPLE",
    "ROLES",
    "SwitchedNorm",
    "TENSOR",
    "BlockInfo",
    "Family",
    "Found",
    "attention_probe",
    "block_attentions",
    "block_stack",
    "block_info",
    "install_qk_norm",
    "int_attr",
    "is_transformers",
    "linears",
    "qk_norm_classes",
    "qualified_name",
    "read_model",
    "readme_table",
    "register_family",
    "registered_families",
    "rows",
    "supported_attention",
    "unregister_family",
    "weight_of",
]
