"""LoRA on a mixture-of-experts layer in PEFT's file layout, both ways, on a tiny random Qwen3MoeForCausalLM.

What the installed versions do (transformers 5, PEFT 0.21): transformers holds Qwen3-MoE's experts as fused 3-D
parameters (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I); no ModuleList) and its router
as a `Qwen3MoeTopKRouter` module with a bare `weight`, so PEFT adapts both through `target_parameters`
(`lora.ParamWrapper`), nesting one wrapper per parameter of the experts module: `gate_up_proj`'s A/B are saved under
`mlp.experts.base_layer.lora_A/B.weight`, `down_proj`'s under `mlp.experts.lora_A/B.weight`.

An adapter saved by lmcraft opens with `peft.PeftModel.from_pretrained` on transformers' model and gives lmcraft's
logits; an adapter PEFT made (random A and B, saved by `save_pretrained`) opens in lmcraft and gives PEFT's logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from test_parity_hf import batch, diff, hf_to_ours, our_logits
from test_parity_moe import hf_moe

pytestmark = pytest.mark.parity
PARAMETERS = ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]


@pytest.fixture(scope="module")
def transformers():  # noqa: ANN201 - the module
    return pytest.importorskip("transformers")


def _randomise_adapter(named_parameters, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_parameters:
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _peft_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(adapted, base) logits of a PEFT model."""
    with torch.no_grad():
        adapted = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            return adapted, model(input_ids=ids, attention_mask=mask).logits


def test_lmcraft_expert_lora_opens_in_peft(transformers, tmp_path: Path) -> None:
    hf_peft = pytest.importorskip("peft")
    from lmcraft import peft

    hf_model = hf_moe(transformers)
    ours = peft.apply(hf_to_ours(tmp_path, hf_model),  # also saves hf_model's (randomised) weights in tmp_path/hf
                      {"method": "lora", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "gate", "experts"]})
    _randomise_adapter(ours.named_parameters(), seed=3)
    peft.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj"] and sorted(config["target_parameters"]) == PARAMETERS

    base = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    theirs = hf_peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    experts = theirs.base_model.model.model.layers[0].mlp.experts
    assert type(experts).__name__ == "ParamWrapper" and experts.parameter_name == "down_proj"
    assert experts.base_layer.parameter_name == "gate_up_proj"
    ids, mask = batch("right")
    adapted, plain = _peft_logits(theirs, ids, mask)
    diff("qwen3_moe:lora-file-to-peft", our_logits(ours.eval(), ids, mask), adapted, mask)
    assert float((adapted - plain).abs().max()) > 0.1  # the adapter matters


def test_peft_expert_lora_opens_in_lmcraft(transformers, tmp_path: Path) -> None:
    hf_peft = pytest.importorskip("peft")
    from lmcraft import peft

    hf_model = hf_moe(transformers)
    base = hf_to_ours(tmp_path, hf_model)  # saves hf_model's weights, then PEFT wraps that same model
    wrapped = hf_peft.get_peft_model(hf_model, hf_peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "o_proj"], target_parameters=PARAMETERS)).eval()
    _randomise_adapter(wrapped.named_parameters(), seed=5)
    wrapped.save_pretrained(tmp_path / "peft-adapter")
    ids, mask = batch("right")
    adapted, _ = _peft_logits(wrapped, ids, mask)

    ours = peft.load_adapter(base, tmp_path / "peft-adapter").eval()
    assert sorted(ours.peft_configs["default"].target_modules) == ["experts", "gate", "o_proj", "q_proj"]
    diff("qwen3_moe:lora-file-from-peft", our_logits(ours, ids, mask), adapted, mask)


def test_partial_expert_targets_are_refused(tmp_path: Path) -> None:
    from lmcraft.peft.hf_format import config_from_peft
    from lmcraft.peft.layers import PeftError

    data = {"peft_type": "LORA", "r": 2, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj"]}
    with pytest.raises(PeftError, match="adapt only part of"):
        config_from_peft(data, "adapter_config.json")
    with pytest.raises(PeftError, match=r"target_parameters \['mlp.foo.bias'\] are not supported"):
        config_from_peft({**data, "target_parameters": ["mlp.foo.bias"]}, "adapter_config.json")
