"""Evaluation results in lm-evaluation-harness's results layout, for tools and people that read lm-eval's JSON.

lm-eval writes `{"results": {TASK: {"alias": TASK, "METRIC,FILTER": value, "METRIC_stderr,FILTER": stderr}},
"n-samples": {TASK: {"original": n, "effective": n}}, "configs": {...}, ...}`. One lmcraft task run with several
prompting strategies becomes one lm-eval task per strategy, named `TASK` when the task has one strategy and
`TASK@STRATEGY` otherwise; the filter is `none` (lmcraft's answer extraction is part of the strategy).

Metric names follow lm-eval's where the meaning is the same: `accuracy` -> `acc`, `bits_per_byte`,
`exact_match`, `f1`, `bleu`, `chrf`; lmcraft's token-level `perplexity` becomes `token_perplexity` (lm-eval's
`perplexity` is a different quantity). Proportions get lm-eval's standard error of the mean of 0/1 scores,
`sqrt(p (1 - p) / (n - 1))`; other metrics have `"N/A"`, as in lm-eval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmcraft.evaluate import TaskResult

__all__ = ["lm_eval_results"]

_NAMES = {"accuracy": "acc", "perplexity": "token_perplexity"}
_PROPORTIONS = {"accuracy", "exact_match"}
_SKIPPED = {"n", "answered", "tokens"}  # counts, not metrics


def _stderr(p: float, n: int) -> float | str:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else "N/A"


def lm_eval_results(results: Sequence[TaskResult]) -> dict[str, Any]:
    """`results` in lm-eval's layout (see the module docstring)."""
    tasks: dict[str, dict[str, Any]] = {}
    counts: dict[str, dict[str, int]] = {}
    configs: dict[str, dict[str, Any]] = {}
    for tr in results:
        for sr in tr.strategies:
            name = tr.task if len(tr.strategies) == 1 else f"{tr.task}@{sr.strategy}"
            entry: dict[str, Any] = {"alias": name}
            n = int(sr.metrics.get("n", tr.n))
            for metric, value in sr.metrics.items():
                if metric in _SKIPPED or metric.endswith(("_ci_low", "_ci_high")):
                    continue
                key = _NAMES.get(metric, metric)
                entry[f"{key},none"] = value
                entry[f"{key}_stderr,none"] = _stderr(value, n) if metric in _PROPORTIONS else "N/A"
            tasks[name] = entry
            counts[name] = {"original": tr.n, "effective": n}
            configs[name] = {"task": name, "model": tr.model, "chat": tr.chat, "strategy": sr.spec}
    return {"results": tasks, "n-samples": counts, "configs": configs}
