"""BitFit (Ben Zaken et al. 2022): train only the bias terms (and optionally the task head).

The base biases stay frozen; each adapter learns an additive delta on them, so several adapters can share one
base and `disable_adapters()` gives the original model back:

    y = f(x) + delta_b          (f: a linear layer or LayerNorm that has a bias; delta_b starts at 0)

Models without biases (Llama) have nothing to train; `add_missing_biases: true` also gives every bias-less
linear layer of the blocks a delta (a new bias, zero at init). Merging adds delta_b into the bias (creating one on
bias-less linear layers, which a Llama checkpoint then has to carry).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmcraft.peft.layers import AdapterLayer, PeftError, find_modules
from lmcraft.peft.model import PeftModel
from lmcraft.peft.registry import MethodConfig, register


class BiasDelta(AdapterLayer):
    """A frozen module with a bias (or a bias-less linear layer) plus a learned additive bias delta."""

    adapter_containers = ("bias_delta",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.bias_delta = nn.ParameterDict()

    def add(self, adapter: str) -> None:
        w = self.base_layer.weight
        self.bias_delta[adapter] = nn.Parameter(torch.zeros(w.shape[0], device=w.device, dtype=w.dtype))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        return out + self.bias_delta[self.active].to(out.dtype) if self.active in self.bias_delta else out

    def merge_adapter(self, adapter: str) -> nn.Module:
        merged = copy.deepcopy(self.base_layer)
        delta = self.bias_delta[adapter].detach()
        with torch.no_grad():
            if merged.bias is None:
                merged.bias = nn.Parameter(delta.clone(), requires_grad=False)
            else:
                merged.bias.add_(delta)
        return merged.requires_grad_(False)


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


@register
@dataclass(kw_only=True)
class BitFitConfig(MethodConfig):
    """BitFit: every bias of the blocks and embeddings trains; `train_head` also trains a copy of the head."""

    method = "bitfit"
    train_head: bool = False
    add_missing_biases: bool = False

    def __post_init__(self) -> None:
        if self.train_head and "head" not in self.modules_to_save:
            self.modules_to_save = [*self.modules_to_save, "head"]

    def inject(self, model: PeftModel, adapter: str) -> None:
        found = find_modules(model.base_model, r"model\..*", (nn.Linear, nn.LayerNorm, BiasDelta))
        selected = [(parent, attr, module) for parent, attr, module, _ in found
                    if isinstance(module, BiasDelta) or _has_bias(module)
                    or (self.add_missing_biases and isinstance(module, nn.Linear))]
        if not selected:
            raise PeftError("BitFit: the model has no bias terms to train (Llama-style models have none); set "
                            "add_missing_biases: true to give its linear layers trainable biases.")
        for parent, attr, module in selected:
            if not isinstance(module, BiasDelta):
                module = BiasDelta(module)
                setattr(parent, attr, module)
            module.add(adapter)
