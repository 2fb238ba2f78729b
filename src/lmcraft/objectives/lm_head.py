"""What an LM head's logits give per token: log-probabilities, and the summed cross-entropy in chunks.

`token_logprobs(logits, tokens, T)` = log softmax(logits / T)[tokens], the one gather every scorer uses (DPO's answer
log-probs, PPO's rollout and update log-probs); `sequence_logprobs` sums it over labelled tokens (labels != -100)
of next-token logits, and `model_sequence_logprobs` computes the same from a model through the LM head in chunks
(`chunked_token_logprobs`, no (B, T, V) logits). The summed cross-entropy itself is
`objectives.base.token_cross_entropy`.

`chunked_token_logprobs(h, head, y, T)` is the same gather (and the entropy of each distribution) computed `rows`
positions at a time from the final hidden states, each chunk under activation checkpointing: the forward keeps no
logits and the backward recomputes one chunk's rows x V logits at a time, so no (B, n, V) tensor ever exists;
`answer_logprobs` applies it to the answer tokens after a prompt (GRPO's policy, old-policy and reference passes),
`model_sequence_logprobs` to labelled tokens (the preference losses' policy and reference passes).

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

__all__ = ["ChunkedLMLoss", "answer_logprobs", "chunked_lm_loss", "chunked_loss_setting", "chunked_token_logprobs",
           "default_rows", "lm_head_weight", "model_sequence_logprobs", "next_token_loss", "scoring", "scored_batches",
           "sequence_logprobs", "token_logprobs"]

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


def scored_batches(model: nn.Module, num_rows: int, batch_size: int, score: Callable[[slice], T],
                   progress: str | None = None) -> list[T]:
    """[score(rows) for consecutive slices of `batch_size` rows out of `num_rows`], all under `scoring(model)`: the
    one batched no-grad loop of every scorer (reward models, judges, reference log-probs, PPO's rollout pass, the
    evaluation's log-likelihoods). `progress`: a bar over the batches with this label."""
    from tqdm.auto import tqdm

    starts = range(0, num_rows, batch_size)
    with scoring(model):
        return [score(slice(lo, lo + batch_size))
                for lo in tqdm(starts, desc=progress, leave=False, disable=progress is None)]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[tokens] in fp32 (fp64 logits stay fp64); logits (B, n, V) aligned with tokens (B, n)."""
    logp = (logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature).log_softmax(-1)
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


def _product_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the products with `hidden` run in: autocast's where it is on, else the hidden states'."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


class ChunkedLMLoss(torch.autograd.Function):
    """sum of cross-entropies of (h W^T) against y; see the module docstring. Returns a 0-d fp64 tensor: the per-row
    losses (fp32) are summed in fp64, like `token_cross_entropy`, so both paths agree to fp32 rounding of each row
    rather than to the rounding of a long fp32 sum."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int
                ) -> torch.Tensor:
        need_w = ctx.needs_input_grad[1]
        w = weight.to(_product_dtype(hidden))  # once, not in every chunk's product (autocast casts per call)
        grad_h = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
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
            total += ((lse - picked) * keep).sum(dtype=torch.float64)
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
        ctx.weight_dtype, ctx.hidden_dtype = weight.dtype, hidden.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = iter(ctx.saved_tensors)
        has_h, has_w = ctx.has
        grad_h = next(saved) * grad_out.to(ctx.hidden_dtype) if has_h else None
        grad_w = (next(saved) * grad_out.float()).to(ctx.weight_dtype) if has_w else None
        return grad_h, grad_w, None, None


def lm_head_weight(model: nn.Module) -> torch.Tensor | None:
    """The weight of a plain LM head (through a PeftModel or DDP wrapper), or None when the fused loss
    cannot be used: another head, a PEFT-wrapped head, a head that scales or caps its logits, or a sharded
    (distributed) model."""
    if dist.is_available() and dist.is_initialized():
        return None
    head = getattr(_language_model(model), "head", None)
    return head.weight if isinstance(head, LMHead) and head.plain else None


def _language_model(model: nn.Module) -> nn.Module:
    inner = getattr(model, "module", model)
    return getattr(inner, "base_model", inner)


def chunked_loss_setting(model: nn.Module) -> bool | str:
    """The model's `chunked_loss` switch (set by the trainer from `TrainerConfig.chunked_loss`): "auto", True, False."""
    return getattr(_language_model(model), "chunked_loss", "auto")


