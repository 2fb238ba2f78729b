"""The loss formulas of the preference stage (`lmcraft dpo`, `dpo.loss`): each is its formula plus the data it needs.

Notation, per example: log pi(y|x) is the policy's log-probability of the answer y, summed over its tokens, |y| its
token count and avg pi(y|x) = log pi(y|x) / |y|; ref is the frozen reference policy; sigma the logistic function.
For a pair (chosen y_c, rejected y_r):

    h = (log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))

Reference-based pair losses (`dpo_loss`):

    sigmoid (DPO, Rafailov et al. 2023):  L = -(1 - e) log sigma(beta h) - e log sigma(-beta h)
                                          (e = label_smoothing: conservative DPO, labels flipped w.p. e)
    ipo (Azar et al. 2023):               L = (h' - 1 / (2 beta))^2, h' as h with log-probs averaged over tokens
    hinge (SLiC, Zhao et al. 2023):       L = max(0, 1 - beta h)
    robust (Chowdhury et al. 2024):       L = ((1 - e) (-log sigma(beta h)) - e (-log sigma(-beta h))) / (1 - 2 e)
                                          (unbiased under labels flipped w.p. e)

Reference-free pair losses (no reference model is loaded or run):

    simpo (Meng et al. 2024):  L = -log sigma(beta (avg pi(y_c|x) - avg pi(y_r|x)) - gamma)
    cpo (Xu et al. 2024):      L = -log sigma(beta (log pi(y_c|x) - log pi(y_r|x))) + alpha NLL(y_c)
    orpo (Hong et al. 2024):   L = NLL(y_c) - lambda log sigma(log odds(y_c) - log odds(y_r)),
                               log odds(y) = avg pi(y|x) - log(1 - exp(avg pi(y|x)))   (lambda = beta)

with NLL(y_c) = -avg pi(y_c|x), the chosen answer's per-token negative log-likelihood (the SFT term).

Unpaired (kto, Ethayarajh et al. 2024): examples (x, y) labelled desirable or undesirable, r = log pi(y|x) -
log ref(y|x), and a reference point z estimated in each micro-batch (on each rank; TRL averages over ranks) from
mismatched pairs (x_i, y_{i-1}) (each prompt with the previous example's answer):

    z = max(0, mean_i (log pi(y_{i-1}|x_i) - log ref(y_{i-1}|x_i)))       (no gradient, as in TRL)
    desirable:   L = lambda_D (1 - sigma(beta (r - z)))
    undesirable: L = lambda_U (1 - sigma(beta (z - r)))

Every function returns per-example losses (the stage sums them and the trainer divides by the number of pairs or
examples) with the implicit rewards reported as metrics (beta times the log-ratio, or beta times the policy log-prob
for the reference-free losses).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["LOSSES", "REFERENCE_FREE", "LossType", "cpo_loss", "dpo_loss", "kto_loss", "kto_reference_point",
           "log_odds", "orpo_loss", "simpo_loss"]

LossType = Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "cpo", "orpo", "kto"]
LOSSES: tuple[str, ...] = ("sigmoid", "ipo", "hinge", "robust", "simpo", "cpo", "orpo", "kto")
REFERENCE_FREE = frozenset({"simpo", "cpo", "orpo"})

Losses = tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0
             ) -> Losses:
    """(per-pair losses, chosen rewards, rejected rewards) of the reference-based losses sigmoid, ipo, hinge and
    robust (see the module docstring; for `ipo` pass log-probs averaged over the answer tokens)."""
    import torch.nn.functional as F

    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = (1 - beta * h).clamp_min(0)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown reference-based loss {loss_type!r}; choose sigmoid, ipo, hinge or robust")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, gamma: float) -> Losses:
    """SimPO from per-token average log-probs: -log sigma(beta (avg_c - avg_r) - gamma); rewards beta avg."""
    import torch.nn.functional as F

    losses = -F.logsigmoid(beta * (avg_chosen - avg_rejected) - gamma)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def cpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_tokens: torch.Tensor, beta: float,
             alpha: float) -> Losses:
    """CPO from summed log-probs: -log sigma(beta (log pi_c - log pi_r)) + alpha (-log pi_c / |y_c|)."""
    import torch.nn.functional as F

    nll = -policy_chosen / chosen_tokens
    losses = -F.logsigmoid(beta * (policy_chosen - policy_rejected)) + alpha * nll
    return losses, beta * policy_chosen.detach(), beta * policy_rejected.detach()


def log_odds(avg_logp: torch.Tensor) -> torch.Tensor:
    """log(p / (1 - p)) of p = exp(avg_logp) <= 1, with log(1 - p) computed stably on both sides of p = 1/2."""
    import math

    import torch

    log1m = torch.where(avg_logp < -math.log(2), torch.log1p(-torch.exp(avg_logp)), torch.log(-torch.expm1(avg_logp)))
    return avg_logp - log1m


def orpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, lam: float) -> Losses:
    """ORPO from per-token average log-probs: -avg_c - lam log sigma(log odds_c - log odds_r); rewards lam avg."""
    import torch.nn.functional as F

    ratio = F.logsigmoid(log_odds(avg_chosen.float()) - log_odds(avg_rejected.float()))
    losses = -avg_chosen - lam * ratio
    return losses, lam * avg_chosen.detach(), lam * avg_rejected.detach()


def kto_reference_point(mismatched_policy: torch.Tensor, mismatched_ref: torch.Tensor) -> torch.Tensor:
    """z = max(0, mean(log pi - log ref)) over the mismatched pairs, without gradient."""
    return (mismatched_policy - mismatched_ref).mean().clamp_min(0).detach()


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, desirable: torch.Tensor, z: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-example KTO losses, rewards beta (log pi - log ref)) for examples labelled by the bool tensor
    `desirable`, around the reference point `z` (`kto_reference_point`)."""
    import torch

    r = policy - ref
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (r - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - r))))
    return losses, beta * r.detach()
