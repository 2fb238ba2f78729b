"""Adapter folders: `save_adapter`, `read_adapter_config`, `load_adapter`.

A folder holds `adapter_config.json` and `adapter_model.safetensors`. Methods Hugging Face PEFT also has are
written in PEFT's layout (`hf_format.py`), so `peft.PeftModel.from_pretrained` loads them onto the matching
transformers model and PEFT's own adapters load here; when PEFT's config cannot hold every field (QLoRA),
`lmcraft_config.json` beside it holds the full lmcraft config. The other methods (bottleneck adapters, BitFit,
P-tuning v2, UniPELT) use lmcraft's layout: `adapter_config.json` holds `lmcraft_method` and the config fields, and
tensor names are the clean module paths. Every file is written atomically (`lmcraft.io`).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from lmcraft.io import read_json, write_bytes, write_json
from lmcraft.peft.api import apply
from lmcraft.peft.hf_format import config_from_peft, load_peft_tensors, peft_layout, peft_tensors
from lmcraft.peft.layers import PeftError
from lmcraft.peft.model import PeftModel, adapter_state_dict, load_adapter_state_dict, require_adapter
from lmcraft.peft.registry import MethodConfig, config_from_dict

CONFIG_NAME = "adapter_config.json"
LMCRAFT_CONFIG_NAME = "lmcraft_config.json"  # full lmcraft config next to a PEFT-layout config that cannot hold it
WEIGHTS_NAME = "adapter_model.safetensors"


def save_adapter(model: PeftModel, directory: str | os.PathLike[str], adapter: str | None = None,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write one adapter (default: the active one) to `directory`; see the module docstring for the layout.

    Other files in the folder are kept, except a stale lmcraft_config.json, which would override the new config.
    """
    adapter = require_adapter(model, adapter)
    cfg = model.peft_configs[adapter]
    layout = peft_layout(cfg)
    if layout is not None:
        config = {**layout.to_peft(model, cfg), "base_model_name_or_path": base_model_name_or_path}
        tensors = peft_tensors(model, adapter)
    else:
        config = {"lmcraft_method": cfg.method, "base_model_name_or_path": base_model_name_or_path,
                  **dataclasses.asdict(cfg)}
        tensors = adapter_state_dict(model, adapter)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / CONFIG_NAME, config, sort_keys=True)
    write_bytes(directory / WEIGHTS_NAME,
                safetensors_bytes({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}))
    if layout is not None and not layout.lossless:
        write_json(directory / LMCRAFT_CONFIG_NAME, cfg.to_dict(), sort_keys=True)
    else:
        (directory / LMCRAFT_CONFIG_NAME).unlink(missing_ok=True)
    return directory


def _read_config(path: Path) -> dict[str, Any]:
    data = read_json(path, "adapter config")
    if not isinstance(data, dict):
        raise PeftError(f"{path}: an adapter config is a JSON object; found {type(data).__name__}")
    return data


def read_adapter_config(directory: str | os.PathLike[str]) -> tuple[MethodConfig, bool]:
    """(method config, whether the tensors are in PEFT's layout) of an adapter folder."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise PeftError(f"{path}: adapter config not found; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    data = _read_config(path)
    data.pop("base_model_name_or_path", None)
    if "lmcraft_method" in data:
        return config_from_dict({"method": data.pop("lmcraft_method"), **data}), False
    if (directory / LMCRAFT_CONFIG_NAME).is_file():
        return config_from_dict(_read_config(directory / LMCRAFT_CONFIG_NAME)), True
    return config_from_peft(data, str(path)), True


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], adapter_name: str = "default") -> PeftModel:
    """Add the adapter stored in `directory` to `model` (a base model or a `PeftModel`) and activate it."""
    directory = Path(directory)
    cfg, peft_layout_files = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise PeftError(f"{weights}: adapter weights not found")
    tensors: dict[str, torch.Tensor] = load_file(str(weights))
    peft_model = apply(model, cfg, adapter_name)
    if peft_layout_files:
        load_peft_tensors(peft_model, adapter_name, tensors)
    else:
        load_adapter_state_dict(peft_model, tensors, adapter_name)
    peft_model.set_adapter(adapter_name)  # loading may have replaced parameters (AdaLoRA ranks, folded prompts)
    return peft_model
