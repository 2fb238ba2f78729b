"""(IA)^3 (Liu et al. 2022): learned vectors that rescale keys, values and the FFN intermediate activation.

    k = l_k * (W_k x + b_k),   v = l_v * (W_v x + b_v)         (output scaling, l: out)
    FFN: y = W_down (l_ff * h) + b                              (input scaling of down_proj, l_ff: intermediate)

All l start at 1, so the model equals the base at init. Merging is exact:
output scaling W' = diag(l) W, b' = l * b;  input scaling W' = W diag(l).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lmcraft.peft.layers import AdapterLayer, find_modules, wrap_targets
from lmcraft.peft.model import PeftModel
from lmcraft.peft.registry import MethodConfig, register


class IA3Linear(AdapterLayer):
    """A frozen `nn.Linear` whose output (or, for feed-forward layers, input) is scaled by a learned vector."""

    adapter_containers = ("ia3_l",)

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.feedforward: dict[str, bool] = {}

    def add(self, adapter: str, feedforward: bool, init_ones: bool = True) -> None:
        """`ia3_l` has PEFT's shape: (1, in) for feed-forward layers, (out, 1) otherwise."""
        w = self.base_layer.weight
        shape = (1, w.shape[1]) if feedforward else (w.shape[0], 1)
        init = torch.ones if init_ones else torch.rand
        self.ia3_l[adapter] = nn.Parameter(init(shape, device=w.device, dtype=w.dtype))
        self.feedforward[adapter] = feedforward

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.feedforward.pop(adapter, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.active
        if a is None or a not in self.ia3_l:
            return self.base_layer(x)
        scale = self.ia3_l[a].flatten()
        if self.feedforward[a]:
            return self.base_layer(x * scale.to(x.dtype))
        out = self.base_layer(x)
        return out * scale.to(out.dtype)

    def merge_adapter(self, adapter: str) -> nn.Module:
        base = self.base_layer
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        scale = self.ia3_l[adapter].detach()
        with torch.no_grad():
            merged.weight.copy_(base.weight * scale)  # (1, in) scales columns, (out, 1) scales rows
            if base.bias is not None:
                merged.bias.copy_(base.bias if self.feedforward[adapter] else base.bias * scale.flatten())
        return merged.requires_grad_(False)


@register
@dataclass(kw_only=True)
class IA3Config(MethodConfig):
    """(IA)^3. `feedforward_modules` (a subset of `target_modules`) get input scaling; the rest output scaling.

    `init_ia3_weights=False` starts the vectors random in [0, 1) instead of 1 (for tests).
    """

    method = "ia3"
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"feedforward_modules {extra} must also be listed in target_modules")

    def inject(self, model: PeftModel, adapter: str) -> None:
        feedforward = {path for *_, path in find_modules(model.base_model, self.feedforward_modules,
                                                           (nn.Linear, IA3Linear))}
        for layer, path in wrap_targets(model.base_model, self.target_modules, (nn.Linear,), IA3Linear,
                                        f"IA3 ({adapter})"):
            layer.add(adapter, path in feedforward, self.init_ia3_weights)
