"""Arguments and helpers shared by the stages that decode (`generate`, `chat`): model flags, decoding flags, the
`GenerationConfig` they make, model loading with a one-line note, and the length check against the context.
Nothing here imports torch at module level, so `--help` stays fast."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcraft.errors import ConfigError
from lmcraft.io import read_text

SAMPLING_FLAGS = ("temperature", "top_p", "top_k", "min_p")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help="model folder, .gguf file or asset name (e.g. smollm2-135m-instruct)")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="weights and compute dtype; auto (default): bf16 where a measured matrix-vector product "
                             "is faster in bf16 (cached per machine; CUDA with bf16), else fp32")
    parser.add_argument("--backend", choices=("auto", "torch", "llamacpp"), default="auto",
                        help="what computes the logits: lmcraft's torch model, or llama.cpp on a GGUF file (MODEL "
                             "itself, or its f32/f16 export cached once); auto: llamacpp when llama-cpp-python is "
                             "installed and the model exports, else torch")
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
    add_compile_argument(parser)


def add_compile_argument(parser: argparse.ArgumentParser) -> None:
    """`--compile auto|true|false` (generate, chat, serve); `compile_setting` turns it into `GenerationConfig`'s."""
    parser.add_argument("--compile", choices=("auto", "true", "false"), default="auto",
                        help="torch.compile the decode step on a fixed-shape cache; auto (default): only when the "
                             "tokens to generate amortise the (measured) compile time")


def compile_setting(flag: str) -> bool | str:
    """The `--compile` flag as `GenerationConfig.compile`: True, False or "auto"."""
    return {"true": True, "false": False}.get(flag, "auto")


def generation_config(args: argparse.Namespace) -> Any:
    """A `GenerationConfig` from the decoding flags: greedy unless a sampling flag is given."""
    from lmcraft.generate import GenerationConfig

    sampling = {name: getattr(args, name) for name in SAMPLING_FLAGS if getattr(args, name) is not None}
    if args.greedy and sampling:
        flags = ", ".join("--" + name.replace("_", "-") for name in sampling)
        raise ConfigError(f"--greedy cannot be combined with sampling flags ({flags}); drop one of them.")
    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=bool(sampling),
                            repetition_penalty=args.repetition_penalty, stop_strings=tuple(args.stop),
                            seed=args.seed, compile=compile_setting(args.compile), weights_fixed=True,
                            **sampling)


def load_for_generation(args: argparse.Namespace, backend: str | None = None) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, chat template override) for MODEL on `backend` (default `--backend`), with a one-line
    note on stderr."""
    import torch

    from lmcraft.decoder_backend import load_decoder
    from lmcraft.precision import weights_dtype

    dtype, choice = weights_dtype(args.dtype, torch.device("cpu"))
    decoder = load_decoder(args.model, backend or args.backend, dtype=dtype)
    template = args.template
    if template is not None and template.endswith(".jinja"):
        template = read_text(Path(template), "chat template")
    describe(decoder, choice.precision if args.dtype != "auto" else f"auto -> {choice.precision}: {choice.reason}")
    return decoder.model, decoder.tokenizer, template


def describe(decoder: Any, precision: str) -> None:
    """One line on stderr: the model, its size and precision or its GGUF file, the backend's note, the threads."""
    import torch

    if decoder.note:
        print(f"[{decoder.note}]", file=sys.stderr)
    what = (f"{decoder.model.num_parameters() / 1e6:.1f}M parameters, {precision}" if decoder.backend == "torch"
            else f"llama.cpp on {decoder.model.path.name}")
    print(f"[{decoder.folder.name}: {what}, {torch.get_num_threads()} threads]", file=sys.stderr)


def check_length(max_new_tokens: int, model: Any) -> None:
    """`--max-new-tokens` must be at least 1 and fit the model's context (positions it was built for)."""
    context = model.config.max_position_embeddings
    if not 1 <= max_new_tokens <= context:
        raise ConfigError(f"--max-new-tokens {max_new_tokens}: expected 1 to {context:,}, the model's context "
                          "length (max_position_embeddings).")
