"""Run one fine-tuning task with several methods and put the results side by side.

Each method runs as its own `lmcraft finetune` process (so every peak-memory figure belongs to one method
alone) with the shared config plus the method's settings, in `output_dir/<method>/`. The comparison is
written to `output_dir/`: compare.md + compare.html (table, plot, settings), compare.json, compare.csv and
compare.png. Columns: trainable parameters (count and % of the total), peak training memory, median
optimizer-step time, tokens/s, and the best validation value of the task's headline metric.

`lmcraft compare` runs the methods as a pipeline plan (`lmcraft.pipeline`): a method whose folder is done
with the identical config (its `.done.json` records the config hash) is not run again (`--rerun` forces it);
a method that fails is reported in the table with the end of its log, and the others still run.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmcraft.config import validate_config
from lmcraft.errors import ConfigError
from lmcraft.finetune.config import CompareConfig, FinetuneConfig
from lmcraft.io import save_figure, write_json, write_text
from lmcraft.report import Report

__all__ = ["MethodRun", "plan_runs", "plot_comparison", "write_comparison"]


@dataclass
class MethodRun:
    name: str
    config: FinetuneConfig
    results: dict[str, Any] | None = None
    error: str | None = None


def plan_runs(cfg: CompareConfig, methods: list[str] | None = None) -> list[MethodRun]:
    """One validated FinetuneConfig per method name (see CompareSection for how a name is resolved)."""
    from lmcraft.peft import REGISTRY

    if cfg.peft is not None:
        raise ConfigError("compare sets `peft` per method: move the top-level peft block to compare.runs.<name>.peft")
    names = methods or cfg.compare.methods
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"compare needs distinct method names, got {names}")
    shared = cfg.model_dump(mode="json", exclude={"compare", "output_dir", "peft", "resume"})
    runs = []
    for name in names:
        override = cfg.compare.runs.get(name)
        peft = dict(override.peft) if override is not None and override.peft is not None else None
        if name in REGISTRY:
            peft = {"method": name, **(peft or {})}
        elif name != "full" and (peft is None or "method" not in peft):
            known = ", ".join(sorted(REGISTRY))
            raise ConfigError(f"compare method {name!r} is neither 'full', a PEFT method ({known}) nor a "
                              f"compare.runs entry with peft.method")
        trainer = {**shared["trainer"], **(cfg.compare.peft_trainer if peft else {}),
                   **(override.trainer if override is not None else {})}
        data = {**shared, "trainer": trainer, "peft": peft, "output_dir": str(cfg.output_dir / name), "resume": False}
        runs.append(MethodRun(name, validate_config(FinetuneConfig, data, f"compare run {name!r}")))
    return runs


def _row(run: MethodRun) -> dict[str, Any]:
    r = run.results or {}
    return {"method": run.name, "trainable_params": r.get("trainable_params"),
            "trainable_percent": r.get("trainable_percent"), "peak_memory_mb": r.get("peak_memory_mb"),
            "step_seconds": r.get("step_seconds"), "tokens_per_second": r.get("tokens_per_second"),
            "metric": r.get("metric"), "metric_value": r.get("metric_value"), "steps": r.get("steps"),
            "error": run.error}


def _fmt(value: Any, spec: str) -> str:
    return "failed" if value is None else format(value, spec)


def plot_comparison(rows: list[dict[str, Any]], metric: str, path: Path, title: str) -> Path:
    """Four bar charts (trainable %, peak memory, tokens/s, validation metric), one bar per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["metric_value"] is not None]
    names = [r["method"] for r in ok]
    panels = [("trainable parameters (% of total, log)", "trainable_percent", True),
              ("peak training memory (MiB)", "peak_memory_mb", False),
              ("throughput (tokens/s)", "tokens_per_second", False),
              (f"validation {metric}", "metric_value", False)]
    fig, axes = plt.subplots(2, 2, figsize=(max(8.0, 0.55 * len(names) + 5), 7.0))
    x = range(len(names))
    for ax, (label, key, log_scale) in zip(axes.flat, panels, strict=True):
        values = [float(r[key] or 0.0) for r in ok]
        bars = ax.bar(x, values, color=["#C44E52" if n == "full" else "#4C72B0" for n in names])
        if log_scale:
            ax.set_yscale("log")
        ax.set_xticks(list(x), names, rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values], fontsize=6, padding=1)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)
    return path


def _settings(cfg: CompareConfig, runs: list[MethodRun]) -> str:
    r = next((run.results for run in runs if run.results), None) or {}
    tc = cfg.trainer
    steps = f"max_steps {tc.max_steps}" if tc.max_steps else f"{tc.epochs} epoch(s)"
    return (f"Task `{cfg.task}` on `{cfg.model}`; {r.get('train_examples', '?')} training / "
            f"{r.get('validation_examples', '?')} validation examples, max_length {cfg.data.max_length}; "
            f"micro-batch {tc.micro_batch_size} x grad_accum {tc.grad_accum}, {steps}, precision {tc.precision}, "
            f"device {r.get('device', '?')}. Peak memory: CUDA tensors, or on CPU the process's peak resident set "
            f"during training (interpreter and libraries included). Step time: median optimizer step after the "
            f"first. Metric: best validation value over the run's evaluations.")


def write_comparison(cfg: CompareConfig, runs: list[MethodRun]) -> list[dict[str, Any]]:
    """The table of the finished runs (markdown + HTML with the plot, JSON, CSV) in `output_dir`; returns its rows."""
    rows = [_row(run) for run in runs]
    metric = next((r["metric"] for r in rows if r["metric"]), "metric")
    out = cfg.output_dir
    headers = ["method", "trainable params", "trainable %", "peak memory (MiB)", "step time (s)", "tokens/s",
               f"val {metric}"]
    table = [[r["method"], _fmt(r["trainable_params"], ","), _fmt(r["trainable_percent"], ".3f"),
              _fmt(r["peak_memory_mb"], ",.0f"), _fmt(r["step_seconds"], ".3f"), _fmt(r["tokens_per_second"], ",.0f"),
              _fmt(r["metric_value"], ".4f")] for r in rows]
    report = Report(cfg.compare.title)
    report.text(_settings(cfg, runs))
    report.table(headers, table)
    if any(r["metric_value"] is not None for r in rows):
        report.image(plot_comparison(rows, metric, out / "compare.png", cfg.compare.title), "methods compared")
    failed = [f"`{r['method']}`: {r['error']}" for r in rows if r["error"]]
    if failed:
        report.section("Failed runs")
        for line in failed:
            report.text(line)
    report.write(out / "compare.md", out / "compare.html")
    write_json(out / "compare.json", rows, indent=1)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "compare.csv", buf.getvalue())
    print(report.to_markdown(out).split("\n", 2)[2])
    return rows
