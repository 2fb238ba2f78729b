"""`lmcraft serve MODEL`: an OpenAI-compatible HTTP server (see `lmcraft.serve`). Binds 127.0.0.1 by default;
SIGTERM/SIGINT shut it down cleanly (exit 0)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcraft.errors import ConfigError
from lmcraft.stages._decoding import (
    add_compile_argument,
    add_model_arguments,
    compile_setting,
    describe,
    load_for_generation,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--adapter", type=Path, metavar="DIR",
                        help="PEFT adapter folder to serve on top of MODEL (must change the model's logits)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1/ requests")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="requests waiting at most; more are answered 429 (default 64)")
    parser.add_argument("--max-batch", type=int, default=16, metavar="N",
                        help="rows decoded together at most (default 16)")
    add_compile_argument(parser)


PROBE = "The quick brown fox jumps over the lazy dog."


def load_served_model(args: argparse.Namespace) -> tuple[Any, Any, str | None]:
    """(model, tokenizer, template) for MODEL on `--backend`, with the `--adapter` loaded on top when given. An
    adapter that leaves the logits of a probe prompt unchanged (e.g. a LoRA whose B is still zero) is refused: serving
    it would silently serve the base model. With an adapter the torch model is checked first, then (backend llamacpp
    or auto) merged and exported for llama.cpp."""
    import torch

    from lmcraft.decoder_backend import to_backend
    from lmcraft.generate import encode_prompts
    from lmcraft.peft import load_adapter

    if args.adapter is None:
        return load_for_generation(args)
    model, tokenizer, template = load_for_generation(args, backend="torch")
    probe = torch.tensor(encode_prompts(tokenizer, [PROBE]), device=next(model.parameters()).device)
    model.eval()
    with torch.inference_mode():
        before = model(probe).logits.float()
    model = load_adapter(model, args.adapter).eval()
    with torch.inference_mode():
        change = (model(probe).logits.float() - before).abs().max().item()
    if change <= 1e-6:
        raise ConfigError(f"{args.adapter}: the adapter does not change the model's logits on a probe prompt (max "
                          f"|change| {change:.1e}); it looks untrained (e.g. LoRA B still zero). Refusing to serve.")
    print(f"[adapter {args.adapter}: max logit change {change:.3g} on a probe prompt]", file=sys.stderr)
    if args.backend == "torch":
        return model, tokenizer, template
    decoder = to_backend(model, tokenizer, Path(args.model), args.backend)
    describe(decoder, args.dtype)
    return decoder.model, tokenizer, template


def run(args: argparse.Namespace) -> int:
    if args.max_queue < 1 or args.max_batch < 1:
        raise ConfigError(f"--max-queue and --max-batch must be >= 1, got {args.max_queue} and {args.max_batch}.")
    try:
        import uvicorn

        from lmcraft.serve.app import build_app
    except ImportError as err:
        raise ConfigError(f"lmcraft serve needs FastAPI and uvicorn ({err}); "
                          "install them with: pip install 'lmcraft[serve]'") from None
    from lmcraft.generate import stop_token_ids

    model, tokenizer, template = load_served_model(args)
    if args.compile == "true" and not hasattr(model, "parameters"):
        print("[--compile true: llama.cpp decodes this model; compile applies to --backend torch only]",
              file=sys.stderr)
    app = build_app(model, tokenizer, stop_token_ids(model, tokenizer), model_name=args.model, template=template,
                    api_key=args.api_key, max_queue=args.max_queue, max_batch=args.max_batch,
                    system=args.system, compile=compile_setting(args.compile))
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: binding {args.host} exposes the model to the network"
              f"{'' if args.api_key else ' WITHOUT an --api-key'}.", file=sys.stderr)

    class Server(uvicorn.Server):
        def capture_signals(self):  # type: ignore[no-untyped-def]
            """uvicorn re-raises the captured SIGTERM after a graceful shutdown (exit -15); we exit 0 instead."""
            import contextlib

            @contextlib.contextmanager
            def quiet():  # type: ignore[no-untyped-def]
                with super(Server, self).capture_signals():
                    yield
                    self._captured_signals.clear()
            return quiet()

    print(f"[serving on http://{args.host}:{args.port}/v1]", file=sys.stderr, flush=True)
    Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")).run()
    return 0
