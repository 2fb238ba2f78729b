"""A scaling sweep end to end: the pre-training runs (a pipeline plan run in this process), probe, fits, report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from lmcraft.scaling.config import ScalingConfig
from lmcraft.scaling.plan import plan_runs, run_configs

__all__ = ["scaling"]


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
