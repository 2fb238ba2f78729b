"""`lmcraft plan CONFIG.yaml [key=value ...]`: will this training run fit? The memory plan, without loading weights.

Reads the config of any training stage (pretrain, finetune, sft, reward, dpo, ppo, grpo; the stage is `--stage` or a
`stage:` key in the file) and prints `lmcraft.stage_memory.plan_stage`'s table. With `--memory-limit` (default: the
config's `trainer.memory_limit`) a plan that does not fit lists which switch saves how much and exits with code 1.
Nothing is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lmcraft.errors import ConfigError
from lmcraft.stage_memory import TRAINING_STAGES, plan_stage

__all__ = ["add_arguments", "run"]



def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="the config of a training stage (as given to that stage)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys, e.g. "
                        "trainer.micro_batch_size=4 trainer.activation_checkpointing=full")
    parser.add_argument("--stage", dest="planned_stage", choices=TRAINING_STAGES,
                        help="the stage the config is for (default: the file's `stage:` key)")
    parser.add_argument("--memory-limit", metavar="SIZE", help="e.g. 24GiB: say whether the run fits and, if not, "
                        "which switch saves how much (default: trainer.memory_limit)")
    parser.epilog = ("examples:\n  lmcraft plan recipes/sft-smollm2-lora.yaml --stage sft --memory-limit 2GiB\n"
                     "  lmcraft plan my-sft.yaml trainer.activation_checkpointing=full data.max_length=4096")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    from lmcraft.hub.files import parse_size

    stage, cfg = _load(args)
    limit_text = args.memory_limit or cfg.trainer.memory_limit
    limit = parse_size(limit_text) if limit_text else None
    plan = plan_stage(stage, cfg)
    print(f"{stage}: {args.config}")
    print(plan.table(limit))
    return 1 if limit is not None and plan.peak > limit else 0


def _load(args: argparse.Namespace) -> tuple[str, Any]:
    """(stage, validated config): the stage from --stage or the file's `stage:` key (removed before validation)."""
    from lmcraft.config import apply_overrides, parse_overrides, validate_config
    from lmcraft.io import read_yaml
    from lmcraft.stage_table import stage_config_class

    path = Path(args.config)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    data = read_yaml(path, "config") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of keys to values, got {type(data).__name__}")
    stage = args.planned_stage or data.get("stage")
    data.pop("stage", None)
    if stage is None:
        raise ConfigError(f"{path}: which stage is this config for? Pass --stage ({', '.join(TRAINING_STAGES)}) or "
                          "add a `stage:` line to the file")
    if stage not in TRAINING_STAGES:
        raise ConfigError(f"{path}: stage {stage!r} does not train; lmcraft plan reads the configs of "
                          f"{', '.join(TRAINING_STAGES)}")
    apply_overrides(data, parse_overrides(args.overrides))
    return stage, validate_config(stage_config_class(stage), data, str(path))
