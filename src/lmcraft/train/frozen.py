"""Frozen linear weights kept in bf16 while adapters train under bf16 autocast (`trainer.frozen_dtype`).

Under bf16 autocast every product of a linear layer reads its weight and bias rounded to bf16 (round to nearest
even), so storing a frozen layer's weight in bf16 gives the same training step, to the bit, while the frozen weights
take 2 bytes per parameter instead of 4 (a 1.1B Llama: 4.1 -> 2.1 GiB). Embeddings stay as they are (and so does a
linear layer sharing its weight with one), so the residual stream keeps its fp32 start.

Only for runs whose checkpoints hold the trained parameters alone (PEFT methods): the frozen weights never reach a
checkpoint. On leaving, the layers return to their dtype holding the bf16-rounded values, the weights the adapters
were trained against; code that ran the model in fp32 after training (samples, a merged save) sees those.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from lmcraft.errors import LmcraftError

__all__ = ["frozen_dtype_for", "frozen_linears_in"]


def frozen_dtype_for(requested: str, precision: str, strategy: str, adapters_only: bool) -> torch.dtype | None:
    """The dtype `trainer.frozen_dtype` (`requested`) stores frozen linear weights in during training, None for as
    loaded: bf16 only where checkpoints hold the trained parameters alone (`adapters_only`), the run trains under bf16
    autocast (`precision`, resolved) and on one process (`strategy` none); auto = bf16 wherever it may."""
    if requested == "fp32" or not adapters_only:
        return None
    if precision != "bf16" or strategy != "none":
        if requested == "bf16":
            raise LmcraftError("trainer.frozen_dtype=bf16 needs bf16 autocast on one process (precision: bf16, "
                               f"strategy: none); this run has precision {precision}, strategy {strategy}")
        return None
    return torch.bfloat16


@contextmanager
def frozen_linears_in(model: nn.Module, dtype: torch.dtype) -> Iterator[int]:
    """Inside the block, the frozen floating-point weights and biases of `model`'s `nn.Linear` layers (those shared
    with an `nn.Embedding` excepted) are stored in `dtype`; yields the bytes this saves."""
    shared = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    kept: dict[int, tuple[nn.Parameter, torch.dtype]] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            for p in module.parameters(recurse=False):
                if not p.requires_grad and p.is_floating_point() and p.dtype != dtype and id(p) not in shared:
                    kept.setdefault(id(p), (p, p.dtype))
    saved = 0
    for p, _ in kept.values():
        saved += p.numel() * (p.element_size() - torch.finfo(dtype).bits // 8)
        p.data = p.data.to(dtype)
    try:
        yield saved
    finally:
        for p, original in kept.values():
            p.data = p.data.to(original)
