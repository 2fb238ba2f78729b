"""Knowledge-distillation losses: a student's token distributions pulled towards a teacher's.

Per labelled position, with temperature T, student logits z_S and teacher logits z_T over the same vocabulary:

    p_S = softmax(z_S / T),  p_T = softmax(z_T / T)
    forward_kl:  KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))          (mode covering; Hinton et al.)
    reverse_kl:  KL(p_S || p_T) = sum_v p_S(v) (log p_S(v) - log p_T(v))          (mode seeking; MiniLLM)
    gkd:         M = beta p_T + (1 - beta) p_S
                 JSD_beta = beta KL(p_T || M) + (1 - beta) KL(p_S || M)            (Agarwal et al. 2024, eq. 1)

JSD_beta tends to 0 at both ends of beta; as in TRL's `GKDTrainer.generalized_jsd_loss`, beta = 0 means the forward
KL and beta = 1 the reverse KL. The divergence is NOT multiplied by T^2 (TRL's GKD convention; Hinton et al. scale by
T^2 to keep gradient sizes when mixing with the hard-label loss at large T). With `alpha` the per-token loss is

    l = alpha * CE(z_S, y) + (1 - alpha) * D(p_T, p_S),     CE = -log softmax(z_S)[y]   (at T = 1)

summed over the labelled tokens (labels != IGNORE_INDEX); the trainer divides by their count.

Top-k teacher (the offline cache): the teacher's k largest logits and their indices I are stored. Both
distributions are renormalised onto I: p_T^k = softmax(z_T[I] / T), p_S^k = softmax(z_S[I] / T); the tail mass
outside I is dropped for both (not lumped into an extra bucket), so D(p_T^k, p_S^k) is the divergence of the two
distributions conditioned on the teacher's top-k set. With k = V it is the full divergence.

Memory: `chunked_distillation_loss` takes the final hidden states of the labelled positions and computes logits
`rows` positions at a time, each chunk under activation checkpointing (as `objectives.lm_head.chunked_token_logprobs`
does): no (positions, V) tensor exists for the student or the teacher, only rows x V per chunk (the teacher's chunk
logits are recomputed, without gradient, in the backward pass).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DistillLoss", "TeacherRows", "chunked_distillation_loss", "divergence"]

LossName = Literal["forward_kl", "reverse_kl", "gkd"]


@dataclass(frozen=True)
class DistillLoss:
    loss: LossName = "forward_kl"
    beta: float = 0.5  # gkd only
    temperature: float = 1.0
    alpha: float = 0.0  # weight of the cross-entropy on the labels


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities (terms with p = 0 count 0)."""
    return torch.xlogy(log_p.exp(), log_p.exp()).sum(-1) - (log_p.exp() * log_q).sum(-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, loss: LossName = "forward_kl",
               beta: float = 0.5, temperature: float = 1.0) -> torch.Tensor:
    """D(p_T, p_S) per row of logits (..., V) (see the module docstring), in fp32."""
    s = (student_logits.float() / temperature).log_softmax(-1)
    t = (teacher_logits.float() / temperature).log_softmax(-1)
    if loss == "forward_kl" or (loss == "gkd" and beta == 0):
        return _kl(t, s)
    if loss == "reverse_kl" or (loss == "gkd" and beta == 1):
        return _kl(s, t)
    m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), 0)
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


@dataclass
class TeacherRows:
    """The teacher's side of the labelled positions: hidden states + its LM head (logits computed per chunk), or
    cached top-k logits `values` (N, k) with their vocabulary `indices` (N, k)."""

    hidden: torch.Tensor | None = None
    head: nn.Module | None = None
    values: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def chunk(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(teacher logits, vocabulary indices or None for the full vocabulary) of rows lo:hi, without gradient."""
        if self.values is not None:
            return self.values[lo:hi].float(), self.indices[lo:hi].long()
        with torch.no_grad():
            return self.head(self.hidden[lo:hi]).float(), None


def _chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor, teacher: TeacherRows | None, lo: int, hi: int,
                spec: DistillLoss) -> torch.Tensor:
    """(loss, CE, D) summed over rows lo:hi, stacked into one (3,) tensor."""
    z = head(h).float()
    ce = F.cross_entropy(z, y, reduction="none")
    if teacher is None:
        kd = torch.zeros_like(ce)
    else:
        zt, idx = teacher.chunk(lo, hi)
        kd = divergence(z if idx is None else z.gather(1, idx), zt, spec.loss, spec.beta, spec.temperature)
    loss = spec.alpha * ce + (1 - spec.alpha) * kd if teacher is not None else ce
    return torch.stack([loss.sum(), ce.detach().sum(), kd.detach().sum()])


def chunked_distillation_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                              teacher: TeacherRows | None, spec: DistillLoss, rows: int) -> torch.Tensor:
    """(summed loss, summed CE, summed D) over N labelled positions: student hidden states (N, H) whose next tokens
    are `targets` (N,), the teacher's rows (None: CE only), `rows` positions per checkpointed chunk."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros(3, dtype=torch.float32)
    for lo in range(0, hidden.shape[0], rows):
        hi = min(lo + rows, hidden.shape[0])
        args = (head, hidden[lo:hi], targets[lo:hi], teacher, lo, hi, spec)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            total = total + _chunk_loss(*args)
    return total
