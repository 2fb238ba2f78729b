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

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="model folder, .gguf file or asset name (e.g. smollm2-135m-instruct)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="weights and compute dtype")
    parser.add_argument("--system", help="system message (implies --chat)")
    parser.add_argument("--template", help="chat template: a built-in name (chatml, llama3, zephyr, alpaca) or a "
                                           ".jinja file; default: the one in the model's tokenizer_config.json")
    parser.add_argument("--encoding", default="utf-8",
                        help="text encoding of prompt files and piped input (default: utf-8)")


def add_decoding_arguments(parser: argparse.ArgumentParser, default_max_new: int = 128) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=default_max_new, metavar="N")
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default without sampling flags)")
    parser.add_argument("--temperature", type=float, metavar="T", help="sample with this temperature")
    parser.add_argument("--top-p", type=float, metavar="P", help="sample from the smallest set of mass >= P")
    parser.add_argument("--top-k", type=int, metavar="K", help="sample from the K most likely tokens")
    parser.add_argument("--min-p", type=float, metavar="P", help="drop tokens below P x the top probability")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                        help="divide (multiply) positive (negative) logits of seen tokens by R")
    parser.add_argument("--stop", action="append", default=[], metavar="S", help="stop string (repeatable)")
    parser.add_argument("--seed", type=int, metavar="N", help="seed for reproducible sampling")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (streams the completion to stdout)")
    source.add_argument("--batch-file", type=Path, metavar="F",
                        help='prompts, one per line, or JSONL records with a "prompt" field')
    parser.add_argument("--chat", action="store_true", help="treat prompts as user messages (chat template)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per batch with --batch-file")
    add_decoding_arguments(parser)


def generation_config(args: argparse.Namespace) -> Any:
    """A `GenerationConfig` from the decoding flags: greedy unless a sampling flag is given."""
    from lmcraft.generate import GenerationConfig

    sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.greedy and sampling:
        flags = ", ".join("--" + name.replace("_", "-") for name in sampling)
        raise ConfigError(f"--greedy cannot be combined with sampling flags ({flags}); drop one of them.")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=bool(sampling),
                            repetition_penalty=args.repetition_penalty, stop_strings=tuple(args.stop),
                            seed=args.seed, **sampling)


def load_for_generation(args: argparse.Namespace) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, chat template override) for MODEL, with a one-line note on stderr."""
    import torch

    from lmcraft.assets import resolve_model
    from lmcraft.hub import load_model
    from lmcraft.tokenizer.load import load_tokenizer

    folder = resolve_model(args.model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(folder, dtype=dtype)
    tokenizer = load_tokenizer(folder)
    template = args.template
    if template is not None and template.endswith(".jinja"):
        template = read_text(Path(template), "chat template")
    params = model.num_parameters() / 1e6
    print(f"[{folder.name}: {params:.1f}M parameters, {args.dtype}, {torch.get_num_threads()} threads]",
          file=sys.stderr)
    return model, tokenizer, template


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


def check_length(max_new_tokens: int, model: Any) -> None:
    """`--max-new-tokens` must be at least 1 and fit the model's context (positions it was built for)."""
    context = model.config.max_position_embeddings
    if not 1 <= max_new_tokens <= context:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: expected 1 to {context:,}, the model's context "
                          "length (max_position_embeddings).")


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
