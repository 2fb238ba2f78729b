"""LoRA (Hu et al. 2021), rsLoRA (Kalajdzievski 2023) and DoRA (Liu et al. 2024) on linear layers.

For a frozen linear layer y = W0 x + b (W0: out x in), adapter `a` adds a rank-r update:

    LoRA:    y = W0 x + b + s B A drop(x),       A: r x in (Kaiming-uniform), B: out x r (zeros) => y = base at init
             s = alpha / r            (rsLoRA: s = alpha / sqrt(r), which keeps the update's scale stable in r)
    DoRA:    y = m / ||W0 + s B A||_row * (W0 x + s B A x) + b
             m (out,) starts at ||W0||_row, so again y = base at init; the row norm is treated as a constant in the
             backward pass (DoRA section 4.3, as PEFT does).
    gated:   y = W0 x + b + sigmoid(g^T x + c) s B A drop(x)      (UniPELT's LoRA gate; not mergeable)
    experts: W_e = W0_e + s B_e A_e for each expert e of a stacked (E, out, in) weight (`LoRAExperts`, below)

Merging: W = W0 + s B A, and for DoRA W = m / ||W0 + s B A||_row * (W0 + s B A).

One wrapper class per variant: `LoRALinear`, and `DoRALinear` and `GatedLoRALinear`, which extend it with their own
parameters (`add_variant`), forward and merge. Several named adapters of one variant can live on one layer;
`PeftModel.set_adapter` picks the active one, and `PeftModel.disable_adapters()` gives back the base model (the
reference model of DPO). A layer wrapped by one variant cannot take an adapter of another.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.models.moe import Experts
from lmcraft.peft.layers import AdapterLayer, PeftError, find_modules, wrap_targets
from lmcraft.peft.model import PeftModel
from lmcraft.peft.nf4 import NF4Linear, dense_weight
from lmcraft.peft.registry import MethodConfig, check_positive, register

LINEAR_TYPES = (nn.Linear, NF4Linear)
LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class LoRALinear(AdapterLayer):
    """A frozen linear layer (`nn.Linear` or `NF4Linear`) plus named low-rank updates: y = W0 x + b + s B A drop(x)."""

    adapter_containers = ("lora_A", "lora_B", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, adapter: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            zero_init_b: bool = True) -> None:
        """A (r x in) Kaiming-uniform, B (out x r) zeros unless `zero_init_b=False`; s = alpha/r or alpha/sqrt(r)."""
        kw = self._factory()
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, **kw)  # Kaiming-uniform (a = sqrt 5)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, **kw)
        if zero_init_b:
            nn.init.zeros_(self.lora_B[adapter].weight)
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[adapter] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.add_variant(adapter)

    def add_variant(self, adapter: str) -> None:
        """Add the parameters a LoRA variant has beyond A and B (none for plain LoRA)."""

    def _factory(self) -> dict[str, Any]:
        """Device and dtype of new adapter weights: the base weight's (float32 for a quantised base)."""
        ref = dense_weight(self.base_layer)
        return dict(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.float32)

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.scaling.pop(adapter, None)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """s B A (out x in)."""
        return self.scaling[adapter] * (self.lora_B[adapter].weight @ self.lora_A[adapter].weight)

    def combined_weight(self, adapter: str) -> torch.Tensor:
        """W0 + s B A."""
        return dense_weight(self.base_layer) + self.delta_weight(adapter).to(dense_weight(self.base_layer).dtype)

    def update(self, adapter: str, dx: torch.Tensor) -> torch.Tensor:
        """s B A dx for the (dropped-out) input dx, in the adapter's dtype."""
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        return lora_b(lora_a(dx.to(lora_a.weight.dtype))) * self.scaling[adapter]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a = self.active
        if a is None or a not in self.lora_A:
            return result
        return self.adapted(a, x, result)

    def adapted(self, a: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The layer's output with adapter `a` active, given x and the base output `result` = W0 x + b."""
        return result + self.update(a, self.lora_dropout[a](x)).to(result.dtype)

    def merge_adapter(self, adapter: str) -> nn.Module:
        with torch.no_grad():
            return self._linear(self.combined_weight(adapter))

    def _linear(self, weight: torch.Tensor) -> nn.Linear:
        """A frozen plain `nn.Linear` with `weight` and the base layer's bias."""
        bias = getattr(self.base_layer, "bias", None)
        merged = nn.Linear(self.in_features, self.out_features, bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(weight)
            if bias is not None:
                merged.bias.copy_(bias)
        return merged.requires_grad_(False)


class DoRALinear(LoRALinear):
    """LoRA with weight decomposition: y = m / ||W0 + s B A||_row * (W0 x + s B A x) + b (module docstring)."""

    adapter_containers = (*LoRALinear.adapter_containers, "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_magnitude_vector = nn.ParameterDict()

    def add_variant(self, adapter: str) -> None:
        """m = ||W0 + s B A||_row, so the layer starts as the base."""
        with torch.no_grad():
            self.lora_magnitude_vector[adapter] = nn.Parameter(self.combined_weight(adapter).norm(dim=1))

    def adapted(self, a: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        dx = self.lora_dropout[a](x)
        delta = self.update(a, dx).to(result.dtype)
        weight = dense_weight(self.base_layer)
        norm = (weight + self.delta_weight(a).detach().to(weight.dtype)).norm(dim=1).detach()  # a constant in backward
        scale = (self.lora_magnitude_vector[a] / norm).to(result.dtype)
        bias = getattr(self.base_layer, "bias", None)
        if self.training and not isinstance(self.lora_dropout[a], nn.Identity):
            base_out = F.linear(dx, weight.to(dx.dtype))  # W0 on the same dropped-out input as the update
        else:
            base_out = result - bias if bias is not None else result
        return result + (scale - 1) * base_out + scale * delta

    def merge_adapter(self, adapter: str) -> nn.Module:
        with torch.no_grad():
            weight = self.combined_weight(adapter)
            return self._linear((self.lora_magnitude_vector[adapter] / weight.norm(dim=1))[:, None] * weight)


class GatedLoRALinear(LoRALinear):
    """UniPELT's gated LoRA: y = W0 x + b + sigmoid(g^T x + c) s B A drop(x); the gate makes it unmergeable."""

    adapter_containers = (*LoRALinear.adapter_containers, "lora_gate")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_gate = nn.ModuleDict()

    def add_variant(self, adapter: str) -> None:
        """The gate (g, c): in -> 1."""
        self.lora_gate[adapter] = nn.Linear(self.in_features, 1, **self._factory())

    def adapted(self, a: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        gate = self.lora_gate[a]
        delta = self.update(a, self.lora_dropout[a](x)) * torch.sigmoid(gate(x.to(gate.weight.dtype)))
        return result + delta.to(result.dtype)

    def merge_adapter(self, adapter: str) -> nn.Module:
        raise PeftError("a gated LoRA update (UniPELT) depends on the input through its gate and cannot be "
                        "merged into the weight.")


class LoRAExperts(AdapterLayer):
    """LoRA on a mixture-of-experts layer's stacked expert weights (`models.moe.Experts`): for each stacked
    W0 (E, out, in) — `gate_up_proj` and `down_proj` — and each expert e,

        W_e = W0_e + s B_e A_e,     A_e: r x in (Kaiming-uniform), B_e: out x r (zeros)

    The experts keep computing as batched products, on W0 + s B A (formed once per forward by one bmm per stack).
    A and B are stored as PEFT's `ParamWrapper` stores them (`target_parameters`): A as one (r E, in) matrix whose
    rows e r .. e r + r - 1 are A_e, B as one (out, r E) matrix whose column j E + e is column j of B_e; they are
    saved under PEFT's names (`PEFT_NAMES`). No dropout: the update is applied to the weight, not to the input
    (PEFT refuses dropout there too)."""

    adapter_containers = ("lora_A", "lora_B")
    PARAMS = ("gate_up_proj", "down_proj")
    # PEFT wraps the experts module once per targeted parameter (a ParamWrapper around a ParamWrapper), in the
    # order of the module's parameters: `gate_up_proj` first, so its tensors sit under `base_layer.`, and
    # `down_proj` outermost. Our local name -> PEFT's.
    PEFT_NAMES = {f"lora_{m}.{p}.weight": f"{'base_layer.' if p == 'gate_up_proj' else ''}lora_{m}.weight"
                  for m in "AB" for p in ("gate_up_proj", "down_proj")}

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}

    def add(self, adapter: str, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
            zero_init_b: bool = True) -> None:
        if dropout:
            raise PeftError("LoRA on experts changes the expert weights, so it cannot drop out their input; set "
                            "lora_dropout: 0 (or leave the experts out of target_modules).")
        a, b = nn.ModuleDict(), nn.ModuleDict()
        for name, w in zip(self.PARAMS, self.base_layer.weights(), strict=True):
            experts, out, inp = w.shape
            a[name] = nn.Linear(inp, r * experts, bias=False, device=w.device, dtype=w.dtype)
            b[name] = nn.Linear(r * experts, out, bias=False, device=w.device, dtype=w.dtype)
            if zero_init_b:
                nn.init.zeros_(b[name].weight)
        self.lora_A[adapter], self.lora_B[adapter] = a, b
        self.scaling[adapter] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.scaling.pop(adapter, None)

    def delta_weights(self, adapter: str) -> list[torch.Tensor]:
        """s B_e A_e for each stack, each (E, out, in)."""
        out = []
        for name, w in zip(self.PARAMS, self.base_layer.weights(), strict=True):
            experts = w.shape[0]
            a = self.lora_A[adapter][name].weight.view(experts, -1, w.shape[2])  # (E, r, in)
            b = self.lora_B[adapter][name].weight.view(w.shape[1], -1, experts).permute(2, 0, 1)  # (E, out, r)
            out.append(self.scaling[adapter] * torch.bmm(b, a))
        return out

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacks the MoE layer computes with: W0 + s B A with the active adapter, W0 without."""
        base = self.base_layer.weights()
        if self.active is None or self.active not in self.lora_A:
            return base
        gate_up, down = (w + d.to(w.dtype) for w, d in zip(base, self.delta_weights(self.active), strict=True))
        return gate_up, down

    def merge_adapter(self, adapter: str) -> nn.Module:
        with torch.no_grad():
            base = self.base_layer.weights()
            merged = Experts(base[0].shape[0], base[1].shape[1], base[1].shape[2])
            for name, w, d in zip(self.PARAMS, base, self.delta_weights(adapter), strict=True):
                setattr(merged, name, nn.Parameter(w + d.to(w.dtype), requires_grad=False))
        return merged


def attach_lora(model: PeftModel, adapter: str, cfg: LoraConfig, gated: bool = False) -> None:
    """Wrap every target linear layer of `model` in the LoRA variant `cfg` asks for and add adapter `adapter`;
    targets that name a mixture-of-experts layer's `experts` get `LoRAExperts` (plain LoRA/rsLoRA only)."""
    targets = LLAMA_LINEARS if cfg.target_modules == "all-linear" else cfg.target_modules
    wrapper = GatedLoRALinear if gated else DoRALinear if cfg.use_dora else LoRALinear
    root, what = model.base_model, f"LoRA ({adapter})"
    groups = [(LINEAR_TYPES, wrapper, targets)]
    experts = [path for *_, path in find_modules(root, targets, (Experts, LoRAExperts))]
    if experts:  # the expert stacks and the linear layers among the targets, each group pinned to its own paths
        if wrapper is not LoRALinear:
            raise PeftError(f"{what}: DoRA and gated LoRA have no expert form; target the experts with plain LoRA.")
        linears = [path for *_, path in find_modules(root, targets, (*LINEAR_TYPES, wrapper))]
        groups = [((Experts,), LoRAExperts, _exactly(experts))] + ([(LINEAR_TYPES, wrapper, _exactly(linears))]
                                                                    if linears else [])
    for accept, kind, paths in groups:
        for layer, _ in wrap_targets(root, paths, accept, kind, what):
            layer.add(adapter, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora,
                      zero_init_b=cfg.init_lora_weights)


def _exactly(paths: list[str]) -> str:
    """A target regex matching exactly these module paths."""
    return "|".join(re.escape(p) for p in paths)


@register
@dataclass(kw_only=True)
class LoraConfig(MethodConfig):
    """LoRA / rsLoRA / DoRA. `target_modules`: names, one regex, or "all-linear" (every projection in the blocks).
    In a mixture-of-experts model `experts` names the stacked expert weights and `gate` the router.

    `init_lora_weights=False` starts B random instead of zero (the update is then non-zero at init; for tests).
    """

    method = "lora"
    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: bool = True

    def __post_init__(self) -> None:
        check_positive("r", self.r)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")

    def inject(self, model: PeftModel, adapter: str) -> None:
        attach_lora(model, adapter, self)


@register
@dataclass(kw_only=True)
class DoraConfig(LoraConfig):
    """`method: dora` = LoRA with weight decomposition (saved as PEFT LoRA with use_dora=true)."""

    method = "dora"
    use_dora: bool = True
