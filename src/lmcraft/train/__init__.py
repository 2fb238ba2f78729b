"""lmcraft.train: the one training loop (`Trainer`) with its optimizer, checkpoint and parallelism parts."""

from lmcraft.train.callbacks import Callback
from lmcraft.train.checkpoint import WeightsFormat
from lmcraft.train.loader import ResumableLoader
from lmcraft.train.optim import param_groups
from lmcraft.train.trainer import EarlyStopping, LossOutput, NonFiniteLossError, Trainer, TrainerConfig, set_seed

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
