"""Optimizer parameter groups (weight-decay split, layer-wise LR decay, head LR) and LR schedules.

Weight decay applies only to matrices: biases, norm weights and every other parameter with
`ndim < 2` are not decayed, and neither are embedding tables unless `decay_embeddings=True`
(decaying rarely seen token rows pulls them to zero between updates).

Layer-wise LR decay (LLRD, ULMFiT / ELECTRA style): with `L = num_layers` and a function
`layer_of(name) -> int | None` mapping each parameter to a depth in `0..L` (0 = embeddings,
`L` = the top block), a parameter at depth `i` trains with `lr * decay ** (L - i)`; parameters
for which `layer_of` returns None (heads, final norm) keep `lr`. Parameters for which
`is_head(name)` is true use `head_lr` instead.

Schedules are multipliers of the base LR at optimizer step `s` (0-based: the s-th update uses
`lr * f(s)`), wrapped in `torch.optim.lr_scheduler.LambdaLR`:
  warmup (all schedules): f(s) = (s + 1) / W for s < W
  constant: 1 after warmup
  linear:   1 - (1 - m) * p,                     p = (s - W) / (T - W) in [0, 1]
  cosine:   m + (1 - m) * (1 + cos(pi * p)) / 2
  wsd:      1 until the last `decay_fraction * T` steps, then linear from 1 down to m
with `W` warmup steps, `T` total steps and `m = min_lr_ratio`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SCHEDULES", "param_groups", "build_optimizer", "lr_multiplier", "build_scheduler"]

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def _embedding_param_ids(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_lr_decay: float | None = None,
    head_lr: float | None = None,
    layer_of: Callable[[str], int | None] | None = None,
    is_head: Callable[[str], bool] | None = None,
    num_layers: int | None = None,
    decay_embeddings: bool = False,
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """Split `model`'s parameters into AdamW groups keyed by (lr, weight_decay).

    `lr` and `weight_decay` are keyword-only, so a call can never swap them.
    Each group is `{"params": [...], "names": [...], "lr": float, "weight_decay": float}`.
    With `trainable_only` (default) frozen parameters (`requires_grad=False`) are left out; pass
    False when a callback unfreezes layers later (AdamW skips parameters whose grad is None).
    `layer_lr_decay` needs `layer_of`; `num_layers` defaults to the largest index it returns.
    """
    if layer_lr_decay is not None and layer_of is None:
        raise ValueError("layer_lr_decay needs layer_of(name) -> layer index")
    if head_lr is not None and is_head is None:
        raise ValueError("head_lr needs is_head(name) -> bool")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad or not trainable_only]
    depth: dict[str, int | None] = {n: layer_of(n) for n, _ in named} if layer_of is not None else {}
    if layer_lr_decay is not None and num_layers is None:
        num_layers = max((d for d in depth.values() if d is not None), default=0)
    embeddings = _embedding_param_ids(model)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, p in named:
        no_decay = p.ndim < 2 or (id(p) in embeddings and not decay_embeddings)
        wd = 0.0 if no_decay else weight_decay
        if head_lr is not None and is_head is not None and is_head(name):
            group_lr = head_lr
        elif layer_lr_decay is not None and depth.get(name) is not None:
            group_lr = lr * layer_lr_decay ** (num_layers - depth[name])  # type: ignore[operator]
        else:
            group_lr = lr
        g = groups.setdefault((group_lr, wd), {"params": [], "names": [], "lr": group_lr, "weight_decay": wd})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def build_optimizer(
    groups: Iterable[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float, kind: str = "adamw"
) -> torch.optim.Optimizer:
    """AdamW (`kind="adamw"`, torch's, fused where it can be) or `AdamW8bit` (`"adamw8bit"`, 8-bit moments) over
    pre-built groups (each group's own `lr`/`weight_decay` wins over the defaults)."""
    groups = list(groups)
    if not any(g["params"] for g in groups):
        raise ValueError("no trainable parameters: every parameter has requires_grad=False")
    if kind == "adamw8bit":
        from lmcraft.train.adamw8bit import AdamW8bit

        return AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r} (expected adamw or adamw8bit)")
    fused = _fused_adamw_ok([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def _fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """The fused AdamW kernel (one pass over all tensors instead of ~10 per tensor) handles plain floating-point
    tensors on CPU and CUDA; sharded (DTensor) parameters keep the default implementation."""
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in params):
            return False
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
               for p in params)


def lr_multiplier(
    schedule: str, step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0,
    decay_fraction: float = 0.2,
) -> float:
    """The factor `f(step)` of the module docstring."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay_steps = max(1, round(decay_fraction * total_steps))
        start = max(warmup_steps, total_steps - decay_steps)
        if step < start:
            return 1.0
        p = min(1.0, (step - start) / max(1, total_steps - start))
        return 1.0 - (1.0 - min_lr_ratio) * p
    p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - (1.0 - min_lr_ratio) * p
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int,
    min_lr_ratio: float = 0.0, decay_fraction: float = 0.2,
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying `lr_multiplier` to every group's own base LR."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} (expected one of {', '.join(SCHEDULES)})")

    def fn(step: int) -> float:
        return lr_multiplier(schedule, step, warmup_steps, total_steps, min_lr_ratio, decay_fraction)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
