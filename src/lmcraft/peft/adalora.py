"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form whose rank budget is reallocated during training.

Update of a frozen layer, in SVD form with r = init_r triplets (P_i, lambda_i, Q_i):

    y = W0 x + b + alpha / (init_r + 1e-5) * P diag(lambda) Q drop(x)
    P = lora_B (out x r), lambda = lora_E (r x 1, starts at 0 => y = base at init), Q = lora_A (r x in)

Importance of every entry w of P, lambda, Q (called after `backward`, before `zero_grad`):

    I(w) = |w * dL/dw|                                   sensitivity
    I_bar <- beta1 I_bar + (1 - beta1) I                 smoothed sensitivity
    U_bar <- beta2 U_bar + (1 - beta2) |I - I_bar|       uncertainty
    s(w) = I_bar * U_bar;   S_i = s(lambda_i) + mean_j s(Q_ij) + mean_j s(P_ji)   (triplet score)

Budget schedule over `total_step` T: the total rank b(t) stays at the initial budget for t <= tinit, falls
cubically to target_r * n_layers,  b(t) = b_T + (b_0 - b_T) (1 - (t - tinit) / (T - tfinal - tinit))^3, and is
fixed for the last tfinal steps. Every deltaT steps the triplets with the lowest S_i are pruned to meet b(t)
(lambda_i set to 0; `rank_pattern` records which survive). Training adds the orthogonality penalty

    R = mean over adapted layers of ( ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2 ),   loss += orth_reg_weight * R

