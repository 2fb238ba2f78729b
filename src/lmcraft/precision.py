"""`precision: auto`: choose bf16 or fp32 for the device and the work at hand, by measurement on CPUs.

Rule: CUDA with bf16 support -> bf16; CUDA without -> fp32; CPU -> a sub-second micro-benchmark of the product
that dominates the work, in fp32 and in bf16, best of a few repeats each -> bf16 when its best time t_bf16
satisfies t_bf16 * MARGIN < t_fp32, else fp32. Two workloads:

- "train" (training, batched scoring): a fixed N x N matmul, compute-bound. bf16 wins on CPUs with AMX; on
  AVX2-only CPUs bf16 matmul runs at about half fp32 speed.
- "decode" (token-by-token generation, whose steps read every weight once): y = W x with W (8192 x 4096), 128 MiB
  in fp32, larger than CPU caches, so memory-bound: bf16 weights halve the bytes read, which can win even where
  bf16 arithmetic is slow.

Each CPU result is cached in `<cache>/precision/<key>.json` ("decode": `<key>-decode.json`), the key being a
hash of the CPU model name, its flags and the torch version, so a measurement runs once per machine.

`LMCRAFT_AUTO_PRECISION=fp32|bf16` fixes what `auto` resolves to (the same numbers on every kind of machine: the
test suite sets fp32).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmcraft import io

__all__ = ["DTYPES", "MARGIN", "WORKLOADS", "PrecisionChoice", "cpu_key", "cpu_seconds", "measure_cpu_matmul",
           "measure_cpu_matvec", "resolve_precision", "weights_dtype"]

log = logging.getLogger("lmcraft.precision")

MARGIN = 1.15  # bf16 must be at least 15% faster than fp32 to be chosen
_SIZE = 512
_REPEATS = 5
_MATVEC = (8192, 4096)  # (out, in) features of the decode benchmark's weight: 128 MiB in fp32
WORKLOADS = ("train", "decode")


@dataclass(frozen=True)
class PrecisionChoice:
    """The resolved precision ("fp32" or "bf16") and why it was chosen."""

    precision: str
    reason: str


def _cpu_info() -> tuple[str, str]:
    """(CPU model name, flags) from /proc/cpuinfo where there is one, else platform's description."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        name, _, value = line.partition(":")
        name = name.strip()
        if name == "model name" and value.strip():
            model = value.strip()
        elif name in ("flags", "Features") and not flags:
            flags = value.strip()
    return model, flags


def cpu_key() -> str:
    """Hash of CPU model name + flags + torch version: one cached measurement per (machine kind, torch)."""
    model, flags = _cpu_info()
    return hashlib.sha256(f"{model}\n{flags}\n{torch.__version__}".encode()).hexdigest()[:16]


def has_amx() -> bool:
    """Whether the CPU reports AMX tile instructions (amx_bf16)."""
    return "amx_bf16" in _cpu_info()[1].split()


def _best_time(dtype: torch.dtype, batch: int, out_features: int, in_features: int) -> float:
    """Best seconds of x @ W^T, x (batch, in), W (out, in), in `dtype`."""
    x = torch.randn(batch, in_features).to(dtype)
    w = torch.randn(out_features, in_features).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu_matmul() -> dict[str, float]:
    """Best-of-`_REPEATS` seconds of one `_SIZE`x`_SIZE` matmul in fp32 and in bf16 on the CPU."""
    return {name: _best_time(dtype, _SIZE, _SIZE, _SIZE) for name, dtype in (("fp32", torch.float32),
                                                                            ("bf16", torch.bfloat16))}


def measure_cpu_matvec() -> dict[str, float]:
    """Best-of-`_REPEATS` seconds of one matrix-vector product with a `_MATVEC` weight in fp32 and in bf16."""
    return {name: _best_time(dtype, 1, *_MATVEC) for name, dtype in (("fp32", torch.float32),
                                                                    ("bf16", torch.bfloat16))}


def _describe(workload: str) -> str:
    return f"{_SIZE}x{_SIZE} matmul" if workload == "train" else f"{_MATVEC[0]}x{_MATVEC[1]} matrix-vector product"


def cpu_seconds(workload: str = "train", cache_dir: str | Path | None = None) -> tuple[dict[str, float], str]:
    """({"fp32": s, "bf16": s} of `workload`'s CPU micro-benchmark, " (cached in PATH)" or ""): the cached
    measurement of this machine kind, measured (and cached) now when there is none."""
    from lmcraft.io import cache_root

    suffix = "" if workload == "train" else f"-{workload}"
    path = cache_root(cache_dir) / "precision" / f"{cpu_key()}{suffix}.json"
    if path.is_file():
        try:
            times = {k: float(v) for k, v in json.loads(path.read_text(encoding="utf-8"))["seconds"].items()}
            return times, f" (cached in {path})"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    times = measure_cpu_matmul() if workload == "train" else measure_cpu_matvec()
    try:
        io.write_json(path, {"cpu": _cpu_info()[0], "torch": torch.__version__, "workload": workload,
                             "seconds": times})
    except OSError as err:
        log.warning("cannot cache the precision measurement in %s (%s)", path, err)
    return times, ""


def _cpu_choice(cache_dir: str | Path | None, workload: str) -> PrecisionChoice:
    times, cached = cpu_seconds(workload, cache_dir)
    fast = times["bf16"] * MARGIN < times["fp32"]
    ratio = times["fp32"] / times["bf16"] if times["bf16"] > 0 else float("inf")
    return PrecisionChoice("bf16" if fast else "fp32",
                           f"CPU {_describe(workload)}: fp32 {times['fp32'] * 1e3:.2f} ms, bf16 "
                           f"{times['bf16'] * 1e3:.2f} ms (bf16 {ratio:.2f}x fp32 speed; needs > {MARGIN}x){cached}")


def resolve_precision(requested: str, device: torch.device, cache_dir: str | Path | None = None,
                      workload: str = "train") -> PrecisionChoice:
    """"fp32"/"bf16" as asked; "auto" -> bf16 on CUDA with bf16 support, measured for `workload` ("train" or
    "decode") on CPU (see module doc)."""
    if workload not in WORKLOADS:
        raise ValueError(f"precision workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if requested != "auto":
        return PrecisionChoice(requested, "set in the config")
    fixed = os.environ.get("LMCRAFT_AUTO_PRECISION")
    if fixed in ("fp32", "bf16"):
        return PrecisionChoice(fixed, "LMCRAFT_AUTO_PRECISION")
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if ok else "fp32", f"CUDA {'supports' if ok else 'lacks'} bf16")
    if device.type == "cpu":
        return _cpu_choice(cache_dir, workload)
    return PrecisionChoice("fp32", f"no bf16 rule for device {device.type}")


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weights_dtype(requested: str, device: torch.device, workload: str = "decode",
                  cache_dir: str | Path | None = None) -> tuple[torch.dtype, PrecisionChoice]:
    """(dtype to load the weights in, the choice) for inference: "fp32"/"bf16" as asked, "auto" resolved for
    `workload` (default "decode": generation), logged."""
    choice = resolve_precision(requested, device, cache_dir, workload)
    if requested == "auto":
        log.info("precision auto -> %s for %s (%s)", choice.precision, workload, choice.reason)
    return DTYPES[choice.precision], choice
