"""The trainer's `loss_fn` and `eval_fn` for a task, sharing one forward pass per validation batch.

`loss_fn(model, batch)` returns the task loss; in training mode it adds the PEFT method's regulariser R
(AdaLoRA's orthogonality penalty) as `R * num_targets`, so the step's mean loss is task loss + R. In eval
mode it also keeps the batch's predictions; `eval_fn(trainer)` then turns everything kept since the last
call into the task's metrics (gathered from every rank when distributed) and starts afresh. The trainer
reports them as `eval_<name>`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from lmcraft.finetune.tasks import Task
from lmcraft.train import LossOutput

__all__ = ["TaskEvaluator"]


class TaskEvaluator:
    def __init__(self, task: Task, regularizer: nn.Module | None = None) -> None:
        """`regularizer`: a PeftModel whose active method may add a loss term (None: no term)."""
        self.task = task
        self.regularizer = regularizer
        self.predicted: list[Any] = []
        self.gold: list[Any] = []

    def loss_fn(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        out, logits = self.task.forward(model, batch)
        if model.training:
            if self.regularizer is not None:
                from lmcraft.peft import regularization_loss

                reg = regularization_loss(self.regularizer)
                if reg is not None:
                    out.loss_sum = out.loss_sum + reg * torch.as_tensor(out.num_targets, device=reg.device)
                    out.metrics["regularization"] = reg.detach()
        else:
            predicted, gold = self.task.predictions(logits.detach(), batch)
            self.predicted.extend(predicted)
            self.gold.extend(gold)
        return out

    def eval_fn(self, trainer: Any = None) -> dict[str, float]:
        predicted, gold = self.predicted, self.gold
        self.predicted, self.gold = [], []
        if dist.is_available() and dist.is_initialized():
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (predicted, gold))
            predicted = [p for part, _ in gathered for p in part]
            gold = [g for _, part in gathered for g in part]
        return self.task.metrics(predicted, gold) if gold else {}
