"""Sparse mixture-of-experts MLP (Qwen3-MoE) and its load-balancing statistics.

For a token x (hidden size H) and E experts, each a gated MLP of width I:

    p      = softmax(W_r x)                              router probabilities (E), in fp32
    S      = top-k indices of p;  w_e = p_e (/ sum_{j in S} p_j with norm_topk_prob)
    y      = sum_{e in S} w_e down_e(act(gate_e x) * up_e x)

The experts are stacked tensors, as transformers 5 holds them: `gate_up_proj` (E, 2I, H) = [W_gate; W_up] per
expert and `down_proj` (E, H, I). The (token, expert) assignments are sorted by expert and laid out in an
(E', C, H) batch, C = the largest number of tokens any expert got, E' = the experts that got any; two `bmm`s
compute every expert at once (padding rows are zeros, never read back). With balanced routing (what the
auxiliary loss asks for) C is about N k / E and the padding small.

Load balancing (Switch Transformer eq. 4-6, as transformers' `load_balancing_loss_func`): over the real tokens
(attention mask 1) of every MoE layer together,

    f_e = (1 / N) sum_tokens [e in top-k(token)]       fraction of tokens routed to e (sums to k over e)
    P_e = (1 / N) sum_tokens p_e(token)                mean router probability of e
    aux = E sum_e f_e P_e                              (k at perfectly uniform routing)

with N the number of real tokens summed over layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from lmcraft.models.config import ModelConfig


class Experts(nn.Module):
    """E gated MLPs as stacked weights: gate_up_proj (E, 2I, H), down_proj (E, H, I)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (gate_up, down) stacks the forward uses; LoRA on experts overrides this with W + delta."""
        return self.gate_up_proj, self.down_proj


class SparseMoE(nn.Module):
    """Router `gate` (E x H, no bias) + `experts`; after each forward `routing` holds (probs (N, E) fp32,
    top-k indices (N, k)) of the last call, read by `RouterOutput`."""

    def __init__(self, cfg: ModelConfig, act: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_size)
        self.act = act
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = self.gate(x).float().softmax(-1)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            weights = weights / weights.sum(-1, keepdim=True)
        self.routing = (probs, chosen)
        return self._experts(x, chosen, weights.to(x.dtype)).reshape(shape)

    def _experts(self, x: torch.Tensor, chosen: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[:, k] expert_{chosen[:, k]}(x), all experts in two batched products."""
        n, k = chosen.shape
        flat = chosen.reshape(-1)
        order = flat.argsort(stable=True)  # assignments grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts)
        used = counts.nonzero().squeeze(1)  # experts that got a token
        capacity = int(counts.max())
        group = torch.full((self.num_experts,), -1, dtype=torch.long, device=x.device)
        group[used] = torch.arange(used.numel(), device=x.device)  # expert -> its row in the batch
        starts = counts.cumsum(0) - counts
        sorted_experts = flat[order]
        slot = group[sorted_experts] * capacity + torch.arange(n * k, device=x.device) - starts[sorted_experts]
        token = order // k
        batch = x.new_zeros(used.numel() * capacity, x.shape[-1]).index_copy(0, slot, x[token])
        gate_up, down = self.experts.weights()
        if used.numel() < self.num_experts:  # e.g. decoding one token: only the experts it uses
            gate_up, down = gate_up.index_select(0, used), down.index_select(0, used)
        h = torch.bmm(batch.view(used.numel(), capacity, -1), gate_up.transpose(1, 2))
        g, u = h.chunk(2, dim=-1)
        out = torch.bmm(self.act(g) * u, down.transpose(1, 2)).reshape(used.numel() * capacity, -1)
        contrib = out[slot] * weights.reshape(-1)[order, None]
        return x.new_zeros(n, x.shape[-1]).index_add_(0, token, contrib)


@dataclass
class RouterOutput:
    """The routing of every MoE layer in one forward: probs (N, E) and top-k indices (N, k) per layer, with the
    padding mask (B, T) of those N = B T tokens (None: all real) and the model's `router_aux_loss_coef`."""

    probs: list[torch.Tensor]
    chosen: list[torch.Tensor]
    mask: torch.Tensor | None
    coef: float = 0.0

    def _counts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum_tokens [e in top-k], sum_tokens p_e, N) over real tokens of every layer."""
        e = self.probs[0].shape[-1]
        real = None if self.mask is None else self.mask.reshape(-1).float()
        routed = torch.zeros(e, device=self.probs[0].device)
        prob_sum = torch.zeros(e, device=self.probs[0].device)
        tokens = torch.zeros((), device=self.probs[0].device)
        for probs, chosen in zip(self.probs, self.chosen, strict=True):
            w = torch.ones(probs.shape[0], device=probs.device) if real is None else real
            routed = routed.index_add(0, chosen.reshape(-1), w.repeat_interleave(chosen.shape[1]))
            prob_sum = prob_sum + (probs * w[:, None]).sum(0)
            tokens = tokens + w.sum()
        return routed, prob_sum, tokens

    def aux_loss(self) -> torch.Tensor:
        """E sum_e f_e P_e (see the module docstring); differentiable through P."""
        routed, prob_sum, tokens = self._counts()
        return (routed / tokens * prob_sum / tokens).sum() * routed.numel()

    def expert_load(self) -> torch.Tensor:
        """(layers, E): the fraction of each layer's routed (token, slot) assignments that went to each expert."""
        real = None if self.mask is None else self.mask.reshape(-1).float()
        rows = []
        for probs, chosen in zip(self.probs, self.chosen, strict=True):
            w = torch.ones(probs.shape[0], device=probs.device) if real is None else real
            load = torch.zeros(probs.shape[-1], device=probs.device).index_add(
                0, chosen.reshape(-1), w.repeat_interleave(chosen.shape[1]))
            rows.append(load / load.sum().clamp_min(1))
        return torch.stack(rows).detach()

    def metrics(self) -> dict[str, torch.Tensor]:
        """`aux_loss` and `expert_load/<e>` (the layer mean of `expert_load`), detached, for training logs."""
        load = self.expert_load().mean(0)
        return {"aux_loss": self.aux_loss().detach(), **{f"expert_load/{e}": v for e, v in enumerate(load)}}


def collect_routing(layers: nn.ModuleList, mask: torch.Tensor | None, coef: float = 0.0) -> RouterOutput | None:
    """The routing the MoE layers recorded in the forward just run (None for a dense model); clears it."""
    moes = [layer.mlp for layer in layers if isinstance(layer.mlp, SparseMoE) and layer.mlp.routing is not None]
    if not moes:
        return None
    probs, chosen = zip(*(m.routing for m in moes), strict=True)
    for m in moes:
        m.routing = None
    return RouterOutput(list(probs), list(chosen), mask, coef)
