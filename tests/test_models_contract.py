"""The model's forward contract is declared once, by the model: whatever stands in for a model or one of its layers
(`PeftModel` wraps a model; the decode fast path's `DecodeAttention` replaces `Attention`) takes the same
parameters, with the same defaults, annotations and order, so a caller cannot tell them apart and a change to the
contract that misses a stand-in fails here."""

from __future__ import annotations

import inspect

import pytest

from lmcraft.generate.fast_decode import DecodeAttention
from lmcraft.models.layers import Attention, Block
from lmcraft.models.model import Backbone, LanguageModel
from lmcraft.peft.model import PeftModel


def _parameters(function: object) -> list[inspect.Parameter]:
    return list(inspect.signature(function).parameters.values())


@pytest.mark.parametrize(("contract", "stand_in"), [
    (LanguageModel.forward, PeftModel.forward),
    (Attention.forward, DecodeAttention.forward),
    (Attention.forward, Block.forward),
])
def test_stand_ins_keep_the_forward_contract(contract: object, stand_in: object) -> None:
    assert _parameters(stand_in) == _parameters(contract)
    assert inspect.signature(stand_in).return_annotation == inspect.signature(contract).return_annotation


def test_backbone_takes_the_models_inputs() -> None:
    """The backbone's parameters are the model's, less the output switches (`use_cache`, `logits_to_keep`)."""
    model = {p.name: p for p in _parameters(LanguageModel.forward)}
    backbone = _parameters(Backbone.forward)
    assert [p.name for p in backbone] == [n for n in model if n not in ("use_cache", "logits_to_keep")]
    assert all(p == model[p.name] for p in backbone)
