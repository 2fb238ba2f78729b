"""Bottleneck adapters: Houlsby et al. 2019 (after attention and after the FFN) and Pfeiffer et al. 2021 (after the
FFN only).

The adapter acts on a sub-layer's output h (hidden size d) before the block's residual/normalisation:

    A(h) = h + W_up f(W_down h + b_down) + b_up          W_down: m x d,  W_up: d x m (zeros), m = d / reduction
    gated (UniPELT): A(h) = h + sigmoid(w_g^T h + c) * (W_up f(W_down h + b_down) + b_up)

W_up and b_up start at zero, so A is the identity and the model equals the base at init. The sub-layer modules
(`self_attn`, `mlp`) are wrapped, not patched: the wrapper calls the original module and applies A to its output.
The non-linearity f makes A impossible to merge into the surrounding weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmcraft.models.layers import ACTIVATIONS
from lmcraft.peft.layers import AdapterLayer, wrap_targets
from lmcraft.peft.model import PeftModel
from lmcraft.peft.registry import MethodConfig, check_choice, check_positive, register

STYLE_TARGETS = {"houlsby": ["self_attn", "mlp"], "pfeiffer": ["mlp"]}


class Bottleneck(nn.Module):
    """h -> h + W_up f(W_down h) (optionally gated); see the module docstring."""

    def __init__(self, hidden: int, bottleneck: int, activation: str, gated: bool, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, bottleneck, device=device, dtype=dtype)
        self.up = nn.Linear(bottleneck, hidden, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[activation]
        self.gate = nn.Linear(hidden, 1, device=device, dtype=dtype) if gated else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        delta = self.up(self.act(self.down(h)))
        if self.gate is not None:
            delta = delta * torch.sigmoid(self.gate(h))
        return h + delta


class AdapterWrapper(AdapterLayer):
    """A sub-layer (attention or MLP) followed by the active adapter's bottleneck."""

    adapter_containers = ("adapter",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter = nn.ModuleDict()

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        return self.adapter[self.active](out) if self.active in self.adapter else out


def attach_adapters(model: PeftModel, adapter: str, cfg: AdapterConfig, gated: bool = False) -> None:
    hidden = model.base_model.config.hidden_size
    ref = next(model.base_model.parameters())
    size = max(1, hidden // cfg.reduction_factor)
    for layer, _ in wrap_targets(model.base_model, STYLE_TARGETS[cfg.style], (nn.Module,), AdapterWrapper,
                                 f"adapter ({adapter})"):
        layer.adapter[adapter] = Bottleneck(hidden, size, cfg.activation, gated, ref.dtype, ref.device)


@register
@dataclass(kw_only=True)
class AdapterConfig(MethodConfig):
    """Bottleneck adapters; bottleneck size = hidden_size // reduction_factor."""

    method = "adapter"
    style: Literal["houlsby", "pfeiffer"] = "houlsby"
    reduction_factor: int = 16
    activation: Literal["relu", "gelu", "gelu_tanh", "silu"] = "relu"

    def __post_init__(self) -> None:
        check_choice("style", self.style, STYLE_TARGETS)
        check_choice("activation", self.activation, ACTIVATIONS)
        check_positive("reduction_factor", self.reduction_factor)

    def inject(self, model: PeftModel, adapter: str) -> None:
        attach_adapters(model, adapter, self)
