"""One module per CLI stage. A stage wires parts together; it holds no math of its own.

Config-driven stages use `add_config_arguments` / `load_stage_config` so that every one of them
reads `CONFIG.yaml key=value ...` the same way; stages that train (a `trainer:` section) use
`add_training_arguments` / `load_training_config`, which add `--no-progress`. A stage that writes a folder
wraps its work in `claim(args, stage, folder, config)` (see `lmcraft.run_folder`): the folder must be new,
empty or an earlier run's of the same config, one writer at a time, and `--overwrite` replaces only what
lmcraft wrote there.
"""

from __future__ import annotations

import argparse
import os
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

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
    add_overwrite_argument(parser)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in an output folder an earlier lmcraft run wrote (only its files are "
                             "replaced; other files are kept)")


def claim(args: argparse.Namespace, stage: str, folder: Path, config: Any,
          output_key: str | None = "output_dir") -> AbstractContextManager[Any]:
    """Claim the stage's output folder for this run (`lmcraft.run_folder.claim_output`), with `--overwrite`.
    Under `torchrun` the rank-0 process holds the claim for all ranks."""
    from lmcraft.run_folder import claim_output

    if os.environ.get("RANK", "0") != "0":
        return nullcontext()
    return claim_output(folder, stage, config, overwrite=getattr(args, "overwrite", False), output_key=output_key)


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


def run_alignment_stage(args: argparse.Namespace, stage: str, cls: type[C], method: str) -> int:
    """`run(args)` of an alignment stage: load and check its config, claim OUT, and run the method (`method`: the
    dotted path `module:Class` of an `AlignmentMethod`, imported only now) in the one run template."""
    import importlib

    from lmcraft.align.run import run_alignment

    cfg = load_training_config(cls, args)
    module, name = method.split(":")
    with claim(args, stage, cfg.output_dir, cfg):  # type: ignore[attr-defined]
        run_alignment(cfg, getattr(importlib.import_module(module), name).from_config(cfg))
    return 0
