"""Peak memory and step time of LoRA SFT: lmcraft default, lmcraft with checkpointing + chunked loss, and
transformers + peft with gradient checkpointing, on one Llama-family config with random weights.

    python -m bench.bench_memory                       # ~1.1B parameters (TinyLlama's shape), sequence 2048, batch 1
    python -m bench.bench_memory --size 100m --seq 256  # a quick check

Each candidate runs in its own process: load the saved folder, apply LoRA (r 8 on q_proj/v_proj), take `--steps`
optimizer steps on one row of `--seq` tokens (every token a target). Peak = the process's peak resident memory
(VmHWM, Linux), which includes loading (for transformers, from after the lmcraft model used for its plan is
freed); step time = the last step's seconds. Beside each peak stands the
planner's prediction (`lmcraft.train.plan`; for transformers the plan of lmcraft with full checkpointing and full
logits, the same memory layout).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.common import Table, machine, set_threads

LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}
SIZES = {  # Llama-family shapes with random weights
    "1b": dict(vocab_size=32000, hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
               intermediate_size=5632),
    "100m": dict(vocab_size=32000, hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                 intermediate_size=2048),
}
CANDIDATES = {"lmcraft": ("none", False), "lmcraft ckpt+chunked": ("full", True), "transformers+peft ckpt": None}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _batch(seq: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))


def child(name: str, folder: Path, seq: int, steps: int) -> dict[str, float]:
    """Run one candidate in this process; returns its peak, prediction and step time."""
    from lmcraft import peft
    from lmcraft.align.sft import sft_loss
    from lmcraft.hub import load_model
    from lmcraft.train.plan import plan_memory
    from lmcraft.train.trainer import apply_memory_switches

    torch.manual_seed(0)
    setting = CANDIDATES[name]
    model = peft.apply(load_model(folder, dtype=torch.float32), {"method": "lora", **LORA}).train()
    ckpt, chunked = setting if setting is not None else ("full", False)
    apply_memory_switches(model, ckpt, chunked)
    predicted = plan_memory(model, (1, seq), ckpt, chunked, "adamw").peak
    ids = _batch(seq, model.config.vocab_size)
    if setting is None:  # transformers + peft, the same weights
        import peft as hf_peft
        from transformers import AutoModelForCausalLM

        del model
        with open("/proc/self/clear_refs", "w") as f:  # restart the peak: transformers' own loading and steps
            f.write("5")
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = hf_peft.get_peft_model(base, hf_peft.LoraConfig(task_type="CAUSAL_LM", **LORA)).train()

        def loss() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss
    else:
        def loss() -> torch.Tensor:
            out = sft_loss(model, {"input_ids": ids, "labels": ids})
            return out.loss_sum / out.num_targets
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    seconds = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
    return {"peak": _rss("VmHWM:"), "predicted": predicted, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps per candidate (the last is timed)")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--child", choices=sorted(CANDIDATES), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.folder, args.seq, args.steps)))
        return 0
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
        for name in CANDIDATES:
            cmd = [sys.executable, "-m", "bench.bench_memory", "--child", name, "--folder", str(folder),
                   "--seq", str(args.seq), "--steps", str(args.steps)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {name}: {results[name]}", file=sys.stderr, flush=True)
    base = results["lmcraft"]
    table = Table(["candidate", "peak GiB", "planned GiB", "planned/peak", "step s", "peak vs lmcraft",
                   "step vs lmcraft"])
    for name, r in results.items():
        table.add([name, f"{r['peak'] / 2**30:.2f}", f"{r['predicted'] / 2**30:.2f}",
                   f"{r['predicted'] / r['peak']:.2f}", f"{r['seconds']:.2f}", f"{r['peak'] / base['peak']:.2f}x",
                   f"{r['seconds'] / base['seconds']:.2f}x"])
    print(f"LoRA SFT, {args.size} ({params / 1e6:,.0f}M parameters, fp32), batch 1 x {args.seq}; {machine()}")
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
