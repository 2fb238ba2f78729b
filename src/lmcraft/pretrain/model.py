"""The model config of a pre-training run: a preset with overrides (vocabulary size and special-token ids taken
from the tokenizer), or the config of the HF folder/asset `model.from` (continued pre-training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from lmcraft.errors import ConfigError
from lmcraft.pretrain.config import ModelSection

if TYPE_CHECKING:
    from lmcraft.models import ModelConfig
    from lmcraft.tokenizer.load import Tokenizer

__all__ = ["model_config"]


def model_config(section: ModelSection, tokenizer: Tokenizer, seq_len: int,
                 progress: bool) -> tuple[ModelConfig, Path | None]:
    """The model config (and the folder to load weights from, for `model.from`); checks that the tokenizer's
    vocabulary and `seq_len` fit it."""
    from lmcraft.models import preset
    from lmcraft.objectives.base import declared_pad_id, end_of_document_id

    overrides = dict(section.overrides)
    if section.from_ is not None:
        from lmcraft.assets import resolve_model
        from lmcraft.hub import load_config

        folder = resolve_model(section.from_, progress=progress)
        mcfg = dataclasses.replace(load_config(folder), **overrides)
    else:
        folder = None
        defaults = {"vocab_size": tokenizer.vocab_size, "bos_token_id": tokenizer.bos_token_id,
                    "eos_token_id": end_of_document_id(tokenizer), "pad_token_id": declared_pad_id(tokenizer)}
        mcfg = preset(section.preset, **{**defaults, **overrides})
    if mcfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocab_size {mcfg.vocab_size} is smaller than the tokenizer's vocabulary "
                          f"({tokenizer.vocab_size} tokens); raise model.overrides.vocab_size or use another tokenizer")
    if mcfg.position == "learned" and mcfg.max_position_embeddings < seq_len:
        raise ConfigError(f"data.seq_len {seq_len} exceeds the model's max_position_embeddings "
                          f"{mcfg.max_position_embeddings} (learned positions); lower data.seq_len")
    return mcfg, folder
