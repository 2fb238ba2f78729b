"""The `lmcraft prepare` config: inputs, steps, chunking, packing (pydantic, torch-free). Inputs are validated by
the data library's reader spec; each step is a "name -> options" block (`config.named_options`) that the data
library builds (`lmcraft.data.pipeline.build_step`) while the config loads and again at run time."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lmcraft.config import ExistingPath, Section, StageConfig, named_options

__all__ = ["PackConfig", "PrepareConfig", "StepOptions"]

# One prepare step and its options (`lmcraft.data.pipeline`'s table), e.g. `{type: c4, min_sentences: 3}`.
StepOptions = named_options("lmcraft.data.pipeline:build_step")


class PackConfig(Section):
    """Tokenise kept documents and pack them into token shards."""

    tokenizer: ExistingPath = Field(description="a folder with tokenizer.json, or the file itself")
    val_fraction: float = Field(0.01, ge=0.0, lt=1.0, description="documents to the validation split (by id hash)")
    shard_tokens: int = Field(100_000_000, ge=1, description="start a new shard after this many tokens")
    sentences: bool = Field(True, description="keep sentence boundaries (needed for NSP/SOP readers)")
    eos_token: str | None = Field(None, description="default: eos_token, else sep_token, of tokenizer_config.json")


class PrepareConfig(StageConfig):
    inputs: list[Any] = Field(
        description="paths/globs (asset:NAME/... allowed) or {path, format, text_field, id_field, text_mode}"
    )
    output: Path = Field(description="run folder: parts/, packed/, stats.json, report.md and its PNGs")
    steps: list[StepOptions] = Field(
        [],
        description="{type: NAME, ...}: html normalize whitespace boilerplate licence pii min_length language "
        "gopher_quality gopher_repetition c4 blocklist copyright perplexity classifier toxicity decontaminate "
        "exact_dedup minhash_dedup augment back_translate",
    )
    on_error: Literal["skip", "raise"] = Field("skip", description="bad input records: count and skip, or stop")
    chunk_docs: int = Field(1000, ge=1, description="documents per chunk (the unit of work and of resuming)")
    max_document_bytes: int | None = Field(
        1 << 20, ge=1024, description="documents longer than this (UTF-8 bytes) are cut at paragraph/line/sentence "
        "breaks so that memory stays bounded (the filters take ~50x a document's size); null: never cut")
    pack: PackConfig | None = Field(None, description="tokenise and pack into token shards")
    seed: int = Field(0, description="seed of the train/validation split")
    title: str = Field("Data preparation report", description="title of report.md")

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[Any]:
        from pydantic import TypeAdapter

        from lmcraft.data.readers import InputSpec

        if not isinstance(value, list) or not value:
            raise ValueError("give a non-empty list of inputs (paths, globs or {path: ..., format: ...})")
        adapter = TypeAdapter(InputSpec)
        return [adapter.validate_python({"path": v} if isinstance(v, str) else v) for v in value]

    @field_validator("steps")
    @classmethod
    def _augment_last(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        from lmcraft.data.pipeline import STEP_TYPES, check_step_order

        check_step_order([STEP_TYPES[step["type"]].kind for step in value])
        return value
