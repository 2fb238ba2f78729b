"""Every registered objective trains: the loss falls on a tiny model in a few dozen plain AdamW steps."""

import pytest
import torch

from lmcraft.errors import ConfigError
from lmcraft.models import preset
from lmcraft.objectives import OBJECTIVES, build_objective
from lmcraft.objectives.sentence_pairs import build_pairs

PAD, CLS, SEP, MASK, EOS = 0, 1, 2, 3, 2
VOCAB = 64
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
MASKING = {"vocab_size": VOCAB, "mask_token_id": MASK, "special_token_ids": [PAD, CLS, SEP, MASK]}


def _counting(batch: int, length: int, seed: int) -> torch.Tensor:
    """Rows x_t = 4 + (s + t) mod 8 from a random start s: every token is predictable from any other."""
    start = torch.randint(0, 60, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return 4 + (start + torch.arange(length)) % 8


def _train(name: str, model_cfg, options: dict, batch: dict, steps: int = 40, lr: float = 3e-3) -> list[float]:  # noqa: ANN001
    torch.manual_seed(0)
    obj = build_objective(name, **options)
    model = obj.build_model(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        out = obj.loss(model, obj.transform(batch, g))
        loss = out.loss_sum / out.num_targets
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _fell(losses: list[float], ratio: float) -> bool:
    return sum(losses[-5:]) / 5 < ratio * sum(losses[:5]) / 5


def test_clm_loss_falls_with_document_resets():
    ids = _counting(8, 32, 0)
    ids[:, 15] = EOS
    losses = _train("clm", preset("llama-14m", **TINY), {"eos_token_id": EOS, "reset_at_eos": True},
                    {"input_ids": ids})
    assert _fell(losses, 0.5), losses


@pytest.mark.parametrize("strategy", ["token", "span"])
def test_mlm_loss_falls(strategy):
    losses = _train("mlm", preset("bert-tiny", **TINY), {"masking": {**MASKING, "strategy": strategy}},
                    {"input_ids": _counting(16, 32, 1)})
    assert _fell(losses, 0.7), losses


@pytest.mark.parametrize("kind", ["nsp", "sop"])
def test_sentence_pair_loss_falls(kind):
    docs = [row.view(8, 4).tolist() for row in _counting(40, 32, 2)]
    pairs = build_pairs(docs, kind, max_length=24, generator=torch.Generator().manual_seed(0))[:16]
    options = {"masking": MASKING, "cls_token_id": CLS, "sep_token_id": SEP, "pad_token_id": PAD}
    losses = _train(kind, preset("bert-tiny", **TINY), options, {"pairs": pairs})
    assert _fell(losses, 0.7), losses


def test_rtd_loss_falls():
    losses = _train("rtd", preset("bert-tiny", **TINY), {"masking": MASKING, "generator_width_fraction": 0.5},
                    {"input_ids": _counting(16, 32, 3)})
    assert _fell(losses, 0.7), losses


def test_plm_loss_falls():
    losses = _train("plm", preset("llama-14m", **TINY), {"partial_prediction_factor": 4},
                    {"input_ids": _counting(16, 32, 4)})
    assert _fell(losses, 0.7), losses


def test_registry_names_and_errors():
    assert set(OBJECTIVES) == {"clm", "mlm", "nsp", "sop", "rtd", "plm"}
    assert build_objective("sop", masking=MASKING, cls_token_id=CLS, sep_token_id=SEP, pad_token_id=PAD).name == "sop"
    with pytest.raises(ConfigError, match="unknown pre-training objective"):
        build_objective("gpt")
    with pytest.raises(ConfigError, match="bad options"):
        build_objective("mlm", masking={**MASKING, "probability": 2.0})
