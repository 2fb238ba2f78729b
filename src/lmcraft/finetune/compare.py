"""Run one fine-tuning task with several methods and put the results side by side.

Each method runs as its own `lmcraft finetune` process (so every peak-memory figure belongs to one method
alone) with the shared config plus the method's settings, in `output_dir/<method>/`. The comparison is
written to `output_dir/`: compare.md + compare.html (table, plot, settings), compare.json, compare.csv and
compare.png. Columns: trainable parameters (count and % of the total), peak training memory, median
optimizer-step time, tokens/s, and the best validation value of the task's headline metric.

A method whose folder already holds results.json made from the identical config is not run again (pass
`rerun=True` to force); a method that fails is reported in the table with the end of its log.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from lmcraft.config import validate_config
from lmcraft.errors import ConfigError
from lmcraft.finetune.config import CompareConfig, FinetuneConfig
from lmcraft.report import Report, write_text
from lmcraft.run_folder import prepare_stage_folder

__all__ = ["MethodRun", "plan_runs", "plot_comparison", "run_compare"]


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


def _config_text(cfg: FinetuneConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=True)


def _execute(run: MethodRun, rerun: bool, log: Callable[[str], None]) -> None:
    out = run.config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    text = _config_text(run.config)
    cfg_path, results_path, log_path = out / "config.yaml", out / "results.json", out / "log.txt"
    if not rerun and results_path.is_file() and cfg_path.is_file() and cfg_path.read_text() == text:
        run.results = json.loads(results_path.read_text())
        log(f"{run.name}: reusing {results_path}")
        return
    results_path.unlink(missing_ok=True)
    flags = prepare_stage_folder(out, "finetune", run.config, "output_dir")
    write_text(cfg_path, text)
    log(f"{run.name}: running (log: {log_path})")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as fh:
        code = subprocess.call([sys.executable, "-m", "lmcraft", "finetune", str(cfg_path), *flags], stdout=fh,
                               stderr=subprocess.STDOUT, env=env)
    if code == 0 and results_path.is_file():
        run.results = json.loads(results_path.read_text())
        r = run.results
        log(f"{run.name}: {r['metric']}={r['metric_value']}, peak {r['peak_memory_mb']} MiB, "
            f"step {r['step_seconds']} s")
    else:
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        run.error = f"exit code {code}: " + " / ".join(tail)
        log(f"{run.name}: FAILED ({run.error})")


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    os.replace(tmp, path)
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


def run_compare(cfg: CompareConfig, methods: list[str] | None = None, rerun: bool = False,
                log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run every method (one process each), write the table, plot and report; returns the table rows."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    runs = plan_runs(cfg, methods)
    for run in runs:
        _execute(run, rerun, log)
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
    write_text(out / "compare.json", json.dumps(rows, indent=1) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "compare.csv", buf.getvalue())
    print(report.to_markdown(out).split("\n", 2)[2])
    return rows
