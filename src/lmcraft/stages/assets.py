"""`lmcraft assets list` / `lmcraft assets fetch NAME [NAME ...]`: the named offline models and data sets."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=None, help="cache folder (default: $LMCRAFT_CACHE or ~/.cache/lmcraft)")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    sub.add_parser("list", parents=[common], help="table of assets: name, kind, size, fetched?, path")
    fetch = sub.add_parser(
        "fetch", parents=[common], help="download (and convert) assets into the cache; instant when done before"
    )
    fetch.add_argument("names", nargs="+", metavar="NAME", help="asset name(s), see `lmcraft assets list`")
    fetch.add_argument("--quiet", action="store_true", help="no progress output")


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    from lmcraft import assets

    if args.action == "list":
        rows = [assets.describe(info, args.cache_dir) for info in assets.list_assets()]
        print(_table(rows, ["name", "kind", "size", "fetched", "path"]))
        return 0
    for name in args.names:
        assets.get_asset(name)  # every name is checked before anything is downloaded
    for name in args.names:
        start = time.perf_counter()
        path = assets.fetch(name, cache_dir=args.cache_dir, progress=not args.quiet)
        if not args.quiet:
            print(f"{name}: ready in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        print(path)
    return 0
