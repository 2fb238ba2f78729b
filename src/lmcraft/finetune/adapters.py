"""What fine-tuning adds around lmcraft.peft: task-aware method configs, AdaLoRA's allocator hook, and
checkpoints that hold only the adapter.

- `method_config`: a new task head (cls, token_cls, regression) must train with any method, so `head` joins
  the method's `modules_to_save` (as Hugging Face PEFT does for sequence classification); AdaLoRA's
  `total_step` defaults to the run's number of optimizer steps.
- `AdaLoraAllocator`: AdaLoRA scores and prunes its singular triplets after each optimizer step, while the
  gradients are still there (after `optimizer.step()`, before `zero_grad`); it registers an optimizer
  step post-hook, since trainer callbacks run after the gradients are cleared.
- `AdapterWeights`: checkpoints (`step-N/`, `best/`) keep exactly the parameters that were trainable when
  training began, in `adapter_model.safetensors`, even while gradual unfreezing has some of them frozen.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmcraft.train import Callback, WeightsFormat

__all__ = ["AdaLoraAllocator", "AdapterWeights", "method_config"]


def method_config(peft: dict[str, Any], head: str, total_steps: int) -> dict[str, Any]:
    """The `peft:` block completed for this task and run length (a new dict; the input is not changed)."""
    out = dict(peft)
    if head != "lm":
        saved = list(out.get("modules_to_save") or [])
        out["modules_to_save"] = saved if "head" in saved else [*saved, "head"]
    if out.get("method") == "adalora" and not out.get("total_step"):
        out["total_step"] = total_steps
    return out


class AdaLoraAllocator(Callback):
    """Calls `lmcraft.peft.update_and_allocate(model, step)` after every optimizer update."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.handle: Any = None

    def on_train_begin(self, trainer: Any) -> None:
        from lmcraft.peft import update_and_allocate

        def hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            update_and_allocate(self.model, trainer.state.step)

        self.handle = trainer.optimizer.register_step_post_hook(hook)

    def on_train_end(self, trainer: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def state_dict(self) -> dict[str, Any]:
        """The importance EMAs and rank pattern of the active AdaLoRA adapter (for exact resume)."""
        return self.model.method_state[self.model.active_adapter].state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.method_state[self.model.active_adapter].load_state_dict(self.model, state)


class AdapterWeights(WeightsFormat):
    """`adapter_model.safetensors` holding the named parameters only; loads non-strictly onto the same model."""

    def __init__(self, names: list[str]) -> None:
        super().__init__("adapter_model.safetensors", trainable_only=True)
        self.names = set(names)

    def select(self, model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in state.items() if k in self.names}
