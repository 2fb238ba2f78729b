"""lmcraft.train: the one training loop (`Trainer`) with its optimizer, checkpoint and parallelism parts.

`TrainerConfig` and `EarlyStopping` live in the torch-free `lmcraft.train.config`; every other name is loaded
on first use (module `__getattr__`), so `import lmcraft.train.config` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lmcraft.train.config import EarlyStopping, TrainerConfig

if TYPE_CHECKING:
    from lmcraft.train.callbacks import Callback
    from lmcraft.train.checkpoint import WeightsFormat
    from lmcraft.train.loader import ResumableLoader
    from lmcraft.train.optim import param_groups
    from lmcraft.train.trainer import LossOutput, NonFiniteLossError, Trainer, set_seed

_LAZY = {
    "Callback": "lmcraft.train.callbacks",
    "WeightsFormat": "lmcraft.train.checkpoint",
    "ResumableLoader": "lmcraft.train.loader",
    "param_groups": "lmcraft.train.optim",
    "LossOutput": "lmcraft.train.trainer",
    "NonFiniteLossError": "lmcraft.train.trainer",
    "Trainer": "lmcraft.train.trainer",
    "set_seed": "lmcraft.train.trainer",
}

__all__ = [
    "Callback",
    "EarlyStopping",
    "LossOutput",
    "NonFiniteLossError",
    "ResumableLoader",
    "Trainer",
    "TrainerConfig",
    "WeightsFormat",
    "param_groups",
    "set_seed",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmcraft.train' has no attribute {name!r}")