def chunked_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                    rows: int | None = None) -> tuple[torch.Tensor, int]:
    """Summed next-token loss: hidden (B, T, H) at position t predicts labels[:, t + 1]; (sum, targets)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    count = int((y != IGNORE_INDEX).sum())
    if count == 0:
        return hidden.sum() * 0.0, 0
    return ChunkedLMLoss.apply(h, weight, y, rows or default_rows(weight.shape[0])), count


def next_token_loss(model: nn.Module, labels: torch.Tensor, fused: bool | str | None = None, **inputs: Any
                    ) -> tuple[torch.Tensor, int, Any]:
    """(summed next-token loss, targets, the model's output) of `model` on `inputs` against `labels` (-100 = ignored).

    `fused` (default: the model's `chunked_loss` switch, "auto" unless the trainer set it): with "auto" or True and
    a plain LM head (`lm_head_weight`), the loss goes through the head in chunks and the model computes the logits
    of the last position only; otherwise (False, or "auto" without a plain head) it is `causal_lm_loss` of the full
    logits. True without a plain LM head is an error. Every causal-LM loss of lmcraft (pre-training's clm, SFT,
    fine-tuning's clm task) goes through here.

    A mixture-of-experts model in training mode adds its load-balancing loss as a mean over the targets:
    loss + coef * aux * targets (coef = `router_aux_loss_coef`), so that loss / targets = CE + coef * aux, as
    transformers' Qwen3-MoE loss."""
    from lmcraft.errors import ConfigError
    from lmcraft.objectives.clm import causal_lm_loss

    mode = chunked_loss_setting(model) if fused is None else fused
    weight = lm_head_weight(model) if mode else None
    if weight is None:
        if mode is True:
            raise ConfigError("trainer.chunked_loss: true needs a model with a plain LM head trained in one process "
                              "(not a PEFT-wrapped head, not a sharded model); use chunked_loss: auto")
        out = model(**inputs)
        loss, count = causal_lm_loss(out.logits, labels)
    else:
        out = model(**inputs, logits_to_keep=1)
        loss, count = chunked_lm_loss(out.hidden_states, weight, labels)
    router = getattr(out, "router", None)
    if router is not None and model.training and router.coef:
        loss = loss + router.coef * router.aux_loss().to(loss.dtype) * count
    return loss, count, out


def _chunk_logprobs(head: nn.Module, h: torch.Tensor, y: torch.Tensor, temperature: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    z = head(h).float()
    logp = (z if temperature == 1 else z / temperature).log_softmax(-1)
    with torch.no_grad():  # in place: one rows x V temporary
        entropy = -logp.exp().mul_(logp).sum(-1)
    return logp.gather(1, y[:, None]).squeeze(1), entropy


def chunked_token_logprobs(hidden: torch.Tensor, head: nn.Module, tokens: torch.Tensor, rows: int,
                           temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(head(h) / T)[tokens], entropy) per position for hidden (B, n, H) aligned with tokens (B, n).

    Equal to `token_logprobs(head(hidden), tokens, T)`, computed `rows` positions at a time; with gradients enabled
    each chunk is checkpointed (its logits are recomputed in the backward pass), so at most rows x V logits exist at
    once. The entropy -sum_v p_v log p_v is returned without a gradient (a metric)."""
    from torch.utils.checkpoint import checkpoint

    shape = tokens.shape
    h, y = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    parts = []
    for start in range(0, h.shape[0], rows):
        args = (head, h[start:start + rows], y[start:start + rows], temperature)
        if torch.is_grad_enabled():
            parts.append(checkpoint(_chunk_logprobs, *args, use_reentrant=False, preserve_rng_state=False))
        else:
            parts.append(_chunk_logprobs(*args))
    if not parts:
        empty = hidden.new_zeros(shape, dtype=torch.float32)
        return empty, empty
    logp, entropy = (torch.cat(p).reshape(shape) for p in zip(*parts, strict=True))
    return logp, entropy


def answer_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int,
                    temperature: float = 1.0, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropies) of the tokens input_ids[:, start:] given everything before them, through the model's
    LM head in chunks (`chunked_token_logprobs`); the model computes the logits of its last position only."""
    inner = getattr(model, "module", model)
    base = getattr(inner, "base_model", inner)
    if getattr(base, "head_kind", None) != "lm":
        raise ValueError("answer_logprobs needs a causal language model with an LM head")
    hidden = model(input_ids, attention_mask=attention_mask, logits_to_keep=1).hidden_states
    rows = rows or default_rows(base.config.vocab_size)
    return chunked_token_logprobs(hidden[:, start - 1:-1], base.head, input_ids[:, start:], rows, temperature)


def model_sequence_logprobs(model: nn.Module, labels: torch.Tensor, rows: int | None = None, **inputs: Any
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """`sequence_logprobs` of `model` on `inputs` (per row: summed log-probs of the labelled tokens, and their count).

    With a plain LM head the log-probs go through it in chunks (`chunked_token_logprobs`), so no (B, T, V) logits
    exist; otherwise they come from the model's full logits."""
    weight = lm_head_weight(model)
    if weight is None:
        return sequence_logprobs(model(**inputs).logits, labels)
    inner = getattr(model, "module", model)
    head = getattr(inner, "base_model", inner).head
    hidden = model(**inputs, logits_to_keep=1).hidden_states[:, :-1]
    y = labels[:, 1:]
    keep = y != IGNORE_INDEX
    logp, _ = chunked_token_logprobs(hidden, head, torch.where(keep, y, 0), rows or default_rows(weight.shape[0]))
    return (logp * keep).sum(-1), keep.sum(-1)
