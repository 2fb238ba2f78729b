"""`lmcraft pipeline CONFIG.yaml [--dry-run]`: run a list of stages and write one report (see lmcraft.pipeline)."""

from __future__ import annotations

import argparse

from lmcraft.stages import add_config_arguments, claim, load_stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="print the plan with estimated time per stage and stop")


def config_class() -> type:
    from lmcraft.pipeline import PipelineConfig

    return PipelineConfig


def run(args: argparse.Namespace) -> int:
    from lmcraft.pipeline import Pipeline, PipelineConfig

    cfg = load_stage_config(PipelineConfig, args)
    pipeline = Pipeline(cfg)
    pipeline.check()
    print(pipeline.describe())
    if not args.dry_run:
        with claim(args, "pipeline", cfg.run_dir, {}):  # any pipeline may go on in a pipeline's folder
            pipeline.run()
    return 0
