"""What every pre-training objective provides, and the token cross-entropy they share.

An objective is a small object with three methods:

    objective.build_model(cfg) -> nn.Module            # the model (or wrapper) this objective trains
    objective.transform(batch, generator) -> batch     # seeded batch transform (masking, permutation, pairs)
    objective.loss(model, batch) -> LossOutput         # summed loss + number of targets (+ metrics)

`loss` only calls `model(...)` (never other methods), so it works on a DDP/FSDP-wrapped model, and it is
the trainer's `loss_fn`. Metrics are detached tensors, each a mean over the micro-batch's targets.

`loss` returns a *summed* loss and the number of targets it was summed over, so gradient accumulation can
divide the sum over all micro-batches by the total target count (see lmcraft.train). Objectives whose
total loss adds means with different denominators (MLM + NSP, generator + discriminator) express the
secondary means as `mean * n_targets`, so that `sum / n_targets` is exactly the objective's loss on one
micro-batch.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.data.collate import IGNORE_INDEX
from lmcraft.models.config import ModelConfig
from lmcraft.train import LossOutput

Batch = dict[str, Any]

__all__ = ["IGNORE_INDEX", "Batch", "LossOutput", "Objective", "token_cross_entropy"]


class Objective(Protocol):
    name: str

    def build_model(self, cfg: ModelConfig) -> nn.Module: ...

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput: ...


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """sum_i -log softmax(logits_i)[labels_i] over positions with labels_i != -100, and their count.

    `logits` (..., V) and `labels` (...) are flattened. When most positions are labelled (causal LM) the
    loss runs over all rows with `ignore_index`, which needs no copy of the logits and no scatter in the
    backward pass; when few are (MLM's 15%), only the labelled rows are gathered first (`index_select`,
    whose gradient is a cheap `index_add`), so the softmax work scales with the number of targets.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    if 2 * count > flat_labels.numel():
        return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum"), count
    rows = keep.nonzero().squeeze(1)
    return F.cross_entropy(flat_logits.index_select(0, rows).float(), flat_labels[rows], reduction="sum"), count
