"""Greedy generation speed: lmcraft `generate()` (eager, and with the compiled static decode step) vs transformers
`generate()` on the same weights.

    python -m bench.bench_generate [--new-tokens 128] [--repeats 5] [--threads N] [--clock wall|cpu]
                                   [--device cpu|cuda] [--precisions auto fp32 bf16] [--compile] [--profile]
                                   [--skip-smollm]

Both sides: weights in the row's precision (`auto`: what `lmcraft.precision` picks for decoding on this device,
the same for both sides; pass `--precisions fp32 bf16` to see each side at each and take each side's best),
`torch.inference_mode()`, the same thread count, greedy decoding of exactly `--new-tokens` tokens (EOS ignored),
prefill included in the time. `--compile` adds lmcraft with `compile=True` (static cache, `torch.compile`d decode
step; its compile happens in the warm-up run, not timed). Models: the ~14M `llama-14m` preset (random weights,
saved once in Hugging Face layout and loaded by both libraries) and SmolLM2-135M-Instruct (the
`smollm2-135m-instruct` asset; on a machine that cannot fetch it, a model of its shape with random weights and random
prompt ids, said in the row's name: speed does not depend on the values). Batch 8 uses prompts of
different lengths, i.e. left padding. The `same tokens` column is the share of generated tokens on which both
libraries agree (ties can differ in the last bits). `--clock cpu` times with this process's CPU time (with
`--threads 1`: the time the work ran, whatever other processes take from a shared machine).

`ceiling` bounds batch-1 decoding from above when the weights do not fit in the caches: every step must read every
weight matrix once, so tok/s <= B / W with W the bytes of the weights used in matrix products in the row's
precision (all parameters but an untied input embedding, times 4 for fp32, 2 for bf16) and B the memory bandwidth
a matrix-vector product reaches here, measured on a 1 GiB fp32 matrix that no cache holds. `of ceiling` is the
best lmcraft batch-1 tok/s over the ceiling. A library at the ceiling cannot decode faster without reading fewer
bytes. `--profile` prints torch.profiler's table of eager decode steps of the last model at batch 1 (where the
step time goes: matrix products, attention, the rest).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import Table, compare, fmt, llama_14m_folder, machine, ratio, set_threads, smollm2_folder

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}

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


def time_batch(ours, theirs, prompts: list[list[int]], new_tokens: int, repeats: int, compiled: bool,  # noqa: ANN001
               clock: Callable[[], float]) -> dict[str, float]:
    """{candidate: tok/s} for one batch of prompts, and "same": the share of tokens transformers agrees on."""
    from lmcraft.generate import GenerationConfig, generate

    device = next(ours.parameters()).device
    ids, mask = (t.to(device) for t in hf_inputs(prompts, pad=0))
    out: dict[str, list[list[int]]] = {}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def lmcraft(compile: bool) -> Callable[[], None]:
        config = GenerationConfig(max_new_tokens=new_tokens, eos_token_ids=(), compile=compile, weights_fixed=True)

        def run() -> None:
            result = generate(ours, prompts, config)
            sync()
            out["lmcraft compiled" if compile else "lmcraft"] = result.tokens
        return run

    def run_theirs() -> None:
        with torch.inference_mode():
            seqs = theirs.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        sync()
        out["transformers"] = seqs[:, ids.shape[1]:].tolist()

    candidates = {"lmcraft": lmcraft(False), "transformers": run_theirs}
    if compiled:
        candidates["lmcraft compiled"] = lmcraft(True)
    best = compare(candidates, repeats=repeats, clock=clock)
    tokens = len(prompts) * new_tokens
    pairs = [(a, b) for ra, rb in zip(out["lmcraft"], out["transformers"], strict=True)
             for a, b in zip(ra, rb, strict=True)]
    same = sum(a == b for a, b in pairs) / tokens
    return {**{name: tokens / seconds for name, seconds in best.items()}, "same": same}


def matvec_bandwidth(device: torch.device, clock: Callable[[], float], repeats: int = 5) -> float:
    """Bytes/s of y = W x with W a (16384, 16384) fp32 matrix (1 GiB): the memory bandwidth decoding sees."""
    weight, x = torch.randn(16384, 16384, device=device), torch.randn(1, 16384, device=device)

    def run() -> None:
        torch.nn.functional.linear(x, weight)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = compare({"matvec": run}, repeats=repeats, clock=clock)["matvec"]
    return weight.numel() * weight.element_size() / best


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decoding step reads: every parameter except an untied input embedding, at the
    model's element size."""
    cfg = model.config
    untied_embedding = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    return (model.num_parameters() - untied_embedding) * model.get_input_embeddings().weight.element_size()


