"""`lmcraft <stage> CONFIG.yaml [key=value ...]`: parse, validate, call a stage.

The CLI is thin and lazy: the stage table (`lmcraft.stage_table`) is plain data, so `lmcraft --help` imports
nothing heavy; a stage's module (and torch) is imported only when that stage runs. Each stage
module provides `add_arguments(parser)` and `run(args) -> int | None`; a config-driven stage also has
`config_class()` returning its config class, whose keys `lmcraft <stage> --help` lists.

User errors (`LmcraftError`, missing files) print as one paragraph with exit code 2; pass
`--debug` for the traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
import textwrap

from lmcraft.stage_table import STAGES, stage_module

EPILOG = """\
examples:
  lmcraft assets fetch smollm2-135m-instruct
  lmcraft generate smollm2-135m-instruct --chat --prompt "What is the capital of France?"
  lmcraft pretrain recipes/pretrain-gpt-tiny.yaml trainer.max_steps=200

Each stage takes --help. Config keys are checked before any work: a typo is an error naming the key.
"""


def build_parser(stage: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmcraft",
        description="lmcraft: the whole life of a language model, one CLI.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="stage", metavar="STAGE")
    for name, (_, summary) in STAGES.items():
        sp = sub.add_parser(
            name,
            help=summary,
            description=summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
        if name == stage:  # only the chosen stage's module is imported
            module = stage_module(name)
            module.add_arguments(sp)
            if hasattr(module, "config_class"):  # list the stage's config keys under --help
                from lmcraft.config import describe_config

                sp.epilog = describe_config(module.config_class())
    return parser


def _chosen_stage(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in STAGES else None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = _chosen_stage(argv)
    parser = build_parser(stage)
    args, extra = parser.parse_known_args(argv)
    late_overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if len(late_overrides) < len(extra) or (late_overrides and not hasattr(args, "overrides")):
        parser.parse_args(argv)  # the usual "unrecognized arguments" error and exit
    if late_overrides:  # key=value written after a flag (`CONFIG --dry-run a.b=1`) still counts as an override
        args.overrides = [*args.overrides, *late_overrides]
    if args.version:
        from lmcraft import __version__

        print(f"lmcraft {__version__}")
        return 0
    if args.stage is None:
        parser.print_help()
        return 0
    try:
        result = stage_module(args.stage).run(args)
        return int(result or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place where every failure becomes a message
        if args.debug:
            raise
        print(_explain(err), file=sys.stderr)
        return 2 if _is_user_error(err) else 1


_DISK_ERRORS = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                errno.EDQUOT: "the disk quota is exhausted"}


def _is_user_error(err: BaseException) -> bool:
    from lmcraft.errors import LmcraftError

    return isinstance(err, LmcraftError | FileNotFoundError | NotADirectoryError | PermissionError) or (
        isinstance(err, OSError) and err.errno in _DISK_ERRORS)


def _explain(err: BaseException) -> str:
    if isinstance(err, OSError) and err.errno in _DISK_ERRORS:
        where = f" while writing {err.filename}" if err.filename else ""
        text = (f"error: {_DISK_ERRORS[err.errno]}{where}. Files already written are intact (lmcraft writes to a "
                "temporary name and renames); free space or choose another folder, then rerun to resume.")
    elif _is_user_error(err):
        text = f"error: {err}"
    else:
        text = f"internal error ({type(err).__name__}): {err}. Re-run with --debug for the traceback."
    return "\n".join(wrapped for line in text.split("\n")  # a table in the message (a memory plan) keeps its lines
                     for wrapped in textwrap.wrap(line, width=100, break_long_words=False, break_on_hyphens=False)
                     or [""])


if __name__ == "__main__":
    raise SystemExit(main())
