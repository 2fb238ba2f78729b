"""Causal LM objective: shifted cross-entropy by hand, document masks by hand, packed == separate documents."""

import math

import pytest
import torch

from lmcraft.models import LanguageModel, preset
from lmcraft.objectives.base import token_cross_entropy
from lmcraft.objectives.clm import CausalLM, causal_lm_loss, document_attention

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


def test_token_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0]])
    loss, n = token_cross_entropy(logits, torch.tensor([1, 2]))
    assert n == 2
    assert loss.item() == pytest.approx(math.log(3) + math.log(5), rel=1e-6)
    loss, n = token_cross_entropy(logits, torch.tensor([-100, -100]))
    assert (loss.item(), n) == (0.0, 0)


def test_causal_lm_loss_shifts_by_one():
    # position t predicts label t+1: row 0 -> label 1 (ln 3), row 1 -> label 2 (ln 5), row 2 unused
    logits = torch.tensor([[[0.0, 0.0, 0.0], [math.log(3), 0.0, 0.0], [9.0, 0.0, 0.0]]])
    loss, n = causal_lm_loss(logits, torch.tensor([[7, 1, 2]]))
    assert n == 2 and loss.item() == pytest.approx(math.log(15), rel=1e-6)
    loss, n = causal_lm_loss(logits, torch.tensor([[7, 1, -100]]))
    assert n == 1 and loss.item() == pytest.approx(math.log(3), rel=1e-6)


def test_document_attention_by_hand():
    ids = torch.tensor([[5, 2, 6, 7, 2, 8]])  # documents [5 EOS] [6 7 EOS] [8], EOS = 2
    mask, positions, starts = document_attention(ids, eos_token_id=2)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ], dtype=torch.bool)
    assert mask.shape == (1, 1, 6, 6) and torch.equal(mask[0, 0], expected)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert starts.tolist() == [[True, False, True, False, False, True]]


def test_transform_labels_padding_and_document_starts():
    obj = CausalLM(eos_token_id=2, reset_at_eos=True)
    batch = obj.transform({"input_ids": torch.tensor([[5, 2, 6, 7, 2, 8]]),
                           "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])})
    # the first token of each later document is not predicted from the previous document; padding never is
    assert batch["labels"].tolist() == [[5, 2, -100, 7, 2, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 2, 0]]
    assert batch["attention_mask"][0, 0, 5].tolist() == [False] * 5 + [True]  # padding query sees only itself
    plain = CausalLM().transform({"input_ids": torch.tensor([[5, 2, 6]])})
    assert plain["labels"].tolist() == [[5, 2, 6]] and "position_ids" not in plain


@pytest.mark.parametrize("name", ["llama-14m", "gpt2-tiny"])
def test_packed_window_equals_separate_documents(name, tiny_model):
    model = tiny_model(preset(name, **TINY)).eval()
    docs = [torch.tensor([5, 9, 11, 2]), torch.tensor([7, 3, 2]), torch.tensor([30, 31, 32, 33, 34])]
    window = torch.cat(docs)[None]
    batch = CausalLM(eos_token_id=2, reset_at_eos=True).transform({"input_ids": window})
    with torch.no_grad():
        packed = model(window, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
        separate = torch.cat([model(d[None]).logits for d in docs], dim=1)
        unmasked = model(window).logits
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unmasked[:, 4:], separate[:, 4:], atol=1e-3)  # the mask is what made them equal


def test_explicit_mask_shape_is_checked():
    model = LanguageModel(preset("llama-14m", **TINY))
    with pytest.raises(ValueError, match="explicit attention mask"):
        model(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 1, 3, 4, dtype=torch.bool))


def test_reset_needs_eos():
    with pytest.raises(ValueError, match="eos_token_id"):
        CausalLM(reset_at_eos=True)
