"""Masked LM: word ids, eligibility, 80/10/10 statistics, whole-word and span selection, seeded masks, loss."""

import math

import pytest
import torch
from torch import nn

from lmcraft.models import ModelOutput
from lmcraft.objectives.mlm import (
    MaskedLM,
    MaskingConfig,
    mask_tokens,
    select_spans,
    span_length_distribution,
    word_ids_from_pieces,
)

CLS, SEP, PAD, MASK = 1, 2, 0, 3
SPECIALS = (PAD, CLS, SEP, MASK)


def _batch(b: int, t: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, vocab, (b, t), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    attention = torch.ones_like(ids)
    attention[::2, -40:] = 0  # half the rows padded at the end
    ids[attention == 0] = PAD
    return ids, attention


def test_word_ids_from_pieces_conventions():
    assert word_ids_from_pieces(["[CLS]", "un", "##aff", "##able", "is", "[SEP]"], "wordpiece",
                                {"[CLS]", "[SEP]"}) == [-1, 0, 0, 0, 1, -1]
    assert word_ids_from_pieces(["The", "Ġcat", "s", "Ġsat"], "bytelevel") == [0, 1, 1, 2]
    assert word_ids_from_pieces(["<s>", "ing", "Ġa"], "bytelevel", {"<s>"}) == [-1, 0, 1]
    assert word_ids_from_pieces(["▁The", "▁ca", "t"], "sentencepiece") == [0, 1, 1]


def test_80_10_10_proportions_on_a_large_batch():
    vocab = 1000
    ids, attention = _batch(64, 512, vocab)
    cfg = MaskingConfig(vocab_size=vocab, mask_token_id=MASK, special_token_ids=SPECIALS)
    inputs, labels = mask_tokens(ids, cfg, torch.Generator().manual_seed(1), attention)
    selected = labels != -100
    eligible = (attention == 1) & (ids != CLS) & (ids != SEP)
    assert not (selected & ~eligible).any()  # never specials or padding
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(inputs[~selected], ids[~selected])
    n = int(selected.sum())
    assert n / int(eligible.sum()) == pytest.approx(0.15, abs=0.01)  # sigma ~ 0.002
    masked = (inputs == MASK) & selected
    unchanged = (inputs == ids) & selected
    random = selected & ~masked & ~unchanged
    assert masked.sum().item() / n == pytest.approx(0.8, abs=0.025)  # sigma ~ 0.006
    assert random.sum().item() / n == pytest.approx(0.1, abs=0.02)  # sigma ~ 0.004
    assert unchanged.sum().item() / n == pytest.approx(0.1, abs=0.02)
    assert (inputs[random] >= 0).all() and (inputs[random] < vocab).all()


def test_masks_are_reproducible_from_the_seed():
    ids, attention = _batch(4, 64, 100)
    cfg = MaskingConfig(vocab_size=100, mask_token_id=MASK, special_token_ids=SPECIALS, strategy="span")
    a = mask_tokens(ids, cfg, torch.Generator().manual_seed(7), attention)
    b = mask_tokens(ids, cfg, torch.Generator().manual_seed(7), attention)
    c = mask_tokens(ids, cfg, torch.Generator().manual_seed(8), attention)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


def test_whole_word_masking_selects_all_pieces_of_a_word():
    b, t = 32, 256
    ids, attention = _batch(b, t, 500, seed=3)
    g = torch.Generator().manual_seed(4)
    starts = torch.rand(b, t, generator=g) < 0.4  # words of 1-several pieces
    word_ids = starts.long().cumsum(1)
    word_ids[(ids == CLS) | (ids == SEP) | (ids == PAD)] = -1
    cfg = MaskingConfig(vocab_size=500, mask_token_id=MASK, special_token_ids=SPECIALS, strategy="whole_word")
    _, labels = mask_tokens(ids, cfg, torch.Generator().manual_seed(5), attention, word_ids=word_ids)
    selected = labels != -100
    chosen_words = total_words = 0
    for r in range(b):
        for w in word_ids[r].unique().tolist():
            if w < 0:
                continue
            sel = selected[r][word_ids[r] == w]
            assert sel.all() or not sel.any()
            chosen_words += int(sel.all())
            total_words += 1
    assert chosen_words / total_words == pytest.approx(0.15, abs=0.03)


def test_span_length_distribution_is_truncated_geometric():
    probs = span_length_distribution(0.2, 10)
    z = sum(0.2 * 0.8 ** (k - 1) for k in range(1, 11))
    assert probs[0].item() == pytest.approx(0.2 / z) and probs[9].item() == pytest.approx(0.2 * 0.8**9 / z)
    mean = sum((k + 1) * p for k, p in enumerate(probs.tolist()))
    assert mean == pytest.approx(3.8, abs=0.005)  # SpanBERT: mean span 3.8


def test_span_masking_budget_and_contiguity():
    b, t = 16, 400
    eligible = torch.ones(b, t, dtype=torch.bool)
    eligible[:, 0] = eligible[:, -1] = False
    word_ids = torch.arange(t).expand(b, -1)
    selected = select_spans(eligible, word_ids, 0.15, 0.2, 10, torch.Generator().manual_seed(0))
    assert (selected.sum(1) == round(0.15 * (t - 2))).all()  # one-token words: the budget is met exactly
    assert not selected[:, 0].any() and not selected[:, -1].any()
    runs = [len(run) for row in selected.int().tolist() for run in "".join(map(str, row)).split("0") if run]
    assert 3.0 < sum(runs) / len(runs) < 6.0  # spans of mean 3.8 words, sometimes touching


def test_span_masking_respects_words():
    b, t = 8, 201
    eligible = torch.ones(b, t, dtype=torch.bool)
    word_ids = (torch.arange(t) // 3).expand(b, -1)  # 3-piece words
    selected = select_spans(eligible, word_ids, 0.15, 0.2, 10, torch.Generator().manual_seed(1))
    per_word = selected.view(b, -1, 3)
    assert (per_word.all(-1) | ~per_word.any(-1)).all()


class _FixedLogits(nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):  # noqa: ANN001
        return ModelOutput(self.logits, self.logits)


def test_mlm_loss_counts_only_selected_positions():
    logits = torch.zeros(1, 4, 4)
    logits[0, 2] = torch.tensor([math.log(3), 0.0, 0.0, 0.0])
    batch = {"input_ids": torch.tensor([[1, 3, 3, 2]]), "labels": torch.tensor([[-100, 0, 1, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0]])}
    obj = MaskedLM(MaskingConfig(vocab_size=4, mask_token_id=3))
    out = obj.loss(_FixedLogits(logits), batch)
    assert out.num_targets == 2 and out.num_tokens == 3
    assert out.loss_sum.item() == pytest.approx(math.log(4) + math.log(6), rel=1e-6)


def test_masking_config_is_validated():
    with pytest.raises(ValueError):
        MaskingConfig(vocab_size=10, mask_token_id=3, probability=0.0)
    with pytest.raises(ValueError):
        MaskingConfig(vocab_size=10, mask_token_id=3, mask_fraction=0.9, random_fraction=0.2)
    with pytest.raises(ValueError):
        MaskingConfig(vocab_size=10, mask_token_id=3, strategy="words")
