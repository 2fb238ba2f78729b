"""Adapters cross between lmcraft and Hugging Face PEFT on a tiny random Llama, with the same logits both ways.

The base model is a transformers `LlamaForCausalLM` saved with `save_pretrained` and loaded in lmcraft with
`lmcraft.hub.load_model`. Tolerance: float32, |difference| <= 1e-5; measured: bit-identical for LoRA, rsLoRA, IA3,
AdaLoRA, prefix, prompt tuning and P-tuning (MLP), <= 2e-6 for DoRA and the LSTM P-tuning encoder; the adapters
change the logits by 1.5-4.5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmcraft import peft
from lmcraft.hub import load_model

pytestmark = pytest.mark.parity

ATOL = 1e-5
X = torch.tensor([[1, 5, 9, 33, 70, 11, 3, 64], [2, 40, 41, 7, 99, 100, 17, 8]])


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def hf_model(folder: Path):  # noqa: ANN201 - a transformers model
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder).eval()


def hf_logits(model, n_virtual: int = 0) -> torch.Tensor:  # noqa: ANN001
    with torch.no_grad():
        logits = model(input_ids=X, attention_mask=torch.ones_like(X)).logits
    return logits[:, n_virtual:]


def test_base_models_agree(llama_dir: Path) -> None:
    torch.testing.assert_close(load_model(llama_dir)(X).logits, hf_logits(hf_model(llama_dir)), rtol=0, atol=ATOL)


LMCRAFT_TO_PEFT = {
    "lora": ({"method": "lora", "r": 4, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "down_proj"]}, 0),
    "rslora": ({"method": "lora", "r": 4, "use_rslora": True, "target_modules": "all-linear"}, 0),
    "dora": ({"method": "dora", "r": 4, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"]}, 0),
    "ia3": ({"method": "ia3"}, 0),
    "adalora": ({"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 10}, 0),
    "prefix": ({"method": "prefix", "num_virtual_tokens": 3, "encoder_hidden_size": 16}, 0),
    "prompt": ({"method": "prompt", "num_virtual_tokens": 3}, 3),
    "ptuning": ({"method": "ptuning", "num_virtual_tokens": 3, "encoder_hidden_size": 16}, 3),
}


@pytest.mark.parametrize("name", sorted(LMCRAFT_TO_PEFT))
def test_lmcraft_adapter_loads_in_peft(name: str, llama_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    cfg, n_virtual = LMCRAFT_TO_PEFT[name]
    torch.manual_seed(1)
    model = peft.apply(load_model(llama_dir), cfg)
    with torch.no_grad():
        for _, p in model.named_adapter_parameters():
            p.add_(torch.randn_like(p) * 0.3)
    if name == "adalora":  # prune one triplet per layer so the saved rank_pattern is exercised
        pattern = {f"{path}.lora_E": [True, False, True, True] for path, _ in
                   ((peft.model.clean_path(p), m) for p, m in model.adapter_layers())}
        model.peft_configs["default"].rank_pattern = pattern
        peft.adalora.apply_rank_pattern(model, "default", pattern)
    ours = model(X).logits
    peft.save_adapter(model, tmp_path, base_model_name_or_path=str(llama_dir))
    theirs = hf_logits(PeftModel.from_pretrained(hf_model(llama_dir), tmp_path), n_virtual)
    assert not torch.allclose(ours, hf_logits(hf_model(llama_dir)), atol=1e-2)  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)


def peft_configs():  # noqa: ANN201 - peft config objects
    from peft import AdaLoraConfig, IA3Config, LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

    return {
        "lora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                            init_lora_weights=False), 0),
        "dora": (LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True,
                            init_lora_weights=False), 0),
        "rslora": (LoraConfig(r=2, lora_alpha=4, target_modules=r".*\.mlp\.(up|down)_proj", use_rslora=True,
                              init_lora_weights=False), 0),
        "ia3": (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                          init_ia3_weights=False), 0),
        "adalora": (AdaLoraConfig(init_r=4, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"]), 0),
        "prefix": (PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16), 0),
        "prompt": (PromptTuningConfig(num_virtual_tokens=3), 3),
        "ptuning_lstm": (PromptEncoderConfig(num_virtual_tokens=3, encoder_hidden_size=16,
                                             encoder_reparameterization_type="LSTM"), 3),
    }


@pytest.mark.parametrize("name", ["lora", "dora", "rslora", "ia3", "adalora", "prefix", "prompt", "ptuning_lstm"])
def test_peft_adapter_loads_in_lmcraft(name: str, llama_dir: Path, tmp_path: Path) -> None:
    from peft import get_peft_model

    cfg, n_virtual = peft_configs()[name]
    cfg.task_type = "CAUSAL_LM"
    torch.manual_seed(2)
    theirs_model = get_peft_model(hf_model(llama_dir), cfg).eval()
    with torch.no_grad():  # move PEFT's adapter off its init (E = 0 for AdaLoRA, for one)
        for p in theirs_model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    theirs = hf_logits(theirs_model, n_virtual)
    theirs_model.save_pretrained(tmp_path)
    ours = peft.load_adapter(load_model(llama_dir), tmp_path)(X).logits
    assert not torch.allclose(ours, hf_logits(hf_model(llama_dir)), atol=1e-2)  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=ATOL)
