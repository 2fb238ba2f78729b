"""One module per CLI stage. A stage wires parts together; it holds no math of its own.

Config-driven stages use `add_config_arguments` / `load_stage_config` so that every one of them
reads `CONFIG.yaml key=value ...` the same way.
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
