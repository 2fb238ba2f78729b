"""UniPELT (Mao et al. 2022): LoRA, prefix tuning and a bottleneck adapter together, each behind a learned gate.

    LoRA on q/v:   y = W0 x + sigmoid(w_L^T x + c_L) * s B A x                 (lora.py, gated)
    prefix:        K_l, V_l scaled by sigmoid(g_l)                            (prefix.py, gated)
    adapter:       A(h) = h + sigmoid(w_A^T h + c_A) * W_up f(W_down h)      (adapter.py, gated)

The gates let the model weight (or switch off) each sub-method per layer/token. Built from the other methods'
modules; nothing is re-implemented here. The gates depend on the input, so UniPELT cannot be merged; it is saved
in lmcraft's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmcraft.peft.adapter import AdapterConfig, attach_adapters
from lmcraft.peft.lora import LoraConfig, attach_lora
from lmcraft.peft.model import PeftModel
from lmcraft.peft.prefix import PrefixConfig, attach_prefix
from lmcraft.peft.registry import MethodConfig, register


@register
@dataclass(kw_only=True)
class UniPELTConfig(MethodConfig):
    """The three sub-methods' main settings; see LoraConfig, PrefixConfig and AdapterConfig for their meaning."""

    method = "unipelt"
    lora_r: int = 8
    lora_alpha: float = 16
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    num_virtual_tokens: int = 10
    prefix_hidden_size: int = 512
    adapter_style: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    adapter_reduction_factor: int = 16

    def parts(self) -> tuple[LoraConfig, PrefixConfig, AdapterConfig]:
        return (LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, target_modules=self.lora_target_modules),
                PrefixConfig(num_virtual_tokens=self.num_virtual_tokens, encoder_hidden_size=self.prefix_hidden_size),
                AdapterConfig(style=self.adapter_style, reduction_factor=self.adapter_reduction_factor))

    def __post_init__(self) -> None:
        self.parts()  # validates every sub-config

    def inject(self, model: PeftModel, adapter: str) -> None:
        lora, prefix, adapters = self.parts()
        attach_lora(model, adapter, lora, gated=True)
        attach_prefix(model, adapter, prefix, gated=True)
        attach_adapters(model, adapter, adapters, gated=True)
