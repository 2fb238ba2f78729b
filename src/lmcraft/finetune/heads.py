"""Set a loaded model's dropout rates (sizing its head to the labels is `lmcraft.peft.training.fit_head`)."""

from __future__ import annotations

from torch import nn

from lmcraft.models.heads import SequenceClassificationHead, TokenClassificationHead
from lmcraft.models.layers import Attention
from lmcraft.models.model import LanguageModel

__all__ = ["set_dropout"]


def set_dropout(model: LanguageModel, hidden: float | None = None, attention: float | None = None,
                classifier: float | None = None) -> None:
    """Set the hidden (embeddings, residual branches), attention-probability and classifier dropout rates.

    None leaves a rate as the checkpoint's config has it. The config is updated too, so saved models keep it.
    """
    cfg = model.config
    if hidden is not None:
        cfg.dropout = hidden
        for module in model.model.modules():
            if isinstance(module, nn.Dropout):
                module.p = hidden
    if attention is not None:
        cfg.attention_dropout = attention
        for module in model.model.modules():
            if isinstance(module, Attention):
                module.dropout = attention
    if classifier is not None:
        cfg.classifier_dropout = classifier
    rate = cfg.classifier_dropout if cfg.classifier_dropout is not None else cfg.dropout
    if isinstance(model.head, SequenceClassificationHead | TokenClassificationHead):
        model.head.dropout.p = rate
