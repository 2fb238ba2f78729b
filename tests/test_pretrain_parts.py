"""The parts `lmcraft pretrain` wires: objectives' token-id needs and kept models, masked-token accuracy as an
eval-mode metric, the seeded batch makers, weight transfer for continued pre-training, and the one declaration
of tokenizer training."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmcraft.data.batches import BatchMaker, Indexed
from lmcraft.errors import ConfigError, ModelLoadError
from lmcraft.hub import save_model
from lmcraft.hub.transfer import load_pretrained_weights
from lmcraft.models import LanguageModel, preset
from lmcraft.objectives import build_objective
from lmcraft.objectives.base import IGNORE_INDEX, masked_token_accuracy

TINY = dict(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)


@dataclasses.dataclass
class Ids:
    """A tokenizer's ids as objectives read them (`lmcraft.objectives.base.TokenizerIds`)."""

    vocab_size: int = 40
    pad_token: str | None = "[PAD]"
    pad_token_id: int | None = 0
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    mask_token_id: int | None = 3
    cls_token_id: int | None = 1
    sep_token_id: int | None = 2
    all_special_ids: tuple[int, ...] = (0, 1, 2, 3)


def test_objectives_take_the_ids_they_need_from_the_tokenizer() -> None:
    mlm = build_objective("mlm", Ids())
    assert (mlm.masking.vocab_size, mlm.masking.mask_token_id, list(mlm.masking.special_token_ids)) == \
        (40, 3, [0, 1, 2, 3])
    nsp = build_objective("nsp", Ids(), 24)
    assert (nsp.cls_token_id, nsp.sep_token_id, nsp.pad_token_id, nsp.max_length, nsp.name) == (1, 2, 0, 24, "nsp")
    assert build_objective("clm", Ids()).eos_token_id == 2  # no EOS: [SEP] ends a document
    assert build_objective("clm", Ids(eos_token_id=5), eos_token_id=7).eos_token_id == 7  # options win
    with pytest.raises(ConfigError, match="objective 'mlm' needs a mask token"):
        build_objective("mlm", Ids(mask_token_id=None))
    with pytest.raises(ConfigError, match="objective 'sop' needs a padding token"):  # no fallback to EOS here
        build_objective("sop", Ids(pad_token=None, pad_token_id=5))


@pytest.mark.parametrize(("name", "head"), [("clm", "lm"), ("plm", "lm"), ("mlm", "mlm"), ("nsp", "mlm"),
                                            ("rtd", "rtd")])
def test_each_objective_names_the_model_it_keeps(name: str, head: str) -> None:
    arch = "llama-14m" if head == "lm" else "bert-tiny"
    objective = build_objective(name, Ids())
    kept = objective.kept_model(objective.build_model(preset(arch, **TINY)))
    assert isinstance(kept, LanguageModel) and kept.head_kind == head


@pytest.mark.parametrize("name", ["mlm", "sop"])
def test_masked_accuracy_is_reported_in_eval_mode_only(name: str) -> None:
    torch.manual_seed(0)
    objective = build_objective(name, Ids())
    model = objective.build_model(preset("bert-tiny", **TINY))
    ids = torch.randint(4, 40, (4, 12))
    batch = {"pairs": [{"tokens_a": r[:5], "tokens_b": r[5:], "label": 0} for r in ids.tolist()]} \
        if name == "sop" else {"input_ids": ids}
    batch = objective.transform(batch, torch.Generator().manual_seed(0))
    assert "masked_accuracy" not in objective.loss(model, batch).metrics
    model.eval()
    with torch.no_grad():
        out = objective.loss(model, batch)
        logits = (model.lm if name == "sop" else model)(batch["input_ids"], attention_mask=batch.get(
            "attention_mask"), token_type_ids=batch.get("token_type_ids")).logits
    masked = batch["labels"] != IGNORE_INDEX
    expected = (logits[masked].argmax(-1) == batch["labels"][masked]).double().mean()
    assert float(out.metrics["masked_accuracy"]) == pytest.approx(float(expected), abs=1e-12)
    assert float(masked_token_accuracy(logits, torch.full_like(batch["labels"], IGNORE_INDEX))) == 0.0


def test_seeded_batches_draw_the_same_masks_every_time() -> None:
    objective = build_objective("mlm", Ids())
    data = Indexed([{"input_ids": torch.arange(4, 20) % 36 + 4} for _ in range(6)])
    make = BatchMaker(objective, pairs=False, seed=3)
    first, again = make([data[i] for i in (2, 3)]), make([data[i] for i in (2, 3)])
    assert torch.equal(first["input_ids"], again["input_ids"]) and torch.equal(first["labels"], again["labels"])
    other = make([data[i] for i in (4, 5)])  # another first index, another generator
    assert not torch.equal(first["labels"], other["labels"])


@pytest.mark.filterwarnings("ignore::lmcraft.hub.HubWarning")  # a new head, unused checkpoint head tensors
def test_weight_transfer_keeps_the_new_head_and_refuses_a_misfit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = LanguageModel(preset("bert-tiny", **TINY), "mlm")
    save_model(source, tmp_path / "src")
    target = LanguageModel(preset("bert-tiny", **TINY), "token_cls")
    load_pretrained_weights(target, tmp_path / "src")
    src_state, state = source.state_dict(), target.state_dict()
    assert all(torch.equal(state[k], src_state[k]) for k in state if k.startswith("model."))
    with pytest.raises(ModelLoadError, match="does not fit the configured model"):
        load_pretrained_weights(LanguageModel(preset("bert-tiny", **{**TINY, "hidden_size": 48}), "mlm"),
                                tmp_path / "src")


def test_tokenizer_training_is_declared_once() -> None:
    from lmcraft.data.tokenizer_training import TokenizerConfig
    from lmcraft.pretrain.config import TokenizerSection
    from lmcraft.tokenizer.train import TokenizerTraining

    assert issubclass(TokenizerConfig, TokenizerTraining)
    assert TokenizerSection.model_fields["train"].annotation == TokenizerTraining | None
    # each stage keeps its default vocabulary size: 8000 for `lmcraft tokenizer`, 8192 for `lmcraft pretrain`
    assert TokenizerConfig(inputs=["x.txt"], output="out").vocab_size == 8000
    assert TokenizerTraining().vocab_size == 8192


def test_objectives_sit_below_train() -> None:
    code = "import sys, lmcraft.objectives; assert not any(m.startswith('lmcraft.train') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)
