"""Depth of every parameter, and what the fine-tuning best practices do with it.

`layer_of(name)` maps a parameter of a lmcraft model (plain or wrapped by lmcraft.peft, whose names add
`base_model.`, `.base_layer`, `.lora_A.default`, ...) to a depth: 0 = embeddings, i + 1 = transformer block
i, None = above the blocks (final norm, head, prompt/prefix providers). With L blocks:

- LLRD (`transformer_param_groups`): a parameter at depth d trains at lr * decay^(L - d); depth None keeps lr, and the
  head (`is_head`) trains at `head_lr` when one is given.
- `freeze_parameters`: the embeddings and/or blocks 0..N-1 stop training (`requires_grad = False`).
- `GradualUnfreezing`: stage k = step // every; at stage k the parameters above the blocks and the top k
  blocks train, the rest of the (initially trainable) parameters wait; the embeddings unfreeze last, at
  stage L + 1. When nothing above the blocks trains (LoRA under an LM head), stages start at 1, so the
  top block trains from the first step. Parameters frozen for good (by `freeze_parameters` or PEFT) are
  never touched.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from torch import nn

from lmcraft.train import Callback
from lmcraft.train.optim import param_groups

__all__ = ["GradualUnfreezing", "freeze_parameters", "is_head", "layer_of", "transformer_param_groups",
           "unfrozen_depths"]

_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EMBED = re.compile(r"(?:^|\.)model\.(?:embed_tokens|embed_positions|embed_types|embed_norm|embed_proj)\.")
_HEAD = re.compile(r"(?:^|\.)head\.")


def layer_of(name: str) -> int | None:
    """0 for embeddings, i + 1 for a parameter inside block i, None otherwise (see the module docstring)."""
    m = _BLOCK.search(name)
    if m:
        return int(m.group(1)) + 1
    return 0 if _EMBED.search(name) else None


def is_head(name: str) -> bool:
    """A parameter of the task head (also its trainable copy under PEFT's `modules_to_save`)."""
    return _HEAD.search(name) is not None and _BLOCK.search(name) is None


def transformer_param_groups(model: nn.Module, *, lr: float, weight_decay: float, num_layers: int,
                             layer_lr_decay: float | None = None,
                             head_lr: float | None = None) -> list[dict[str, Any]]:
    """`train.optim.param_groups` with depths and head read from lmcraft's parameter names (`layer_of`,
    `is_head`): no decay on biases/norms/embeddings, LLRD by depth, the head at `head_lr`."""
    return param_groups(model, lr=lr, weight_decay=weight_decay, layer_lr_decay=layer_lr_decay, head_lr=head_lr,
                              layer_of=layer_of if layer_lr_decay is not None else None,
                              is_head=is_head if head_lr is not None else None, num_layers=num_layers)


def freeze_parameters(model: nn.Module, embeddings: bool = False, bottom_layers: int = 0) -> list[str]:
    """Stop training the embeddings and/or blocks 0..bottom_layers-1; returns the names frozen."""
    frozen = []
    for name, p in model.named_parameters():
        depth = layer_of(name)
        if p.requires_grad and depth is not None and ((depth == 0 and embeddings) or 1 <= depth <= bottom_layers):
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


def unfrozen_depths(stage: int, num_layers: int) -> set[int]:
    """Depths training at gradual-unfreezing stage `stage`: the top `stage` blocks, then (stage > L) embeddings."""
    top = {num_layers - i for i in range(min(stage, num_layers))}
    return top | ({0} if stage > num_layers else set())


class GradualUnfreezing(Callback):
    """Top-down unfreezing every `every_steps` optimizer steps, over the parameters trainable at creation.

    Stateless across resumes: the stage is a function of the step. Frozen parameters get no gradient (and
    AdamW skips them), so they keep their values exactly until their stage comes.
    """

    def __init__(self, model: nn.Module, num_layers: int, every_steps: int,
                 log: Callable[[str], None] | None = None) -> None:
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}")
        self.params = [(layer_of(n), p) for n, p in model.named_parameters() if p.requires_grad]
        self.num_layers, self.every = num_layers, every_steps
        self.first_stage = 0 if any(depth is None for depth, _ in self.params) else 1
        self.log = log
        self.stage: int | None = None

    def apply(self, step: int) -> None:
        stage = step // self.every + self.first_stage
        if stage == self.stage:
            return
        self.stage = stage
        depths = unfrozen_depths(stage, self.num_layers)
        for depth, p in self.params:
            p.requires_grad_(depth is None or depth in depths)
        if self.log is not None:
            self.log(f"gradual unfreezing: step {step}, stage {stage}: training depths {sorted(depths)} "
                     "and everything above the blocks")

    def on_train_begin(self, trainer: Any) -> None:
        self.apply(trainer.state.step)

    def on_step_begin(self, trainer: Any) -> None:
        self.apply(trainer.state.step)
