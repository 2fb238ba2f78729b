"""Reward model training: a scalar head on a language model, fitted to preference pairs (Bradley-Terry).

The model maps a conversation x = (prompt, answer) to r(x): the reward head reads the hidden state of the last
non-padding token (decoders; for encoders that token's state attends to the whole sequence). Under the
Bradley-Terry model P(chosen > rejected) = sigma(r_c - r_r), and training minimises per pair

    L = -log sigma(r_c - r_r - m)

with an optional margin m >= 0 per pair (Llama 2: larger for clearer preferences), which asks r_c to exceed r_r by
at least about m. Reported per pair: accuracy [r_c > r_r] and margin r_c - r_r (means over pairs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcraft.align.data import PreferencePair
from lmcraft.align.instruct import ChatFormatter, Tokenized, Truncation, truncate

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.train import LossOutput

__all__ = ["PairData", "TokenizedPair", "bradley_terry_loss", "build_pair_data", "collate_pairs", "reward_loss"]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float = 0.0
                       ) -> torch.Tensor:
    """Per-pair -log sigma(r_c - r_r - m)."""
    import torch.nn.functional as F

    return -F.logsigmoid(r_chosen.float() - r_rejected.float() - margin)


@dataclass
class TokenizedPair:
    chosen: Tokenized
    rejected: Tokenized
    margin: float = 0.0


@dataclass
class PairData:
    """Tokenized preference pairs (a map-style dataset) and how many were dropped by truncation."""

    items: list[TokenizedPair]
    pad_id: int
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> TokenizedPair:
        return self.items[i]

    def collate(self, batch: list[TokenizedPair]) -> dict[str, torch.Tensor]:
        return collate_pairs(batch, self.pad_id)


def build_pair_data(pairs: Sequence[PreferencePair], formatter: ChatFormatter, max_length: int,
                    truncation: Truncation = "right") -> PairData:
    """Render prompt + chosen and prompt + rejected; the answer is kept when truncating (prompt cut from the left)."""
    items, dropped = [], 0
    for pair in pairs:
        sides = [truncate(formatter.tokenize_pair(pair.prompt, answer, pair.source), max_length, truncation,
                          keep_answer=True) for answer in (pair.chosen, pair.rejected)]
        if sides[0] is None or sides[1] is None:
            dropped += 1
            continue
        items.append(TokenizedPair(sides[0], sides[1], pair.margin))
    pad = formatter.tokenizer.pad_token_id
    return PairData(items, 0 if pad is None else pad, dropped)


def collate_pairs(batch: Sequence[TokenizedPair], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows: the B chosen sequences, then the B rejected ones.

    `labels` marks the answer tokens (-100 elsewhere), for objectives that score answers (DPO); `margin` (B,).
    """
    import torch

    from lmcraft.align.instruct import collate_padded

    out = collate_padded([p.chosen for p in batch] + [p.rejected for p in batch], pad_id)
    out["margin"] = torch.tensor([p.margin for p in batch], dtype=torch.float32)
    out["num_tokens"] = int(out["attention_mask"].sum())
    return out


def reward_loss(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed Bradley-Terry loss over the pairs of a micro-batch, with accuracy and mean margin as metrics."""
    from lmcraft.train import LossOutput

    rewards = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    if rewards.dim() == 2:  # a classification head with one label
        rewards = rewards.squeeze(-1)
    b = rewards.shape[0] // 2
    chosen, rejected = rewards[:b], rewards[b:]
    losses = bradley_terry_loss(chosen, rejected, batch["margin"])
    diff = (chosen - rejected).detach()
    metrics = {"accuracy": (diff > 0).float().mean(), "margin": diff.mean(), "reward_chosen": chosen.detach().mean(),
               "reward_rejected": rejected.detach().mean()}
    return LossOutput(losses.sum(), b, metrics, num_tokens=batch.get("num_tokens"))
