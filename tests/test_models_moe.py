"""The mixture-of-experts switch without transformers: the batched experts equal the per-token sum they stand for,
the router statistics follow their definitions, activation checkpointing keeps the aux-loss gradients, and a dense
model has no router output."""

from __future__ import annotations

import pytest
import torch

from lmcraft.models import LanguageModel, ModelConfig
from lmcraft.models.moe import SparseMoE

MOE = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
           model_type="qwen3_moe", qk_norm="head", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
           norm_topk_prob=True, router_aux_loss_coef=0.1)


def moe_model(seed: int = 0, **kw) -> LanguageModel:
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(**{**MOE, **kw}))


def test_experts_equal_the_per_token_definition() -> None:
    """y = sum over the top-k of w_e down_e(silu(gate_e x) * up_e x), token by token."""
    layer = moe_model().model.layers[0].mlp
    assert isinstance(layer, SparseMoE)
    x = torch.randn(3, 5, 32)
    y = layer(x).reshape(-1, 32)
    probs, chosen = layer.routing
    gate_up, down = layer.experts.gate_up_proj, layer.experts.down_proj
    for n, token in enumerate(x.reshape(-1, 32)):
        w = probs[n, chosen[n]] / probs[n, chosen[n]].sum()
        expected = sum(w[j] * down[e] @ (torch.nn.functional.silu(gate_up[e, :16] @ token) * (gate_up[e, 16:] @ token))
                       for j, e in enumerate(chosen[n].tolist()))
        assert torch.allclose(y[n], expected, atol=1e-6)


def test_router_statistics_follow_their_definitions() -> None:
    model = moe_model(mlp_only_layers=(1,))
    ids = torch.randint(0, 64, (2, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    router = model(ids, attention_mask=mask).router
    assert len(router.probs) == 1  # layer 1 is dense
    real = mask.reshape(-1).bool()
    probs, chosen = router.probs[0][real], router.chosen[0][real]
    f = torch.stack([(chosen == e).any(-1).float().mean() for e in range(4)])
    p = probs.mean(0)
    assert torch.allclose(router.aux_loss(), 4 * (f * p).sum(), atol=1e-6)
    load = router.expert_load()[0]
    assert torch.allclose(load, f / f.sum()) and abs(float(load.sum()) - 1) < 1e-6
    metrics = router.metrics()
    assert set(metrics) == {"aux_loss", *(f"expert_load/{e}" for e in range(4))}
    assert moe_model(num_experts=0)(ids).router is None


@pytest.mark.parametrize("mode", ["full", "mlp"])
def test_checkpointing_keeps_the_aux_loss_gradient(mode: str) -> None:
    ids = torch.randint(0, 64, (2, 8))
    grads = []
    for checkpointing in ("none", mode):
        model = moe_model()
        model.model.set_checkpointing(checkpointing)
        out = model(ids)
        (out.logits.square().mean() + out.router.aux_loss()).backward()
        grads.append(model.model.layers[0].mlp.gate.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bad_moe_configs() -> None:
    with pytest.raises(ValueError, match="num_experts_per_tok=5 must be in 1..num_experts=4"):
        ModelConfig(**{**MOE, "num_experts_per_tok": 5})
    with pytest.raises(ValueError, match="decoder_sparse_step=0"):
        ModelConfig(**{**MOE, "decoder_sparse_step": 0})
    cfg = ModelConfig(**{**MOE, "num_layers": 4, "decoder_sparse_step": 2, "mlp_only_layers": (3,)})
    assert [cfg.is_moe_layer(i) for i in range(4)] == [False, True, False, False]
    model = LanguageModel(cfg)
    norms = cfg.num_layers * 2 * cfg.head_dim + cfg.hidden_size  # q/k norms and the final norm: not in the estimate
    assert cfg.num_parameters() + norms == model.num_parameters()
