"""`lmcraft generate MODEL --prompt TEXT`: stream a completion (or a chat reply) from a model folder or asset.

MODEL is a Hugging Face-layout folder, a .gguf file or an asset name (fetched and converted once). One
prompt streams to stdout with the speed on stderr; `--batch-file` (one prompt per line, or JSONL with a
"prompt" field) generates in left-padded batches and prints one JSON line per prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lmcraft.errors import ConfigError, InputFileError
from lmcraft.io import check_text, read_text
from lmcraft.stages._decoding import (
    add_decoding_arguments,
    add_model_arguments,
    check_length,
    generation_config,
    load_for_generation,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (streams the completion to stdout)")
    source.add_argument("--batch-file", type=Path, metavar="F",
                        help='prompts, one per line, or JSONL records with a "prompt" field')
    parser.add_argument("--chat", action="store_true", help="treat prompts as user messages (chat template)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --batch-file")
    add_decoding_arguments(parser)


def read_prompts(path: Path, encoding: str = "utf-8") -> list[str]:
    """Prompts of a batch file: JSONL records with a string "prompt", or else one prompt per non-empty line."""
    lines = read_text(path, "prompt file", encoding).splitlines()
    jsonl = path.suffix == ".jsonl" or next((ln for ln in lines if ln.strip()), "").lstrip().startswith("{")
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            prompts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputFileError(path, f"line {number}", f"a JSON object ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputFileError(path, f"line {number}", 'a JSON object with a string "prompt" field')
        prompts.append(record["prompt"])
    if not prompts:
        raise InputFileError(path, "whole file", "at least one prompt")
    return prompts


def _report(result: Any) -> str:
    return (f"[{result.num_new_tokens} tokens in {result.elapsed_s:.2f}s: {result.tokens_per_second:.1f} tok/s, "
            f"prefill {result.prefill_s * 1000:.0f} ms, finish: {', '.join(sorted(set(result.finish_reasons)))}]")


def run(args: argparse.Namespace) -> int:
    from lmcraft.generate import TextStreamer, generate_text

    config = generation_config(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}.")
    prompts = [check_text(args.prompt, "--prompt")] if args.prompt is not None else read_prompts(
        args.batch_file, args.encoding)
    model, tokenizer, template = load_for_generation(args)
    check_length(config.max_new_tokens, model)
    options = dict(chat=args.chat or args.system is not None, system=args.system, template=template)
    if args.prompt is not None:
        streamer = TextStreamer(tokenizer, stop_strings=config.stop_strings)
        result = generate_text(model, tokenizer, prompts, config, streamer=streamer, **options)
        sys.stdout.write("\n")
        print(_report(result), file=sys.stderr)
        return 0
    total_tokens, total_time = 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start:start + args.batch_size]
        result = generate_text(model, tokenizer, batch, config, **options)
        for prompt, text, reason in zip(batch, result.texts, result.finish_reasons, strict=True):
            print(json.dumps({"prompt": prompt, "text": text, "finish_reason": reason}, ensure_ascii=False), flush=True)
        total_tokens += result.num_new_tokens
        total_time += result.elapsed_s
    print(f"[{len(prompts)} prompts, {total_tokens} tokens in {total_time:.2f}s: "
          f"{total_tokens / max(total_time, 1e-9):.1f} tok/s]", file=sys.stderr)
    return 0
