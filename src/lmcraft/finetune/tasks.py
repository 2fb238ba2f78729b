"""The fine-tuning tasks: which head, the loss, what a prediction is, and the validation metrics.

Losses follow the trainer's contract (a SUM over targets plus the number of targets):

    cls:        L = sum_b -log softmax(z_b)[y_b]                    z = W pooled   (B, C); targets = B
    regression: L = sum_b (z_b - y_b)^2                             z = w pooled   (B,);   targets = B
    token_cls:  L = sum_{b,t: y_bt != -100} -log softmax(z_bt)[y_bt]                        targets = labelled tokens
    clm:        L = sum_{b,t: y_b,t+1 != -100} -log p(y_b,t+1 | x_b,<=t)                    targets = predicted tokens
    qa:         L = sum_b (CE(s_b, start_b) + CE(e_b, end_b)) / 2   s, e = start/end logits (B, T); targets = B
                (its mean equals BertForQuestionAnswering's loss; windows and labels: lmcraft.finetune.qa)

The pooled vector is the [CLS] state for encoders and the last non-padding token for decoders (see
lmcraft.models.heads). Validation metrics: accuracy, precision/recall/F1 (macro, micro), MCC for
classification; seqeval-style entity precision/recall/F1 (BIO tags) plus token accuracy for token
classification; MSE, MAE, Pearson and Spearman correlation for regression; loss/perplexity for clm; for qa,
SQuAD v1.1 exact match and token F1 of each example's best span (the highest s_i + e_j over its windows, context
tokens only, i <= j < i + max_answer_length), maximised over the gold answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.data.collate import IGNORE_INDEX
from lmcraft.metrics import classification_report, entity_f1, normalize_text, token_f1
from lmcraft.objectives.base import token_cross_entropy
from lmcraft.objectives.lm_head import next_token_loss
from lmcraft.train import LossOutput

__all__ = ["CausalLMTask", "ClassificationTask", "QATask", "RegressionTask", "Task", "TokenClassificationTask",
           "make_task", "spearman", "task_logits"]


def _task_loss(loss: torch.Tensor, count: int | torch.Tensor, batch: dict[str, Any],
               metrics: dict[str, Any] | None = None) -> LossOutput:
    """The trainer's `LossOutput` of a task's summed `loss` over `count` targets, counting the batch's real tokens
    (its attention mask) as the tokens seen."""
    return LossOutput(loss, count, metrics or {}, batch["attention_mask"].sum())


def task_logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    kwargs = {"attention_mask": batch["attention_mask"]}
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    return model(batch["input_ids"], **kwargs).logits


@dataclass
class Task:
    """Base: `forward` gives the loss and the logits; `predictions` and `metrics` score a validation pass."""

    labels: list[str] = field(default_factory=list)
    name: ClassVar[str] = ""
    head: ClassVar[str] = ""
    headline_metric: ClassVar[tuple[str, str]] = ("loss", "min")

    def headline(self) -> tuple[str, str]:
        """(the metric that sums up a run, "max" or "min"): what early stopping and compare use by default."""
        return self.headline_metric

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
        raise NotImplementedError

    def predictions(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        """(predicted, gold) for the examples of one batch, in a form `metrics` understands."""
        return [], []

    def metrics(self, predicted: list[Any], gold: list[Any]) -> dict[str, float]:
        return {}


@dataclass
class ClassificationTask(Task):
    name: ClassVar[str] = "cls"
    head: ClassVar[str] = "cls"
    headline_metric: ClassVar[tuple[str, str]] = ("f1_macro", "max")

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
        logits = task_logits(model, batch).float()
        y = batch["labels"]
        loss = F.cross_entropy(logits, y, reduction="sum")
        acc = (logits.argmax(-1) == y).float().mean().detach()
        return _task_loss(loss, y.numel(), batch, {"accuracy": acc}), logits

    def predictions(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        return logits.argmax(-1).tolist(), batch["labels"].tolist()

    def metrics(self, predicted: list[Any], gold: list[Any]) -> dict[str, float]:
        report = classification_report(gold, predicted, num_classes=len(self.labels))
        return {k: float(v) for k, v in report.items() if not isinstance(v, list)}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties share their average rank)."""

    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x), dtype=np.float64)
        r[order] = np.arange(len(x), dtype=np.float64)
        _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        return sums[inverse] / counts[inverse]

    return _pearson(ranks(a), ranks(b))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else 0.0


