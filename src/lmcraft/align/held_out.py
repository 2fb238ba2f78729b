"""Held-out accuracy of a prompting task's items, before, during and after an alignment run (GRPO, and preference
runs on task pairs): greedy answers scored by the task's answer spec, and the paired change with its McNemar test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.align.common import ScoreEvaluator

if TYPE_CHECKING:
    from torch import nn

    from lmcraft.align.grpo_config import TaskSection
    from lmcraft.align.rewards import Rewards
    from lmcraft.tokenizer.load import Tokenizer

__all__ = ["HeldOutAccuracy", "held_out_change", "task_accuracy"]


class HeldOutAccuracy(ScoreEvaluator):
    """`evaluator(model) -> accuracy` of greedy answers to the held-out items (the task's answer spec). Each call
    keeps its per-item results in `correct`; `baseline` keeps the start model's accuracy and per-item results in
    OUT/start_score.json (`correct_before`), so that a resumed run can still compare the same items before and
    after training (`held_out_change`)."""

    def __init__(self, items: Sequence[dict[str, Any]], rewards: Rewards, tokenizer: Tokenizer, max_new_tokens: int,
                 batch_size: int = 16) -> None:
        self.items, self.rewards, self.tokenizer = list(items), rewards, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.correct: list[bool] | None = None
        self.correct_before: list[bool] | None = None

    def baseline(self, out: Path, model: nn.Module) -> float:
        from lmcraft.io import read_json, write_json

        path = out / "start_score.json"
        if path.is_file():
            data = read_json(path)
            self.correct_before = data.get("correct")
            return float(data["score"])
        value = self(model)
        self.correct_before = self.correct
        write_json(path, {"score": value, "correct": self.correct})
        return value

    def __call__(self, model: nn.Module) -> float:
        from lmcraft.generate import GenerationConfig, generate_text
        from lmcraft.peft.training import unwrap

        config = GenerationConfig(max_new_tokens=self.max_new_tokens)
        correct: list[bool] = []
        for lo in range(0, len(self.items), self.batch_size):
            chunk = self.items[lo: lo + self.batch_size]
            texts = generate_text(unwrap(model), self.tokenizer, [i["messages"] for i in chunk], config,
                                  chat=True).texts or []
            correct += [self.rewards.accuracy(i, t) > 0 for i, t in zip(chunk, texts, strict=True)]
        self.correct = correct
        return sum(correct) / max(len(self.items), 1)

    def change(self) -> dict[str, float]:
        """`held_out_change` from the start model's results to the last evaluation's; {} until both exist."""
        if self.correct_before is None or self.correct is None:
            return {}
        return held_out_change(self.correct_before, self.correct)


def held_out_change(before: Sequence[bool], after: Sequence[bool]) -> dict[str, float]:
    """Accuracy on the same n held-out items before and after training: each with its 95% Wilson interval, the
    items only one of the two gets right (b = before only, c = after only) and the exact McNemar p-value of the
    change (two-sided binomial test of c against b + c draws at 1/2)."""
    from lmcraft.evaluate import wilson_interval
    from lmcraft.metrics import mcnemar_exact

    if len(before) != len(after):
        raise ValueError(f"held-out results of different lengths: {len(before)} before, {len(after)} after")
    n = len(before)
    b = sum(x and not y for x, y in zip(before, after, strict=True))
    c = sum(y and not x for x, y in zip(before, after, strict=True))
    out: dict[str, float] = {"held_out": n}
    for key, hits in (("before", sum(before)), ("after", sum(after))):
        low, high = wilson_interval(int(hits), n)
        out.update({f"accuracy_{key}_ci_low": low, f"accuracy_{key}_ci_high": high})
    out.update({"right_before_only": b, "right_after_only": c, "mcnemar_p": mcnemar_exact(b, c)})
    return out


def task_accuracy(section: TaskSection, tokenizer: Tokenizer, batch_size: int = 16) -> HeldOutAccuracy:
    """Held-out accuracy on the `eval_size` items of a task section (the items after its `size` training ones):
    greedy answers of up to the task's `generation.max_new_tokens` tokens, scored by its answer spec."""
    from lmcraft.align.grpo_config import RewardSpec
    from lmcraft.align.rewards import Rewards, section_task, task_items

    task = section_task(section)
    rewards = Rewards([RewardSpec(kind="accuracy")], task.config.answer)
    return HeldOutAccuracy(task_items(section)[1], rewards, tokenizer, task.config.generation.max_new_tokens,
                           batch_size)
