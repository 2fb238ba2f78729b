"""Permutation LM / two-stream attention: masks by hand, the query stream never sees its own token, and the
content stream is exactly our Block run with the permutation mask."""

import pytest
import torch

from lmcraft.models import preset
from lmcraft.models.layers import AttentionMask
from lmcraft.models.two_stream import TwoStreamModel, permutation_masks, two_stream_layer
from lmcraft.objectives.plm import PermutationLM, sample_permutation

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0,
            attention_dropout=0.0)
CONFIGS = [preset("llama-14m", **TINY, num_kv_heads=2), preset("bert-tiny", **TINY)]


def test_masks_for_a_hand_worked_order():
    # order z = (2, 0, 3, 1): ranks r = (1, 3, 0, 2); the last K = 2 of the order (3, then 1) are predicted
    rank = torch.tensor([[1, 3, 0, 2]])
    targets = torch.tensor([[3, 1]])
    content, query = permutation_masks(rank, targets)
    assert content[0, 0].int().tolist() == [
        [1, 0, 1, 0],  # token 0 (rank 1) sees token 2 (rank 0) and itself
        [1, 1, 1, 1],  # token 1 is last: sees everything
        [0, 0, 1, 0],  # token 2 is first: only itself
        [1, 0, 1, 1],  # token 3 (rank 2) sees 2, 0 and itself
    ]
    assert query[0, 0].int().tolist() == [
        [1, 0, 1, 0],  # predicting token 3: content of 2 and 0, never 3 itself
        [1, 0, 1, 1],  # predicting token 1: content of 2, 0, 3
    ]


def test_sample_permutation_targets_are_the_end_of_the_order():
    rank, targets = sample_permutation(8, 12, 2, torch.Generator().manual_seed(0))
    assert sorted(rank[0].tolist()) == list(range(12))
    assert rank.gather(1, targets).tolist() == [[10, 11]] * 8


def test_transform_shapes_and_rejects_padding():
    obj = PermutationLM(partial_prediction_factor=4)
    ids = torch.randint(0, 64, (3, 12))
    batch = obj.transform({"input_ids": ids}, torch.Generator().manual_seed(0))
    assert batch["target_positions"].shape == (3, 3)
    assert torch.equal(batch["labels"], ids.gather(1, batch["target_positions"]))
    with pytest.raises(ValueError, match="padding"):
        obj.transform({"input_ids": ids, "attention_mask": torch.tensor([[1] * 11 + [0]] * 3)})


@pytest.mark.parametrize("cfg", CONFIGS, ids=["llama", "bert"])
def test_content_stream_is_the_block_with_the_permutation_mask(cfg, tiny_model):
    lm = tiny_model(cfg).eval()
    block, backbone = lm.model.layers[0], lm.model
    rank, targets = sample_permutation(2, 6, 2, torch.Generator().manual_seed(1))
    content, query = permutation_masks(rank, targets)
    positions = torch.arange(6).expand(2, -1)
    h = backbone.embed(torch.randint(0, 64, (2, 6)), None, positions, None)
    g = torch.randn(2, 2, cfg.hidden_size)
    rope_h = backbone.rotary(positions, h.dtype) if cfg.position == "rope" else None
    rope_g = backbone.rotary(targets, h.dtype) if cfg.position == "rope" else None
    new_h, _ = two_stream_layer(block, h, g, content, query, rope_h, rope_g)
    torch.testing.assert_close(new_h, block(h, AttentionMask(content, False), rope_h))


@pytest.mark.parametrize("cfg", CONFIGS, ids=["llama", "bert"])
def test_query_stream_never_depends_on_its_own_token(cfg, tiny_model):
    model = TwoStreamModel(tiny_model(cfg)).eval()
    ids = torch.randperm(60)[:10][None] + 4  # distinct tokens, so one embedding row = one position
    rank, targets = sample_permutation(1, 10, 3, torch.Generator().manual_seed(2))
    content, query = permutation_masks(rank, targets)
    logits = model(ids, content, query, targets).logits
    for k in range(3):
        pos = int(targets[0, k])
        changed = ids.clone()
        changed[0, pos] = 1 if ids[0, pos] != 1 else 2
        new = model(changed, content, query, targets).logits
        torch.testing.assert_close(new[0, k], logits[0, k], atol=0, rtol=0)  # its own token: no effect at all
        later = [j for j in range(3) if rank[0, targets[0, j]] > rank[0, pos]]
        assert all(not torch.allclose(new[0, j], logits[0, j]) for j in later)  # later targets do see it
    # gradient check: d logits[target k] / d (embedding of input position target_k) = 0 (the LM head is tied to
    # the embedding table, so the gradient is taken at the embedding lookup's output, not at the table)
    captured = []

    def keep(module, args, out):  # noqa: ANN001, ANN202
        out.retain_grad()
        captured.append(out)

    handle = model.lm.model.embed_tokens.register_forward_hook(keep)
    logits = model(ids, content, query, targets).logits
    handle.remove()
    logits[0, 0].square().sum().backward()
    grad = captured[0].grad[0]  # (T, H)
    seen = (rank[0] < rank[0, targets[0, 0]]).nonzero().squeeze(1)
    assert grad[targets[0, 0]].abs().max().item() == 0.0
    assert all(grad[j].abs().max().item() > 0.0 for j in seen.tolist())
    unseen = [j for j in range(10) if j not in seen.tolist()]
    assert all(grad[j].abs().max().item() == 0.0 for j in unseen)
