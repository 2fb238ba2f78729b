"""The CPU heap during training: freed activation buffers go back to the system (glibc's mmap threshold).

glibc's malloc serves a request above its mmap threshold with a mapping of its own, returned to the system when
freed. By default the threshold is dynamic: freeing such a block raises it to that block's size (up to 32 MiB), so
after the first steps the activations of a long sequence come from the heap instead, where a freed block leaves a
hole that later requests of other sizes cannot always fill. The process then holds far more than its live tensors:
LoRA on a 1.1B Llama shape, one row of 2,048 tokens with full checkpointing, peaked 1.8 GiB above the memory plan.
Fixing the threshold at 4 MiB (`mallopt(M_MMAP_THRESHOLD)`, which also stops the dynamic rise) keeps every larger
buffer out of the heap: the same step then peaks within 6% of the plan, and the llama-14m benchmark step
(8 x 256 tokens) ran as fast as before within its noise (bench.bench_train, alternated runs).

A `MALLOC_MMAP_THRESHOLD_` set in the environment is the user's own choice and is left alone; other C libraries
(or platforms) are left alone too.
"""

from __future__ import annotations

import ctypes
import os

__all__ = ["MMAP_THRESHOLD", "cap_mmap_threshold"]

MMAP_THRESHOLD = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def cap_mmap_threshold(nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` for this process; whether it was set."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes))
