"""GRPO's math: group advantages, the clipped per-token objective, the k3 KL, and the four loss aggregations.

A rollout holds P groups of G completions o_1..o_G of one prompt each, with rewards r_1..r_G, answer masks m_{i,t}
and |o_i| = sum_t m_{i,t}. With mean_g, std_g the group's mean and (unbiased, Bessel-corrected) standard deviation:

    grpo, dapo:   A_i = (r_i - mean_g) / (std_g + eps)            (Shao et al. 2024; Yu et al. 2025)
    dr_grpo:      A_i = r_i - mean_g                              (Liu et al. 2025: no std scaling)
    rloo:         A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j      (Ahmadian et al. 2024: leave-one-out baseline)

For the current policy's log-probs l_{i,t}, the old policy's l^old_{i,t} (the rollout's) and the reference's
l^ref_{i,t}, the per-token objective (token-level importance ratio, clip-higher with eps_low / eps_high) is

    rho_{i,t} = exp(l_{i,t} - l^old_{i,t})
    L_{i,t}   = -min(rho_{i,t} A_i, clip(rho_{i,t}, 1 - eps_low, 1 + eps_high) A_i) + beta k3_{i,t}
    k3_{i,t}  = exp(l^ref_{i,t} - l_{i,t}) - (l^ref_{i,t} - l_{i,t}) - 1             (Schulman's k3, >= 0)

and the batch loss aggregates it over the B rows of an optimizer step:

    grpo:     (1/B) sum_i (1/|o_i|) sum_t m_{i,t} L_{i,t}         per-sequence token mean, then mean over sequences
    dapo:     sum_{i,t} m_{i,t} L_{i,t} / sum_{i,t} m_{i,t}       token mean over the whole batch
    dr_grpo:  sum_{i,t} m_{i,t} L_{i,t} / (B L_max)               L_max = the maximum completion length (constant)

`rloo` follows TRL's RLOOTrainer: one sequence-level ratio rho_i = exp(sum_t m_{i,t} (l_{i,t} - l^old_{i,t})) and
L_i = -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i), averaged over sequences; its KL enters the
reward instead, r_i <- r_i - beta sum_t m_{i,t} (l^old_{i,t} - l^ref_{i,t}), before the baseline.

In the trainer's contract (loss_sum / num_targets summed over the window) a micro-batch returns
(sum_i per-row loss, B_micro) for grpo / dr_grpo / rloo and (sum of masked token losses, tokens) for dapo, so an
accumulated step equals the formulas above over all its rows.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["LossType", "aggregate", "degenerate_groups", "group_advantages", "k3_kl", "sequence_loss", "token_loss"]

LossType = Literal["grpo", "dapo", "dr_grpo", "rloo"]


def group_advantages(rewards: torch.Tensor, group_size: int, loss: LossType, eps: float = 1e-4) -> torch.Tensor:
    """A_i of rewards (P * G,) laid out group by group (see the module docstring)."""
    r = rewards.double().view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    if loss == "rloo":
        adv = r - (r.sum(1, keepdim=True) - r) / (group_size - 1)
    elif loss == "dr_grpo":
        adv = r - mean
    else:
        adv = (r - mean) / (r.std(1, keepdim=True) + eps)
    return adv.reshape(-1).to(rewards.dtype)


def degenerate_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(P,) bool: groups whose G rewards are all equal (no learning signal; dynamic sampling drops them)."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(1)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """exp(ref - logp) - (ref - logp) - 1 per token: an unbiased, non-negative estimate of KL(pi || ref)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def token_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, eps_low: float,
               eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_{i,t} without the KL term, clipped low, clipped high) for (B, n) log-probs and advantages (B,).

    Clipped low/high: rho < 1 - eps_low with A < 0 / rho > 1 + eps_high with A > 0 (where the clip is active)."""
    adv = advantages[:, None]
    ratio = torch.exp(logp - old_logp)
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    return loss, (ratio < 1 - eps_low) & (adv < 0), (ratio > 1 + eps_high) & (adv > 0)


def sequence_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L_i, clipped low, clipped high) of RLOO's sequence-level ratio, for (B, n) log-probs and mask."""
    ratio = torch.exp(((logp - old_logp) * mask).sum(-1))
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    return loss, (ratio < 1 - eps_low) & (advantages < 0), (ratio > 1 + eps_high) & (advantages > 0)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss: LossType, max_length: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss_sum, num_targets) of a micro-batch for the trainer: see the module docstring. `per_token` is (B, n)
    (grpo, dapo, dr_grpo) or the per-sequence losses (B,) (rloo)."""
    rows = torch.tensor(float(mask.shape[0]), device=mask.device)
    if loss == "rloo":
        return per_token.sum(), rows
    masked = per_token * mask
    if loss == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp_min(1)).sum(), rows
    if loss == "dr_grpo":
        return masked.sum() / max_length, rows
    return masked.sum(), mask.sum()
