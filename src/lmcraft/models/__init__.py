"""Our own PyTorch transformers: one backbone for decoders (Llama, Mistral, Qwen2, GPT-2) and encoders (BERT).

    from lmcraft.models import LanguageModel, ModelConfig, preset
    model = LanguageModel(preset("llama-14m"))            # decoder with LM head
    out = model(input_ids)                                # out.logits (B, T, V)
"""

from lmcraft.models.config import PRESETS, ModelConfig, preset
from lmcraft.models.layers import KVCache
from lmcraft.models.model import LanguageModel, ModelOutput

__all__ = ["PRESETS", "KVCache", "LanguageModel", "ModelConfig", "ModelOutput", "preset"]
