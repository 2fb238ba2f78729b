"""Save a `LanguageModel` as a Hugging Face folder that transformers (and lmcraft) load.

Writes config.json, model.safetensors (or shards + index), generation_config.json (decoders) and the
tokenizer files found in `tokenizer_dir`. Tied matrices are stored once, under the embedding's name,
as transformers expects; GPT-2's q/k/v are fused back into `c_attn`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from lmcraft.errors import LmcraftError, ModelLoadError
from lmcraft.hub.files import parse_size, staged_folder, write_shards
from lmcraft.hub.hf_config import to_hf_config
from lmcraft.hub.names import NAME_TABLES, plan
from lmcraft.io import write_json
from lmcraft.models.model import LanguageModel

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt")


def hf_state_dict(model: LanguageModel) -> dict[str, torch.Tensor]:
    """The model's tensors under Hugging Face names (on CPU, contiguous, each stored once)."""
    cfg = model.config
    if cfg.model_type not in NAME_TABLES:
        raise ModelLoadError(f"model_type {cfg.model_type!r} has no Hugging Face layout; supported: "
                             f"{', '.join(NAME_TABLES)}.")
    params = {name: p.detach() for name, p in model.named_parameters()}  # tied duplicates appear once
    entries = plan(NAME_TABLES[cfg.model_type], model.head_kind, {n: p.shape for n, p in params.items()},
                   cfg.model_type)
    out = {}
    for e in entries:
        out[e.hf] = e.to_hf(params).cpu()
        out.update({alias: out[e.hf].clone() for alias in e.aliases})  # separate storage: safetensors needs it
    return out


def _copy_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    copied = [name for name in TOKENIZER_FILES if (tokenizer_dir / name).is_file()]
    if not copied:
        raise LmcraftError(f"{tokenizer_dir}: no tokenizer files to copy (expected one of "
                           f"{', '.join(TOKENIZER_FILES)}).")
    for name in copied:
        shutil.copyfile(tokenizer_dir / name, out / name)


def save_model(model: LanguageModel, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
               generation_config: dict[str, Any] | None = None, max_shard_size: int | str = "2GB") -> Path:
    """Write `model` as a Hugging Face folder at `out_dir` (created or updated atomically); returns the path.

    generation_config: written as generation_config.json; default for decoders with an LM head: the
    config's bos/eos/pad token ids. max_shard_size: bytes or "500MB"/"2GB"; larger models are sharded.
    """
    out_dir = Path(out_dir)
    tensors = hf_state_dict(model)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    config = to_hf_config(model.config, model.head_kind, dtype)
    if generation_config is None and model.head_kind == "lm":
        cfg = model.config
        ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
        generation_config = {k: v for k, v in ids.items() if v is not None}
    with staged_folder(out_dir) as stage:
        write_shards(tensors, stage, parse_size(max_shard_size))
        if generation_config is not None:
            write_json(stage / "generation_config.json", generation_config, sort_keys=True)
        if tokenizer_dir is not None:
            _copy_tokenizer(Path(tokenizer_dir), stage)
        write_json(stage / "config.json", config, sort_keys=True)
    return out_dir
