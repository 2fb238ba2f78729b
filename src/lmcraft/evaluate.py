"""Evaluation harness: run a task's prompting strategies on a model and score them.

Metrics (each named in a task's `metrics` list):

- accuracy: fraction correct, with the 95% Wilson score interval
  `(p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)`, z = 1.96 (`wilson_interval`).
- f1: for label answers the macro F1 over the task's labels (an unreadable answer counts as wrong);
  otherwise the mean SQuAD token F1, `2PR/(P+R)` over the multiset overlap of normalised words.
- exact_match: mean of exact string equality of extracted and gold answers.
- bleu, chrf (sacrebleu, corpus level) and rouge1/rouge2/rougeL (rouge-score, mean F-measure) between the
  final generated text and the gold target.
- perplexity: `exp(-sum log p / sum tokens)` over all texts, and bits per byte
  `-sum log p / (ln 2 * sum UTF-8 bytes)`, which does not depend on the tokenizer.

Strategies of one task are compared pairwise on the same documents (`paired_comparisons`): the counts of documents
only one of the two gets right and the exact McNemar p-value (`lmcraft.metrics.mcnemar_exact`); a difference is
reported as significant at p < 0.05 (no correction for the number of pairs: read several at once with care).

`evaluate_task` times every strategy (wall clock, including every stage) and returns a `TaskResult`;
`write_results` stores it as JSON plus one JSONL of per-document samples per strategy.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmcraft.io import write_json, write_jsonl
from lmcraft.lm_eval_format import lm_eval_results
from lmcraft.metrics import classification_report, mcnemar_exact, normalize_text, token_f1
from lmcraft.prompting.lm import LM
from lmcraft.prompting.strategies import Chain, Context, Prediction
from lmcraft.prompting.tasks import Task
from lmcraft.report import Panel, Report, plot_panels

__all__ = [
    "StrategyResult",
    "build_report",
    "TaskResult",
    "evaluate_task",
    "generation_metrics",
    "paired_comparisons",
    "perplexity_metrics",
    "read_results",
    "score_predictions",
    "token_f1",
    "wilson_interval",
    "write_results",
]


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% for the default z)."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)


def label_f1(preds: Sequence[str | None], golds: Sequence[str], labels: Sequence[str]) -> float:
    """Macro F1 over `labels`; a missing prediction goes to an extra "none" class that is not averaged."""
    index = {normalize_text(lab): i for i, lab in enumerate(labels)}
    none = len(labels)
    y = [index.get(normalize_text(g), none) for g in golds]
    p = [none if a is None else index.get(normalize_text(a), none) for a in preds]
    per_class = classification_report(y, p, num_classes=none + 1)["f1_per_class"][:none]
    return sum(per_class) / len(per_class)


def generation_metrics(hyps: Sequence[str], refs: Sequence[str], which: Sequence[str]) -> dict[str, float]:
    """BLEU / chrF (sacrebleu) and ROUGE-1/2/L F-measure (rouge-score) of hypotheses against references."""
    out: dict[str, float] = {}
    if "bleu" in which or "chrf" in which:
        import sacrebleu

        if "bleu" in which:
            out["bleu"] = sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score
        if "chrf" in which:
            out["chrf"] = sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score
    if "rouge" in which:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r, h) for h, r in zip(hyps, refs, strict=True)]
        for key in ("rouge1", "rouge2", "rougeL"):
            out[key] = 100 * sum(s[key].fmeasure for s in scores) / max(1, len(scores))
    return out


def perplexity_metrics(preds: Sequence[Prediction]) -> dict[str, float]:
    logp = sum(p.extra["logprob"] for p in preds)
    tokens = sum(p.extra["tokens"] for p in preds)
    nbytes = sum(p.extra["bytes"] for p in preds)
    return {
        "perplexity": math.exp(-logp / max(1, tokens)),
        "bits_per_byte": -logp / (math.log(2) * max(1, nbytes)),
        "tokens": float(tokens),
    }


def score_predictions(task: Task, preds: Sequence[Prediction]) -> dict[str, float]:
    """Every metric the task asks for, on one strategy's predictions."""
    wanted = task.config.metrics
    out: dict[str, float] = {"n": float(len(preds))}
    if "perplexity" in wanted:
        out.update(perplexity_metrics(preds))
    scored = [p for p in preds if p.correct is not None]
    if not scored:
        return out
    if "accuracy" in wanted:
        k = sum(bool(p.correct) for p in scored)
        lo, hi = wilson_interval(k, len(scored))
        out.update(accuracy=k / len(scored), accuracy_ci_low=lo, accuracy_ci_high=hi)
        out["answered"] = sum(p.answer is not None for p in scored) / len(scored)
    if "exact_match" in wanted:
        out["exact_match"] = sum((p.answer or "").strip() == p.gold.strip() for p in scored) / len(scored)
    if "f1" in wanted:
        answer = task.config.answer
        if answer.type == "label":
            out["f1"] = label_f1([p.answer for p in scored], [p.gold or "" for p in scored], answer.labels)
        else:
            out["f1"] = sum(token_f1(p.answer or "", p.gold or "") for p in scored) / len(scored)
    gen = [m for m in wanted if m in ("bleu", "chrf", "rouge")]
    if gen:
        hyps = [p.chains[-1].outputs[-1].strip() if p.chains else (p.answer or "") for p in scored]
        out.update(generation_metrics(hyps, [p.gold or "" for p in scored], gen))
    agreements = [p.agreement for p in scored if p.agreement is not None]
    if agreements:
        out["agreement"] = sum(agreements) / len(agreements)
    return out


