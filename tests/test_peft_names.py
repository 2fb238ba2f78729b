"""`target_modules` and `modules_to_save` in Hugging Face module names, mapped through the family's name table."""

from __future__ import annotations

import pytest
import torch

from lmcraft import peft
from lmcraft.hub.names import NAME_TABLES
from lmcraft.models import LanguageModel, preset

SMALL = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=64)


def tiny(name: str, head: str | None = None) -> LanguageModel:
    torch.manual_seed(0)
    extra = {"num_kv_heads": 2} if name == "llama-14m" else {}
    return LanguageModel(preset(name, **SMALL, **extra), head).eval()


def wrapped(model: peft.PeftModel) -> list[str]:
    return sorted(path.replace(".base_layer", "") for path, _ in model.adapter_layers())


def test_hf_module_paths_of_each_family() -> None:
    assert NAME_TABLES["llama"].hf_module("model.layers.0.attn_norm", "lm") == "model.layers.0.input_layernorm"
    assert NAME_TABLES["llama"].hf_module("head", "lm") == "lm_head"
    assert NAME_TABLES["gpt2"].hf_module("model.layers.1.self_attn.k_proj", "lm") == "transformer.h.1.attn.c_attn"
    assert NAME_TABLES["bert"].hf_module("model.layers.0.self_attn.v_proj", "mlm") == \
        "bert.encoder.layer.0.attention.self.value"
    assert NAME_TABLES["llama"].hf_module("model.layers.0.self_attn", "lm") is None  # no parameters of its own


def test_bert_query_value_are_q_proj_v_proj() -> None:
    ours = peft.apply(tiny("bert-tiny"), {"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"],
                                          "init_lora_weights": False})
    theirs = peft.apply(tiny("bert-tiny"), {"method": "lora", "r": 2, "target_modules": ["query", "value"],
                                            "init_lora_weights": False})
    assert wrapped(ours) == wrapped(theirs) and len(wrapped(ours)) == 4
    x = torch.randint(0, 64, (2, 6))
    assert torch.equal(ours(x).logits, theirs(x).logits)


def test_gpt2_packed_and_shared_names() -> None:
    c_attn = wrapped(peft.apply(tiny("gpt2-tiny"), {"method": "lora", "r": 2, "target_modules": ["c_attn"]}))
    assert c_attn == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "kqv"]
    c_proj = wrapped(peft.apply(tiny("gpt2-tiny"), {"method": "lora", "r": 2, "target_modules": ["c_proj"]}))
    assert c_proj == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj")]
    attn_only = peft.apply(tiny("gpt2-tiny"), {"method": "lora", "r": 2, "target_modules": ["attn.c_proj"]})
    assert wrapped(attn_only) == [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]


def test_ia3_feedforward_modules_in_hf_names() -> None:
    model = peft.apply(tiny("gpt2-tiny"), {"method": "ia3", "target_modules": ["c_attn", "mlp.c_proj"],
                                           "feedforward_modules": ["mlp.c_proj"]})
    shapes = {n: tuple(p.shape) for n, p in model.named_adapter_parameters()}
    assert shapes["model.layers.0.mlp.down_proj.ia3_l"] == (1, 64)  # input scaling of the FFN's down projection
    assert shapes["model.layers.0.self_attn.k_proj.ia3_l"] == (32, 1)


def test_modules_to_save_in_hf_names(tmp_path) -> None:  # noqa: ANN001
    model = peft.apply(tiny("llama-14m"), {"method": "lora", "r": 2, "modules_to_save": ["lm_head"]})
    assert "head" in wrapped(model)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters():
            p.add_(0.1)
    peft.save_adapter(model, tmp_path)
    again = peft.load_adapter(tiny("llama-14m"), tmp_path)
    x = torch.randint(0, 64, (1, 5))
    assert torch.equal(model(x).logits, again(x).logits)


def test_unknown_name_lists_both_spellings() -> None:
    with pytest.raises(peft.PeftError, match="no module matches") as err:
        peft.apply(tiny("gpt2-tiny"), {"method": "lora", "target_modules": ["query"]})
    message = str(err.value)
    assert "q_proj" in message and "c_attn" in message and "Hugging Face names" in message


def test_modules_to_save_are_written_once_each(tiny_model) -> None:  # noqa: ANN001 - the conftest builder
    from lmcraft import peft
    from lmcraft.models import preset
    from lmcraft.peft.hf_format import peft_modules_to_save

    model = tiny_model(preset("bert-tiny", vocab_size=64, hidden_size=16, num_layers=1, num_heads=2,
                              intermediate_size=32), head="cls")
    wrapped = peft.apply(model, {"method": "lora", "r": 2, "target_modules": ["q_proj"], "modules_to_save": ["head"]})
    names = peft_modules_to_save(wrapped, ["head"])
    assert names and len(names) == len(set(names))
