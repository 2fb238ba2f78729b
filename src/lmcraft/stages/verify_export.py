"""`lmcraft verify-export OUT.gguf --against MODEL`: compare a GGUF with the model it was exported from.

Reopens the file with lmcraft's importer and with gguf-py's reader, and prints a table: tensor list, tokenizer,
logits and held-out perplexity against MODEL (see `lmcraft.gguf_verify` for the tolerances), and llama.cpp's
perplexity when `llama_cpp` is installed. Exit code 1 when a check is outside its tolerance.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="FILE.gguf", help="the exported GGUF file")
    parser.add_argument("--against", required=True, metavar="MODEL",
                        help="the source: model folder, asset name or PEFT adapter folder")


def run(args: argparse.Namespace) -> int:
    from lmcraft.gguf_export import load_source
    from lmcraft.gguf_verify import report, verify_export

    return report(verify_export(args.gguf, load_source(args.against)))
