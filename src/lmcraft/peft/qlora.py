"""QLoRA (Dettmers et al. 2023): LoRA adapters on a base model whose linear layers are frozen NF4 weights.

    y = dequant(W_nf4) x + b + s B A x          (A, B in `compute_dtype`; W dequantised per forward, see nf4.py)

Only the adapters train; gradients flow through the dequantised weight to earlier layers' adapters. The adapter
itself is an ordinary LoRA adapter and is saved in PEFT's LoRA layout (PEFT stores no quantisation in adapter
files either); `lmcraft_config.json` next to it records the NF4 settings so `load_adapter` quantises the base the
same way. `merge` dequantises and returns plain floating-point linear layers with the update folded in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmcraft.peft.layers import find_modules
from lmcraft.peft.lora import LLAMA_LINEARS, LoraConfig, attach_lora
from lmcraft.peft.model import PeftModel
from lmcraft.peft.nf4 import NF4Linear
from lmcraft.peft.registry import check_choice, register

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def quantize_model(model: nn.Module, targets: list[str] | str = LLAMA_LINEARS, blocksize: int = 64,
                   double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every matching `nn.Linear` by a frozen `NF4Linear`; returns how many were replaced."""
    found = find_modules(model, targets, (nn.Linear,))
    for parent, attr, module, _ in found:
        setattr(parent, attr, NF4Linear(module, blocksize, double_quant, compute_dtype))
    return len(found)


@register
@dataclass(kw_only=True)
class QLoraConfig(LoraConfig):
    """LoRA on an NF4-quantised base. `quantize_modules`: which linear layers are stored in 4 bits."""

    method = "qlora"
    target_modules: list[str] | str = field(default_factory=lambda: list(LLAMA_LINEARS))
    quantize_modules: list[str] = field(default_factory=lambda: list(LLAMA_LINEARS))
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("compute_dtype", self.compute_dtype, DTYPES)
        if self.blocksize < 2 or self.blocksize % 2:
            raise ValueError(f"blocksize must be an even number >= 2, got {self.blocksize}")

    def inject(self, model: PeftModel, adapter: str) -> None:
        quantize_model(model.base_model, self.quantize_modules, self.blocksize, self.double_quant,
                       DTYPES[self.compute_dtype])
        attach_lora(model, adapter, self)
