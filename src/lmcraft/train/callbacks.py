"""Trainer hooks: a list that dispatches to many callbacks, and the progress bar (the `Callback` base class is
`lmcraft.hooks`'s, re-exported here; its docstring states the hooks' order and state contract)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from lmcraft.hooks import Callback

if TYPE_CHECKING:
    from lmcraft.train.trainer import Trainer

__all__ = ["Callback", "CallbackList", "ProgressBar"]


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
