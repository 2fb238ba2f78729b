"""ELECTRA replaced-token detection: sampling, replaced-vs-original labels, embedding sharing, loss by hand."""

import math

import pytest
import torch
from torch import nn

from lmcraft.models import preset
from lmcraft.objectives.electra import (
    ElectraModel,
    ElectraOutput,
    ReplacedTokenDetection,
    generator_config,
    sample_inverse_cdf,
)
from lmcraft.objectives.mlm import MaskingConfig

TINY = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, dropout=0.0,
            attention_dropout=0.0)


def test_inverse_cdf_sampling_by_hand():
    logits = torch.log(torch.tensor([0.2, 0.5, 0.3])).expand(5, -1)  # cdf 0.2, 0.7, 1.0
    u = torch.tensor([0.1, 0.25, 0.65, 0.75, 0.9999])
    assert sample_inverse_cdf(logits, u).tolist() == [0, 1, 1, 2, 2]


def test_inverse_cdf_sampling_frequencies():
    logits = torch.tensor([[0.0, math.log(3.0)]]).expand(20000, -1)
    samples = sample_inverse_cdf(logits, torch.rand(20000, generator=torch.Generator().manual_seed(0)))
    assert samples.float().mean().item() == pytest.approx(0.75, abs=0.015)


def test_generator_config_scales_width():
    gen = generator_config(preset("bert-tiny"), 0.25)
    assert (gen.num_heads, gen.hidden_size, gen.intermediate_size, gen.head_dim) == (1, 64, 256, 64)
    gqa = generator_config(preset("llama-14m"), 0.5)  # 6 heads / 2 kv heads -> 3 heads / 1 kv head
    assert (gqa.num_heads, gqa.num_kv_heads, gqa.hidden_size) == (3, 1, 192)


def test_same_width_shares_one_embedding_tensor():
    cfg = preset("bert-tiny", **TINY)
    model = ElectraModel(cfg, cfg)
    shared = model.discriminator.model.embed_tokens.weight
    assert model.generator.model.embed_tokens.weight is shared
    assert model.generator.head.decoder.weight is shared
    assert model.embed_proj is None


def test_narrow_generator_reads_the_discriminator_table_through_a_projection():
    cfg = preset("bert-tiny", **TINY)
    model = ElectraModel(cfg, generator_config(cfg, 0.5)).eval()
    assert model.embed_proj.weight.shape == (16, 32)
    ids = torch.tensor([[5, 6, 7, 8]])
    labels = torch.tensor([[-100, 6, -100, -100]])
    before = model(ids, labels, torch.zeros(1, 4)).generator_logits
    with torch.no_grad():
        model.discriminator.model.embed_tokens.weight[7] += 1.0
    after = model(ids, labels, torch.zeros(1, 4)).generator_logits
    assert not torch.allclose(before, after)


def test_a_sample_equal_to_the_original_counts_as_original():
    cfg = preset("bert-tiny", **TINY)
    model = ElectraModel(cfg, cfg).eval()
    with torch.no_grad():
        model.generator.head.bias[9] = 1e4  # the generator always samples token 9
    ids = torch.tensor([[5, 3, 3, 6]])  # positions 1, 2 masked (3 = [MASK]); originals 9 and 10
    labels = torch.tensor([[-100, 9, 10, -100]])
    out = model(ids, labels, torch.rand(1, 4))
    assert out.is_replaced.tolist() == [[0.0, 0.0, 1.0, 0.0]]


class _FixedElectra(nn.Module):
    def __init__(self, out: ElectraOutput) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args):  # noqa: ANN002
        return self.out


def test_loss_is_generator_mean_plus_lambda_discriminator_mean():
    gen_logits = torch.zeros(1, 4, 4)  # ln 4 per masked token
    disc_logits = torch.tensor([[0.0, 0.0, 0.0, 100.0]])  # ln 2 per real token; the padding one is ignored
    out = ElectraOutput(gen_logits, disc_logits, torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    batch = {"input_ids": torch.tensor([[5, 3, 3, 0]]), "labels": torch.tensor([[-100, 1, 2, -100]]),
             "attention_mask": torch.tensor([[1, 1, 1, 0]]), "sample_uniform": torch.zeros(1, 4)}
    obj = ReplacedTokenDetection(MaskingConfig(vocab_size=4, mask_token_id=3))
    loss = obj.loss(_FixedElectra(out), batch)
    assert loss.num_targets == 2 and loss.num_tokens == 3
    assert loss.loss_sum.item() / 2 == pytest.approx(math.log(4) + 50 * math.log(2), rel=1e-6)


def test_no_gradient_flows_through_sampling():
    cfg = preset("bert-tiny", **TINY)
    model = ElectraModel(cfg, generator_config(cfg, 0.5))
    obj = ReplacedTokenDetection(MaskingConfig(vocab_size=64, mask_token_id=3), disc_weight=1.0)
    batch = obj.transform({"input_ids": torch.randint(4, 64, (2, 16))}, torch.Generator().manual_seed(0))
    out = model(batch["input_ids"], batch["labels"], batch["sample_uniform"])
    out.discriminator_logits.sum().backward()
    # the discriminator loss reaches the shared embeddings but nothing in the generator's own layers
    assert model.discriminator.model.embed_tokens.weight.grad is not None
    assert all(p.grad is None for p in model.generator.parameters())
    assert model.embed_proj.weight.grad is None
