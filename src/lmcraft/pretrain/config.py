"""The config of `lmcraft pretrain`: model, objective, tokenizer, data, trainer and samples sections.

Everything here is plain pydantic, importable by name; only validating `objective` imports the objectives
(torch), to build the objective once with placeholder token ids so that unknown names, option typos and bad
values fail before any work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from lmcraft.config import Section, StageConfig, check_options
from lmcraft.generation_settings import SamplingSettings
from lmcraft.tokenizer.train import TokenizerTraining
from lmcraft.train.config import TrainerConfig

__all__ = ["DataSection", "ModelSection", "ObjectiveSection", "PretrainConfig", "SamplesSection",
           "TokenizerSection", "TokenizerTraining"]


class ModelSection(Section):
    """`preset: NAME` (+ `overrides`) for a fresh model, or `from: FOLDER_OR_ASSET` to continue pre-training."""

    preset: str | None = None
    from_: str | None = Field(None, alias="from")
    overrides: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        from lmcraft.models.config import PRESETS, ModelConfig

        if (self.preset is None) == (self.from_ is None):
            raise ValueError("give exactly one of model.preset (a fresh model) and model.from (an HF folder or asset)")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; known presets: {', '.join(PRESETS)}")
        fields = {f.name for f in dataclasses.fields(ModelConfig)}
        unknown = sorted(set(self.overrides) - fields)
        if unknown:
            raise ValueError(f"unknown model.overrides keys {unknown}; allowed: {', '.join(sorted(fields))}")
        return self


# token ids to build an objective with while validating its options (no tokenizer is known yet)
_PLACEHOLDER_TOKENIZER = SimpleNamespace(vocab_size=8, pad_token="<pad>", pad_token_id=0, eos_token_id=1,
                                         bos_token_id=1, mask_token_id=2, cls_token_id=3, sep_token_id=1,
                                         all_special_ids=[0, 1, 2, 3])


class ObjectiveSection(Section):
    """`name` (clm, mlm, nsp, sop, rtd, plm) and that objective's options. The vocabulary size and token ids (EOS,
    [MASK], [CLS], [SEP], padding, specials) come from the tokenizer unless given."""

    model_config = ConfigDict(extra="allow")

    name: str

    @property
    def options(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.model_extra or {}))  # a deep copy: building fills in ids

    @model_validator(mode="after")
    def _buildable(self) -> ObjectiveSection:
        from lmcraft.objectives import build_objective

        # fails early on bad names and options, each at its key (objective.name, objective.masking, ...)
        check_options(lambda: build_objective(self.name, _PLACEHOLDER_TOKENIZER, **self.options))
        return self


class TokenizerSection(Section):
    path: str | None = None  # a tokenizer folder, tokenizer.json, or a tokenizer/model asset name
    train: TokenizerTraining | None = None

    @model_validator(mode="after")
    def _not_both(self) -> TokenizerSection:
        if self.path is not None and self.train is not None:
            raise ValueError("give tokenizer.path or tokenizer.train, not both")
        return self


class DataSection(Section):
    """`packed:` a `lmcraft prepare` output (its folder, packed/ folder or index.json), or `inputs:` raw text."""

    packed: Path | None = None
    inputs: list[Any] | None = None  # paths, globs, asset:NAME/... paths, {path:, format:, ...}, corpus asset names
    eval_inputs: list[Any] | None = None  # held-out files (same forms), removed from `inputs`
    text_mode: Literal["file", "paragraph", "line"] = "paragraph"  # what one document is in plain-text inputs
    val_fraction: float = Field(0.02, ge=0.0, lt=1.0)  # documents held out for evaluation (without eval_inputs)
    seq_len: int = Field(256, ge=8)
    train_split: str = "train"
    eval_split: str = "validation"
    seed: int = 0  # the train/validation split of `inputs`, and the sentence pairs

    @model_validator(mode="after")
    def _one_source(self) -> DataSection:
        if (self.packed is None) == (self.inputs is None):
            raise ValueError("give exactly one of data.packed (a `lmcraft prepare` output) and data.inputs (text)")
        if self.inputs is not None and not self.inputs:
            raise ValueError("data.inputs is empty")
        if self.eval_inputs is not None and self.inputs is None:
            raise ValueError("data.eval_inputs goes with data.inputs (packed data has its own validation split)")
        return self


class SamplesSection(SamplingSettings):
    """Text sampled from a decoder at the end of the run (the one generation section; temperature 0 = greedy)."""

    prompts: list[str] = ["The"]
    temperature: float = Field(0.8, ge=0, description="0 = greedy")
    top_k: int = Field(50, ge=0)
    seed: int = 0
    compile: bool | Literal["auto"] = False


class PretrainConfig(StageConfig):
    model: ModelSection
    objective: ObjectiveSection
    data: DataSection
    tokenizer: TokenizerSection = TokenizerSection()
    trainer: TrainerConfig = TrainerConfig()
    samples: SamplesSection = SamplesSection()
    output_dir: Path

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.tokenizer.train is not None and self.data.inputs is None:
            raise ValueError("tokenizer.train needs data.inputs (packed data is already tokenised)")
        return self
