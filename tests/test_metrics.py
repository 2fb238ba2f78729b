"""Classification metrics against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from lmcraft.metrics import bio_entities, classification_report, confusion_matrix, entity_f1, mcnemar_exact


def test_binary_report_by_hand() -> None:
    # tp=2 (1->1), fn=1 (1->0), fp=1 (0->1), tn=2 (0->0)
    labels = [1, 1, 1, 0, 0, 0]
    preds = [1, 1, 0, 1, 0, 0]
    r = classification_report(labels, preds)
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["f1"] == pytest.approx(2 / 3)  # P = R = 2/3
    assert r["f1_macro"] == pytest.approx(2 / 3)
    # MCC = (tp tn - fp fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn)) = (4 - 1) / 9
    assert r["mcc"] == pytest.approx(3 / 9)


def test_multiclass_macro_vs_micro() -> None:
    labels = [0, 0, 1, 2, 2, 2]
    preds = [0, 1, 1, 2, 2, 0]
    cm = confusion_matrix(labels, preds)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    r = classification_report(labels, preds)
    f1s = [2 * 0.5 * 0.5 / 1.0, 2 * 0.5 * 1.0 / 1.5, 2 * 1.0 * (2 / 3) / (1 + 2 / 3)]
    assert r["f1_macro"] == pytest.approx(sum(f1s) / 3)
    assert r["f1_micro"] == pytest.approx(r["accuracy"]) == pytest.approx(4 / 6)
    assert -1 <= r["mcc"] <= 1 and not math.isnan(r["mcc"])


def test_degenerate_constant_predictions() -> None:
    r = classification_report([0, 0, 1], [0, 0, 0])
    assert r["mcc"] == 0.0 and r["f1"] == 0.0


def test_bio_entities_and_entity_f1() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "I-ORG", "O"]
    assert bio_entities(tags) == {("PER", 0, 2), ("LOC", 3, 4), ("ORG", 4, 5)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "O", "O", "B-LOC"]]  # PER boundary wrong, LOC right
    f = entity_f1(gold, pred)
    assert f["entity_precision"] == pytest.approx(0.5)
    assert f["entity_recall"] == pytest.approx(0.5)
    assert f["entity_f1"] == pytest.approx(0.5)


@pytest.mark.parametrize(("b", "c"), [(3, 12), (0, 5), (7, 7), (1, 0), (10, 25), (0, 0)])
def test_exact_mcnemar_equals_scipys_binomial_test(b: int, c: int) -> None:
    from scipy.stats import binomtest

    expected = binomtest(b, b + c, 0.5).pvalue if b + c else 1.0
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-12)
