"""Greedy generation speed: lmcraft `generate()` vs transformers `generate()` on the same weights.

    python -m bench.bench_generate [--new-tokens 128] [--repeats 5] [--threads N] [--skip-smollm]

Both sides: fp32, `torch.inference_mode()`, the same thread count, greedy decoding of exactly
`--new-tokens` tokens (EOS ignored), prefill included in the time. Models: the ~14M `llama-14m`
preset (random weights, saved once in Hugging Face layout and loaded by both libraries) and
SmolLM2-135M-Instruct (the `smollm2-135m-instruct` asset; skipped with a message when it cannot be
fetched). Batch 8 uses prompts of different lengths, i.e. left padding. The `same tokens` column is
the share of generated tokens on which both libraries agree (fp32 ties can differ in the last bits).

`bandwidth ceiling` bounds batch-1 decoding from above when the weights do not fit in the CPU caches: every
step must read every weight matrix once, so tok/s <= B / W with W the bytes of the weights used in matrix
products (all parameters but an untied input embedding) and B the memory bandwidth a matrix-vector product
reaches here, measured on a 1 GiB fp32 matrix that no cache holds. A library at the ceiling cannot decode
faster without reading fewer bytes (lower precision).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

from bench.common import Table, compare, fmt, llama_14m_folder, machine, ratio, set_threads, smollm2_folder

PROMPT = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
          "movable metal type with an oil-based ink and a wooden screw press. Within a few decades")


def prompts_for(batch: int, vocab_size: int, tokenizer=None) -> list[list[int]]:  # noqa: ANN001
    """`batch` prompts of different lengths (16..44 tokens): real text when a tokenizer is given."""
    g = torch.Generator().manual_seed(0)
    base = tokenizer.encode(PROMPT) if tokenizer is not None else torch.randint(0, vocab_size, (44,), generator=g)
    base = [int(t) for t in base]
    lengths = [44 - 4 * i for i in range(batch)] if batch > 1 else [32]
    return [base[:n] for n in lengths]


def hf_inputs(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def time_batch(ours, theirs, prompts: list[list[int]], new_tokens: int, repeats: int) -> tuple[float, float, float]:  # noqa: ANN001
    """(lmcraft tok/s, transformers tok/s, share of equal tokens) for one batch of prompts."""
    from lmcraft.generate import GenerationConfig, generate

    config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=())
    ids, mask = hf_inputs(prompts, pad=0)
    out: dict[str, list[list[int]]] = {}

    def run_ours() -> None:
        out["ours"] = generate(ours, prompts, config).tokens

    def run_theirs() -> None:
        with torch.inference_mode():
            seqs = theirs.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        out["theirs"] = seqs[:, ids.shape[1]:].tolist()

    best = compare({"ours": run_ours, "theirs": run_theirs}, repeats=repeats)
    tokens = len(prompts) * new_tokens
    pairs = [(a, b) for ra, rb in zip(out["ours"], out["theirs"], strict=True) for a, b in zip(ra, rb, strict=True)]
    return tokens / best["ours"], tokens / best["theirs"], sum(a == b for a, b in pairs) / tokens


def matvec_bandwidth(repeats: int = 5) -> float:
    """Bytes/s of y = W x with W a (16384, 16384) fp32 matrix (1 GiB): the memory bandwidth decoding sees."""
    weight, x = torch.randn(16384, 16384), torch.randn(1, 16384)
    torch.nn.functional.linear(x, weight)
    best = compare({"matvec": lambda: torch.nn.functional.linear(x, weight)}, repeats=repeats)["matvec"]
    return weight.numel() * weight.element_size() / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decoding step reads: every parameter except an untied input embedding."""
    cfg = model.config
    untied_embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return (model.num_parameters() - untied_embedding) * 4


def bench_model(name: str, folder: Path, table: Table, new_tokens: int, repeats: int, bandwidth: float,
                tokenizer=None) -> None:  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    from lmcraft.hub import load_model

    ours = load_model(folder, dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs.generation_config.eos_token_id = None  # both sides generate exactly new_tokens tokens
    for batch in (1, 8):
        prompts = prompts_for(batch, ours.config.vocab_size, tokenizer)
        ours_tps, theirs_tps, same = time_batch(ours, theirs, prompts, new_tokens, repeats)
        ceiling = fmt(bandwidth / weight_bytes(ours)) if batch == 1 else "-"
        table.add([name, batch, fmt(ours_tps), fmt(theirs_tps), ratio(ours_tps, theirs_tps), f"{same:.0%}", ceiling])
        print(f"  {name} batch {batch}: lmcraft {fmt(ours_tps)} tok/s, transformers {fmt(theirs_tps)} tok/s",
              file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (best kept)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both sides (default: all cores)")
    parser.add_argument("--skip-smollm", action="store_true", help="only the llama-14m preset")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    print(f"# greedy generation, {args.new_tokens} new tokens, fp32 — {machine()}, "
          f"transformers {transformers.__version__}", flush=True)
    bandwidth = matvec_bandwidth()
    print(f"# matrix-vector memory bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    table = Table(["model", "batch", "lmcraft tok/s", "transformers tok/s", "ratio", "same tokens",
                   "bandwidth ceiling tok/s"])
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        bench_model("llama-14m", llama_14m_folder(Path(tmp)), table, args.new_tokens, args.repeats, bandwidth)
    folder = None if args.skip_smollm else smollm2_folder()
    if folder is not None:
        from lmcraft.tokenizer.load import load_tokenizer

        bench_model("smollm2-135m", folder, table, args.new_tokens, max(2, args.repeats // 2), bandwidth,
                    load_tokenizer(folder))
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
