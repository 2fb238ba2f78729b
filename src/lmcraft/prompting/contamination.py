"""Evaluation tasks against training data: the tasks' items as decontamination eval sets, and `lmcraft eval`'s
warning when a model's recorded training data overlaps (or was never checked against) a task.

A task's items are its evaluated documents (`Task.docs()`), each as the newline-joined string values of its
record (`data.decontaminate.record_texts`). The prepare stage attaches them to its `decontaminate` steps
(`attach_eval_tasks`); a model pre-trained on that data records the result (`data.provenance`), and
`overlap_warnings` compares the fingerprint of the task as evaluated now with the recorded ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcraft.data.decontaminate import Decontaminate, EvalSet, record_texts
from lmcraft.data.provenance import read_provenance
from lmcraft.prompting.tasks import Task, builtin_tasks, load_task

__all__ = ["attach_eval_tasks", "overlap_warnings", "task_texts"]


def task_texts(task: Task) -> list[str]:
    """One text per evaluated document of `task`."""
    return [record_texts(doc) for doc in task.docs()]


def attach_eval_tasks(steps: list[Any], base_dir: Path | None = None) -> None:
    """Load the `tasks` of every decontaminate step (`builtin` = all built-in tasks; a YAML path is read relative
    to `base_dir`) and attach their items as eval sets named after the task."""
    for step in steps:
        if not isinstance(step, Decontaminate) or getattr(step, "_tasks_attached", False):
            continue
        names = [n for ref in step.tasks for n in (builtin_tasks() if ref == "builtin" else [ref])]
        for ref in names:
            path = (base_dir / ref) if base_dir is not None and (base_dir / ref).is_file() else ref
            task = load_task(path)
            step.add_set(task.config.name, task_texts(task))
        step.mark_tasks_attached()


def overlap_warnings(model_dir: str | Path, task: Task) -> list[str]:
    """Warnings about `task` against the training data recorded in `model_dir` (none when it records none)."""
    record = read_provenance(Path(model_dir))
    if record is None:
        return []
    name = task.config.name
    texts = task_texts(task)
    checks = record.get("decontamination") or []
    for check in checks:
        fingerprint = EvalSet.build(name, texts, check["n"], check["min_words"]).fingerprint
        for eval_set in check["sets"]:
            if eval_set["fingerprint"] != fingerprint:
                continue
            found = eval_set["contaminated_items"]
            if found and check["action"] == "flag":
                return [f"{found} of {eval_set['items']} items of task {name!r} occur in the training data of "
                        f"{model_dir} ({check['n']}-gram overlap, flagged by `lmcraft prepare` but kept): its scores "
                        "may be inflated"]
            return []
    return [f"the training data of {model_dir} ({record['train'][0]}) was not decontaminated against task {name!r} "
            "as evaluated now: overlap unknown (add the task to a decontaminate step of `lmcraft prepare`)"]
