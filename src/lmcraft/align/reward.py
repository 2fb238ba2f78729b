"""Reward model training: a scalar head on a language model, fitted to preference pairs (Bradley-Terry).

The model maps a conversation x = (prompt, answer) to r(x): the reward head reads the hidden state of the last
non-padding token (decoders; for encoders that token's state attends to the whole sequence). Under the
Bradley-Terry model P(chosen > rejected) = sigma(r_c - r_r), and training minimises per pair

    L = -log sigma(r_c - r_r - m)

with an optional margin m >= 0 per pair (Llama 2: larger for clearer preferences), which asks r_c to exceed r_r by
at least about m. Reported per pair: accuracy [r_c > r_r] and margin r_c - r_r (means over pairs).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmcraft.align.data import PreferencePair
from lmcraft.align.instruct import ChatFormatter, Tokenized, Truncation, truncate
from lmcraft.align.run import AlignmentMethod, Run, StageConfig, TrainPlan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.align.config import PairsData
    from lmcraft.train import LossOutput

__all__ = ["PairData", "RewardModeling", "TokenizedPair", "bradley_terry_loss", "build_pair_data", "collate_pairs",
           "load_pairs", "reward_loss"]


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
    """Render prompt + chosen and prompt + rejected; the answer is kept when truncating (prompt cut from the left).
    The whole sequences are checked first (`align.data_checks`): a label-mask bug stops the run, example shown."""
    from lmcraft.align.data_checks import check_chat_examples
    from lmcraft.align.instruct import collate_padded

    items, dropped, conversations, whole = [], 0, [], []
    for pair in pairs:
        full = [formatter.tokenize_pair(pair.prompt, answer, pair.source) for answer in (pair.chosen, pair.rejected)]
        conversations += [[*pair.prompt, *answer] for answer in (pair.chosen, pair.rejected)]
        whole += full
        sides = [truncate(side, max_length, truncation, keep_answer=True) for side in full]
        if sides[0] is None or sides[1] is None:
            dropped += 1
            continue
        items.append(TokenizedPair(sides[0], sides[1], pair.margin))
    pad = formatter.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    checks = check_chat_examples(conversations, whole, formatter.tokenizer.eos_token_ids,
                                 lambda exs: collate_padded(exs, pad))
    print(checks.line(), file=sys.stderr)
    return PairData(items, pad, dropped)


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


def load_pairs(data: PairsData, formatter: ChatFormatter) -> tuple[PairData, PairData | None]:
    """(train, held-out or None) pairs of a preference `data` section (reward, dpo)."""
    from lmcraft.align.config import split_eval
    from lmcraft.align.data import load_preferences

    if data.task is not None:
        from lmcraft.align.task_pairs import task_preferences

        pairs, evals = task_preferences(data.task, data.seed)
    else:
        pairs = load_preferences(data.train, data.format, data.limit)
        evals = load_preferences(data.eval, data.format) if data.eval else []
        if not evals:
            pairs, evals = split_eval(pairs, data.val_size, data.seed)
    train = build_pair_data(pairs, formatter, data.max_length, data.truncation)
    evaluation = build_pair_data(evals, formatter, data.max_length, data.truncation) if evals else None
    return train, evaluation


class RewardModeling(AlignmentMethod):
    """Reward modelling in the run template: a scalar head on the start model, preference pairs, `reward_loss`, the
    start model evaluated first; pairwise accuracy and margin in the summary."""

    name = "reward"

    def head(self, cfg: StageConfig) -> tuple[str | None, int | None]:
        from lmcraft.align.modeling import reward_head

        return reward_head(cfg.model.from_)

    def data(self, run: Run) -> tuple[PairData, PairData | None]:
        return load_pairs(run.cfg.data, ChatFormatter(run.start.tokenizer, train_on="last"))

    def plan(self, run: Run) -> TrainPlan:
        return TrainPlan(reward_loss, run.train, run.evaluation, start_evaluation=True)

    def summary(self, run: Run) -> dict[str, Any]:
        evals = [r for r in run.trainer.state.history if r["split"] == "eval"]
        return {"pairs": len(run.train), "dropped": run.train.dropped,
                "start_eval_accuracy": run.start_eval.get("eval_accuracy"),
                "eval_accuracy": evals[-1].get("eval_accuracy") if evals else None,
                "eval_margin": evals[-1].get("eval_margin") if evals else None}
