"""`lmcraft compare CONFIG.yaml --methods full,lora,qlora,...`: one task, several fine-tuning methods.

The config is a finetune config plus a `compare:` section (per-method peft/trainer settings). The methods are
a pipeline plan (`lmcraft.pipeline`): each runs as its own `lmcraft finetune` process in `output_dir/<method>/`,
and a method whose folder is done with the same config (`.done.json`) is reused unless `--rerun`. The stage
writes a table (markdown, HTML, CSV, JSON) and a plot of trainable parameters, peak memory, step time,
tokens/s and the validation metric:

    lmcraft compare recipes/compare-minilm-spam.yaml
    lmcraft compare recipes/compare-minilm-spam.yaml --methods full,lora,ia3 trainer.max_steps=20
"""

from __future__ import annotations

import argparse

from lmcraft.stages import add_config_arguments, claim, load_stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--methods", help="comma-separated method names (default: compare.methods of the config)")
    parser.add_argument("--rerun", action="store_true", help="run methods again even if their results exist")


def run(args: argparse.Namespace) -> int:
    from lmcraft.finetune.compare import plan_runs, write_comparison
    from lmcraft.pipeline import Pipeline, PipelineConfig, StageSpec, read_summary

    cfg = load_stage_config(config_class(), args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    runs = plan_runs(cfg, methods)
    stages = [StageSpec(name=run.name, stage="finetune",
                        config=run.config.model_dump(mode="json", exclude_none=True, exclude={"output_dir"}))
              for run in runs]
    plan = Pipeline(PipelineConfig(run_dir=cfg.output_dir, title=cfg.compare.title, stages=stages))
    with claim(args, "compare", cfg.output_dir, cfg):
        failures = plan.run_stages(keep_going=True, rerun=args.rerun)
        for run in runs:
            failure = failures[run.name]
            if failure is not None:
                tail = failure.log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                run.error = f"exit code {failure.code}: " + " / ".join(tail)
            else:
                run.results = read_summary(run.config.output_dir) or None
                run.error = None if run.results else f"no summary in {run.config.output_dir}"
        rows = write_comparison(cfg, runs)
    return 0 if all(r["error"] is None for r in rows) else 1


def config_class() -> type:
    """The config class, listed by `lmcraft compare --help` and checked by `lmcraft pipeline` (built with the
    fine-tuning config, which imports torch)."""
    from lmcraft.finetune.config import CompareConfig

    return CompareConfig
