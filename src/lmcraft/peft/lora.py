"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) on linear layers.

For a frozen linear layer y = W0 x + b (W0: out x in), adapter `a` adds a rank-r update:

    LoRA:    y = W0 x + b + s B A drop(x),       A: r x in (Kaiming-uniform), B: out x r (zeros) => y = base at init
             s = alpha / r            (rsLoRA: s = alpha / sqrt(r), which keeps the update's scale stable in r)
    DoRA:    y = m / ||W0 + s B A||_row * (W0 x + s B A x) + b
             m (out,) starts at ||W0||_row, so again y = base at init; the row norm is treated as a constant in the
             backward pass (DoRA section 4.3, as PEFT does).
    gated:   y = W0 x + b + sigmoid(g^T x + c) s B A x      (UniPELT's LoRA gate; not mergeable)

Merging: W = W0 + s B A, and for DoRA W = m / ||W0 + s B A||_row * (W0 + s B A).

Several named adapters can live on one layer; `PeftModel.set_adapter` picks the active one, and
`PeftModel.disable_adapters()` gives back the base model (the reference model of DPO).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
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
from lmcraft.peft.nf4 import NF4Linear, dense_weight

LINEAR_TYPES = (nn.Linear, NF4Linear)
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRALinear(AdapterLayer):
    """A frozen linear layer (`nn.Linear` or `NF4Linear`) plus named low-rank updates; math in the module doc."""

    adapter_containers = ("lora_A", "lora_B", "lora_magnitude_vector", "lora_gate", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.lora_gate = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, adapter: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            use_dora: bool = False, gated: bool = False, zero_init_b: bool = True) -> None:
        ref = dense_weight(self.base_layer)
        kw = dict(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, **kw)  # Kaiming-uniform (a=sqrt 5)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, **kw)
        if zero_init_b:
            nn.init.zeros_(self.lora_B[adapter].weight)
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if use_dora:
            with torch.no_grad():
                self.lora_magnitude_vector[adapter] = nn.Parameter(self._combined_weight(adapter).norm(dim=1))
        if gated:
            self.lora_gate[adapter] = nn.Linear(self.in_features, 1, **kw)

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.scaling.pop(adapter, None)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """s B A (out x in)."""
        return self.scaling[adapter] * (self.lora_B[adapter].weight @ self.lora_A[adapter].weight)

    def _combined_weight(self, adapter: str) -> torch.Tensor:
        """W0 + s B A."""
        return dense_weight(self.base_layer) + self.delta_weight(adapter).to(dense_weight(self.base_layer).dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a = self.active
        if a is None or a not in self.lora_A:
            return result
        lora_a, lora_b = self.lora_A[a], self.lora_B[a]
        dx = self.lora_dropout[a](x)
        delta = lora_b(lora_a(dx.to(lora_a.weight.dtype))) * self.scaling[a]
        if a in self.lora_gate:
            delta = delta * torch.sigmoid(self.lora_gate[a](x.to(lora_a.weight.dtype)))
        delta = delta.to(result.dtype)
        if a not in self.lora_magnitude_vector:
            return result + delta
        weight = dense_weight(self.base_layer)
        norm = (weight + self.delta_weight(a).detach().to(weight.dtype)).norm(dim=1).detach()
        scale = (self.lora_magnitude_vector[a] / norm).to(result.dtype)
        bias = getattr(self.base_layer, "bias", None)
        if self.training and not isinstance(self.lora_dropout[a], nn.Identity):
            base_out = F.linear(dx, weight.to(dx.dtype))  # W0 on the same dropped-out input as the update
        else:
            base_out = result - bias if bias is not None else result
        return result + (scale - 1) * base_out + scale * delta

    def merge_adapter(self, adapter: str) -> nn.Module:
        if adapter in self.lora_gate:
            raise PeftError("a gated LoRA update (UniPELT) depends on the input through its gate and cannot be "
                            "merged into the weight.")
        with torch.no_grad():
            weight = self._combined_weight(adapter)
            if adapter in self.lora_magnitude_vector:
                weight = (self.lora_magnitude_vector[adapter] / weight.norm(dim=1))[:, None] * weight
            bias = getattr(self.base_layer, "bias", None)
            merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                               device=weight.device, dtype=weight.dtype)
            merged.weight.copy_(weight)
            if bias is not None:
                merged.bias.copy_(bias)
        return merged.requires_grad_(False)


def attach_lora(model: PeftModel, adapter: str, cfg: LoraConfig, gated: bool = False) -> None:
    """Wrap every target linear layer of `model` in `LoRALinear` and add adapter `adapter` to it."""
    targets = LLAMA_LINEARS if cfg.target_modules == "all-linear" else cfg.target_modules
    for layer, _ in wrap_targets(model.base_model, targets, LINEAR_TYPES, LoRALinear, f"LoRA ({adapter})"):
        layer.add(adapter, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora, gated,
                  zero_init_b=cfg.init_lora_weights)


def peft_lora_dict(model: PeftModel, cfg: Any, r: int, **fields: Any) -> dict[str, Any]:
    """The keys PEFT 0.21 writes for a LoRA-family adapter (LoRA, AdaLoRA), filled from `cfg` and `fields`."""
    targets = cfg.target_modules
    return {
        "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
        "bias": "none", "corda_config": None, "ensure_weight_tying": False, "eva_config": None,
        "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "kasa_config": None, "layer_replication": None, "layers_pattern": None, "layers_to_transform": None,
        "loftq_config": {}, "lora_alpha": cfg.lora_alpha, "lora_bias": False, "lora_dropout": cfg.lora_dropout,
        "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core",
        "modules_to_save": peft_modules_to_save(model, cfg.modules_to_save), "monteclora_config": None,
        "peft_type": cfg.peft_type, "qalora_group_size": 16, "r": r, "rank_pattern": {}, "revision": None,
        "target_modules": targets if isinstance(targets, str) else list(targets), "target_parameters": None,
        "task_type": peft_task_type(model), "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
        "use_qalora": False, "use_rslora": False, "velora_config": None, **fields,
    }


# PEFT 0.21 LoraConfig keys lmcraft does not implement, with their neutral values.
LORA_UNSUPPORTED = {"bias": "none", "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}, "lora_bias": False, "use_qalora": False, "layer_replication": None,
                "target_parameters": None, "trainable_token_indices": None, "exclude_modules": None,
                "alora_invocation_tokens": None, "use_bdlora": None, "fan_in_fan_out": False}


@register
@dataclass(kw_only=True)
class LoraConfig(MethodConfig):
    """LoRA / rsLoRA / DoRA. `target_modules`: names, one regex, or "all-linear" (every projection in the blocks).

    `init_lora_weights=False` starts B random instead of zero (the update is then non-zero at init; for tests).
    """

    method = "lora"
    peft_type = "LORA"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool = True

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def inject(self, model: PeftModel, adapter: str) -> None:
        attach_lora(model, adapter, self)

    def to_peft(self, model: PeftModel, adapter: str) -> dict[str, Any]:
        return peft_lora_dict(model, self, self.r, use_dora=self.use_dora, use_rslora=self.use_rslora,
                              init_lora_weights=self.init_lora_weights)

    @classmethod
    def from_peft(cls, data: dict[str, Any]) -> LoraConfig:
        reject_unsupported(data, LORA_UNSUPPORTED, "LoRA adapter")
        targets = data.get("target_modules") or ["q_proj", "v_proj"]
        return cls(r=data.get("r", 8), lora_alpha=data.get("lora_alpha", 8),
                   lora_dropout=data.get("lora_dropout", 0.0),
                   target_modules=targets if isinstance(targets, str) else sorted(targets),
                   use_rslora=bool(data.get("use_rslora")), use_dora=bool(data.get("use_dora")),
                   init_lora_weights=data.get("init_lora_weights", True) is not False,
                   modules_to_save=modules_to_save_from_peft(data))


@register
@dataclass(kw_only=True)
class DoraConfig(LoraConfig):
    """`method: dora` = LoRA with weight decomposition (saved as PEFT LoRA with use_dora=true)."""

    method = "dora"
    peft_canonical = False
    use_dora: bool = True
