"""`compile: auto | true | false`: torch.compile of the model's forward for training, with a persistent cache.

Rule of `auto`: compile only when it pays back. Once two (eager) micro-batches have run, with t_step the measured
time of the last optimizer step, compile when remaining_steps * t_step > AMORTISE * t_compile, i.e. the eager run
left is at least 20 times longer than the compile, so tests and short runs stay eager. t_compile is what compiling
this model (and shape) took before on this machine, measured and kept under `<lmcraft cache>/compile/`
(`record_compile_seconds`, for training and generation alike), else TYPICAL_COMPILE_S. `compile: true` compiles at
the same point whatever the rule says.

Where those two micro-batches had different shapes (padded to their longest sequence: SFT, preference data), the
compile uses dynamic shapes from the start: one compile instead of a static one followed by torch's automatic
dynamic recompile (a 2-layer test model on a 2-core EPYC, padded batches of four lengths: 31.5 s instead of
22.0 + 16.7 s). Packed data keeps static shapes, which compile faster (llama-14m: 40 s static, 63 s dynamic).
The trainer keeps the decision in its checkpointed state, so a resumed run compiles (or not) before its first step
and takes the uninterrupted run's path at every step.

Compiled code is cached under `<lmcraft cache>/inductor` (TORCHINDUCTOR_CACHE_DIR, unless already set), so a
second run of the same model skips most of the work. A failure to compile is reported and the run goes on eager.

Only the training step is compiled. The trainer's evaluation and generation inside a run use the model's own
forward (`eager_forward`): a no-grad forward is another graph and another compile, which does not pay. Measured on
a 2-core EPYC in bf16: the no-grad compile took 22 s (llama-14m) and 45 s (SmolLM2-135M), and then a batch took
0.392 s against 0.343 s eager (llama-14m, 8 x 256) and 0.845 s against 0.905 s (SmolLM2, 4 x 128): 750 batches to
pay back the better case.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

__all__ = ["AMORTISE", "TYPICAL_COMPILE_S", "batch_shapes", "compile_model", "eager_forward", "prepare_compile",
           "record_compile_seconds", "recorded_compile_seconds", "should_compile", "training_compile_key"]

log = logging.getLogger("lmcraft.train")

AMORTISE = 20
TYPICAL_COMPILE_S = 60.0


def should_compile(mode: str | bool, remaining_steps: int, step_seconds: float,
                   compile_seconds: float = TYPICAL_COMPILE_S) -> bool:
    """True/False as asked; "auto" by the amortisation rule in the module doc."""
    if mode != "auto":
        return bool(mode)
    return remaining_steps * step_seconds > AMORTISE * compile_seconds


def prepare_compile() -> None:
    """Before any torch.compile: the persistent inductor cache under the lmcraft cache (unless
    TORCHINDUCTOR_CACHE_DIR is set), and graphs that fail to compile run eager instead of stopping the run."""
    import torch._dynamo

    from lmcraft.io import cache_root

    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    torch._dynamo.config.suppress_errors = True


def compile_model(model: nn.Module, dynamic: bool | None = None) -> bool:
    """Compile `model`'s forward in place (names and state dict unchanged); False, with a message, on failure.
    `dynamic` as torch.compile takes it: None = static shapes until a second shape is seen (then one recompile
    with dynamic shapes), True = dynamic shapes from the start (batches of varying length: one compile)."""
    from lmcraft.models.rope import RotaryEmbedding

    prepare_compile()
    max_pos = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    for m in model.modules():
        if isinstance(m, RotaryEmbedding) and max_pos:
            m.reserve(int(max_pos))  # no data-dependent table sizing inside the graph
    try:
        model.compile(dynamic=dynamic)
    except Exception as err:  # noqa: BLE001 - any compiler failure: say so and train eager
        print(f"lmcraft: torch.compile failed ({type(err).__name__}: {err}); training continues eager",
              file=sys.stderr)
        return False
    log.info("model forward compiled with torch.compile (cache %s)", os.environ["TORCHINDUCTOR_CACHE_DIR"])
    return True


@contextmanager
def eager_forward(model: nn.Module) -> Iterator[None]:
    """Inside the block `model` runs its own forward, not the one `compile_model` compiled for training: a
    generation inside a training run (samples, held-out accuracy) feeds it a new shape at every token, each of which
    would recompile it, and an evaluation would compile a no-grad graph (module doc). Generation compiles its own
    decode step where that pays (`generate.static`)."""
    compiled = getattr(model, "_compiled_call_impl", None)  # set by nn.Module.compile
    if compiled is None:
        yield
        return
    model._compiled_call_impl = None
    try:
        yield
    finally:
        model._compiled_call_impl = compiled


def _record_file(kind: str, key: Sequence[Any]) -> Path:
    import torch

    from lmcraft.io import cache_root

    text = json.dumps([*key, torch.__version__], sort_keys=True, default=str)
    return cache_root() / "compile" / f"{kind}-{hashlib.sha256(text.encode()).hexdigest()[:16]}.json"


def recorded_compile_seconds(kind: str, key: Sequence[Any]) -> tuple[float, str]:
    """(the compile seconds recorded for `kind` ("train", "generate") and `key`, where it comes from), or the typical
    figure when none was recorded on this machine."""
    path = _record_file(kind, key)
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["compile_s"]), f"measured before ({path})"
    except (OSError, ValueError, KeyError, TypeError):
        return TYPICAL_COMPILE_S, "typical compile time"


def record_compile_seconds(kind: str, key: Sequence[Any], seconds: float) -> None:
    """Keep the measured compile seconds of `kind` and `key` for later runs (a failure to write only warns)."""
    from lmcraft import io

    try:
        io.write_json(_record_file(kind, key), {"compile_s": seconds})
    except OSError as err:
        log.warning("cannot record the compile time (%s)", err)


def training_compile_key(model: nn.Module, precision: str, batch_shape: Sequence[int],
                         dynamic: bool | None = None) -> list[Any]:
    """What a training compile's time depends on: the model's config and parameters (trainable and frozen), the
    precision, the batch shape (what of it is fixed: the micro-batch size) and whether shapes are dynamic."""
    config = getattr(model, "config", None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    key = [repr(config), sum(p.numel() for p in model.parameters()), trainable, precision, list(batch_shape)]
    return key + (["dynamic"] if dynamic else [])


def batch_shapes(batch: Any) -> tuple:
    """The shapes of every tensor in a (nested) dict/list/tuple batch, in order: equal for two batches of one
    collate exactly when a compiled step sees the same input shapes for both."""
    from lmcraft.train.checkpoint import tensors_in

    return tuple(tuple(t.shape) for t in tensors_in(batch))
