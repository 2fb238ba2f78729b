"""Supervised instruction tuning: next-token cross-entropy on the assistant tokens only.

    L = (1 / |A|) sum_{(b, t) in A} -log p(x[b, t] | x[b, < t])

over the trained (assistant) tokens A of all micro-batches of an optimizer step (the trainer divides the summed loss
by |A|). Examples are rendered and masked by `ChatFormatter`, truncated, and either right-padded per batch or packed
into rows with per-example attention (see instruct.py).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lmcraft.align.data import Conversation
from lmcraft.align.instruct import ChatFormatter, Tokenized, Truncation, collate_packed, collate_padded, pack, truncate
from lmcraft.align.run import AlignmentMethod, Run, TrainPlan

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.align.config import DataSection
    from lmcraft.train import LossOutput

__all__ = ["SFT", "SFTData", "build_sft_data", "load_sft_conversations", "sft_loss"]


@dataclass
class SFTData:
    """Training items (examples, or packed rows of examples), their collate function and what was dropped."""

    items: list[Any]
    examples: list[Tokenized]
    pad_id: int
    packed: bool
    dropped: int = 0
    stats: dict[str, float] = field(default_factory=dict)

    def collate(self, batch: list[Any]) -> dict[str, torch.Tensor]:
        if self.packed:
            out = collate_packed(batch, self.pad_id)
            out["num_tokens"] = sum(len(e.input_ids) for row in batch for e in row)
        else:
            out = collate_padded(batch, self.pad_id)
            out["num_tokens"] = int(out["attention_mask"].sum())
        return out

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Any:
        return self.items[i]


def build_sft_data(conversations: Sequence[Conversation], formatter: ChatFormatter, max_length: int,
                   truncation: Truncation = "right", packing: bool = False) -> SFTData:
    """Tokenize, mask and truncate every conversation; pack them into rows of `max_length` tokens if asked. The
    whole examples are checked first (`align.data_checks`): a label-mask bug stops the run here, example shown."""
    from lmcraft.align.data_checks import check_chat_examples

    whole = [formatter.tokenize(conv.messages, source=conv.source) for conv in conversations]
    examples, dropped = [], 0
    for full in whole:
        ex = truncate(full, max_length, truncation)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    pad = formatter.tokenizer.pad_token_id
    pad = 0 if pad is None else pad
    collate = (lambda exs: collate_packed([exs], pad)) if packing else (lambda exs: collate_padded(exs, pad))
    checks = check_chat_examples([c.messages for c in conversations], whole, formatter.tokenizer.eos_token_ids, collate)
    items: list[Any] = pack(examples, max_length) if packing else list(examples)
    tokens = sum(len(e.input_ids) for e in examples)
    stats = {"examples": len(examples), "dropped": dropped, "tokens": tokens,
             "trained_tokens": sum(e.num_trained for e in examples), "rows": len(items),
             "fill": tokens / (len(items) * max_length) if packing and items else 0.0}
    print(checks.line(), file=sys.stderr)
    return SFTData(items, examples, pad, packing, dropped, stats)


def sft_loss(model: nn.Module, batch: dict[str, Any]) -> LossOutput:
    """Summed next-token cross-entropy over labelled tokens (`labels` != -100) and their count (`next_token_loss`:
    chunked through the LM head unless the trainer's `chunked_loss` is false)."""
    from lmcraft.objectives.lm_head import next_token_loss
    from lmcraft.train import LossOutput

    total, count, _ = next_token_loss(model, batch["labels"], input_ids=batch["input_ids"],
                                      attention_mask=batch.get("attention_mask"),
                                      position_ids=batch.get("position_ids"))
    return LossOutput(total, count, {}, num_tokens=batch.get("num_tokens"))


def load_sft_conversations(data: DataSection) -> tuple[list[Conversation], list[Conversation]]:
    """(training, held-out) conversations of an SFT `data` section: `eval` files, else `val_size` held out."""
    from lmcraft.align.config import split_eval
    from lmcraft.align.data import load_conversations

    convs = load_conversations(data.train, data.format, data.limit)
    evals = load_conversations(data.eval, data.format) if data.eval else []
    if not evals:
        convs, evals = split_eval(convs, data.val_size, data.seed)
    return convs, evals


class SFT(AlignmentMethod):
    """SFT in the run template: chat data with assistant-token masks, `sft_loss`, the start model evaluated first;
    OUT/sft_curves.png and the data's numbers, train and held-out losses in the summary."""

    name = "sft"

    def data(self, run: Run) -> tuple[SFTData, SFTData | None]:
        d = run.cfg.data
        convs, evals = load_sft_conversations(d)
        formatter = ChatFormatter(run.start.tokenizer, train_on=d.train_on)
        train = build_sft_data(convs, formatter, d.max_length, d.truncation, d.packing)
        evaluation = build_sft_data(evals, formatter, d.max_length, d.truncation, d.packing) if evals else None
        return train, evaluation

    def plan(self, run: Run) -> TrainPlan:
        from lmcraft.errors import ConfigError

        if run.cfg.data.packing and getattr(run.training.model, "providers", None):
            raise ConfigError("data.packing cannot be combined with prefix/prompt-style PEFT methods (their virtual "
                              "tokens would be shared by every packed example); set data.packing=false")
        return TrainPlan(sft_loss, run.train, run.evaluation, start_evaluation=True)

    def summary(self, run: Run) -> dict[str, Any]:
        from lmcraft.align.plots import plot_training

        history = run.trainer.state.history
        start_loss = run.start_eval.get("eval_loss")
        if run.cfg.trainer.plot:
            plot_training(history, run.out / "sft_curves.png", "SFT", start_loss)
        last = next((r for r in reversed(history) if r["split"] == "train"), {})
        last_eval = next((r for r in reversed(history) if r["split"] == "eval"), {})
        return {"data": run.train.stats, "train_loss": last.get("loss"), "start_eval_loss": start_loss,
                "eval_loss": last_eval.get("eval_loss")}
