"""Copy the weights of a Hugging Face folder into a model built for another purpose (continued pre-training).

The target keeps its own head when the checkpoint's differs: every backbone tensor (`model.*`) must be in the
checkpoint with the same shape, and head tensors are taken where name and shape agree.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from lmcraft.errors import ModelLoadError

if TYPE_CHECKING:
    from lmcraft.models import LanguageModel

__all__ = ["load_pretrained_weights"]


def load_pretrained_weights(model: LanguageModel, folder: Path) -> None:
    """Load the HF checkpoint in `folder` into `model`: every backbone tensor, and head tensors of equal shape;
    then re-tie the output embeddings. Raises `ModelLoadError` when a backbone tensor is missing or of another
    shape (the configured model does not fit the checkpoint)."""
    from lmcraft.hub.load import load_model

    loaded = load_model(folder, head=model.head_kind, dtype="float32").state_dict()
    target = model.state_dict()
    take = {k: v for k, v in loaded.items() if k in target and target[k].shape == v.shape}
    missing = [k for k in target if k.startswith("model.") and k not in take]
    if missing:
        raise ModelLoadError(f"{folder}: the checkpoint does not fit the configured model; {len(missing)} backbone "
                             f"tensor(s) missing or of another shape, e.g. {missing[:3]} (check model.overrides)")
    model.load_state_dict(take, strict=False)
    model.tie_weights()
