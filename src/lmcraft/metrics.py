"""Classification metrics for fine-tuning: accuracy, precision/recall/F1 (macro, micro), MCC, entity F1.

With a confusion matrix C (rows = true class, columns = predicted):
    precision_k = C_kk / sum_i C_ik,   recall_k = C_kk / sum_j C_kj,   F1_k = 2 P_k R_k / (P_k + R_k)
    macro = mean over classes;  micro = the same ratios on the summed counts (= accuracy for single-label)
    MCC (multi-class, Gorodkin): (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)),
        c = trace(C), s = total, p_k = predicted count of k, t_k = true count of k.
Entity F1 (seqeval, IOB2/BIO): entities are (type, start, end) spans decoded from tag sequences; an entity
counts as correct only if type and both boundaries match.
Answer text (SQuAD): `normalize_text` lower-cases and drops punctuation and the articles a/an/the; exact match is
equality of normalised texts, token F1 = 2PR/(P+R) over the multiset overlap of their words.
Paired comparison of two systems on the same items (exact McNemar test): with b items only the first gets right and
c items only the second, p = min(1, 2 P[X <= min(b, c)]) for X ~ Binomial(b + c, 1/2).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

import numpy as np


def confusion_matrix(labels: Sequence[int], preds: Sequence[int], num_classes: int | None = None) -> np.ndarray:
    y, p = np.asarray(labels, dtype=np.int64), np.asarray(preds, dtype=np.int64)
    if y.shape != p.shape:
        raise ValueError(f"labels and predictions differ in length: {y.shape} vs {p.shape}")
    k = num_classes or int(max(y.max(initial=0), p.max(initial=0)) + 1)
    return np.bincount(y * k + p, minlength=k * k).reshape(k, k)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b != 0)


def matthews_corrcoef(cm: np.ndarray) -> float:
    t, p = cm.sum(axis=1).astype(np.float64), cm.sum(axis=0).astype(np.float64)
    c, s = float(np.trace(cm)), float(cm.sum())
    denom = math.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return 0.0 if denom == 0 else (c * s - float((p * t).sum())) / denom


def classification_report(labels: Sequence[int], preds: Sequence[int], num_classes: int | None = None) -> dict:
    """accuracy, precision/recall/F1 macro and micro, MCC, and per-class F1 (for binary tasks `f1` = F1 of class 1)."""
    cm = confusion_matrix(labels, preds, num_classes)
    tp = np.diag(cm).astype(np.float64)
    pred_count, true_count = cm.sum(axis=0), cm.sum(axis=1)
    precision, recall = _safe_div(tp, pred_count), _safe_div(tp, true_count)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = (true_count + pred_count) > 0  # classes absent from both sides do not dilute macro averages
    micro_p = tp.sum() / max(pred_count.sum(), 1)
    micro_r = tp.sum() / max(true_count.sum(), 1)
    report = {
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "precision_macro": float(precision[present].mean()) if present.any() else 0.0,
        "recall_macro": float(recall[present].mean()) if present.any() else 0.0,
        "f1_macro": float(f1[present].mean()) if present.any() else 0.0,
        "f1_micro": float(0.0 if micro_p + micro_r == 0 else 2 * micro_p * micro_r / (micro_p + micro_r)),
        "mcc": matthews_corrcoef(cm),
        "f1_per_class": [float(x) for x in f1],
    }
    if cm.shape[0] == 2:
        report["f1"] = float(f1[1])
    return report


def bio_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """Spans (type, start, end_exclusive) from IOB2 tags; an I- tag with no matching open entity starts one."""
    spans: set[tuple[str, int, int]] = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, i))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, i
    return spans


def entity_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, float]:
    """seqeval-style micro precision/recall/F1 over exact entity spans, summed over sentences."""
    correct = n_true = n_pred = 0
    for t, p in zip(true_tags, pred_tags, strict=True):
        gold, guess = bio_entities(t), bio_entities(p)
        correct += len(gold & guess)
        n_true += len(gold)
        n_pred += len(guess)
    precision = correct / n_pred if n_pred else 0.0
    recall = correct / n_true if n_true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"entity_precision": precision, "entity_recall": recall, "entity_f1": f1}


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, collapse whitespace."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 between normalised answers."""
    p, g = normalize_text(pred).split(), normalize_text(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts `b` and `c` (see the module docstring)."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)
