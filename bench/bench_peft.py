"""Training-step speed: lmcraft LoRA vs lmcraft full fine-tuning vs peft+transformers LoRA, same model and batch.

    python -m bench.bench_peft [--batch 4] [--seq 128] [--repeats 3] [--threads N] [--skip-smollm]

One step = forward, causal-LM loss, backward, AdamW update, zero_grad, on a fixed random batch of
`--batch` x `--seq` tokens. Candidates, timed interleaved (best of `--repeats` after one warm-up each):
- lmcraft full:        every parameter trains (`lmcraft finetune` without `peft:`);
- lmcraft LoRA:        `lmcraft.peft` LoRA (r=8, alpha=16, q_proj + v_proj, PEFT's defaults) with the
                       finetune stage's causal-LM loss (through the LM head in chunks); frozen weights get
                       no gradient (checked);
- lmcraft LoRA, plain loss: the same with the loss on full (B, T, V) logits, to show what the chunked loss adds;
- lmcraft QLoRA:       the same adapters on an NF4 base (every projection dequantised in forward and backward);
- peft+transformers:   `peft.get_peft_model(AutoModelForCausalLM, LoraConfig(same))`, loss from `labels=`.
All fp32, the same thread count. Models: the ~14M `llama-14m` preset (random weights, saved once in Hugging
Face layout and loaded by both libraries) and SmolLM2-135M-Instruct (the `smollm2-135m-instruct` asset).
Targets: an lmcraft LoRA step >= 1.4x faster than an lmcraft full step, and >= 1.3x faster than peft+transformers.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import Table, compare, llama_14m_folder, machine, set_threads, smollm2_folder

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def lmcraft_step(folder: Path, batch: dict[str, torch.Tensor], method: str | None, fused: bool = True
                 ) -> tuple[Callable[[], None], int]:
    """(one training step, trainable parameter count) for an lmcraft model; method None = full fine-tuning."""
    from lmcraft import peft
    from lmcraft.finetune.tasks import CausalLMTask
    from lmcraft.hub import load_model

    torch.manual_seed(0)
    model = load_model(folder, dtype=torch.float32)
    if method is not None:
        model = peft.apply(model, {"method": method, **LORA})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    task = CausalLMTask(fused=fused)

    def step() -> None:
        out, _ = task.forward(model, batch)
        (out.loss_sum / out.num_targets).backward()
        if any(p.grad is not None for p in frozen):
            raise AssertionError("a frozen weight received a gradient")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def peft_step(folder: Path, batch: dict[str, torch.Tensor]) -> tuple[Callable[[], None], int]:
    import peft
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", **LORA)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = batch["input_ids"]

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def bench_model(name: str, folder: Path, table: Table, batch_size: int, seq: int, repeats: int) -> None:
    from lmcraft.hub import load_config

    vocab = load_config(folder).vocab_size
    ids = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    full, n_full = lmcraft_step(folder, batch, None)
    lora, n_lora = lmcraft_step(folder, batch, "lora")
    plain, _ = lmcraft_step(folder, batch, "lora", fused=False)
    qlora, _ = lmcraft_step(folder, batch, "qlora")
    theirs, n_theirs = peft_step(folder, batch)
    if n_lora != n_theirs:
        raise AssertionError(f"LoRA configs differ: lmcraft trains {n_lora} parameters, peft {n_theirs}")
    best = compare({"full": full, "lora": lora, "plain": plain, "qlora": qlora, "peft": theirs}, repeats=repeats)
    vs_full, vs_peft = best["full"] / best["lora"], best["peft"] / best["lora"]
    seconds = [f"{best[k]:.3f}" for k in ("full", "lora", "plain", "qlora", "peft")]
    table.add([name, f"{batch_size}x{seq}", f"{n_lora:,} / {n_full:,}", *seconds,
               f"{vs_full:.2f}x {'ok' if vs_full >= 1.4 else 'MISS'}",
               f"{vs_peft:.2f}x {'ok' if vs_peft >= 1.3 else 'MISS'}"])
    print(f"  {name}: full {best['full']:.3f} s, LoRA {best['lora']:.3f} s, LoRA plain loss {best['plain']:.3f} s, "
          f"QLoRA {best['qlora']:.3f} s, peft {best['peft']:.3f} s", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per candidate (best kept)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--skip-smollm", action="store_true", help="only the llama-14m preset")
    args = parser.parse_args(argv)

    import transformers

    transformers.logging.set_verbosity_error()
    set_threads(args.threads)
    print(f"# training step (forward + backward + AdamW), fp32, LoRA r=8 on q_proj/v_proj — {machine()}, "
          f"transformers {transformers.__version__}", flush=True)
    table = Table(["model", "batch", "LoRA / full params", "lmcraft full s", "lmcraft LoRA s", "LoRA plain-loss s",
                   "QLoRA s", "peft+transformers s", "LoRA vs full (>=1.4)", "LoRA vs peft (>=1.3)"])
    with tempfile.TemporaryDirectory(prefix="bench-peft-") as tmp:
        bench_model("llama-14m", llama_14m_folder(Path(tmp)), table, args.batch, args.seq, args.repeats)
    folder = None if args.skip_smollm else smollm2_folder()
    if folder is not None:
        bench_model("smollm2-135m", folder, table, args.batch, args.seq, args.repeats)
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
