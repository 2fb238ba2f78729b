"""`lmcraft tokenizer CONFIG.yaml`: train a BPE / WordPiece / Unigram tokenizer on a corpus.

Documents are streamed from the inputs (any format `lmcraft prepare` reads, including its own
`parts/*.jsonl.zst` output). A deterministic `held_out_fraction` of documents (by id hash) is
kept out of training; after training, bytes per token is measured on it. The output folder
holds tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
and tokenizer_report.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from lmcraft.config import StageConfig
from lmcraft.stages import add_config_arguments, claim, load_stage_config

__all__ = ["TokenizerConfig", "add_arguments", "config_class", "run", "train"]


class TokenizerConfig(StageConfig):
    inputs: list[Any] = Field(description="paths/globs (asset:NAME/... allowed) or {path, format, text_field, ...}")
    output: Path = Field(description="folder for tokenizer.json, tokenizer_config.json, tokenizer_report.json")
    kind: Literal["bpe", "wordpiece", "unigram"] = Field("bpe", description="byte-level BPE, WordPiece or Unigram")
    vocab_size: int = Field(8000, ge=32)
    min_frequency: int = Field(2, ge=1, description="minimum pair/word count to merge (BPE, WordPiece)")
    lowercase: bool = False
    special_tokens: dict[str, str] | None = Field(None, description="role -> token; default per kind")
    chat_template: str | None = Field("chatml", description='"chatml", null for none, or a Jinja template')
    model_max_length: int = Field(2048, ge=1)
    held_out_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="documents kept out to measure bytes/token")
    max_docs: int | None = Field(None, ge=1, description="read at most this many documents")
    seed: int = 0
    on_error: Literal["skip", "raise"] = "skip"

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, value: Any) -> list[Any]:
        from lmcraft.stages.prepare import PrepareConfig

        return PrepareConfig._inputs(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress output")


def train(cfg: TokenizerConfig, progress: bool = True) -> dict[str, Any]:
    """Train, save and evaluate; returns the report written to tokenizer_report.json."""
    from itertools import islice

    from lmcraft.data.pipeline import is_validation
    from lmcraft.data.readers import ErrorLog, read_documents
    from lmcraft.errors import InputFileError
    from lmcraft.io import excerpt, write_json
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
    trained_on = 0

    def docs(held_out: bool) -> Any:
        nonlocal trained_on
        stream = islice(read_documents(cfg.inputs, errors, cfg.on_error), cfg.max_docs)
        for d in stream:
            if is_validation(d.id, cfg.held_out_fraction, cfg.seed) == held_out:
                trained_on += not held_out
                yield d.text

    specials = cfg.special_tokens or DEFAULT_SPECIAL_TOKENS[cfg.kind]
    tok = train_tokenizer(
        docs(False), cfg.kind, cfg.vocab_size, specials, cfg.min_frequency, cfg.lowercase, show_progress=progress
    )
    if trained_on == 0:
        skipped = ", ".join(f"{n:,} {kind}" for kind, n in errors.to_dict().get("counts", {}).items()) or "none"
        raise InputFileError(excerpt(", ".join(str(spec.path) for spec in cfg.inputs), 200), "every record",
                             f"at least one training document (skipped as bad input: {skipped})")
    out = save_tokenizer(tok, cfg.output, specials, template, cfg.model_max_length)
    train_errors = errors.to_dict()
    bpt, n_bytes, n_tokens = bytes_per_token(tok, docs(True))
    report = {
        "kind": cfg.kind,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "held_out_documents_fraction": cfg.held_out_fraction,
        "held_out_bytes": n_bytes,
        "held_out_tokens": n_tokens,
        "bytes_per_token": round(bpt, 4),
        "input_errors": train_errors,
    }
    write_json(out / "tokenizer_report.json", report)
    return {**report, "output": str(out)}


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(TokenizerConfig, args)
    with claim(args, "tokenizer", cfg.output, cfg, "output"):
        report = train(cfg, progress=not args.no_progress and sys.stderr.isatty())
    print(
        f"{report['kind']} tokenizer, vocabulary {report['vocab_size']:,}, saved to {report['output']}; "
        f"held-out: {report['bytes_per_token']:.3f} bytes/token ({report['held_out_bytes']:,} bytes)"
    )
    return 0


def config_class() -> type:
    """The config class, listed by `lmcraft tokenizer --help` and checked by `lmcraft pipeline`."""
    return TokenizerConfig
