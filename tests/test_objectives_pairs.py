"""NSP / SOP: pair building from documents, packing with token types, truncation, combined loss by hand."""

import math

import pytest
import torch
from torch import nn

from lmcraft.errors import LmcraftError
from lmcraft.models import ModelOutput, preset
from lmcraft.objectives.mlm import MaskingConfig
from lmcraft.objectives.sentence_pairs import (
    PretrainingModel,
    SentencePair,
    SentencePairObjective,
    build_pairs,
    collate_pairs,
    truncate_pair,
)

CLS, SEP, PAD, MASK = 1, 2, 0, 3


def _documents(n_docs: int, n_segments: int, seg_len: int = 3) -> list[list[list[int]]]:
    """Token = 1000 * doc + 10 * segment + k, so every token says where it came from."""
    return [[[1000 * d + 10 * s + k for k in range(seg_len)] for s in range(n_segments)] for d in range(n_docs)]


def _segments(tokens: list[int]) -> list[tuple[int, int]]:
    out = []
    for t in tokens:
        key = (t // 1000, t % 1000 // 10)
        if not out or out[-1] != key:
            out.append(key)
    return out


def test_collate_pairs_by_hand():
    pairs = [SentencePair([5, 6], [7], 0), SentencePair([8], [9, 10, 11], 1)]
    batch = collate_pairs(pairs, CLS, SEP, PAD)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 7, 2, 0], [1, 8, 2, 9, 10, 11, 2]]
    assert batch["token_type_ids"].tolist() == [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["special_tokens_mask"].int().tolist() == [[1, 0, 0, 1, 0, 1, 0], [1, 0, 1, 0, 0, 0, 1]]
    assert batch["pair_labels"].tolist() == [0, 1]


def test_truncate_pair_trims_the_longer_side():
    a, b = [1, 2, 3, 4, 5], [6, 7]
    truncate_pair(a, b, 4, torch.Generator().manual_seed(0))
    assert (len(a), len(b)) == (2, 2) and b == [6, 7]
    assert a in ([1, 2], [2, 3], [3, 4], [4, 5])  # a contiguous piece of the original


def test_sop_pairs_are_consecutive_in_order_or_swapped():
    docs = _documents(200, 6)
    pairs = build_pairs(docs, "sop", max_length=12, generator=torch.Generator().manual_seed(0), short_seq_prob=0.0)
    assert len(pairs) > 200
    for p in pairs:
        assert len(p.a) + len(p.b) <= 9
        sa, sb = _segments(p.a), _segments(p.b)
        assert {d for d, _ in sa + sb} == {sa[0][0]}  # one document
        first, second = (sa, sb) if p.label == 0 else (sb, sa)
        assert first[-1][1] + 1 == second[0][1]  # the two parts touch, in document order once unswapped
    swapped = sum(p.label for p in pairs) / len(pairs)
    assert swapped == pytest.approx(0.5, abs=0.07)


def test_nsp_pairs_are_true_next_or_from_another_document():
    docs = _documents(60, 30)  # long documents: few single-segment chunks (those are always random-next)
    pairs = build_pairs(docs, "nsp", max_length=12, generator=torch.Generator().manual_seed(1), short_seq_prob=0.0)
    for p in pairs:
        assert len(p.a) + len(p.b) <= 9
        sa, sb = _segments(p.a), _segments(p.b)
        if p.label == 0:
            assert sa[0][0] == sb[0][0] and sa[-1][1] + 1 == sb[0][1]
        else:
            assert sa[0][0] != sb[0][0]
    random_next = sum(p.label for p in pairs) / len(pairs)
    assert random_next == pytest.approx(0.5, abs=0.07)


def test_nsp_needs_two_documents():
    with pytest.raises(LmcraftError, match="two non-empty documents"):
        build_pairs(_documents(1, 5), "nsp", max_length=16)


def test_pairs_are_seeded():
    docs = _documents(20, 5)
    a = build_pairs(docs, "nsp", 12, torch.Generator().manual_seed(3))
    b = build_pairs(docs, "nsp", 12, torch.Generator().manual_seed(3))
    assert a == b


def test_transform_accepts_data_items_and_truncates():
    obj = SentencePairObjective("nsp", MaskingConfig(vocab_size=100, mask_token_id=MASK), CLS, SEP, PAD, max_length=8)
    items = [{"tokens_a": torch.tensor([10, 11, 12, 13]), "tokens_b": torch.tensor([20, 21]), "label": torch.tensor(1)},
             SentencePair([30], [40], 0)]
    batch = obj.transform({"pairs": items}, torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (2, 8)  # 4 + 2 tokens trimmed to 5, plus [CLS] [SEP] [SEP]
    assert batch["pair_labels"].tolist() == [1, 0]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]


def test_transform_never_masks_cls_sep_or_padding():
    obj = SentencePairObjective("sop", MaskingConfig(vocab_size=100, mask_token_id=MASK, probability=0.5), CLS, SEP,
                                PAD)
    pairs = [SentencePair([10 + i for i in range(8)], [50 + i for i in range(3)], i % 2) for i in range(16)]
    batch = obj.transform({"pairs": pairs}, torch.Generator().manual_seed(0))
    selected = batch["labels"] != -100
    assert selected.any()
    assert not (selected & (batch["special_tokens_mask"] | (batch["attention_mask"] == 0))).any()


class _FixedHeads(nn.Module):
    def __init__(self, mlm_logits: torch.Tensor, pair_logits: torch.Tensor) -> None:
        super().__init__()
        self.mlm_logits, self.pair_logits = mlm_logits, pair_logits

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # noqa: ANN001
        return ModelOutput(self.mlm_logits, self.mlm_logits), self.pair_logits


def test_loss_is_mlm_mean_plus_pair_mean():
    mlm_logits = torch.zeros(2, 3, 4)  # uniform over 4 tokens: ln 4 per masked token
    pair_logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # ln 2 and ln 4 for labels 0, 1
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.ones(2, 3),
             "token_type_ids": torch.zeros(2, 3, dtype=torch.long),
             "labels": torch.tensor([[-100, 1, -100], [2, 3, -100]]), "pair_labels": torch.tensor([0, 1])}
    obj = SentencePairObjective("nsp", MaskingConfig(vocab_size=4, mask_token_id=MASK), CLS, SEP, PAD)
    out = obj.loss(_FixedHeads(mlm_logits, pair_logits), batch)
    pair_mean = (math.log(2) + math.log(4)) / 2
    assert out.num_targets == 3
    assert out.loss_sum.item() / 3 == pytest.approx(math.log(4) + pair_mean, rel=1e-6)
    assert out.metrics["nsp_accuracy"].item() == 0.5


def test_pretraining_model_shapes():
    cfg = preset("bert-tiny", vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    out, pair = PretrainingModel(cfg)(torch.randint(4, 64, (3, 7)), torch.ones(3, 7, dtype=torch.long),
                                      torch.zeros(3, 7, dtype=torch.long))
    assert out.logits.shape == (3, 7, 64) and pair.shape == (3, 2)
