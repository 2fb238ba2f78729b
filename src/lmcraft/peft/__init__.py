"""Parameter-efficient fine-tuning: one interface over LoRA/DoRA/rsLoRA, QLoRA, AdaLoRA, bottleneck adapters,
prefix tuning, prompt tuning, P-tuning v1/v2, BitFit, (IA)^3 and UniPELT.

    from lmcraft import peft
    model = peft.apply(base, {"method": "lora", "r": 8})     # a PeftModel; only the adapter trains
    peft.print_trainable_parameters(model)
    peft.save_adapter(model, "adapter/")                       # Hugging Face PEFT layout where PEFT has the method
    merged = peft.merge(model)

Modules: `registry.py` (method configs by name), `layers.py` (wrapper layers, providers, target matching),
`model.py` (`PeftModel`, adapter state dicts), `api.py` (apply, merge, parameter counts), `hf_format.py` (Hugging
Face PEFT's config keys and tensor names), `io.py` (adapter folders), and one module per method with its math.
"""

from lmcraft.peft import adalora, adapter, bitfit, ia3, lora, prefix, prompt, ptuning, qlora, unipelt
from lmcraft.peft.adalora import AdaLoraConfig, update_and_allocate
from lmcraft.peft.adapter import AdapterConfig
from lmcraft.peft.api import (
    apply,
    count_parameters,
    merge,
    print_trainable_parameters,
    regularization_loss,
    trainable_parameters,
)
from lmcraft.peft.bitfit import BitFitConfig
from lmcraft.peft.ia3 import IA3Config
from lmcraft.peft.io import load_adapter, read_adapter_config, save_adapter
from lmcraft.peft.layers import PeftError
from lmcraft.peft.lora import DoraConfig, LoraConfig
from lmcraft.peft.model import PeftModel, adapter_state_dict, load_adapter_state_dict
from lmcraft.peft.prefix import PrefixConfig
from lmcraft.peft.prompt import PromptConfig
from lmcraft.peft.ptuning import PTuningConfig, PTuningV2Config
from lmcraft.peft.qlora import QLoraConfig, quantize_model
from lmcraft.peft.registry import REGISTRY, MethodConfig, config_from_dict
from lmcraft.peft.unipelt import UniPELTConfig

__all__ = [
    "REGISTRY",
    "AdaLoraConfig",
    "AdapterConfig",
    "BitFitConfig",
    "DoraConfig",
    "IA3Config",
    "LoraConfig",
    "MethodConfig",
    "PTuningConfig",
    "PTuningV2Config",
    "PeftError",
    "PeftModel",
    "PrefixConfig",
    "PromptConfig",
    "QLoraConfig",
    "UniPELTConfig",
    "adalora",
    "adapter",
    "adapter_state_dict",
    "apply",
    "bitfit",
    "config_from_dict",
    "count_parameters",
    "ia3",
    "load_adapter",
    "load_adapter_state_dict",
    "lora",
    "merge",
    "prefix",
    "print_trainable_parameters",
    "prompt",
    "ptuning",
    "qlora",
    "quantize_model",
    "read_adapter_config",
    "regularization_loss",
    "save_adapter",
    "trainable_parameters",
    "unipelt",
    "update_and_allocate",
]
