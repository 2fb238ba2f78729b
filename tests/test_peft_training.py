"""lmcraft.peft.training (prepare for training, regulariser, checkpoint format, reference policy) and
lmcraft.objectives.lm_head (token log-probs, the batched no-grad scoring loop)."""

from __future__ import annotations

import torch

from lmcraft.models import LanguageModel, ModelConfig
from lmcraft.objectives.lm_head import scored_batches, sequence_logprobs, token_logprobs
from lmcraft.peft.training import (
    REGULARIZER_METRIC,
    AdaLoraAllocator,
    AdapterWeights,
    method_config,
    prepare_for_training,
    reference_policy,
)
from lmcraft.train import LossOutput, WeightsFormat


def _model() -> LanguageModel:
    torch.manual_seed(0)
    return LanguageModel(ModelConfig(vocab_size=24, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32))


def _loss(model: torch.nn.Module, batch: torch.Tensor) -> LossOutput:
    return LossOutput(model(batch).logits.float().square().sum(), 3, {})


def test_method_config_adds_the_head_and_adalora_steps() -> None:
    given = {"method": "adalora", "init_r": 4}
    cfg = method_config(given, "cls", 40)
    assert cfg["modules_to_save"] == ["head"] and cfg["total_step"] == 40 and "total_step" not in given
    assert "modules_to_save" not in method_config({"method": "lora"}, "lm", 40)


def test_full_finetuning_trains_everything_and_saves_whole_weights() -> None:
    model = _model()
    model.requires_grad_(False)
    training = prepare_for_training(model, None, "lm", 10)
    assert training.method == "full" and all(p.requires_grad for p in model.parameters())
    assert type(training.weights()) is WeightsFormat and training.callbacks() == []
    assert training.loss(_loss) is _loss


def test_adalora_regulariser_is_added_in_training_only_under_one_name() -> None:
    training = prepare_for_training(_model(), {"method": "adalora", "init_r": 4, "target_r": 2}, "lm", 10)
    assert isinstance(training.weights(), AdapterWeights)
    assert [type(c) for c in training.callbacks()] == [AdaLoraAllocator]
    loss = training.loss(_loss)
    batch = torch.tensor([[1, 2, 3]])
    training.model.train()
    plain, regularized = _loss(training.model, batch), loss(training.model, batch)
    reg = regularized.metrics[REGULARIZER_METRIC]
    assert torch.allclose(regularized.loss_sum, plain.loss_sum + reg * 3)
    training.model.eval()
    assert REGULARIZER_METRIC not in loss(training.model, batch).metrics


def test_reference_policy_disables_adapters_or_copies() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    base = _model()
    expected = base(ids).logits
    lora = prepare_for_training(_model(), {"method": "lora", "r": 2, "init_lora_weights": False}, "lm", 10).model
    reference = reference_policy(lora)
    assert reference.copy is None and not torch.equal(lora(ids).logits, expected)
    lora.train()
    with reference.active(lora) as net:
        assert torch.equal(net(ids).logits, expected) and not net.training and not torch.is_grad_enabled()
    assert lora.training
    full = _model()
    copied = reference_policy(full)
    with torch.no_grad():
        next(full.parameters()).add_(1.0)
    with copied.active(full) as net:
        assert net is copied.copy and torch.equal(net(ids).logits, expected)


def test_token_logprobs_and_scored_batches() -> None:
    logits = torch.randn(2, 5, 7)
    tokens = torch.randint(0, 7, (2, 5))
    expected = (logits / 2.0).log_softmax(-1).gather(2, tokens[..., None])[..., 0]
    assert torch.equal(token_logprobs(logits, tokens, 2.0), expected)
    labels = tokens.clone()
    labels[:, :2] = -100
    total, count = sequence_logprobs(logits, labels)
    assert count.tolist() == [3, 3]
    assert torch.allclose(total, token_logprobs(logits[:, :-1], labels[:, 1:].clamp_min(0))[:, 1:].sum(-1))
    model = _model().train()
    seen = scored_batches(model, 5, 2, lambda rows: (rows.start, model.training, torch.is_grad_enabled()))
    assert seen == [(0, False, False), (2, False, False), (4, False, False)] and model.training
