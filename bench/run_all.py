"""Run every benchmark in turn: `python -m bench.run_all` (or `make bench`).

Each benchmark prints its own table with ratios against the reference tool; this only sequences them
in separate processes so that one's memory and threads never disturb the next.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ("bench.bench_generate", "bench.bench_train", "bench.bench_peft", "bench.bench_data", "bench.bench_memory",
              "bench.bench_grpo_memory", "bench.bench_serve", "bench.bench_decode_backends")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== {name}", flush=True)
        if subprocess.call([sys.executable, "-m", name]) != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
