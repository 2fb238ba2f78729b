"""What every pre-training objective provides, the loss record it returns, and the token cross-entropy they share.

An objective is a small object with four methods (and a class method):

    Objective.with_token_ids(options, tokenizer, max_length) -> options   # fill in the ids it needs
    objective.build_model(cfg) -> nn.Module            # the model (or wrapper) this objective trains
    objective.kept_model(model) -> LanguageModel       # the part kept after pre-training
    objective.transform(batch, generator) -> batch     # seeded batch transform (masking, permutation, pairs)
    objective.loss(model, batch) -> LossOutput         # summed loss + number of targets (+ metrics)

`loss` only calls `model(...)` (never other methods), so it works on a DDP/FSDP-wrapped model, and it is
the trainer's `loss_fn`. Metrics are detached tensors, each a mean over the micro-batch's targets. Metrics
that cost an arg-max over the vocabulary (masked-token accuracy) are computed only when the model is in
eval mode, i.e. in `Trainer.evaluate`, whose target-weighted mean then gives the exact ratio over the whole
evaluation set.

`loss` returns a *summed* loss and the number of targets it was summed over, so gradient accumulation can
divide the sum over all micro-batches by the total target count (see lmcraft.train). Objectives whose
total loss adds means with different denominators (MLM + NSP, generator + discriminator) express the
secondary means as `mean * n_targets`, so that `sum / n_targets` is exactly the objective's loss on one
micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.data.collate import IGNORE_INDEX
from lmcraft.errors import ConfigError
from lmcraft.models.config import ModelConfig

if TYPE_CHECKING:
    from lmcraft.models.model import LanguageModel

Batch = dict[str, Any]

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "LossOutput",
    "Objective",
    "TokenizerIds",
    "declared_pad_id",
    "end_of_document_id",
    "masked_token_accuracy",
    "required_token",
    "token_cross_entropy",
]


@dataclass
class LossOutput:
    """What a loss_fn returns for one micro-batch (the trainer's contract; see lmcraft.train.trainer).

    loss_sum:    scalar tensor, sum of per-target losses, attached to the graph
    num_targets: number of targets summed in loss_sum (int or integer tensor)
    metrics:     extra values, each a mean over this micro-batch's targets
    num_tokens:  tokens processed, for throughput only (default: num_targets)
    """

    loss_sum: torch.Tensor
    num_targets: int | torch.Tensor
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)
    num_tokens: int | torch.Tensor | None = None


class TokenizerIds(Protocol):
    """The part of `lmcraft.tokenizer.load.Tokenizer` objectives read: vocabulary size and special ids."""

    pad_token: str | None

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_token_id(self) -> int | None: ...
    @property
    def eos_token_id(self) -> int | None: ...
    @property
    def bos_token_id(self) -> int | None: ...
    @property
    def mask_token_id(self) -> int | None: ...
    @property
    def cls_token_id(self) -> int | None: ...
    @property
    def sep_token_id(self) -> int | None: ...
    @property
    def all_special_ids(self) -> Sequence[int]: ...


def end_of_document_id(tokenizer: TokenizerIds) -> int | None:
    """The id that ends a document: EOS, else [SEP] (BERT's document separator)."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def declared_pad_id(tokenizer: TokenizerIds) -> int | None:
    """The id of the tokenizer's own padding token (None without one: no fallback to EOS)."""
    return tokenizer.pad_token_id if tokenizer.pad_token is not None else None


def required_token(value: int | None, what: str, objective: str) -> int:
    """`value`, or a `ConfigError` explaining that the tokenizer lacks the `what` token `objective` needs."""
    if value is None:
        raise ConfigError(f"objective {objective!r} needs a {what} token, but the tokenizer defines none; train one "
                          f"with tokenizer.train.special_tokens including it (e.g. kind: wordpiece has [MASK], "
                          f"[CLS], [SEP]) or use another tokenizer")
    return value


class Objective(Protocol):
    name: str

    @classmethod
    def with_token_ids(cls, options: dict[str, Any], tokenizer: TokenizerIds,
                       max_length: int | None = None) -> dict[str, Any]: ...

    def build_model(self, cfg: ModelConfig) -> nn.Module: ...

    def kept_model(self, model: nn.Module) -> LanguageModel: ...

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch: ...

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput: ...


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """sum_i -log softmax(logits_i)[labels_i] over positions with labels_i != -100, and their count.

    `logits` (..., V) and `labels` (...) are flattened. When most positions are labelled (causal LM) the
    loss runs over all rows with `ignore_index`, which needs no copy of the logits and no scatter in the
    backward pass; when few are (MLM's 15%), only the labelled rows are gathered first (`index_select`,
    whose gradient is a cheap `index_add`), so the softmax work scales with the number of targets. The per-row
    losses (fp32) are summed in fp64 (a 0-d fp64 result), the reduction the chunked LM-head loss uses too.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    keep = flat_labels != IGNORE_INDEX
    count = int(keep.sum())
    if count == 0:
        return logits.sum() * 0.0, 0
    if 2 * count > flat_labels.numel():
        per_row = F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    else:
        rows = keep.nonzero().squeeze(1)
        per_row = F.cross_entropy(flat_logits.index_select(0, rows).float(), flat_labels[rows], reduction="none")
    return per_row.sum(dtype=torch.float64), count


def masked_token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(1/|M|) sum_{i in M} [argmax_v logits_{i,v} = labels_i] over the labelled positions M (0 when M is empty)."""
    masked = labels != IGNORE_INDEX
    hits = (logits[masked].argmax(-1) == labels[masked]).sum()
    return hits.double() / max(int(masked.sum()), 1)
