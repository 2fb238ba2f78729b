"""`lmcraft finetune CONFIG.yaml [key=value ...]`: full fine-tuning or any PEFT method on a task.

Tasks: sequence classification (`cls`), token classification (`token_cls`), regression, causal-LM text
(`clm`). See lmcraft.finetune.config for every key and recipes/finetune-*.yaml for ready configs:

    lmcraft finetune recipes/finetune-minilm-spam.yaml
    lmcraft finetune recipes/finetune-minilm-spam.yaml peft.method=lora peft.r=8 trainer.lr=1e-3
"""

from __future__ import annotations

import argparse
import json

from lmcraft.stages import add_config_arguments, claim, load_stage_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from lmcraft.finetune.config import FinetuneConfig
    from lmcraft.finetune.runner import run_finetune

    cfg = load_stage_config(FinetuneConfig, args)
    with claim(args, "finetune", cfg.output_dir, cfg):
        results = run_finetune(cfg)
    shown = {k: results[k] for k in ("method", "metric", "metric_value", "trainable_params", "total_params",
                                     "peak_memory_mb", "step_seconds", "tokens_per_second", "final")}
    print(json.dumps(shown, indent=1, default=str))
    return 0


def config_class() -> type:
    """The config class, listed by `lmcraft finetune --help` and checked by `lmcraft pipeline`."""
    from lmcraft.finetune.config import FinetuneConfig

    return FinetuneConfig
