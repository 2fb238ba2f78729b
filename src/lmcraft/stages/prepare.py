"""`lmcraft prepare CONFIG.yaml`: raw text -> cleaned, filtered, deduplicated documents -> token shards.

The steps (`steps:`) run per chunk of `chunk_docs` documents in `--workers` processes and deduplication is
decided in input order, so the output is byte-identical for any `--workers`; a killed run resumes after its
last complete part. `--shard i/N` processes a deterministic 1/N of the input into `OUT/shard-i-of-N/`. The
executor is `lmcraft.data.prepare`, its config `lmcraft.data.prepare_config`; the part files and packing are
`lmcraft.data.parts`. The wiring gives the steps what lives above the data library: eval tasks to decontaminate
against, lmcraft's decoder to back-translate with.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmcraft.data.prepare_config import PackConfig, PrepareConfig
from lmcraft.errors import ConfigError, InputFileError
from lmcraft.stages import add_config_arguments, claim, load_stage_config

__all__ = ["PackConfig", "PrepareConfig", "add_arguments", "config_class", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--workers", type=int, default=1, help="worker processes for per-document steps (default 1)")
    parser.add_argument("--shard", default="0/1", metavar="i/N",
                        help="process shard i of N (default 0/1: all); one Slurm array task per shard: "
                        "--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT")
    parser.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="where the per-document steps run: local processes (default) or Ray actors "
                        "(pip install 'lmcraft[ray]'); the output is the same")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --executor ray: join this running cluster (default: start a local one with "
                        "--workers CPUs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} must look like i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text!r}: need N >= 1 and 0 <= i < N")
    return i, n


def run(args: argparse.Namespace) -> int:
    from lmcraft.data.back_translation import BackTranslate
    from lmcraft.data.pipeline import build_steps
    from lmcraft.data.prepare import prepare, shard_folder

    cfg = load_stage_config(PrepareConfig, args)
    shard = _parse_shard(args.shard)
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    identity = cfg if shard == (0, 1) else {**cfg.model_dump(mode="json"), "shard": list(shard)}
    with claim(args, "prepare", shard_folder(cfg.output, shard), identity, "output"):
        steps = build_steps(cfg.steps)
        if any(step.name == "decontaminate" for step in steps):
            from lmcraft.prompting.contamination import attach_eval_tasks

            attach_eval_tasks(steps, Path(args.config).parent if args.config else None)
        for step in steps:
            if isinstance(step, BackTranslate):
                from lmcraft.prompting.model_lm import open_generator

                step.use_generator(open_generator)
        result = prepare(cfg, workers=args.workers, shard=shard, progress=not args.no_progress,
                         executor=args.executor, ray_address=args.ray_address, steps=steps)
        _report_skipped(cfg, result)
    print(f"wrote {result['docs_written']:,} documents to {result['output']}; report: {result['report']}")
    for name, entry in (result.get("licences") or {}).items():
        print(f"  licence {name}: {entry['documents']:,} documents")
    if result.get("packed"):
        for name, sp in result["packed"]["splits"].items():
            print(f"  {name}: {sp['tokens']:,} tokens in {sp['documents']:,} documents")
    return 0


def _report_skipped(cfg: PrepareConfig, result: dict[str, Any]) -> None:
    """Say on the console what bad input was skipped; a run that kept no document is an error (exit 2)."""
    from lmcraft.data.readers import ErrorLog, describe_inputs

    errors = ErrorLog.from_dict(result.get("errors") or {})
    if errors.counts:
        first = "; ".join(" ".join(map(str, e)) for e in errors.examples[:3])
        print(f"skipped bad input: {errors.counts_text()}; first: {first}", file=sys.stderr)
    if result["docs_written"] == 0:
        raise InputFileError(describe_inputs(cfg.inputs), "every record",
                             f"at least one usable document: {result['docs_read']:,} read, none kept (see "
                             f"{result['report']})")


def config_class() -> type:
    """The config class, listed by `lmcraft prepare --help` and checked by `lmcraft pipeline`."""
    return PrepareConfig
