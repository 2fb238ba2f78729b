"""Trainer hooks: the `Callback` base class, a list that dispatches to many, and the progress bar.

Every hook receives the `Trainer`; callbacks run on every rank (test `trainer.is_main` for work
that only rank 0 should do). A callback may stop training by setting `trainer.should_stop = True`.
Callbacks that hold state across steps return it from `state_dict()` (tensors, numbers, strings, and lists and
dicts of them); it is saved in each checkpoint (`trainer_state/callbacks.pt`, loaded with `weights_only=True`) and
given back to `load_state_dict()` on resume.

Order within one optimizer step: on_step_begin -> (micro-batches, update) -> on_optimizer_step (gradients
still set; skipped steps do not call it) -> on_step_end ->
on_log (every `log_every` steps) -> on_eval (every `eval_every`) -> on_save (every `save_every`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from lmcraft.train.trainer import Trainer

__all__ = ["Callback", "CallbackList", "ProgressBar"]


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


class CallbackList:
    """Calls a hook on each callback in order."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)

    def __getattr__(self, hook: str) -> Any:
        if not hook.startswith("on_"):
            raise AttributeError(hook)

        def dispatch(*args: Any) -> None:
            for cb in self.callbacks:
                getattr(cb, hook)(*args)

        return dispatch

    def state_dict(self) -> list[dict[str, Any]]:
        return [cb.state_dict() for cb in self.callbacks]

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        for cb, state in zip(self.callbacks, states, strict=False):
            cb.load_state_dict(state)


class ProgressBar(Callback):
    """tqdm bar over optimizer steps (rank 0) with loss, lr and tokens/s; tqdm shows the ETA."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.is_main:
            self.bar = tqdm(total=trainer.total_steps, initial=trainer.state.step, desc="train", unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                                 tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
            self.bar.update(1)

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.write(f"step {trainer.state.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
