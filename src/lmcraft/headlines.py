"""The headline of each finished stage of a pipeline: what it measured before and after, with its interval.

`headline_rows(kind, summary, folder)` reads only what the stage left in its folder (`summary.json` /
`results.json`, `metrics.jsonl`) and returns rows `[metric, before, after, interval or test]`:

    pretrain   train loss at the first logged step -> at the last; held-out loss at the end
    finetune   the validation headline metric; accuracy with its 95% Wilson interval over the validation examples
    sft        held-out answer loss of the start model -> of the trained one
    dpo        held-out DPO loss (ln 2 while policy = reference) -> trained; held-out reward accuracy with its Wilson
               interval (at the start every implicit reward is 0, a tie, so there is no "before" rate); with pairs
               made from a task (`data.task`), the held-out greedy accuracy as for grpo
    grpo       held-out greedy accuracy before -> after on the same problems: Wilson intervals, exact McNemar p
    eval       accuracy of every prompting strategy with its Wilson interval; the pairs that differ (McNemar p < 0.05)

A stage whose files lack a number gets no row for it (a report never fails).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["headline_rows"]


def _interval(low: Any, high: Any) -> str:
    return f"[{low:.3f}, {high:.3f}]" if isinstance(low, int | float) and isinstance(high, int | float) else ""


def _wilson(rate: Any, n: Any) -> str:
    from lmcraft.evaluate import wilson_interval

    if not isinstance(rate, int | float) or not isinstance(n, int | float) or n <= 0:
        return ""
    hits = round(rate * n)
    return f"{hits}/{int(n)}, " + _interval(*wilson_interval(hits, int(n)))


def _train_losses(folder: Path) -> tuple[int, float, int, float] | None:
    """(first step, its train loss, last step, its train loss) from the stage's metrics.jsonl."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("split") == "train" and isinstance(row.get("loss"), int | float):
            rows.append(row)
    if len(rows) < 2:
        return None
    return rows[0]["step"], rows[0]["loss"], rows[-1]["step"], rows[-1]["loss"]


def _pretrain(s: dict[str, Any], folder: Path) -> list[list[Any]]:
    rows = []
    losses = _train_losses(folder)
    if losses is not None:
        rows.append([f"train loss (step {losses[0]} -> {losses[2]})", losses[1], losses[3], ""])
    held_out = (s.get("eval") or {}).get("eval_loss")
    if held_out is not None:
        rows.append(["held-out loss", "", held_out, f"perplexity {s['eval'].get('eval_ppl', float('nan')):.1f}"])
    return rows


def _finetune(s: dict[str, Any], folder: Path) -> list[list[Any]]:
    val, n = s.get("validation") or {}, s.get("validation_examples")
    rows = []
    if s.get("metric") and s.get("metric_value") is not None:
        rows.append([f"validation {s['metric']}", "", s["metric_value"], ""])
    if "accuracy" in val:
        rows.append(["validation accuracy", "", val["accuracy"], _wilson(val["accuracy"], n)])
    return rows


def _loss_change(s: dict[str, Any], label: str) -> list[list[Any]]:
    if s.get("start_eval_loss") is None or s.get("eval_loss") is None:
        return []
    return [[label, s["start_eval_loss"], s["eval_loss"], ""]]


def _sft(s: dict[str, Any], folder: Path) -> list[list[Any]]:
    return _loss_change(s, "held-out answer loss")


def _dpo(s: dict[str, Any], folder: Path) -> list[list[Any]]:
    rows = _loss_change(s, "held-out DPO loss")
    if s.get("eval_reward_accuracy") is not None:
        rows.append(["held-out reward accuracy (chance 0.5)", "ties", s["eval_reward_accuracy"],
                     _wilson(s["eval_reward_accuracy"], s.get("eval_count"))])
    return rows + _held_out_accuracy(s, folder)


def _held_out_accuracy(s: dict[str, Any], folder: Path) -> list[list[Any]]:
    if s.get("accuracy_before") is None or s.get("accuracy_after") is None:
        return []
    test = ""
    if "held_out" in s:
        test = (f"{_interval(s['accuracy_before_ci_low'], s['accuracy_before_ci_high'])} -> "
                f"{_interval(s['accuracy_after_ci_low'], s['accuracy_after_ci_high'])}; right only before / only "
                f"after {s['right_before_only']} / {s['right_after_only']}, McNemar p = {s['mcnemar_p']:.2g}")
    n = f" ({s['held_out']} problems)" if "held_out" in s else ""
    return [[f"held-out accuracy{n}", s["accuracy_before"], s["accuracy_after"], test]]


def _eval(s: dict[str, Any], folder: Path) -> list[list[Any]]:
    rows = []
    for task in s.get("results") or []:
        if not isinstance(task, dict):
            continue
        for st in task.get("strategies", []):
            m = st.get("metrics", {})
            if "accuracy" in m:
                rows.append([f"{task.get('task')}: {st.get('strategy')} accuracy", "", m["accuracy"],
                             f"{round(m['accuracy'] * m.get('n', 0))}/{int(m.get('n', 0))}, "
                             + _interval(m.get("accuracy_ci_low"), m.get("accuracy_ci_high"))])
        for c in task.get("comparisons", []):
            if c.get("significant"):
                rows.append([f"{task.get('task')}: {c['a']} vs {c['b']}", "", "",
                             f"right only A / only B {c['only_a']} / {c['only_b']}, McNemar p = {c['p_value']:.2g}"])
    return rows


_RULES = {"pretrain": _pretrain, "finetune": _finetune, "sft": _sft, "dpo": _dpo, "grpo": _held_out_accuracy,
          "eval": _eval}


def headline_rows(kind: str, summary: dict[str, Any], folder: Path) -> list[list[Any]]:
    """`[metric, before, after, interval or test]` rows of a stage of `kind` (see the module docstring)."""
    rule = _RULES.get(kind)
    if rule is None:
        return []
    try:
        return rule(summary, folder)
    except (KeyError, TypeError, ValueError):  # a summary of another layout: no headline rather than no report
        return []