def bench_model(name: str, folder: Path, table: Table, args: argparse.Namespace, bandwidth: float,
                best: dict[tuple[str, int], dict[str, float]], tokenizer=None) -> torch.nn.Module:  # noqa: ANN001
    """Rows of `table` for each precision and batch; `best` keeps each side's best tok/s per (model, batch)."""
    from transformers import AutoModelForCausalLM

    from lmcraft.hub import load_model
    from lmcraft.precision import weights_dtype

    device = torch.device(args.device)
    repeats = args.repeats if tokenizer is None else max(2, args.repeats // 2)
    ours = None
    for asked in args.precisions:
        dtype, choice = weights_dtype(asked, device)
        label = choice.precision if asked != "auto" else f"auto={choice.precision}"
        ours = load_model(folder, dtype=dtype, device=device)
        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
        theirs.generation_config.eos_token_id = None  # both sides generate exactly new_tokens tokens
        ceiling = bandwidth / weight_bytes(ours)
        for batch in (1, 8):
            prompts = prompts_for(batch, ours.config.vocab_size, tokenizer)
            tps = time_batch(ours, theirs, prompts, args.new_tokens, repeats, args.compile, CLOCKS[args.clock])
            mine = max(tps["lmcraft"], tps.get("lmcraft compiled", 0.0))
            compiled = [fmt(tps["lmcraft compiled"])] if args.compile else []
            table.add([name, batch, label, fmt(tps["lmcraft"]), *compiled, fmt(tps["transformers"]),
                       ratio(mine, tps["transformers"]), f"{tps['same']:.0%}",
                       fmt(ceiling) if batch == 1 else "-", f"{mine / ceiling:.0%}" if batch == 1 else "-"])
            sides = best.setdefault((name, batch), {"lmcraft": 0.0, "transformers": 0.0})
            sides["lmcraft"], sides["transformers"] = max(sides["lmcraft"], mine), max(sides["transformers"],
                                                                                     tps["transformers"])
            print(f"  {name} {label} batch {batch}: " + ", ".join(f"{k} {fmt(v)}" for k, v in tps.items()
                                                                 if k != "same"), file=sys.stderr, flush=True)
        del theirs
    return ours


def profile_decode(model: torch.nn.Module, steps: int = 16) -> None:
    """torch.profiler's table (self time per op) of `steps` eager decode steps at batch 1, prefill excluded."""
    from torch.profiler import ProfilerActivity, profile

    from lmcraft.generate import Generation, GenerationConfig

    run = Generation(model, [list(range(1, 33))], GenerationConfig(max_new_tokens=steps + 1, eos_token_ids=()))
    entries = iter(run)
    next(entries)  # prefill and the first token
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for _ in entries:
            pass
    print(f"# profile of {steps} eager decode steps at batch 1 (self time per op)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (best kept)")
    parser.add_argument("--threads", type=int, help="intra-op threads for both sides (default: all cores)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="wall time, or this process's CPU time")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--precisions", nargs="+", choices=("auto", "fp32", "bf16"), default=["auto"])
    parser.add_argument("--compile", action="store_true", help="add lmcraft with the compiled static decode step")
    parser.add_argument("--profile", action="store_true", help="profile eager decode steps of the last model")
    parser.add_argument("--skip-smollm", action="store_true", help="only the llama-14m preset")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    device = torch.device(args.device)
    gpu = f", {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    print(f"# greedy generation, {args.new_tokens} new tokens, {args.clock} clock — {machine()}{gpu}, "
          f"transformers {transformers.__version__}", flush=True)
    bandwidth = matvec_bandwidth(device, CLOCKS[args.clock])
    print(f"# matrix-vector memory bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    table = Table(["model", "batch", "precision", "lmcraft tok/s", *(["lmcraft compiled tok/s"] if args.compile
                                                                     else []),
                   "transformers tok/s", "ratio", "same tokens", "ceiling tok/s", "of ceiling"])
    best: dict[tuple[str, int], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        last = bench_model("llama-14m", llama_14m_folder(Path(tmp)), table, args, bandwidth, best)
        folder = None if args.skip_smollm else smollm2_folder(Path(tmp))
        if folder is not None:
            from lmcraft.tokenizer.load import load_tokenizer

            has_tokenizer = (folder / "tokenizer.json").is_file()
            last = bench_model("smollm2-135m" if has_tokenizer else "smollm2-135m (random weights)", folder, table,
                               args, bandwidth, best, load_tokenizer(folder) if has_tokenizer else None)
    table.print()
    print("ratio: lmcraft's best (eager or compiled) / transformers. Each side at its best precision: "
          + "; ".join(f"{m} batch {b}: {ratio(s['lmcraft'], s['transformers'])}" for (m, b), s in best.items()))
    if args.profile:
        profile_decode(last)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
