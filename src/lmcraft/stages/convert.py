"""`lmcraft convert FILE.gguf OUT_DIR`: a GGUF model as a Hugging Face-layout folder."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lmcraft.stages import add_overwrite_argument, claim


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("gguf", metavar="FILE.gguf", help="GGUF file (llama.cpp format) of a llama, qwen2, qwen3, "
                        "olmo2, granite, phi3, gemma, gemma2, gemma3 or gpt2 model")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to create (config.json, model.safetensors, ...)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="stored weight type"
    )
    add_overwrite_argument(parser)
    parser.add_argument("--force", action="store_true", help=argparse.SUPPRESS)  # the old name of --overwrite
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from lmcraft.gguf_import import convert_gguf

    if args.force:
        print("note: --force is deprecated; it is now called --overwrite", file=sys.stderr)
        args.overwrite = True
    start = time.perf_counter()
    with claim(args, "convert", Path(args.out_dir), {"gguf": str(Path(args.gguf).resolve()), "dtype": args.dtype}):
        out = convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=True, progress=not args.quiet)
    if not args.quiet:
        print(f"converted in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    print(out)
    return 0
