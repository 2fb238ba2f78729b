"""Metric sinks on rank 0: `metrics.jsonl`, TensorBoard events (`tb/`) and `curves.png`.

Records are flat dicts with `step` and `split` ("train" or "eval"); train records carry `loss`
(token mean since the previous record), `lr`, `grad_norm`, `epoch`, `tokens_per_s` and the
loss_fn's metrics; eval records carry `eval_loss`, `eval_ppl` and `eval_<metric>`.
The trainer's history (saved in every checkpoint) is the source of truth: on resume the JSONL file
is rewritten from it and TensorBoard purges events past the resumed step, so a resumed run's logs
read like an uninterrupted run's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.io import save_figure, write_jsonl
from lmcraft.train.callbacks import Callback

if TYPE_CHECKING:
    from lmcraft.train.trainer import Trainer

__all__ = ["JsonlLogger", "TensorBoardLogger", "CurvePlotter", "plot_curves"]


class JsonlLogger(Callback):
    """Append each record to `output_dir/metrics.jsonl` (one JSON object per line)."""

    def __init__(self, filename: str = "metrics.jsonl") -> None:
        self.filename = filename

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.is_main:
            write_jsonl(trainer.output_dir / self.filename, trainer.state.history)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.is_main:
            with open(trainer.output_dir / self.filename, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class TensorBoardLogger(Callback):
    """Scalars under `split/key` in `output_dir/tb` (view with `tensorboard --logdir OUTPUT_DIR/tb`)."""

    def __init__(self) -> None:
        self.writer: Any = None

    def on_train_begin(self, trainer: Trainer) -> None:
        if trainer.is_main:
            from torch.utils.tensorboard import SummaryWriter

            step = trainer.state.step
            self.writer = SummaryWriter(str(trainer.output_dir / "tb"), purge_step=step + 1 if step else None)

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, int | float):
                self.writer.add_scalar(f"{record['split']}/{key.removeprefix('eval_')}", value, record["step"])

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def plot_curves(history: list[dict[str, Any]], path: Path) -> None:
    """Loss (train and eval), learning rate and eval perplexity against step, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if r["split"] == "train"]
    evals = [r for r in history if r["split"] == "eval"]
    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval")
        axes[2].plot([r["step"] for r in evals], [r["eval_ppl"] for r in evals], "o-", color="C2")
        axes[2].set(title="eval perplexity", xlabel="step")
    axes[0].set(title="loss", xlabel="step")
    axes[0].legend()
    axes[1].plot([r["step"] for r in train], [r["lr"] for r in train], color="C1")
    axes[1].set(title="learning rate", xlabel="step")
    fig.tight_layout()
    save_figure(fig, path, dpi=100)


class CurvePlotter(Callback):
    """Write `output_dir/curves.png` from the trainer's history when training ends."""

    def on_train_end(self, trainer: Trainer) -> None:
        if trainer.is_main and trainer.state.history:
            plot_curves(trainer.state.history, trainer.output_dir / "curves.png")
