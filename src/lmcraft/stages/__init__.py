"""One module per CLI stage. A stage wires parts together; it holds no math of its own.

Config-driven stages use `add_config_arguments` / `load_stage_config` so that every one of them
reads `CONFIG.yaml key=value ...` the same way; stages that train (a `trainer:` section) use
`add_training_arguments` / `load_training_config`, which add `--no-progress`.
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import BaseModel

from lmcraft.config import load_config

C = TypeVar("C", bound=BaseModel)


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """`CONFIG.yaml` then any number of `dotted.key=value` overrides."""
    parser.add_argument(
        "config", nargs=None if required else "?", metavar="CONFIG.yaml", help="stage config (YAML)"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="override config keys, e.g. trainer.lr=3e-4"
    )


def load_stage_config(cls: type[C], args: argparse.Namespace) -> C:
    return load_config(cls, args.config, args.overrides)


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """`CONFIG.yaml key=value ...` and `--no-progress`, for stages whose config has a `trainer` section."""
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def load_training_config(cls: type[C], args: argparse.Namespace) -> C:
    """The validated config; `--no-progress` turns `trainer.progress` off."""
    cfg = load_stage_config(cls, args)
    if args.no_progress:
        cfg.trainer.progress = False  # type: ignore[attr-defined]
    return cfg