@dataclass
class StrategyResult:
    strategy: str
    spec: dict[str, Any]
    metrics: dict[str, float]
    seconds: float
    seconds_per_item: float
    predictions: list[Prediction] = field(default_factory=list, repr=False)


@dataclass
class TaskResult:
    task: str
    model: str
    n: int
    chat: bool
    strategies: list[StrategyResult]
    config: dict[str, Any] = field(default_factory=dict)


def evaluate_task(
    lm: LM,
    task: Task,
    *,
    model_name: str = "",
    chat: bool = False,
    limit: int | None = None,
    on_result: Callable[[TaskResult], None] | None = None,
) -> TaskResult:
    """Run every strategy of `task` on the same documents and score each; strategies run one after another.
    `on_result` is called with the partial result after each strategy (to save progress)."""
    docs = task.docs(limit)
    ids = list(range(len(docs)))
    gen = task.config.generation
    ctx = Context(
        lm,
        task.config.template,
        task.config.answer,
        pool=task.fewshot_docs(),
        chat=chat,
        max_new_tokens=gen.max_new_tokens,
        answer_max_new_tokens=gen.answer_max_new_tokens,
        stop=tuple(gen.stop),
        seed=gen.seed,
    )
    result = TaskResult(
        task.config.name, model_name, len(docs), chat, [], task.config.model_dump(mode="json", by_alias=True)
    )
    for strategy in task.config.strategies:
        start = time.perf_counter()
        preds = strategy.run(ctx, docs, ids)
        seconds = time.perf_counter() - start
        result.strategies.append(
            StrategyResult(
                strategy.title(),
                strategy.model_dump(),
                score_predictions(task, preds),
                seconds,
                seconds / max(1, len(docs)),
                preds,
            )
        )
        if on_result is not None:
            on_result(result)
    return result


def paired_comparisons(tr: TaskResult) -> list[dict[str, Any]]:
    """Every pair of scored strategies of `tr`: documents only the first / only the second gets right, the exact
    McNemar p-value, and whether it is below 0.05."""
    scored = [(sr.strategy, {p.id: bool(p.correct) for p in sr.predictions if p.correct is not None})
              for sr in tr.strategies]
    scored = [(name, right) for name, right in scored if right]
    out = []
    for i, (a, right_a) in enumerate(scored):
        for b, right_b in scored[i + 1:]:
            shared = right_a.keys() & right_b.keys()
            only_a = sum(right_a[k] and not right_b[k] for k in shared)
            only_b = sum(right_b[k] and not right_a[k] for k in shared)
            p = mcnemar_exact(only_a, only_b)
            out.append({"a": a, "b": b, "n": len(shared), "only_a": only_a, "only_b": only_b, "p_value": p,
                        "significant": p < 0.05})
    return out


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text).strip("_")


def write_results(results: Sequence[TaskResult], out_dir: Path) -> Path:
    """`results.json` (metrics and timings of every task x strategy), `samples/<task>__<strategy>.jsonl`, and
    the metrics in lm-evaluation-harness's layout in `results_lm_eval.json` (`lmcraft.lm_eval_format`)."""
    summary = []
    for tr in results:
        entries = []
        for sr in tr.strategies:
            sample_path = out_dir / "samples" / f"{_slug(tr.task)}__{_slug(sr.strategy)}.jsonl"
            write_jsonl(sample_path, (asdict(p) for p in sr.predictions))
            entries.append(
                {
                    "strategy": sr.strategy,
                    "spec": sr.spec,
                    "metrics": sr.metrics,
                    "seconds": sr.seconds,
                    "seconds_per_item": sr.seconds_per_item,
                    "samples": str(sample_path.relative_to(out_dir)),
                }
            )
        summary.append({"task": tr.task, "model": tr.model, "n": tr.n, "chat": tr.chat, "strategies": entries,
                        "comparisons": paired_comparisons(tr), "config": tr.config})
    path = out_dir / "results.json"
    write_json(path, {"results": summary})
    write_json(out_dir / "results_lm_eval.json", lm_eval_results(results))
    return path


