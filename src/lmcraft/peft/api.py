"""What a user does with a model and a method: `apply` it, count what trains, ask for its regulariser, `merge` it.

    model = apply(base, {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]})
    print_trainable_parameters(model)          # llama-14m: trainable params: 81,920 / total 14,637,440 (0.5597%)
    ... train ...
    plain = merge(model)                        # weights folded in where the math allows
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmcraft.peft.model import PeftModel, require_adapter
from lmcraft.peft.nf4 import NF4Linear
from lmcraft.peft.registry import MethodConfig, config_from_dict


def apply(model: nn.Module, cfg: MethodConfig | dict[str, Any], adapter_name: str = "default") -> PeftModel:
    """Add a PEFT method to `model`: freezes the base, adds the adapter, returns the `PeftModel` wrapper."""
    cfg = config_from_dict(cfg)
    peft_model = model if isinstance(model, PeftModel) else PeftModel(model)
    peft_model.add_adapter(adapter_name, cfg)
    return peft_model


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) of everything that trains: hand these to the optimizer."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); shared tensors count once and NF4 weights count as their full element count."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    total += sum(m.weight_numel for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> str:
    """Print and return `trainable params: X / total Y (Z%)`."""
    trainable, total = count_parameters(model)
    line = f"trainable params: {trainable:,} / total {total:,} ({100 * trainable / max(total, 1):.4f}%)"
    print(line)
    return line


def regularization_loss(model: nn.Module) -> torch.Tensor | None:
    """The active adapter's extra loss term (e.g. AdaLoRA's weighted orthogonality penalty), or None."""
    if not isinstance(model, PeftModel) or model.active_adapter is None:
        return None
    return model.peft_configs[model.active_adapter].regularization(model, model.active_adapter)


def merge(model: PeftModel, adapter: str | None = None) -> nn.Module:
    """Fold adapter `adapter` (default: active) into the model and drop every wrapper and other adapter.

    Weight methods (LoRA, DoRA, QLoRA, AdaLoRA, IA3, BitFit, modules_to_save) become plain base weights and the
    bare base model is returned. Prefix/prompt methods cannot enter the weights; their reparameterisation (prefix
    MLP, P-tuning encoder) is folded into a plain table and the `PeftModel` is returned. Bottleneck adapters and
    UniPELT's gates depend non-linearly on the input and raise `PeftError`.
    """
    adapter = require_adapter(model, adapter)
    layers = sorted(model.adapter_layers(), key=lambda item: -item[0].count("."))
    replacements = [(path, layer.merged(adapter)) for path, layer in layers]  # raises before anything changes
    for path, new in replacements:
        parent_path, _, attr = path.rpartition(".")
        setattr(model.base_model.get_submodule(parent_path), attr, new)
    for p in model.base_model.parameters():
        p.requires_grad_(False)
    for name in list(model.peft_configs):
        if name != adapter:
            model.delete_adapter(name)
    if adapter not in model.providers:
        return model.base_model
    model.providers[adapter].fold()
    model.set_adapter(adapter)
    return model
