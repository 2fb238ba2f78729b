"""What an LM head's logits give per token: log-probabilities, and the summed cross-entropy in chunks.

`token_logprobs(logits, tokens, T)` = log softmax(logits / T)[tokens], the one gather every scorer uses (DPO's answer
log-probs, PPO's rollout and update log-probs); `sequence_logprobs` sums it over labelled tokens (labels != -100)
of next-token logits. The summed cross-entropy itself is `objectives.base.token_cross_entropy`.

The chunked LM-head loss computes the causal-LM loss through the output layer without materialising the (B, T, V)
logits. For final hidden states h (N, H) (N = B * T positions), the LM head W (V, H) and next-token targets y
(-100 = ignored), the summed loss and its gradients are

    z_i = W h_i,   L = sum_{i: y_i != -100} (logsumexp(z_i) - z_i[y_i])
    dL/dz_i = softmax(z_i) - onehot(y_i)        (0 for ignored rows)
    dL/dh_i = W^T dL/dz_i,   dL/dW = sum_i dL/dz_i h_i^T

`ChunkedLMLoss` computes L and both gradients chunk by chunk in the forward pass (`rows` positions at a
time, so only rows x V logits exist at once) and scales the stored gradients by the incoming gradient in
the backward pass: the same loss and gradients as `cross_entropy(h W^T, y, reduction="sum")`, with the
same matrix products (the logits are never recomputed), and a fraction of the memory and memory traffic
for large vocabularies. dL/dW is computed only when W requires a gradient (full fine-tuning).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lmcraft.data.collate import IGNORE_INDEX
from lmcraft.models.heads import LMHead

__all__ = ["ChunkedLMLoss", "chunked_lm_loss", "default_rows", "lm_head_weight", "next_token_loss", "scoring",
           "scored_batches", "sequence_logprobs", "token_logprobs"]

T = TypeVar("T")


@contextmanager
def scoring(model: nn.Module) -> Iterator[nn.Module]:
    """`model` in eval mode (no dropout) under no-grad; its training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def scored_batches(model: nn.Module, num_rows: int, batch_size: int, score: Callable[[slice], T]) -> list[T]:
    """[score(rows) for consecutive slices of `batch_size` rows out of `num_rows`], all under `scoring(model)`: the
    one batched no-grad loop of every scorer (reward models, judges, reference log-probs, PPO's rollout pass)."""
    with scoring(model):
        return [score(slice(lo, lo + batch_size)) for lo in range(0, num_rows, batch_size)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[tokens] in fp32; logits (B, n, V) already aligned with tokens (B, n)."""
    logp = (logits.float() / temperature).log_softmax(-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: sum_t log softmax(logits[t-1] / T)[labels[t]] over labelled t (labels != -100), and the count."""
    labels = labels[:, 1:]
    keep = labels != IGNORE_INDEX
    picked = token_logprobs(logits[:, :-1], labels.clamp_min(0), temperature)
    return (picked * keep).sum(-1), keep.sum(-1)


def default_rows(vocab_size: int, budget: int = 2**23) -> int:
    """Positions per chunk so that one chunk's fp32 logits take about `budget` elements (32 MiB)."""
    return max(16, budget // vocab_size)


class ChunkedLMLoss(torch.autograd.Function):
    """sum of cross-entropies of (h W^T) against y; see the module docstring. Returns a 0-d fp32 tensor."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int
                ) -> torch.Tensor:
        need_w = ctx.needs_input_grad[1]
        w = weight.to(hidden.dtype)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            y = targets[start:start + rows]
            keep = y != IGNORE_INDEX
            if not bool(keep.any()):
                continue
            h = hidden[start:start + rows]
            z = (h @ w.T).float()
            lse = torch.logsumexp(z, dim=-1)
            safe_y = torch.where(keep, y, 0)
            picked = z.gather(1, safe_y[:, None]).squeeze(1)
            total += ((lse - picked) * keep).sum()
            # dL/dz = softmax(z) - onehot(y) on kept rows, computed in place in z
            z.sub_(lse[:, None]).exp_()
            z[torch.arange(z.shape[0], device=z.device), safe_y] -= 1.0
            z.mul_(keep[:, None])
            dz = z.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:start + rows] = dz @ w
            if grad_w is not None:
                grad_w += (dz.T @ h).float()
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        has_h, has_w = ctx.has
        grad_h = next(saved) * grad_out if has_h else None
        grad_w = (next(saved) * grad_out).to(ctx.weight_dtype) if has_w else None
        return grad_h, grad_w, None, None


def lm_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The weight of a plain LM head (through a PeftModel or DDP wrapper), or None when the fused loss
    cannot be used: another head, a PEFT-wrapped head, a head that scales or caps its logits, or a sharded
    (distributed) model."""
    if dist.is_available() and dist.is_initialized():
        return None
    inner = getattr(model, "module", model)
    base = getattr(inner, "base_model", inner)
    head = getattr(base, "head", None)
    return head.weight if isinstance(head, LMHead) and head.plain else None


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    rows: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss: hidden (B, T, H) at position t predicts labels[:, t + 1]; (sum, targets)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = int((y != IGNORE_INDEX).sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    return ChunkedLMLoss.apply(h, weight, y, rows or default_rows(weight.shape[0])), count


def next_token_loss(model: nn.Module, labels: torch.Tensor, fused: bool = True, **inputs: Any
                    ) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(summed next-token loss, targets, logits) of `model` on `inputs` against `labels` (-100 = ignored).

    With `fused` and a plain LM head (`lm_head_weight`), the loss goes through the head in chunks and the model
    computes the logits of the last position only; otherwise it is `causal_lm_loss` of the full logits."""
    from lmcraft.objectives.clm import causal_lm_loss

    weight = lm_head_weight(model) if fused else None
    if weight is None:
        logits = model(**inputs).logits
        loss, count = causal_lm_loss(logits, labels)
        return loss, count, logits
    out = model(**inputs, logits_to_keep=1)
    loss, count = chunked_lm_loss(out.hidden_states, weight, labels)
    return loss, count, out.logits
