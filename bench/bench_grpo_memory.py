"""Peak memory of one GRPO update step with a large vocabulary, beside the size of its full logits tensor.

    python -m bench.bench_grpo_memory                   # vocabulary 49,152 (SmolLM2's), G = 8 completions x 256 tokens
    python -m bench.bench_grpo_memory --generations 4 16

A small Llama-family model with random weights (SmolLM2's vocabulary, tied LM head, LoRA r 16 on every linear
layer) takes one optimizer step of `lmcraft.align.grpo.GRPOLoss` on a rollout of G completions of `--length` tokens
after a `--prompt` token prompt (random tokens, random advantages). The log-probs of the B x n answer tokens would,
computed from the model's full logits, need a (B, n, V) fp32 tensor of B n V 4 bytes; lmcraft computes them through
the LM head in chunks (`objectives.lm_head.answer_logprobs`). The reference candidate "full logits" is the same step
with the log-probs gathered from `model(...).logits` (what a plain implementation does).

Each candidate runs in its own process: build the model and the batch, take one warm-up step (optimizer state,
lazily built kernels), then reset the peak resident set (/proc/self/clear_refs) and take the measured step;
"peak above baseline" = VmHWM after the step - VmRSS before it (Linux). The children run with glibc's mmap threshold
fixed at 64 KiB (MALLOC_MMAP_THRESHOLD_, `--malloc mapped`): by default glibc raises the threshold to the size of
the last freed mapped block (up to 32 MiB), after which blocks of a chunk's size (~32 MiB) come from the heap and
stay resident after they are freed, so the resident set measures the allocator's retention rather than the live
tensors; `--malloc default` measures it that way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from bench.common import Table, machine, set_threads

MODEL = dict(vocab_size=49152, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=640,
             tie_word_embeddings=True)
LORA = {"method": "lora", "r": 16, "lora_alpha": 32,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
CANDIDATES = ("lmcraft (chunked LM head)", "full logits")


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def _full_logits_loss(settings: object):  # noqa: ANN202 - a loss_fn like GRPOLoss
    """GRPO's loss with the answer log-probs gathered from the model's full (B, T, V) logits."""
    from lmcraft.align.grpo_loss import aggregate, token_loss
    from lmcraft.objectives.lm_head import token_logprobs
    from lmcraft.train import LossOutput

    def loss_fn(model: torch.nn.Module, batch: dict) -> LossOutput:
        w, mask = batch["prompt_width"], batch["answer_mask"]
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = token_logprobs(logits[:, w - 1:-1], batch["input_ids"][:, w:], settings.temperature)
        per, _, _ = token_loss(logp, logp.detach(), batch["advantages"], settings.epsilon_low, settings.eps_high)
        loss_sum, count = aggregate(per, mask, settings.loss, settings.max_new_tokens)
        return LossOutput(loss_sum, count, {})
    return loss_fn


def child(name: str, generations: int, length: int, prompt: int) -> dict[str, float]:
    """One GRPO step of candidate `name` in this process: baseline RSS, peak above it, seconds."""
    from lmcraft import peft
    from lmcraft.align.grpo import GroupRollout, GRPOLoss
    from lmcraft.align.grpo_config import GRPOSection
    from lmcraft.models import LanguageModel, ModelConfig

    torch.manual_seed(0)
    model = peft.apply(LanguageModel(ModelConfig(**MODEL), "lm"), LORA).train()
    settings = GRPOSection(num_generations=generations, prompts_per_rollout=1, max_new_tokens=length)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, MODEL["vocab_size"], (generations, prompt + length), generator=g)
    rollout = GroupRollout(ids, torch.ones_like(ids), prompt, torch.ones(generations, length),
                           torch.randn(generations, generator=g), None, None)
    batch = rollout.select(range(generations))
    loss_fn = GRPOLoss(settings) if name == CANDIDATES[0] else _full_logits_loss(settings)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step() -> float:
        out = loss_fn(model, batch)
        (out.loss_sum / out.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss_sum / out.num_targets)

    step()  # warm-up: the optimizer state and torch's lazily built kernels exist before the measured step
    baseline = _rss("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:  # the peak restarts here: only the step counts
        f.write("5")
    start = time.perf_counter()
    loss = step()
    return {"baseline": baseline, "peak": _rss("VmHWM:") - baseline, "seconds": time.perf_counter() - start,
            "loss": loss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, nargs="+", default=[8], help="G: completions in the step")
    parser.add_argument("--length", type=int, default=256, help="completion tokens n")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--threads", type=int, help="intra-op threads (default: all cores)")
    parser.add_argument("--malloc", choices=("mapped", "default"), default="mapped",
                        help="glibc's mmap threshold in the children: fixed at 64 KiB (mapped) or glibc's dynamic one")
    parser.add_argument("--child", choices=CANDIDATES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.generations[0], args.length, args.prompt)))
        return 0
    table = Table(["G x n", "candidate", "peak above baseline MiB", "(B, n, V) fp32 logits MiB", "peak / logits",
                   "step s"])
    for generations in args.generations:
        logits = generations * args.length * MODEL["vocab_size"] * 4
        for name in CANDIDATES:
            cmd = [sys.executable, "-m", "bench.bench_grpo_memory", "--child", name, "--generations", str(generations),
                   "--length", str(args.length), "--prompt", str(args.prompt)]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"} if args.malloc == "mapped" else None
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  {generations} x {args.length}, {name}: {r}", file=sys.stderr, flush=True)
            table.add([f"{generations} x {args.length}", name, f"{r['peak'] / 2**20:,.0f}", f"{logits / 2**20:,.0f}",
                       f"{r['peak'] / logits:.2f}", f"{r['seconds']:.1f}"])
    print(f"GRPO step (LoRA r 16), vocabulary {MODEL['vocab_size']:,}, hidden {MODEL['hidden_size']}, "
          f"{MODEL['num_layers']} layers, prompt {args.prompt} tokens, malloc {args.malloc}; {machine()}")
    table.print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
