"""Mixture-of-experts MLP speed: lmcraft's batched experts vs a loop over experts, forward + backward.

    python -m bench.bench_moe [--repeats 5] [--threads N]

Candidates on the same router output (random hidden states, random router, seed 0):
- lmcraft bmm:  `SparseMoE` as shipped: assignments sorted by expert into an (E', C, H) batch, two `bmm`s;
- expert loop:  one `index_select` / two matmuls / `index_add_` per expert that got tokens (transformers' eager
                `Qwen3MoeExperts` computes this way); the outputs are checked equal to lmcraft's (fp32, 1e-5).
Shapes: the `qwen3-moe-tiny` preset's layer (E=8, k=2, H=128, I=64) on 512 tokens (a training micro-batch), a wider
layer (E=64, k=8, H=512, I=256) on 2048 tokens, and that layer decoding one token (forward only).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.common import Table, compare, fmt, machine, set_threads
from lmcraft.models.config import ModelConfig
from lmcraft.models.moe import SparseMoE

CASES = [("tiny E8 k2, 512 tok", 8, 2, 128, 64, 512, True), ("wide E64 k8, 2048 tok", 64, 8, 512, 256, 2048, True),
         ("wide E64 k8, decode 1 tok", 64, 8, 512, 256, 1, False)]


def loop_experts(moe: SparseMoE, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The reference: a Python loop over the experts that got tokens."""
    out = torch.zeros_like(x)
    gate_up, down = moe.experts.weights()
    for e in chosen.unique().tolist():
        token, slot = torch.where(chosen == e)
        g, u = F.linear(x[token], gate_up[e]).chunk(2, dim=-1)
        out.index_add_(0, token, F.linear(moe.act(g) * u, down[e]) * weights[token, slot, None])
    return out


def step(fn: Callable[..., torch.Tensor], inputs: tuple, backward: bool) -> Callable[[], None]:
    """One timed call: forward + backward of a scalar of the output, or a no-grad forward."""
    def run() -> None:
        if backward:
            fn(*inputs).square().mean().backward()
        else:
            with torch.no_grad():
                fn(*inputs)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    print(machine(), f"(set_threads: {threads})")
    table = Table(["case", "lmcraft bmm ms", "expert loop ms", "loop / bmm"])
    for name, e, k, h, i, n, backward in CASES:
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=8, hidden_size=h, num_layers=1, num_heads=1, intermediate_size=i, num_experts=e,
                          num_experts_per_tok=k, norm_topk_prob=True)
        moe = SparseMoE(cfg, F.silu)
        for p in moe.parameters():
            torch.nn.init.normal_(p, std=0.05)
        x = torch.randn(n, h, requires_grad=backward)
        with torch.no_grad():
            weights, chosen = moe.gate(x).float().softmax(-1).topk(k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
        ours = moe._experts(x, chosen, weights)
        assert torch.allclose(ours, loop_experts(moe, x, chosen, weights), atol=1e-5)

        inputs = (moe, x, chosen, weights)
        best = compare({"bmm": step(lambda m, *a: m._experts(*a), inputs, backward),
                        "loop": step(loop_experts, inputs, backward)}, repeats=args.repeats)
        table.add([name, fmt(best["bmm"] * 1e3, 2), fmt(best["loop"] * 1e3, 2), f"{best['loop'] / best['bmm']:.2f}x"])
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
