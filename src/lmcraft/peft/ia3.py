"""(IA)^3 (Liu et al. 2022): learned vectors that rescale keys, values and the FFN intermediate activation.

    k = l_k * (W_k x + b_k),   v = l_v * (W_v x + b_v)         (output scaling, l: out)
    FFN: y = W_down (l_ff * h) + b                              (input scaling of down_proj, l_ff: intermediate)

All l start at 1, so the model equals the base at init. Merging is exact:
output scaling W' = diag(l) W, b' = l * b;  input scaling W' = W diag(l).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmcraft.peft.base import (
    MethodConfig,
    modules_to_save_from_peft,
    peft_modules_to_save,
    peft_task_type,
    register,
    reject_unsupported,
)
from lmcraft.peft.model import AdapterLayer, PeftError, PeftModel, wrap_targets


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
    peft_type = "IA3"
    target_modules: list[str] = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] = field(default_factory=lambda: ["down_proj"])
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
        if extra:
            raise ValueError(f"feedforward_modules {extra} must also be listed in target_modules")

    def inject(self, model: PeftModel, adapter: str) -> None:
        for layer, path in wrap_targets(model.base_model, self.target_modules, (nn.Linear,), IA3Linear,
                                        f"IA3 ({adapter})"):
            ff = any(path == t or path.endswith("." + t) for t in self.feedforward_modules)
            layer.add(adapter, ff, self.init_ia3_weights)

    def to_peft(self, model: PeftModel, adapter: str) -> dict[str, Any]:
        return {
            "auto_mapping": None, "exclude_modules": None, "fan_in_fan_out": False,
            "feedforward_modules": list(self.feedforward_modules), "inference_mode": True,
            "init_ia3_weights": self.init_ia3_weights,
            "modules_to_save": peft_modules_to_save(model, self.modules_to_save), "peft_type": "IA3",
            "revision": None, "target_modules": list(self.target_modules), "task_type": peft_task_type(model),
        }

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> IA3Config:
        reject_unsupported(data, {"exclude_modules": None, "fan_in_fan_out": False}, "IA3 adapter")
        targets, ff = data.get("target_modules"), data.get("feedforward_modules")
        if isinstance(targets, str) or isinstance(ff, str):
            raise PeftError("IA3 adapter: regular-expression target_modules/feedforward_modules are not supported; "
                            "list the module names instead.")
        return cls(target_modules=sorted(targets or ["k_proj", "v_proj", "down_proj"]),
                   feedforward_modules=sorted(ff or []),
                   init_ia3_weights=data.get("init_ia3_weights", True) is not False,
                   modules_to_save=modules_to_save_from_peft(data))
