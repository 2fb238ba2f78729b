"""Measure a training run: peak memory, time per optimizer step and tokens per second.

Peak memory is the high-water mark *during training* (from the first step to the end, evaluations
included), so that loading a checkpoint in float32 before quantising it (QLoRA) does not count:
- CUDA: `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` (tensors only);
- CPU (Linux): the process's peak resident set size `VmHWM` after resetting it through
  `/proc/self/clear_refs` (everything the process holds: weights, gradients, optimizer state,
  activations, plus the Python interpreter and libraries). Freed heap is first returned to the OS
  (`malloc_trim`), so memory released before training does not linger in the resident set.
Step time is the median over the optimizer steps after the first (which pays one-time allocations);
tokens/s is their tokens divided by their total time.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
from pathlib import Path
from typing import Any

import torch

from lmcraft.train import Callback

__all__ = ["RunProfiler", "current_rss_mb", "peak_memory_mb", "reset_peak_memory"]

_STATUS = Path("/proc/self/status")


def _status_mb(key: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    """Resident set size of this process in MiB (Linux), else None."""
    return _status_mb("VmRSS")


def reset_peak_memory(device: torch.device) -> bool:
    """Start a new high-water mark; False when this platform cannot (then the peak covers the whole process)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_mb(device: torch.device) -> float | None:
    """The high-water mark since `reset_peak_memory` (MiB): CUDA tensors, or the CPU process's resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    hwm = _status_mb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunProfiler(Callback):
    """Collects step times and tokens from the trainer's per-step metrics and the training peak memory."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[float] = []
        self.device: torch.device | None = None
        self.rss_before_mb: float | None = None
        self.peak_mb: float | None = None

    def on_train_begin(self, trainer: Any) -> None:
        self.device = trainer.device
        reset_peak_memory(self.device)
        self.rss_before_mb = current_rss_mb()

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        if not metrics.get("skipped"):
            self.seconds.append(metrics["seconds"])
            self.tokens.append(metrics["tokens"])

    def on_train_end(self, trainer: Any) -> None:
        self.peak_mb = peak_memory_mb(trainer.device)

    def summary(self) -> dict[str, float | None]:
        timed_s, timed_t = (self.seconds[1:], self.tokens[1:]) if len(self.seconds) > 1 else (self.seconds,
                                                                                               self.tokens)
        total = sum(timed_s)
        return {
            "step_seconds": statistics.median(timed_s) if timed_s else None,
            "tokens_per_second": sum(timed_t) / total if total > 0 else None,
            "peak_memory_mb": self.peak_mb,
            "rss_before_training_mb": self.rss_before_mb,
            "timed_steps": len(timed_s),
        }
