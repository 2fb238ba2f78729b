"""Hugging Face-layout load/save for the llama, mistral, qwen2, gpt2, bert, roberta, distilbert, electra and
modernbert families.

    from lmcraft import hub
    model = hub.load_model("path/to/hf-folder")              # head from config.json `architectures`
    hub.save_model(model, "out/", tokenizer_dir="path/to/hf-folder")

Folders hold config.json + model.safetensors (or shards + model.safetensors.index.json); pickle weights
are refused. What is saved loads in transformers with the same logits, and the reverse.
"""

from lmcraft.hub.files import index_tensors, parse_size
from lmcraft.hub.hf_config import config_from_hf, load_config, to_hf_config
from lmcraft.hub.load import HubWarning, load_model
from lmcraft.hub.save import hf_state_dict, save_model

__all__ = ["HubWarning", "config_from_hf", "hf_state_dict", "index_tensors", "load_config", "load_model",
           "parse_size", "save_model", "to_hf_config"]
