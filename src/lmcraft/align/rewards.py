"""Verifiable rewards for GRPO: task items with gold answers, and the weighted reward r = sum_k w_k r_k.

Items. `task_items(section)` gives (train, held-out) lists of {"messages", "answer"} from a prompting task
(`lmcraft.prompting.load_task`, e.g. the built-in `arithmetic`: "What is 7 + 5?" -> "12", seeded): the template
renders the question, `template.target` the gold answer. `task_answer_spec` is the task's answer reader.

Rewards (one value per completion y of n tokens; see `RewardSpec`):

    accuracy  1[spec.match(spec.extract(a(y)), gold)]      a(y) = the text inside <answer>...</answer>, else y
    format    1[pattern matches y]                         default ^<think>.*</think><answer>.*</answer>$ (DOTALL)
    length    -max(0, n - max_tokens) / max_tokens
    scorer    s(x, y) of an existing scorer (rule, reward model, LLM judge: lmcraft.align.scoring)

`Rewards(specs, answer_spec)(items, texts, lengths)` returns the weighted total and each term (logged separately as
reward/<name>).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lmcraft.align.grpo_config import THINK_ANSWER_PATTERN, RewardSpec, TaskSection
from lmcraft.errors import ConfigError
from lmcraft.prompting.answers import AnswerSpec

if TYPE_CHECKING:
    import torch

__all__ = ["Rewards", "answer_text", "section_task", "task_answer_spec", "task_items"]

_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def section_task(section: TaskSection, size: int | None = None) -> Any:
    """The prompting task a `task` section names, with its overrides (a generated source sized to `size`)."""
    from lmcraft.prompting.tasks import load_task

    overrides = dict(section.overrides)
    if size is not None:
        overrides.setdefault("data.size", size)
    return load_task(section.name, overrides)


def task_answer_spec(section: TaskSection) -> AnswerSpec:
    """How answers of the task are read and compared: the prompting task's answer spec."""
    return section_task(section).config.answer


def task_items(section: TaskSection) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, held-out) items {"messages", "answer"}: `size` then `eval_size` documents of the task."""
    from lmcraft.prompting.templates import fill

    need = section.size + section.eval_size
    task = section_task(section)
    if len(task.docs()) < need and "size" in type(task.config.data).model_fields:  # a generated source: make more
        task = section_task(section, need)
    docs = task.docs()
    if len(docs) < need:
        raise ConfigError(f"task {section.name!r} has {len(docs)} documents, fewer than task.size + "
                          f"task.eval_size = {need}")
    template = task.config.template
    system = section.system if section.system is not None else (template.description or None)
    head = [{"role": "system", "content": system}] if system else []
    items = [{"messages": [*head, {"role": "user", "content": template.question(d)}],
              "answer": fill(template.target, d)} for d in docs[:need]]
    return items[:section.size], items[section.size:]


def answer_text(completion: str) -> str:
    """The text inside the last <answer>...</answer> of `completion`, else the whole completion."""
    found = _ANSWER.findall(completion)
    return found[-1] if found else completion


class Rewards:
    """The weighted reward of completions; `names` lists the terms in config order."""

    def __init__(self, specs: Sequence[RewardSpec], answer_spec: AnswerSpec | None = None) -> None:
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"reward names must be unique (give `name:`), got {labels}")
        if not specs:
            raise ConfigError("grpo needs at least one reward in `rewards`")
        self.specs, self.answer_spec, self.names = list(specs), answer_spec, labels
        self.patterns = {s.label: re.compile(s.pattern or THINK_ANSWER_PATTERN, re.DOTALL)
                         for s in specs if s.kind == "format"}
        self.scorers: dict[str, Any] = {}
        for s in specs:
            if s.kind == "scorer":
                from lmcraft.align.scoring import build_scorer

                self.scorers[s.label] = build_scorer(s.scorer)

    def accuracy(self, item: dict[str, Any], text: str) -> float:
        if self.answer_spec is None or item.get("answer") is None:
            raise ConfigError("an accuracy reward needs a task with gold answers (the `task` section)")
        spec = self.answer_spec
        return float(spec.match(spec.extract(answer_text(text)), str(item["answer"])))

    def term(self, spec: RewardSpec, items: Sequence[dict[str, Any]], texts: Sequence[str],
             lengths: Sequence[int]) -> torch.Tensor:
        """The unweighted values of one reward term, (N,) float32."""
        import torch

        if spec.kind == "scorer":
            return self.scorers[spec.label]([i["messages"] for i in items], list(texts)).float().cpu()
        if spec.kind == "accuracy":
            values = [self.accuracy(i, t) for i, t in zip(items, texts, strict=True)]
        elif spec.kind == "format":
            values = [float(self.patterns[spec.label].search(t) is not None) for t in texts]
        else:
            cap = spec.max_tokens
            values = [-max(0, n - cap) / cap for n in lengths]
        return torch.tensor(values, dtype=torch.float32)

    def __call__(self, items: Sequence[dict[str, Any]], texts: Sequence[str], lengths: Sequence[int]
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(sum_k w_k r_k, {name: r_k}) for completions `texts` (of `lengths` tokens) to `items`."""
        terms = {s.label: self.term(s, items, texts, lengths) for s in self.specs}
        total = sum(s.weight * terms[s.label] for s in self.specs)
        return total, terms
