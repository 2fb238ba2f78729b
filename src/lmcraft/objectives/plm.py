"""Permutation language modelling (XLNet, "plm") with partial prediction.

For each window x (B, T) a factorisation order z is drawn uniformly among the T! permutations; only the last
K = max(1, T // partial_prediction_factor) tokens of the order are predicted:

    L = sum_b sum_{t = T-K+1..T}  -log p(x_{z_t} | x_{z_<t})

where p comes from the two-stream model (lmcraft.models.two_stream): the query stream at position z_t sees the
content of exactly the tokens earlier in the order, plus its own position but not its own token. Windows must
be full (packed, no padding). `transform` adds `perm_rank` (B, T) (rank of each position in z),
`target_positions` (B, K) (z_{T-K+1..T}, in order) and `labels` (B, K) (the tokens there).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.model import LanguageModel
from lmcraft.models.two_stream import TwoStreamModel, permutation_masks
from lmcraft.objectives.base import Batch, LossOutput, TokenizerIds, token_cross_entropy

__all__ = ["PermutationLM", "sample_permutation"]


def sample_permutation(batch: int, seq_len: int, num_targets: int,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random orders: returns ranks (B, T) and the positions of the last `num_targets` in the order."""
    device = generator.device if generator is not None else "cpu"
    order = torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)  # order[b, r] = position
    rank = order.argsort(dim=1)
    return rank, order[:, seq_len - num_targets:]


@dataclass
class PermutationLM:
    """XLNet permutation LM on our backbone; predicts the last T // partial_prediction_factor tokens of each order."""

    partial_prediction_factor: int = 6
    name: ClassVar[str] = "plm"

    def __post_init__(self) -> None:
        if self.partial_prediction_factor < 2:
            raise ValueError("partial_prediction_factor must be >= 2 (at least one token of context)")

    @classmethod
    def with_token_ids(cls, options: dict[str, Any], tokenizer: TokenizerIds,
                       max_length: int | None = None) -> dict[str, Any]:
        return dict(options)  # permutations need no special token

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return TwoStreamModel(LanguageModel(cfg, "lm"))

    def kept_model(self, model: nn.Module) -> LanguageModel:
        """The language model inside the two-stream wrapper (its query stream is dropped)."""
        return model.lm

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        input_ids = batch["input_ids"]
        padding = batch.get("attention_mask")
        if padding is not None and padding.dim() == 2 and not bool(padding.all()):
            raise ValueError("permutation LM expects full packed windows; this batch has padding")
        b, t = input_ids.shape
        k = max(1, t // self.partial_prediction_factor)
        rank, targets = sample_permutation(b, t, k, generator)
        rank, targets = rank.to(input_ids.device), targets.to(input_ids.device)
        return {**batch, "perm_rank": rank, "target_positions": targets, "labels": input_ids.gather(1, targets)}

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        content, query = permutation_masks(batch["perm_rank"], batch["target_positions"])
        out = model(batch["input_ids"], content, query, batch["target_positions"], batch.get("token_type_ids"))
        total, count = token_cross_entropy(out.logits, batch["labels"])
        return LossOutput(total, count, {}, batch["input_ids"].numel())
