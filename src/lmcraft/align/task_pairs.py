"""Preference pairs made from a prompting task (`data.task` of `lmcraft dpo` / `lmcraft reward`): the prompt is the
task's question (`align.rewards.task_items`), `chosen` its gold answer and `rejected` a wrong one, the gold answer
of another item drawn with a seeded generator:

    rejected(i) = gold(j),   j uniform over the items whose gold answer differs from gold(i)

so that a preference method learns to prefer right answers over plausible wrong ones (for arithmetic: another
result of the same range), and its effect can be read as held-out accuracy of greedy answers
(`align.held_out`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lmcraft.align.data import LabelledAnswer, PreferencePair
from lmcraft.align.grpo_config import TaskSection
from lmcraft.errors import ConfigError

__all__ = ["as_labelled_answers", "task_preferences"]


def _pairs(items: Sequence[dict[str, Any]], rng: np.random.Generator, name: str, first: int) -> list[PreferencePair]:
    answers = [str(item["answer"]) for item in items]
    if items and len(set(answers)) < 2:
        raise ConfigError(f"task {name!r}: every item has the gold answer {answers[0]!r}, so no wrong answer can be "
                          "drawn from the others; use a task with varied answers")
    pairs = []
    for i, (item, gold) in enumerate(zip(items, answers, strict=True)):
        wrong = [a for a in answers if a != gold]
        pairs.append(PreferencePair(item["messages"], [{"role": "assistant", "content": gold}],
                                    [{"role": "assistant", "content": wrong[int(rng.integers(len(wrong)))]}],
                                    f"task {name}, item {first + i}"))
    return pairs


def task_preferences(section: TaskSection, seed: int) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs of the task's first `size` and next `eval_size` items (see the module docstring);
    each split draws its wrong answers from its own items, so no held-out answer appears in training pairs."""
    from lmcraft.align.rewards import task_items

    train, held_out = task_items(section)
    rng = np.random.Generator(np.random.PCG64(seed))
    return _pairs(train, rng, section.name, 0), _pairs(held_out, rng, section.name, len(train))


def as_labelled_answers(pairs: Sequence[PreferencePair]) -> list[LabelledAnswer]:
    """KTO's labelled answers from pairs: each chosen answer desirable, each rejected one undesirable."""
    return [LabelledAnswer(p.prompt, answer, desirable, p.source)
            for p in pairs for answer, desirable in ((p.chosen, True), (p.rejected, False))]
