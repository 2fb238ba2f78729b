"""`lmcraft compare CONFIG.yaml --methods full,lora,qlora,...`: one task, several fine-tuning methods.

The config is a finetune config plus a `compare:` section (per-method peft/trainer settings). Each method
runs as its own `lmcraft finetune` process; the stage writes a table (markdown, HTML, CSV, JSON) and a plot
of trainable parameters, peak memory, step time, tokens/s and the validation metric:

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
    from lmcraft.finetune.compare import run_compare
    from lmcraft.finetune.config import CompareConfig

    cfg = load_stage_config(CompareConfig, args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    with claim(args, "compare", cfg.output_dir, cfg):
        rows = run_compare(cfg, methods, rerun=args.rerun)
    return 0 if all(r["error"] is None for r in rows) else 1


def config_class() -> type:
    """The config class, listed by `lmcraft compare --help` and checked by `lmcraft pipeline`."""
    from lmcraft.finetune.config import CompareConfig

    return CompareConfig
