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

from lmcraft.scaling.config import ScalingConfig
from lmcraft.scaling.plan import plan_runs
from lmcraft.scaling.run import scaling
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

__all__ = ["ScalingConfig", "add_arguments", "config_class", "plan_runs", "run", "scaling"]


def config_class() -> type[ScalingConfig]:
    return ScalingConfig


def run(args: argparse.Namespace) -> int:
    from lmcraft.scaling.report import format_result

    cfg = load_training_config(ScalingConfig, args)
    with claim(args, "scaling", cfg.output_dir, cfg):
        result = scaling(cfg, progress=not args.no_progress)
    print(format_result(result))
    return 0
