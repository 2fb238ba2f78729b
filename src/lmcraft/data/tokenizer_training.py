"""Train a tokenizer on the documents of input files, keep a held-out share, and report its compression.

Documents are streamed from the inputs (any format `lmcraft prepare` reads, including its own
`parts/*.jsonl.zst` output). A deterministic `held_out_fraction` of documents (by id hash) is kept out of
training; after training, bytes per token (UTF-8 bytes / tokens, higher is better) is measured on it. The output
folder holds tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json and, written
last (so its presence means the training finished), tokenizer_report.json.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lmcraft.config import StageConfig
from lmcraft.errors import InputFileError
from lmcraft.io import write_json
from lmcraft.tokenizer.train import TokenizerTraining

__all__ = ["REPORT", "TokenizerConfig", "train_on_inputs"]

REPORT = "tokenizer_report.json"


class TokenizerConfig(StageConfig, TokenizerTraining):
    """The `lmcraft tokenizer` stage: `TokenizerTraining` on `inputs`, saved to `output`."""

    inputs: list[Any] = Field(description="paths/globs (asset:NAME/... allowed) or {path, format, text_field, ...}")
    output: Path = Field(description="folder for tokenizer.json, tokenizer_config.json, tokenizer_report.json")
    vocab_size: int = Field(8000, ge=32)  # the stage's own default (pre-training's tokenizer.train has 8192)
    chat_template: str | None = Field("chatml", description='"chatml", null for none, or a Jinja template')
    model_max_length: int = Field(2048, ge=1)
    held_out_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="documents kept out to measure bytes/token")
    seed: int = 0
    on_error: Literal["skip", "raise"] = "skip"

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[Any]:
        from lmcraft.data.prepare_config import PrepareConfig

        return PrepareConfig._inputs(value)


def train_on_inputs(cfg: TokenizerConfig, progress: bool = True) -> dict[str, Any]:
    """Train, save and evaluate; returns the report written to tokenizer_report.json (plus `output`).

    Fails before training when the chat template does not render, and after reading when no training document
    was usable (naming what was skipped as bad input)."""
    from lmcraft.data.pipeline import is_validation
    from lmcraft.data.readers import ErrorLog, describe_inputs, read_documents
    from lmcraft.tokenizer.chat import apply_chat_template
    from lmcraft.tokenizer.train import (
        CHATML_TEMPLATE,
        DEFAULT_SPECIAL_TOKENS,
        bytes_per_token,
        save_tokenizer,
        train_tokenizer,
    )

    errors = ErrorLog()
    template = CHATML_TEMPLATE if cfg.chat_template == "chatml" else cfg.chat_template
    if template is not None:  # a template that does not render fails now, not in every later stage
        apply_chat_template([{"role": "user", "content": "hi"}], template, add_generation_prompt=True)
    trained_on = set_aside = 0

    def texts(held_out: bool) -> Iterator[str]:
        nonlocal trained_on, set_aside
        stream = islice(read_documents(cfg.inputs, errors, cfg.on_error), cfg.max_docs)
        for d in stream:
            if is_validation(d.id, cfg.held_out_fraction, cfg.seed) == held_out:
                trained_on += not held_out
                yield d.text
            elif not held_out:
                set_aside += 1

    specials = cfg.special_tokens or DEFAULT_SPECIAL_TOKENS[cfg.kind]
    tok = train_tokenizer(
        texts(False), cfg.kind, cfg.vocab_size, specials, cfg.min_frequency, cfg.lowercase, show_progress=progress
    )
    if trained_on == 0:
        held = (f"; {set_aside:,} usable document(s) all fell in the held-out split (held_out_fraction="
                f"{cfg.held_out_fraction}): split the text into more documents with `text_mode: paragraph` or "
                "`line`, or set held_out_fraction: 0") if set_aside else ""
        raise InputFileError(describe_inputs(cfg.inputs), "every record",
                             f"at least one training document (skipped as bad input: {errors.counts_text()}{held})")
    out = save_tokenizer(tok, cfg.output, specials, template, cfg.model_max_length)
    train_errors = errors.to_dict()
    bpt, n_bytes, n_tokens = bytes_per_token(tok, texts(True))
    report = {
        "kind": cfg.kind,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "held_out_documents_fraction": cfg.held_out_fraction,
        "held_out_bytes": n_bytes,
        "held_out_tokens": n_tokens,
        "bytes_per_token": round(bpt, 4),
        "input_errors": train_errors,
    }
    write_json(out / REPORT, report)
    return {**report, "output": str(out)}