@dataclass
class RegressionTask(Task):
    name: ClassVar[str] = "regression"
    head: ClassVar[str] = "cls"
    headline_metric: ClassVar[tuple[str, str]] = ("pearson", "max")

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
        pred = task_logits(model, batch).float().squeeze(-1)
        loss = F.mse_loss(pred, batch["labels"].float(), reduction="sum")
        return _task_loss(loss, pred.numel(), batch), pred

    def predictions(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        return logits.tolist(), batch["labels"].tolist()

    def metrics(self, predicted: list[Any], gold: list[Any]) -> dict[str, float]:
        p, y = np.asarray(predicted, dtype=np.float64), np.asarray(gold, dtype=np.float64)
        return {"mse": float(((p - y) ** 2).mean()), "mae": float(np.abs(p - y).mean()),
                "pearson": _pearson(p, y), "spearman": spearman(p, y)}


@dataclass
class TokenClassificationTask(Task):
    name: ClassVar[str] = "token_cls"
    head: ClassVar[str] = "token_cls"

    def headline(self) -> tuple[str, str]:
        return ("entity_f1" if self.bio else "token_accuracy"), "max"

    @property
    def bio(self) -> bool:
        """Whether the tags are BIO/IOB2 entity tags (then entity-level F1 is reported)."""
        return any(t.startswith(("B-", "I-")) for t in self.labels)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
        logits = task_logits(model, batch)
        loss, count = token_cross_entropy(logits, batch["labels"])
        keep = batch["labels"] != IGNORE_INDEX
        acc = (logits.argmax(-1)[keep] == batch["labels"][keep]).float().mean().detach() if count else 0.0
        return _task_loss(loss, count, batch, {"accuracy": acc}), logits

    def predictions(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        pred, gold = [], []
        for row_logits, row_labels in zip(logits.argmax(-1).tolist(), batch["labels"].tolist(), strict=True):
            kept = [(p, g) for p, g in zip(row_logits, row_labels, strict=True) if g != IGNORE_INDEX]
            pred.append([self.labels[p] for p, _ in kept])
            gold.append([self.labels[g] for _, g in kept])
        return pred, gold

    def metrics(self, predicted: list[Any], gold: list[Any]) -> dict[str, float]:
        flat_p = [t for row in predicted for t in row]
        flat_g = [t for row in gold for t in row]
        out = {"token_accuracy": float(np.mean([p == g for p, g in zip(flat_p, flat_g, strict=True)]))
               if flat_g else 0.0}
        if self.bio:
            out.update(entity_f1(gold, predicted))
        return out


@dataclass
class CausalLMTask(Task):
    """`fused`: compute the loss through a plain LM head chunk by chunk, without the (B, T, V) logits (None: the
    trainer's `chunked_loss` switch)."""

    fused: bool | None = None
    name: ClassVar[str] = "clm"
    head: ClassVar[str] = "lm"
    headline_metric: ClassVar[tuple[str, str]] = ("ppl", "min")

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
        loss, count, out = next_token_loss(model, batch["labels"], self.fused, input_ids=batch["input_ids"],
                                           attention_mask=batch["attention_mask"])
        return _task_loss(loss, count, batch), out.logits


@dataclass
class QATask(Task):
    max_answer_length: int = 30
    name: ClassVar[str] = "qa"
    head: ClassVar[str] = "qa"
    headline_metric: ClassVar[tuple[str, str]] = ("f1", "max")

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> tuple[LossOutput, torch.Tensor]:
        logits = task_logits(model, batch).float()
        start, end = logits.unbind(-1)
        loss = (F.cross_entropy(start, batch["start_positions"], reduction="sum")
                + F.cross_entropy(end, batch["end_positions"], reduction="sum")) / 2
        return _task_loss(loss, start.shape[0], batch), logits

    def best_span(self, logits: torch.Tensor, offsets: list[Any]) -> tuple[float, int, int] | None:
        """(score, first token, last token) of the best context span in one window, None without context."""
        inside = torch.tensor([o is not None for o in offsets] + [False] * (logits.shape[0] - len(offsets)))
        if not inside.any():
            return None
        i = torch.arange(logits.shape[0])
        allowed = (inside[:, None] & inside[None, :] & (i[None, :] >= i[:, None])
                   & (i[None, :] - i[:, None] < self.max_answer_length))
        scores = (logits[:, 0, None] + logits[None, :, 1]).masked_fill(~allowed, float("-inf"))
        flat = int(scores.argmax())
        first, last = divmod(flat, logits.shape[0])
        return float(scores[first, last]), first, last

    def predictions(self, logits: torch.Tensor, batch: dict[str, Any]) -> tuple[list[Any], list[Any]]:
        predicted, gold = [], []
        for row, meta in zip(logits.float().cpu(), batch["qa"], strict=True):
            best = self.best_span(row, meta["offsets"])
            text = "" if best is None else meta["context"][meta["offsets"][best[1]][0]:meta["offsets"][best[2]][1]]
            predicted.append((meta["example"], float("-inf") if best is None else best[0], text))
            gold.append((meta["example"], meta["answers"]))
        return predicted, gold

    def metrics(self, predicted: list[Any], gold: list[Any]) -> dict[str, float]:
        best: dict[int, tuple[float, str]] = {}
        for example, score, text in predicted:
            if example not in best or score > best[example][0]:
                best[example] = (score, text)
        answers = dict(gold)
        em = [max(float(normalize_text(best[k][1]) == normalize_text(g)) for g in answers[k]) for k in best]
        f1 = [max(token_f1(best[k][1], g) for g in answers[k]) for k in best]
        return {"exact_match": sum(em) / len(em), "f1": sum(f1) / len(f1), "examples": float(len(best))}


_TASKS: dict[str, type[Task]] = {t.name: t for t in (ClassificationTask, RegressionTask, TokenClassificationTask,
                                                     CausalLMTask, QATask)}


def make_task(name: str, labels: list[str], **options: Any) -> Task:
    """The task `name` with its label names and task options (qa: `max_answer_length`)."""
    return _TASKS[name](labels=list(labels), **options)
