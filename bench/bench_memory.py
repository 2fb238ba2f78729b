"""Peak memory and step time of LoRA SFT: lmcraft default, lmcraft with checkpointing + chunked loss, and
transformers + peft with gradient checkpointing, on one Llama-family config with random weights.

    python -m bench.bench_memory                       # ~1.1B parameters (TinyLlama's shape), sequence 2048, batch 1
    python -m bench.bench_memory --size 100m --seq 256  # a quick check

Each candidate runs in its own process, one after the other (so their peaks do not mix): load the saved folder,
apply LoRA (r 8 on q_proj/v_proj), take one warm-up optimizer step and then `--steps` timed ones on one row of
`--seq` tokens (every token a target). Peak = the process's peak resident memory (VmHWM, Linux), which includes
loading (for transformers, from after the lmcraft model used for its plan is freed); the steps' peak = the same from
the first step on, what the planner predicts; step time = the best timed step. Beside each peak stands the
planner's prediction (`lmcraft.train.plan`; for transformers the plan of lmcraft with full checkpointing and full
logits, the same memory layout; none for bf16-loaded weights, a layout lmcraft does not train in).

Precision (`--precision`, default auto: what `precision: auto` picks on this machine) is each side's bf16 path as
its trainer runs it: the forward pass under bf16 autocast, backward and update outside. lmcraft also does what its
Trainer does: glibc's mmap threshold fixed (`train.allocator`) and, under bf16, the frozen linear weights stored
in bf16 (`trainer.frozen_dtype: auto`, `train.frozen`). transformers + peft loads fp32 weights (the HF Trainer's
`bf16=True` on a default load); the last row loads them in bf16 instead (`dtype=torch.bfloat16`, LoRA weights in
bf16 too), the other way its users save memory. Ratios are against "transformers+peft ckpt"; the issue's goal is
lmcraft's peak <= 0.7x at <= 1.3x its step time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import Table, machine, set_threads

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
SIZES = {  # Llama-family shapes with random weights
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               intermediate_size=5632),
    "100m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                 intermediate_size=2048),
}
CANDIDATES = {"lmcraft": ("none", False), "lmcraft ckpt+chunked": ("full", True), "transformers+peft ckpt": None,
              "transformers+peft ckpt, bf16 weights": None}


def _rss(field: str, file: str = "/proc/self/status") -> int:
    with open(file) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _batch(seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))


def child(name: str, folder: Path, seq: int, steps: int, precision: str) -> dict[str, Any]:
    """Run one candidate in this process; returns its peak, prediction and step time (or why it was skipped)."""
    from contextlib import ExitStack

    from lmcraft import peft
    from lmcraft.align.sft import sft_loss
    from lmcraft.hub import load_model
    from lmcraft.train.allocator import cap_mmap_threshold
    from lmcraft.train.frozen import frozen_linears_in
    from lmcraft.train.plan import plan_memory, reset_peak_resident
    from lmcraft.train.trainer import apply_memory_switches

    torch.manual_seed(0)
    setting = CANDIDATES[name]
    bf16 = precision == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    model = peft.apply(load_model(folder, dtype=torch.float32), {"method": "lora", **LORA}).train()
    ckpt, chunked = setting if setting is not None else ("full", False)
    apply_memory_switches(model, ckpt, chunked)
    with ExitStack() as held:
        if setting is not None:  # what the Trainer does: its heap setting, and frozen weights in bf16 under bf16
            cap_mmap_threshold()
            if bf16:
                held.enter_context(frozen_linears_in(model, torch.bfloat16))
        with autocast:
            predicted = plan_memory(model, (1, seq), ckpt, chunked, "adamw").peak
        room = _rss("MemAvailable:", "/proc/meminfo") + _rss("VmRSS:")
        if predicted > 0.9 * room:  # a shared machine: do not push the neighbours into the OOM killer
            return {"skipped": f"planned {predicted / 2**30:.1f} GiB, {room / 2**30:.1f} GiB available"}
        ids = _batch(seq, model.config.vocab_size)
        if setting is None:  # transformers + peft, the same weights
            import peft as hf_peft
            from transformers import AutoModelForCausalLM

            del model
            reset_peak_resident()  # restart the peak: transformers' own loading and steps
            dtype = torch.bfloat16 if name.endswith("bf16 weights") else torch.float32
            base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(task_type="CAUSAL_LM", **LORA)).train()

            def loss() -> torch.Tensor:
                return model(input_ids=ids, labels=ids).loss
        else:
            def loss() -> torch.Tensor:
                out = sft_loss(model, {"input_ids": ids, "labels": ids})
                return out.loss_sum / out.num_targets
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        loading = _rss("VmHWM:")
        reset_peak_resident()  # the steps' own peak from here on
        times = []
        for i in range(steps + 1 if steps else 1):  # the first step warms up (allocator, optimizer state)
            start = time.perf_counter()
            with autocast:  # the forward pass; backward and update outside, as both trainers do
                value = loss()
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            print(f"  {name} step {i}: {times[-1]:.2f} s, peak so far {_rss('VmHWM:') / 2**30:.2f} GiB",
                  file=sys.stderr, flush=True)
        steps_peak = _rss("VmHWM:")  # before the frozen weights go back to fp32 (as after a Trainer's run)
    seconds = min(times[1:] or times)
    return {"peak": max(loading, steps_peak), "steps_peak": steps_peak, "predicted": predicted, "seconds": seconds}


def _name(row: dict[str, float], results: dict[str, dict[str, float]]) -> str:
    return next(name for name, r in results.items() if r is row)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps per candidate, after one warm-up "
                        "step (the best is reported); 0 = one step, warm-up included (slow machines)")
    parser.add_argument("--candidates", nargs="+", choices=sorted(CANDIDATES), default=list(CANDIDATES),
                        metavar="NAME", help=f"which to run, in this order (default: all: {', '.join(CANDIDATES)})")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="bf16 autocast or fp32 for every candidate; auto = what `precision: auto` picks here")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--child", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.seq, args.steps, args.precision)))
        return 0
    from lmcraft.precision import resolve_precision

    precision = resolve_precision(args.precision, torch.device("cpu")).precision
    from lmcraft.hub.save import save_model
    from lmcraft.models import LanguageModel, ModelConfig

    with tempfile.TemporaryDirectory(prefix="lmcraft-bench-memory-") as tmp:
        folder = Path(tmp) / args.size
        torch.manual_seed(0)
        model = LanguageModel(ModelConfig(**SIZES[args.size], tie_word_embeddings=False), "lm")
        params = model.num_parameters()
        save_model(model, folder)
        del model
        results = {}
        for name in args.candidates:
            cmd = [sys.executable, "-m", "bench.bench_memory", "--child", name, "--folder", str(folder),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--precision", precision]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)  # stderr: the step times
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    measured = {name: r for name, r in results.items() if "skipped" not in r}
    if not measured:
        print(f"nothing measured: {results}", file=sys.stderr)
        return 1
    base = measured.get("transformers+peft ckpt", next(iter(measured.values())))
    table = Table(["candidate", "peak GiB", "steps' peak GiB", "planned GiB", "planned/steps' peak", "step s",
                   f"peak vs {_name(base, results)}", f"step vs {_name(base, results)}"])
    for name, r in results.items():
        if "skipped" in r:
            table.add([name, f"skipped: {r['skipped']}", "", "", "", "", "", ""])
            continue
        planned = [f"{r['predicted'] / 2**30:.2f}", f"{r['predicted'] / r['steps_peak']:.2f}"]
        if name.endswith("bf16 weights"):  # a layout lmcraft's plan does not describe
            planned = ["—", "—"]
        table.add([name, f"{r['peak'] / 2**30:.2f}", f"{r['steps_peak'] / 2**30:.2f}", *planned, f"{r['seconds']:.2f}",
                   f"{r['peak'] / base['peak']:.2f}x", f"{r['seconds'] / base['seconds']:.2f}x"])
    print(f"LoRA SFT, {args.size} ({params / 1e6:,.0f}M parameters, {precision}), batch 1 x {args.seq}; {machine()}")
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