def read_results(out_dir: Path) -> list[TaskResult]:
    """The results written by `write_results` (with their per-document samples), e.g. to merge runs or
    re-render a report."""
    data = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    tasks = []
    for t in data["results"]:
        strategies = []
        for s in t["strategies"]:
            preds = []
            for line in (out_dir / s["samples"]).read_text(encoding="utf-8").splitlines():
                p = json.loads(line)
                p["chains"] = [Chain(**c) for c in p["chains"]]
                preds.append(Prediction(**p))
            strategies.append(
                StrategyResult(s["strategy"], s["spec"], s["metrics"], s["seconds"], s["seconds_per_item"], preds)
            )
        tasks.append(TaskResult(t["task"], t["model"], t["n"], t["chat"], strategies, t.get("config", {})))
    return tasks


def _accuracy_row(sr: StrategyResult) -> list[Any]:
    m = sr.metrics
    ci = f"[{m['accuracy_ci_low']:.3f}, {m['accuracy_ci_high']:.3f}]" if "accuracy" in m else ""
    extra = [m.get(k) for k in ("f1", "exact_match", "bleu", "chrf", "rougeL") if k in m]
    return [sr.strategy, m.get("accuracy"), ci, *extra, m.get("answered"), m.get("agreement"), sr.seconds_per_item]


def build_report(results: Sequence[TaskResult], out_dir: Path, title: str = "lmcraft evaluation") -> Report:
    """A report with, per task, a metrics table, a plot comparing strategies, and one example per strategy."""
    report = Report(title)
    for tr in results:
        report.section(tr.task)
        desc = (tr.config.get("description") or "").rstrip(". ")
        gen = tr.config.get("generation", {})
        report.text(
            f"{desc + '. ' if desc else ''}Model `{tr.model}`, {tr.n} documents, "
            f"{'chat-template' if tr.chat else 'plain'} prompts, at most {gen.get('max_new_tokens')} reasoning / "
            f"{gen.get('answer_max_new_tokens')} answer tokens. Times are wall-clock seconds per document, all "
            "stages included."
        )
        labels = [sr.strategy for sr in tr.strategies]
        if any("perplexity" in sr.metrics for sr in tr.strategies):
            rows = [
                [
                    sr.strategy,
                    sr.metrics["perplexity"],
                    sr.metrics["bits_per_byte"],
                    int(sr.metrics["tokens"]),
                    sr.seconds_per_item,
                ]
                for sr in tr.strategies
            ]
            report.table(["strategy", "perplexity", "bits per byte", "tokens", "s / text"], rows)
        if any("accuracy" in sr.metrics for sr in tr.strategies):
            first = tr.strategies[0].metrics
            extra = [k for k in ("f1", "exact_match", "bleu", "chrf", "rougeL") if k in first]
            headers = ["strategy", "accuracy", "95% CI (Wilson)", *extra, "answered", "agreement", "s / problem"]
            report.table(headers, [_accuracy_row(sr) for sr in tr.strategies])
            m = [sr.metrics for sr in tr.strategies]
            plot = plot_panels(
                out_dir / f"{_slug(tr.task)}.png",
                labels,
                [
                    Panel(
                        "accuracy (95% Wilson CI)",
                        [x.get("accuracy", 0.0) for x in m],
                        [x.get("accuracy_ci_low", 0.0) for x in m],
                        [x.get("accuracy_ci_high", 0.0) for x in m],
                        "accuracy",
                    ),
                    Panel("time per problem", [sr.seconds_per_item for sr in tr.strategies], ylabel="seconds"),
                ],
                title=f"{tr.task}: {tr.model}",
            )
            report.image(plot, f"{tr.task}: accuracy and time per problem by strategy")
            pairs = paired_comparisons(tr)
            if pairs:
                report.text("Paired comparisons on the same documents (exact McNemar test; * = p < 0.05):")
                report.table(["strategy A", "strategy B", "only A right", "only B right", "p", ""],
                             [[c["a"], c["b"], c["only_a"], c["only_b"], c["p_value"], "*" if c["significant"] else ""]
                              for c in pairs])
        report.text("Strategy settings:")
        report.code("\n".join(f"{sr.strategy}: {json.dumps(sr.spec)}" for sr in tr.strategies))
        for sr in tr.strategies:
            if sr.predictions and sr.predictions[0].chains:
                pred, chain = sr.predictions[0], sr.predictions[0].chains[0]
                report.text(f"Example, `{sr.strategy}`: gold `{pred.gold}`, answer `{pred.answer}`.")
                report.code(_example(chain.prompts, chain.outputs))
    return report


def _example(prompts: Sequence[str], outputs: Sequence[str], limit: int = 1200) -> str:
    """The last stage's prompt (cut to `limit` characters from the left) and every stage's output."""
    prompt = prompts[-1] if len(prompts[-1]) <= limit else "..." + prompts[-1][-limit:]
    stages = "\n".join(f"--- stage {i + 1} output ---\n{o.strip()}" for i, o in enumerate(outputs))
    return f"--- prompt (last stage) ---\n{prompt}\n{stages}"
