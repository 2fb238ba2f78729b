"""Fit a loaded model's head to the task (number of labels, label names) and set its dropout rates.

`fit_head` replaces the classifier's output layer when the checkpoint's has another number of outputs
(freshly initialised with the model's init: N(0, initializer_range), zero bias); an encoder's pooler is kept.
Label names go into the config's `id2label`/`label2id`, so a saved model carries them in its config.json.
"""

from __future__ import annotations

from torch import nn

from lmcraft.models.heads import SequenceClassificationHead, TokenClassificationHead
from lmcraft.models.layers import Attention
from lmcraft.models.model import LanguageModel

__all__ = ["fit_head", "set_dropout"]


def fit_head(model: LanguageModel, num_labels: int, labels: list[str] | None = None) -> None:
    """Give a cls/token_cls head `num_labels` outputs; record `labels` (names in id order) in the config."""
    head = model.head
    if not isinstance(head, SequenceClassificationHead | TokenClassificationHead):
        raise ValueError(f"fit_head needs a cls or token_cls head, the model has {model.head_kind!r}")
    cfg = model.config
    old = head.classifier
    if old.out_features != num_labels:
        new = nn.Linear(old.in_features, num_labels, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)
        model._init_weights(new)
        head.classifier = new
    cfg.num_labels = num_labels
    names = labels if labels else [f"LABEL_{i}" for i in range(num_labels)]
    cfg.extra["id2label"] = {str(i): name for i, name in enumerate(names)}
    cfg.extra["label2id"] = {name: i for i, name in enumerate(names)}


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
