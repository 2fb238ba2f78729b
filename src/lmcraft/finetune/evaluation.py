"""The trainer's `loss_fn` and `eval_fn` for a task, sharing one forward pass per validation batch.

`loss_fn(model, batch)` returns the task loss (the PEFT method's regulariser is added around it by
`lmcraft.peft.training.PeftTraining.loss`). In eval mode it also keeps the batch's predictions; `eval_fn(trainer)`
then turns everything kept since the last call into the task's metrics (gathered from every rank when distributed)
and starts afresh. The trainer reports them as `eval_<name>`.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import nn

from lmcraft.finetune.tasks import Task
from lmcraft.train import LossOutput

__all__ = ["TaskEvaluator"]


class TaskEvaluator:
    def __init__(self, task: Task) -> None:
        self.task = task
        self.predicted: list[Any] = []
        self.gold: list[Any] = []

    def loss_fn(self, model: nn.Module, batch: dict[str, Any]) -> LossOutput:
        out, logits = self.task.forward(model, batch)
        if not model.training:
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
