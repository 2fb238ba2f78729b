"""The trainer's plug-in contracts, on the lowest floor so that any floor can implement them.

`Callback`: hooks into the one training loop. Every hook receives the `Trainer`; callbacks run on every rank
(test `trainer.is_main` for work that only rank 0 should do).
A callback may stop training by setting `trainer.should_stop = True`.
Callbacks that hold state across steps return it from `state_dict()` (tensors, numbers, strings, and lists and
dicts of them); it is saved in each checkpoint (`trainer_state/callbacks.pt`, loaded with `weights_only=True`) and
given back to `load_state_dict()` on resume.

Order within one optimizer step: on_step_begin -> (micro-batches, update) -> on_optimizer_step (gradients
still set; skipped steps do not call it) -> on_step_end ->
on_log (every `log_every` steps) -> on_eval (every `eval_every`) -> on_save (every `save_every`).

`WeightsFormat`: which model tensors a checkpoint stores, in which file, and how strictly they load back
(`lmcraft.train.checkpoint` writes and reads them; PEFT's adapter-only format subclasses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.train.trainer import Trainer

__all__ = ["Callback", "WeightsFormat"]


class Callback:
    """Override the hooks you need; all default to doing nothing."""

    def on_train_begin(self, trainer: Trainer) -> None: ...

    def on_step_begin(self, trainer: Trainer) -> None: ...

    def on_optimizer_step(self, trainer: Trainer, step: int) -> None:
        """Right after the optimizer update of step `step` (0-based), while gradients still exist (AdaLoRA)."""

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """After each optimizer step; `metrics` holds this step's loss, lr, grad_norm, targets, ..."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A train record (averaged since the previous one) or an eval record was produced."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...

    def on_save(self, trainer: Trainer, path: Path) -> None:
        """A complete checkpoint now exists at `path`."""

    def on_train_end(self, trainer: Trainer) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WeightsFormat:
    """Which model tensors a checkpoint stores, in which file, and how strictly they load back.

    `WeightsFormat()` stores the whole state dict in `model.safetensors` and loads it strictly.
    `WeightsFormat("adapter_model.safetensors", trainable_only=True)` stores only parameters with
    `requires_grad` (adapters, a head) and loads them onto a model rebuilt with the same frozen
    base. PEFT methods subclass it and override `select` / `write_extra` (e.g. adapter_config.json).
    """

    def __init__(self, filename: str = "model.safetensors", trainable_only: bool = False) -> None:
        self.filename, self.trainable_only = filename, trainable_only

    @property
    def strict(self) -> bool:
        return not self.trainable_only

    def select(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors to write, from the full state dict (names as in `model.state_dict()`)."""
        if not self.trainable_only:
            return state
        keep = {n for n, p in model.named_parameters() if p.requires_grad}
        return {k: v for k, v in state.items() if k in keep}

    def write_extra(self, model: nn.Module, directory: Path) -> None:
        """Hook for extra files next to the weights; nothing by default."""
