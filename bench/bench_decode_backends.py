"""Decode speed of lmcraft's backends on SmolLM2-135M-Instruct against plain llama.cpp.

    nice -n 5 python -m bench.bench_decode_backends [--new-tokens 64] [--repeats 3] [--threads N]

Candidates, each decoding exactly `--new-tokens` greedy tokens (EOS ignored, prefill included) of the same prompts:

* `torch fp32`: lmcraft's decode loop on its torch model (the asset, fp32).
* `lmcraft llamacpp <file>`: the same decode loop with llama.cpp computing the logits (`backend: llamacpp`) on
  the q8_0 and q4_k_m files lmcraft exports, and on the asset's original Q4_1 GGUF.
* `plain llama.cpp Q4_1`: llama-cpp-python's high-level `Llama.generate` (llama.cpp's own greedy sampler) on the
  original Q4_1 GGUF: the reference for the `vs plain` column (same file as `lmcraft llamacpp Q4_1`).

Batch 8 (prompts of 16..44 tokens): lmcraft's llamacpp backend decodes the 8 rows together, one `llama_decode`
per step with 8 sequences (llama.cpp's low-level batch API, as llama-server's parallel slots do). `Llama`'s
high-level API decodes one sequence, so plain llama.cpp's batch 8 is the 8 prompts one after the other.
All candidates use the same thread count and alternate (A B C ... A B C), best of `--repeats`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.bench_generate import prompts_for
from bench.common import Table, compare, fmt, machine, ratio, set_threads


def plain_greedy(plain: Any, prompt: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens from llama-cpp-python's `Llama.generate` (llama.cpp's own sampler), cache reset."""
    plain.reset()
    row: list[int] = []
    for token in plain.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        row.append(token)
        if len(row) == new_tokens:
            break
    return row


def time_batch(models: dict[str, Any], plain: Any, prompts: list[list[int]], config: Any, repeats: int
               ) -> tuple[dict[str, float], dict[str, list[list[int]]]]:
    """Best seconds of every candidate on `prompts` (alternating), and the tokens each produced."""
    from lmcraft.generate import generate

    tokens: dict[str, list[list[int]]] = {}

    def ours(name: str, model: Any) -> Callable[[], None]:
        def run() -> None:
            tokens[name] = generate(model, prompts, config).tokens
        return run

    def run_plain() -> None:  # the high-level API is batch 1: one prompt after the other
        tokens["plain llama.cpp Q4_1"] = [plain_greedy(plain, p, config.max_new_tokens) for p in prompts]

    candidates = {name: ours(name, model) for name, model in models.items()}
    candidates["plain llama.cpp Q4_1"] = run_plain
    return compare(candidates, repeats=repeats), tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per candidate (best kept)")
    parser.add_argument("--threads", type=int, help="threads for every candidate (default: all cores)")
    parser.add_argument("--out", type=Path, help="folder for the exported GGUF files (default: a temporary one)")
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("skipping: llama_cpp is not importable (pip install 'lmcraft[llamacpp]')", flush=True)
        return 0

    from lmcraft.assets import resolve_model
    from lmcraft.generate import GenerationConfig
    from lmcraft.generate.llamacpp_backend import LlamaCppModel
    from lmcraft.gguf_export import export_gguf, load_source

    threads = set_threads(args.threads)
    folder = resolve_model("smollm2-135m-instruct")
    original = next(folder.glob("*.gguf"))
    source = load_source("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        files = {}
        for quant in ("q8_0", "q4_k_m"):
            files[quant] = out / f"smollm2-{quant}.gguf"
            if not files[quant].is_file():
                export_gguf(source, files[quant], quant, progress=False)
        files["Q4_1"] = original
        cfg = source.model.config
        models: dict[str, Any] = {"torch fp32": source.model}
        models.update({f"lmcraft llamacpp {name}": LlamaCppModel(path, cfg, threads) for name, path in files.items()})
        plain = llama_cpp.Llama(model_path=str(original), n_ctx=512, n_batch=512, n_threads=threads,
                                n_threads_batch=threads, verbose=False)
        config = GenerationConfig(max_new_tokens=args.new_tokens, eos_token_ids=())
        print(f"# greedy decoding, {args.new_tokens} new tokens — {machine()}, llama-cpp-python "
              f"{llama_cpp.__version__}", flush=True)
        table = Table(["candidate", "batch", "tok/s", "vs plain llama.cpp", "vs torch fp32", "same tokens as torch"])
        for batch in (1, 8):
            prompts = prompts_for(batch, cfg.vocab_size, source.tokenizer)
            best, tokens = time_batch(models, plain, prompts, config, args.repeats)
            speed = {name: batch * args.new_tokens / seconds for name, seconds in best.items()}
            reference = tokens["torch fp32"]
            for name in best:
                same = sum(a == b for ra, rb in zip(tokens[name], reference, strict=True)
                           for a, b in zip(ra, rb, strict=True)) / (batch * args.new_tokens)
                table.add([name, batch, fmt(speed[name]), ratio(speed[name], speed["plain llama.cpp Q4_1"]),
                           ratio(speed[name], speed["torch fp32"]), f"{same:.0%}"])
                print(f"  batch {batch} {name}: {fmt(speed[name])} tok/s", file=sys.stderr, flush=True)
        table.print()
        for model in models.values():
            if isinstance(model, LlamaCppModel):
                model.close()
        plain.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
