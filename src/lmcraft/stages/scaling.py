"""`lmcraft scaling CONFIG.yaml [key=value ...]`: a sweep of model sizes (and token budgets) with the pre-training
stage, scaling-law fits with confidence intervals, plots, and a capability probe per model.

Each size (`sizes`, or a width x depth `grid`) at each token budget (`tokens`) is one `lmcraft pretrain` stage in
OUT/runs/NAME/ (`trainer.max_steps = tokens / (micro_batch_size * grad_accum * seq_len)`, `curve_points`
evaluations). The runs are a pipeline plan run in this process: a rerun skips the runs done with the same config
and resumes an interrupted one. The first run tokenises and packs `data.inputs` (and trains the tokenizer); later
runs read its folders. Probe, fits and report: `lmcraft.scaling` (OUT/scaling.json, scaling.png, report.md/html).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcraft.scaling.config import ScalingConfig
from lmcraft.scaling.plan import plan_runs, run_configs
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

__all__ = ["ScalingConfig", "add_arguments", "config_class", "plan_runs", "run", "scaling"]


def config_class() -> type[ScalingConfig]:
    return ScalingConfig


def scaling(cfg: ScalingConfig, progress: bool = True) -> dict[str, Any]:
    """Run the sweep, probe, fit, plot and report (see the module docstring); returns the content of scaling.json."""
    from lmcraft.io import write_json
    from lmcraft.pipeline import InProcessPipeline, PipelineConfig, StageSpec, read_summary
    from lmcraft.scaling.report import SweepDescription, write_report
    from lmcraft.scaling.sweep import FinishedRun, fit_laws, probe_runs, run_row, sweep_result

    out = Path(cfg.output_dir)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    runs = plan_runs(cfg)
    stages = [StageSpec(name=name, stage="pretrain", config={k: v for k, v in data.items() if k != "output_dir"})
              for name, data in run_configs(cfg)]
    plan = InProcessPipeline(PipelineConfig(run_dir=out / "runs", stages=stages), [] if progress else ["--no-progress"])
    plan.run_stages(sys.stderr)
    finished = [FinishedRun(name, Path(rc.output_dir), read_summary(Path(rc.output_dir)),
                            rc.trainer.micro_batch_size * rc.trainer.grad_accum * rc.data.seq_len) for name, rc in runs]
    probes: list[dict[str, Any] | None] = [None] * len(finished)
    reference = None
    if cfg.probe is not None:
        first = runs[0][1]
        packed = Path(first.data.packed or Path(first.output_dir) / "data")
        probes, reference = probe_runs(cfg.probe, finished, packed, cfg.data.eval_split, cfg.data.seq_len, out,
                                       progress)
    rows = [run_row(run, cfg.fit.embeddings, probe) for run, probe in zip(finished, probes, strict=True)]
    fits = fit_laws(rows, cfg.fit)
    result = sweep_result(rows, fits, reference)
    write_json(out / "scaling.json", result)
    write_report(SweepDescription(out, cfg.objective.name, cfg.data.seq_len, cfg.fit, cfg.report, cfg.probe),
                 rows, fits, result)
    return result


def run(args: argparse.Namespace) -> int:
    from lmcraft.scaling.report import format_result

    cfg = load_training_config(ScalingConfig, args)
    with claim(args, "scaling", cfg.output_dir, cfg):
        result = scaling(cfg, progress=not args.no_progress)
    print(format_result(result))
    return 0
