"""Shared helpers for benchmarks: interleaved timing that resists noisy neighbours, and a table with ratios.

    times = compare({"lmcraft": run_ours, "transformers": run_theirs}, repeats=5)   # best seconds each
    table = Table(["model", "batch", "lmcraft tok/s", "transformers tok/s", "ratio"])
    table.add(["llama-14m", 1, fmt(a), fmt(b), ratio(a, b)])
    table.print()

`compare` alternates the candidates (A B A B ...) so a burst of load from another process hits both,
and keeps each one's fastest run: the minimum is the least disturbed measurement of the same work.
"""

from __future__ import annotations

import gc
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lmcraft.models import ModelConfig


def set_threads(n: int | None = None) -> int:
    """Use `n` intra-op threads (default: all cores) in this process; returns the count."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return n


def time_once(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    gc.collect()
    start = clock()
    fn()
    return clock() - start


def compare(candidates: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Best time (seconds, by `clock`: wall time by default) of each candidate over `repeats` interleaved runs,
    after `warmup` runs each."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    best = {name: float("inf") for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            best[name] = min(best[name], time_once(fn, clock))
    return best


def random_model_folder(root: Path, name: str, config: ModelConfig) -> Path:
    """A model of `config` with seed-0 random weights, saved once as `root / name` in Hugging Face layout, so that
    lmcraft and transformers load the same weights."""
    from lmcraft.hub import save_model
    from lmcraft.models import LanguageModel

    folder = root / name
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        save_model(LanguageModel(config), folder)
    return folder


def llama_14m_folder(root: Path) -> Path:
    """The `llama-14m` preset with seed-0 random weights (see `random_model_folder`)."""
    from lmcraft.models import preset

    return random_model_folder(root, "llama-14m", preset("llama-14m"))


# SmolLM2-135M's published shape (HuggingFaceTB/SmolLM2-135M-Instruct config.json)
SMOLLM2_135M_SHAPE = dict(vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
                          intermediate_size=1536, rope_theta=100000.0, max_position_embeddings=8192,
                          tie_word_embeddings=True)


def smollm2_folder(root: Path | None = None) -> Path | None:
    """The `smollm2-135m-instruct` asset's folder. When it cannot be fetched (an offline machine): with `root`, a
    model of its shape with random weights saved there (decoding and training speed do not depend on the values;
    the folder has no tokenizer), else None; either way with a message."""
    try:
        from lmcraft.assets import resolve_model

        return resolve_model("smollm2-135m-instruct")
    except Exception as err:  # noqa: BLE001 - any fetch failure only replaces or skips this model
        if root is None:
            print(f"skipping smollm2-135m-instruct: the asset cannot be fetched ({err})", flush=True)
            return None
        print(f"smollm2-135m-instruct cannot be fetched ({err}): using random weights of its shape", flush=True)
        from lmcraft.models import ModelConfig

        return random_model_folder(root, "smollm2-135m-random", ModelConfig(**SMOLLM2_135M_SHAPE))


def ratio(ours: float, theirs: float) -> str:
    """ours / theirs as '2.31x' (for throughputs: > 1 means we are faster)."""
    return f"{ours / theirs:.2f}x" if theirs > 0 else "-"


def fmt(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


class Table:
    """A plain-text table printed with aligned columns (markdown pipe syntax, so it pastes into docs)."""

    def __init__(self, columns: Sequence[str]) -> None:
        self.columns = list(columns)
        self.rows: list[list[str]] = []

    def add(self, row: Sequence[object]) -> None:
        if len(row) != len(self.columns):
            raise ValueError(f"row has {len(row)} cells, table has {len(self.columns)} columns")
        self.rows.append([str(cell) for cell in row])

    def render(self) -> str:
        widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True)) + " |"
        sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        return "\n".join([line(self.columns), sep, *(line(r) for r in self.rows)])

    def print(self, file=sys.stdout) -> None:  # noqa: ANN001 - a text stream
        print(self.render(), file=file, flush=True)


def machine() -> str:
    """One line naming the CPU, core count, torch version and thread count, printed above every table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
