"""`lmcraft tokenizer CONFIG.yaml`: train a BPE / WordPiece / Unigram tokenizer on a corpus.

Documents are streamed from the inputs (any format `lmcraft prepare` reads, including its own
`parts/*.jsonl.zst` output). A deterministic `held_out_fraction` of documents (by id hash) is
kept out of training; after training, bytes per token is measured on it. The output folder
holds tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
and tokenizer_report.json. See lmcraft.data.tokenizer_training.
"""

from __future__ import annotations

import argparse
import sys

from lmcraft.data.tokenizer_training import TokenizerConfig, train_on_inputs
from lmcraft.stages import add_config_arguments, claim, load_stage_config

__all__ = ["TokenizerConfig", "add_arguments", "config_class", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress output")


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(TokenizerConfig, args)
    with claim(args, "tokenizer", cfg.output, cfg, "output"):
        report = train_on_inputs(cfg, progress=not args.no_progress and sys.stderr.isatty())
    print(
        f"{report['kind']} tokenizer, vocabulary {report['vocab_size']:,}, saved to {report['output']}; "
        f"held-out: {report['bytes_per_token']:.3f} bytes/token ({report['held_out_bytes']:,} bytes)"
    )
    return 0


def config_class() -> type[TokenizerConfig]:
    """The config class, listed by `lmcraft tokenizer --help` and checked by `lmcraft pipeline`."""
    return TokenizerConfig