(the paper's squared Frobenius norms; PEFT uses the plain norm averaged per matrix). Call `update_and_allocate`
from a trainer callback after backward, and add `lmcraft.peft.regularization_loss(model)` to the loss.
Saving keeps only surviving triplets, with `rank_pattern` in adapter_config.json, as PEFT does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lmcraft.peft.layers import AdapterLayer, PeftError, clean_path, wrap_targets
from lmcraft.peft.model import PeftModel
from lmcraft.peft.registry import MethodConfig, register


class SVDLinear(AdapterLayer):
    """A frozen `nn.Linear` plus AdaLoRA updates P diag(lambda) Q (math in the module docstring)."""

    adapter_containers = ("lora_A", "lora_B", "lora_E", "lora_dropout")

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_E = nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.ranknum: dict[str, float] = {}
        self.scaling: dict[str, float] = {}

    def add(self, adapter: str, r: int, alpha: float, dropout: float) -> None:
        w = self.base_layer.weight
        self.lora_A[adapter] = nn.Parameter(torch.randn(r, self.in_features, device=w.device, dtype=w.dtype) * 0.02)
        self.lora_B[adapter] = nn.Parameter(torch.randn(self.out_features, r, device=w.device, dtype=w.dtype) * 0.02)
        self.lora_E[adapter] = nn.Parameter(torch.zeros(r, 1, device=w.device, dtype=w.dtype))
        self.lora_dropout[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.ranknum[adapter] = float(r)
        self.scaling[adapter] = alpha if alpha > 0 else float(r)

    def resize(self, adapter: str, keep: torch.Tensor) -> None:
        """Keep only the triplets where `keep` (bool, length r) is true; the scale keeps the initial rank."""
        keep = keep.to(self.lora_E[adapter].device)
        with torch.no_grad():
            self.lora_A[adapter] = nn.Parameter(self.lora_A[adapter][keep].clone())
            self.lora_E[adapter] = nn.Parameter(self.lora_E[adapter][keep].clone())
            self.lora_B[adapter] = nn.Parameter(self.lora_B[adapter][:, keep].clone())

    def delete_adapter(self, adapter: str) -> None:
        super().delete_adapter(adapter)
        self.ranknum.pop(adapter, None)
        self.scaling.pop(adapter, None)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        scale = self.scaling[adapter] / (self.ranknum[adapter] + 1e-5)
        return self.lora_B[adapter] @ (self.lora_A[adapter] * self.lora_E[adapter]) * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        a = self.active
        if a is None or a not in self.lora_A:
            return result
        scale = self.scaling[a] / (self.ranknum[a] + 1e-5)
        dx = self.lora_dropout[a](x).to(self.lora_A[a].dtype)
        return result + ((dx @ (self.lora_A[a] * self.lora_E[a]).T @ self.lora_B[a].T) * scale).to(result.dtype)

    def merge_adapter(self, adapter: str) -> nn.Module:
        base = self.base_layer
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(base.weight + self.delta_weight(adapter).to(base.weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias)
        return merged.requires_grad_(False)


def svd_layers(model: PeftModel, adapter: str) -> list[tuple[str, SVDLinear]]:
    return [(p, m) for p, m in model.adapter_layers() if isinstance(m, SVDLinear) and adapter in m.lora_A]


def triplet_key(path: str) -> str:
    """PEFT's rank_pattern key of a layer: `model.layers.0.self_attn.q_proj.lora_E`."""
    return f"{clean_path(path)}.lora_E"


class RankAllocator:
    """Importance EMAs and the budget schedule of one AdaLoRA adapter (see the module docstring)."""

    def __init__(self, cfg: AdaLoraConfig, model: PeftModel, adapter: str) -> None:
        self.cfg, self.adapter = cfg, adapter
        layers = svd_layers(model, adapter)
        self.init_budget = sum(m.lora_E[adapter].shape[0] for _, m in layers)
        self.target_budget = cfg.target_r * len(layers)
        self.reset()

    def reset(self) -> None:
        self.ipt_avg: dict[int, torch.Tensor] = {}
        self.unc_avg: dict[int, torch.Tensor] = {}

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank budget at `step`, whether to prune at this step)."""
        c = self.cfg
        if step <= c.tinit:
            return self.init_budget, False
        if step > c.total_step - c.tfinal:
            return self.target_budget, True
        frac = 1 - (step - c.tinit) / (c.total_step - c.tfinal - c.tinit)
        budget = int((self.init_budget - self.target_budget) * frac**3 + self.target_budget)
        return budget, step % c.deltaT == 0

    def update_importance(self, params: list[nn.Parameter]) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        with torch.no_grad():
            for p in params:
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs()
                key = id(p)
                if key not in self.ipt_avg:
                    self.ipt_avg[key], self.unc_avg[key] = torch.zeros_like(p), torch.zeros_like(p)
                self.ipt_avg[key] = b1 * self.ipt_avg[key] + (1 - b1) * ipt
                self.unc_avg[key] = b2 * self.unc_avg[key] + (1 - b2) * (ipt - self.ipt_avg[key]).abs()

    def state_dict(self, model: nn.Module) -> dict[str, Any]:
        """The EMAs by parameter name and the current rank pattern: what exact resume needs besides the weights."""
        names = {id(p): n for n, p in model.named_parameters()}
        return {"ipt_avg": {names[k]: t for k, t in self.ipt_avg.items()},
                "unc_avg": {names[k]: t for k, t in self.unc_avg.items()},
                "rank_pattern": self.cfg.rank_pattern}

    def load_state_dict(self, model: nn.Module, state: dict[str, Any]) -> None:
        params = dict(model.named_parameters())
        self.ipt_avg = {id(params[n]): t.to(params[n].device) for n, t in state["ipt_avg"].items()}
        self.unc_avg = {id(params[n]): t.to(params[n].device) for n, t in state["unc_avg"].items()}
        self.cfg.rank_pattern = state["rank_pattern"]

    def score(self, p: nn.Parameter) -> torch.Tensor:
        if id(p) not in self.ipt_avg:
            return torch.zeros_like(p)
        return self.ipt_avg[id(p)] * self.unc_avg[id(p)]

    def triplet_scores(self, layer: SVDLinear) -> torch.Tensor:
        a = self.adapter
        return (self.score(layer.lora_E[a]).view(-1) + self.score(layer.lora_A[a]).mean(dim=1)
                + self.score(layer.lora_B[a]).mean(dim=0))


def apply_rank_pattern(model: PeftModel, adapter: str, pattern: dict[str, list[bool]]) -> None:
    """Zero lambda_i of every pruned triplet."""
    with torch.no_grad():
        for path, layer in svd_layers(model, adapter):
            keep = pattern.get(triplet_key(path))
            e = layer.lora_E[adapter]
            if keep is not None and len(keep) == e.shape[0]:
                e.masked_fill_(~torch.tensor(keep, device=e.device)[:, None], 0.0)


def update_and_allocate(model: PeftModel, step: int) -> int:
    """The trainer hook (after backward, before zero_grad): update importance, prune to the budget.

    Returns the rank budget in force at `step`.
    """
    adapter = model.active_adapter
    cfg = model.peft_configs.get(adapter)
    if not isinstance(cfg, AdaLoraConfig):
        raise PeftError(f"update_and_allocate needs an active AdaLoRA adapter; active: {adapter!r}")
    alloc: RankAllocator = model.method_state[adapter]
    layers = svd_layers(model, adapter)
    last = cfg.total_step - cfg.tfinal
    if step > last:
        apply_rank_pattern(model, adapter, cfg.rank_pattern or {})
        return alloc.target_budget
    params = [p for _, m in layers for p in (m.lora_A[adapter], m.lora_B[adapter], m.lora_E[adapter])]
    if step < last:
        if all(p.grad is None for p in params):
            raise PeftError("update_and_allocate found no gradients on the AdaLoRA parameters: call it after "
                            "loss.backward() and before optimizer.zero_grad().")
        alloc.update_importance(params)
    budget, prune = alloc.budget(step)
    if (prune or step == last) and budget < alloc.init_budget:
        scores = {triplet_key(path): alloc.triplet_scores(m) for path, m in layers}
        threshold = torch.kthvalue(torch.cat(list(scores.values())), alloc.init_budget - budget).values
        cfg.rank_pattern = {k: (s > threshold).tolist() for k, s in scores.items()}
        apply_rank_pattern(model, adapter, cfg.rank_pattern)
    if step == last:
        alloc.reset()
    return budget


def orthogonal_regularizer(model: PeftModel, adapter: str) -> torch.Tensor:
    """R = mean over layers of ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2."""
    terms = []
    for _, m in svd_layers(model, adapter):
        p, q = m.lora_B[adapter], m.lora_A[adapter]
        eye = torch.eye(q.shape[0], device=q.device, dtype=q.dtype)
        terms.append((p.T @ p - eye).pow(2).sum() + (q @ q.T - eye).pow(2).sum())
    return torch.stack(terms).mean()


@register
@dataclass(kw_only=True)
class AdaLoraConfig(MethodConfig):
    """AdaLoRA; `total_step` (the number of optimizer steps) is required for the budget schedule."""

    method = "adalora"
    init_r: int = 12
    target_r: int = 8
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    rank_pattern: dict[str, list[bool]] | None = None

    def __post_init__(self) -> None:
        if not self.total_step or self.total_step <= 0:
            raise ValueError("total_step (the number of training steps) must be set to a positive integer")
        if self.tinit >= self.total_step - self.tfinal:
            raise ValueError(f"tinit={self.tinit} leaves no budgeting phase before total_step - tfinal "
                             f"= {self.total_step - self.tfinal}")
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise ValueError("beta1 and beta2 must lie in (0, 1)")
        if not 0 < self.target_r <= self.init_r:
            raise ValueError(f"need 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")

    def inject(self, model: PeftModel, adapter: str) -> None:
        for layer, _ in wrap_targets(model.base_model, self.target_modules, (nn.Linear,), SVDLinear,
                                     f"AdaLoRA ({adapter})"):
            layer.add(adapter, self.init_r, self.lora_alpha, self.lora_dropout)
        model.method_state[adapter] = RankAllocator(self, model, adapter)

    def regularization(self, model: PeftModel, adapter: str) -> torch.Tensor:
        return self.orth_reg_weight * orthogonal_regularizer(model, adapter)
