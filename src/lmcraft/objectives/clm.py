"""Causal language modelling: next-token cross-entropy over packed windows.

    L = sum_{b, t : y[b, t+1] != -100}  -log p(y[b, t+1] | x[b, <= t])

with logits at position t predicting label t + 1 (labels default to the inputs; padding is -100).

Document-boundary-aware attention (`reset_at_eos=True`): documents packed into one window are separated
by EOS tokens (the EOS belongs to the document it ends). With document index d_t of token t,

    mask[b, 0, i, j] = (d_i == d_j) and (j <= i)          (block-diagonal causal)
    position_ids[b, t] = t - start(d_t)                    (positions restart in every document)

and the label of each document's first token (except at the window start) is -100, because the EOS
before it sees only the previous document. A window then gives the same logits as running each
document on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.model import LanguageModel
from lmcraft.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LossOutput,
    TokenizerIds,
    end_of_document_id,
    token_cross_entropy,
)
from lmcraft.objectives.lm_head import next_token_loss

__all__ = ["CausalLM", "causal_lm_loss", "document_attention"]


def document_attention(input_ids: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-diagonal causal mask (B, 1, T, T) bool, restarted position ids (B, T) and document starts (B, T) bool."""
    t = input_ids.shape[1]
    is_eos = (input_ids == eos_token_id).long()
    doc = is_eos.cumsum(dim=1) - is_eos  # the EOS closes its own document
    starts = torch.ones_like(doc, dtype=torch.bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    idx = torch.arange(t, device=input_ids.device).expand_as(doc)
    start_index = torch.where(starts, idx, 0).cummax(dim=1).values
    causal = idx[:, None, :] <= idx[:, :, None]  # [b, i, j] = j <= i
    mask = (doc[:, :, None] == doc[:, None, :]) & causal
    return mask[:, None], idx - start_index, starts


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed shifted cross-entropy: logits[:, t] predicts labels[:, t + 1]; returns (sum, number of targets).

    The labels are shifted (the last position gets -100), not the logits, so the logits are never copied.
    """
    next_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return token_cross_entropy(logits, next_labels)


@dataclass
class CausalLM:
    """Next-token prediction. `reset_at_eos` needs `eos_token_id` and builds per-document attention."""

    eos_token_id: int | None = None
    reset_at_eos: bool = False
    name: ClassVar[str] = "clm"

    def __post_init__(self) -> None:
        if self.reset_at_eos and self.eos_token_id is None:
            raise ValueError("reset_at_eos=True needs eos_token_id")

    @classmethod
    def with_token_ids(cls, options: dict[str, Any], tokenizer: TokenizerIds,
                       max_length: int | None = None) -> dict[str, Any]:
        """`eos_token_id` defaults to the tokenizer's end-of-document id (when it has one)."""
        eos = end_of_document_id(tokenizer)
        return {"eos_token_id": eos, **options} if eos is not None else dict(options)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return LanguageModel(cfg, "lm")

    def kept_model(self, model: nn.Module) -> LanguageModel:
        return cast(LanguageModel, model)

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        """Add `labels` (inputs, -100 at padding); with `reset_at_eos`, a 4-D mask and restarted `position_ids`."""
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids).clone()
        padding = batch.get("attention_mask")
        if padding is not None:
            labels[padding == 0] = IGNORE_INDEX
        out = {**batch, "labels": labels}
        if self.reset_at_eos:
            mask, positions, starts = document_attention(input_ids, self.eos_token_id)
            if padding is not None:
                eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
                mask = (mask & padding.bool()[:, None, None, :]) | eye
            starts[:, 0] = False
            labels[starts] = IGNORE_INDEX
            out.update(attention_mask=mask, position_ids=positions)
        return out

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        """Through `next_token_loss`: chunked through the LM head unless the trainer's `chunked_loss` is false.
        A mixture-of-experts model's loss includes coef * aux (see `next_token_loss`); the metrics then hold
        `aux_loss` and `expert_load/<e>` (the fraction of routed tokens expert e got, mean over MoE layers)."""
        total, count, out = next_token_loss(model, batch["labels"], input_ids=batch["input_ids"],
                                            attention_mask=batch.get("attention_mask"),
                                            position_ids=batch.get("position_ids"))
        router = getattr(out, "router", None)
        return LossOutput(total, count, router.metrics() if router is not None else {})
