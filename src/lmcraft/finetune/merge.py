"""Fold a PEFT adapter folder into its base model and write a plain Hugging Face model folder.

The base model and head come from the adapter's finetune.json (written by `lmcraft finetune`), else from
`adapter_config.json` (`base_model_name_or_path`, `task_type`), else from the arguments. Methods whose
update is a function of the weights merge (LoRA, DoRA, rsLoRA, QLoRA (dequantised), AdaLoRA, IA3, BitFit,
trained head copies); prompt/prefix methods add virtual tokens and bottleneck adapters / UniPELT add
non-linear modules, so they cannot become plain weights: those raise `PeftError` with the reason.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from lmcraft.errors import LmcraftError
from lmcraft.io import read_json

__all__ = ["load_merged", "merge_adapter_folder"]

_TASK_TYPE_HEADS = {"CAUSAL_LM": "lm", "SEQ_CLS": "cls", "TOKEN_CLS": "token_cls"}


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return read_json(path)


def merge_adapter_folder(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None,
                         head: str | None = None, num_labels: int | None = None) -> Path:
    """Load base + adapter, merge, save to `out_dir` (atomically) with the base's tokenizer; returns `out_dir`."""
    from lmcraft.hub import save_model

    merged, folder = load_merged(adapter_dir, base, head, num_labels)
    return save_model(merged, out_dir, tokenizer_dir=folder)


def load_merged(adapter_dir: str | Path, base: str | None = None, head: str | None = None,
                num_labels: int | None = None) -> tuple[torch.nn.Module, Path]:
    """(base + adapter merged into plain weights, the base model's folder, which holds its tokenizer)."""
    from lmcraft import peft
    from lmcraft.assets import resolve_model
    from lmcraft.finetune.runner import FINETUNE_INFO
    from lmcraft.hub import HubWarning, load_model
    from lmcraft.peft.io import CONFIG_NAME
    from lmcraft.peft.training import fit_head

    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / CONFIG_NAME).is_file():
        raise LmcraftError(f"{adapter_dir}: not an adapter folder (no {CONFIG_NAME}); pass the final/ "
                           "folder of a PEFT fine-tuning run")
    info = _read_json(adapter_dir / FINETUNE_INFO)
    adapter_cfg = _read_json(adapter_dir / CONFIG_NAME)
    base = base or info.get("base_model") or adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise LmcraftError(f"{adapter_dir}: the adapter does not name its base model; pass --base MODEL")
    head = head or info.get("head") or _TASK_TYPE_HEADS.get(adapter_cfg.get("task_type") or "", None)
    folder = resolve_model(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HubWarning)  # the head's trained weights come with the adapter
        model = load_model(folder, head=head, dtype=torch.float32)
    if model.head_kind in ("cls", "token_cls"):
        fit_head(model, num_labels or info.get("num_labels") or model.config.num_labels, info.get("labels"))
    adapted = peft.load_adapter(model, adapter_dir)
    method = adapted.peft_configs[adapted.active_adapter].method
    merged = peft.merge(adapted)
    if isinstance(merged, peft.PeftModel):
        raise peft.PeftError(f"{adapter_dir}: a {method} adapter feeds virtual tokens to the model and cannot be "
                             "folded into its weights; load the adapter on the base model instead "
                             "(lmcraft.peft.load_adapter).")
    return merged, folder
