"""The memory planner: the predicted peak memory of a training step, split by what holds it, and advice.

    peak = runtime + weights + gradients + optimizer state + activations + LM-head loss (logits) + reference copies

- weights: every parameter and buffer of the model as stored (frozen ones too);
- gradients: the trainable parameters' size (gradients are freed after each step, `zero_grad(set_to_none=True)`);
- optimizer state: AdamW's two moments in the parameters' dtype (2 x trainable bytes), 8-bit AdamW's one byte each
  plus an fp32 absmax per 256 values;
- activations: what autograd keeps for the backward pass, measured, not guessed: one forward of a 64-token row under
  `saved_tensors_hooks` counts the bytes of the tensors saved per token (parameters excluded), which scales linearly
  to the largest batch (B x T tokens; SDPA keeps O(T) per token row). With activation checkpointing the kept part is
  each block's input (L x tokens x H) plus one block's (or sub-layer's) activations while it is recomputed;
- LM-head loss: full logits keep the (B, T, V) logits, their fp32 log-softmax and, in the backward pass, its
  gradient (3 B T V x 4 bytes in fp32); the chunked loss keeps dL/dh (B T H) and two chunks of rows x V fp32 logits
  (plus dL/dW in fp32 when the head trains);
- runtime: on CPU the process's resident memory besides the weights when the plan is made (libraries, allocator).

The trainer prints this table before step 0 and, with `trainer.memory_limit`, stops there when the peak exceeds it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["MemoryPlan", "activation_bytes_per_token", "can_plan", "largest_batch_shape", "plan_memory"]

PROBE_TOKENS = 64


@dataclass
class MemoryPlan:
    """Predicted bytes of one training step (see the module docstring)."""

    batch_shape: tuple[int, int]
    weights: int
    gradients: int
    optimizer: int
    activations: int  # with the run's checkpointing setting
    activations_plain: int  # without checkpointing
    activations_full: int  # with full checkpointing
    logits: int
    logits_chunked: int
    logits_full: int
    runtime: int = 0
    reference: int = 0
    checkpointing: str = "none"
    chunked: bool = False
    optimizer_name: str = "adamw"
    optimizer_8bit: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return (self.runtime + self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + self.reference)

    def advice(self, limit: int) -> list[str]:
        """Which switch saves how much, biggest first, when the peak exceeds `limit`."""
        if self.peak <= limit:
            return []
        tips = []
        if self.checkpointing != "full" and self.activations > self.activations_full:
            tips.append((self.activations - self.activations_full, "trainer.activation_checkpointing=full"))
        if not self.chunked and self.logits > self.logits_chunked:
            tips.append((self.logits - self.logits_chunked, "trainer.chunked_loss=auto (a plain LM head)"))
        if self.optimizer_name == "adamw" and self.optimizer > self.optimizer_8bit:
            tips.append((self.optimizer - self.optimizer_8bit, "trainer.optimizer=adamw8bit"))
        b, t = self.batch_shape
        if b > 1:
            per_row = (self.activations + self.logits) // b
            tips.append((per_row * (b - 1), f"trainer.micro_batch_size=1 (with grad_accum x{b} for the same batch)"))
        return [f"  {_gib(saved)} less with {switch}" for saved, switch in sorted(tips, reverse=True)]

    def table(self, limit: int | None = None) -> str:
        b, t = self.batch_shape
        rows = [("runtime (process)", self.runtime), ("weights", self.weights), ("gradients", self.gradients),
                (f"optimizer state ({self.optimizer_name})", self.optimizer),
                (f"activations (checkpointing {self.checkpointing})", self.activations),
                (f"LM-head loss ({'chunked' if self.chunked else 'full logits'})", self.logits)]
        if self.reference:
            rows.append(("reference/old policies", self.reference))
        lines = [f"memory plan for the largest batch {b} x {t} tokens:"]
        lines += [f"  {name:<40} {_gib(n):>11}" for name, n in rows]
        lines.append(f"  {'predicted peak':<40} {_gib(self.peak):>11}"
                     + (f"   (limit {_gib(limit)})" if limit is not None else ""))
        lines.append(f"  activations without / with full checkpointing: {_gib(self.activations_plain)} / "
                     f"{_gib(self.activations_full)}")
        lines.append(f"  LM-head loss with full logits / chunked: {_gib(self.logits_full)} / "
                     f"{_gib(self.logits_chunked)}")
        if limit is not None and self.peak > limit:
            lines.append(f"does not fit {_gib(limit)}; options:")
            lines += self.advice(limit) or ["  a smaller model, shorter sequences (data.max_length) or more memory"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def activation_bytes_per_token(model: nn.Module) -> float:
    """Bytes autograd keeps per token in one forward of `model` (parameters excluded), measured on one row of
    `PROBE_TOKENS` random tokens with the model's current checkpointing setting."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and t.device.type != "meta":
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    first = next(model.parameters())
    lm = _language_model(model)
    # learned positions end at max_position_embeddings, and prompt tuning puts virtual tokens before the row
    length = min(PROBE_TOKENS, lm.config.max_position_embeddings // 2)
    vocab = lm.model.embed_tokens.num_embeddings
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(first.device)
    was_training = model.training
    model.train()
    devices = [first.device] if first.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # dropout draws leave the run's RNG as it was
        out = model(input_ids=ids, logits_to_keep=1)
    del out
    model.train(was_training)
    return sum(seen.values()) / length


def _language_model(model: nn.Module) -> Any:
    inner = _unwrap(model)
    return getattr(inner, "base_model", inner)


def largest_batch_shape(dataset: Any, batch_size: int, collate_fn: Any = None, scan_limit: int = 50_000
                        ) -> tuple[int, int] | None:
    """(rows, tokens) of the largest micro-batch: `batch_size` rows of the longest item (items with `input_ids`, as
    objects, dicts or lists of them for packed rows); for datasets whose items say nothing of their length, or larger
    than `scan_limit`, the shape of the first batch; None when the batches are made during training (GRPO's
    rollouts: their length is not known before sampling)."""
    n = len(dataset)
    lengths = [_length(dataset[i]) for i in range(n)] if n <= scan_limit else [None]
    if lengths and all(x is not None for x in lengths):
        return batch_size, max(lengths)  # type: ignore[type-var]
    from torch.utils.data import default_collate

    if n == 0 or collate_fn is False:
        return None
    batch = (collate_fn or default_collate)([dataset[i] for i in range(min(batch_size, n))])
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch[0]
    return (batch_size, int(ids.shape[-1])) if isinstance(ids, torch.Tensor) else None


def _length(item: Any) -> int | None:
    ids = item.get("input_ids") if isinstance(item, dict) else getattr(item, "input_ids", None)
    if ids is not None:
        return len(ids)
    if isinstance(item, list | tuple) and item and all(_length(x) is not None for x in item):
        return sum(_length(x) for x in item)  # type: ignore[misc]
    return None


def can_plan(model: nn.Module) -> bool:
    """Whether `model` is (or wraps) a `LanguageModel`, whose parts the planner knows."""
    from lmcraft.models.model import LanguageModel

    return isinstance(_language_model(model), LanguageModel)


def plan_memory(model: nn.Module, batch_shape: tuple[int, int], checkpointing: str = "none",
                chunked_loss: bool | str = "auto", optimizer: str = "adamw", reference_bytes: int = 0) -> MemoryPlan:
    """The `MemoryPlan` of training `model` (a LanguageModel or PeftModel) on batches of `batch_shape`."""
    from lmcraft.objectives.lm_head import default_rows, lm_head_weight

    lm = _language_model(model)
    cfg = lm.config
    uniq = {id(p): p for p in model.parameters()}.values()
    weights = sum(p.numel() * p.element_size() for p in uniq) + sum(b.numel() * b.element_size()
                                                                    for b in model.buffers())
    trainable = [p for p in uniq if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    adamw = 2 * grads
    adamw8 = sum(2 * p.numel() + 8 * -(-p.numel() // 256) for p in trainable)
    b, t = batch_shape
    tokens = b * t
    backbone = lm.model
    mode = backbone.checkpointing
    try:
        backbone.set_checkpointing("none")
        per_token_plain = activation_bytes_per_token(model)
        if checkpointing in ("attention", "mlp"):
            backbone.set_checkpointing(checkpointing)
            per_token_partial = activation_bytes_per_token(model)
    finally:
        backbone.set_checkpointing(mode)
    es = next(iter(uniq)).element_size()
    layers = cfg.num_layers
    plain = int(per_token_plain * tokens)
    inputs = layers * tokens * cfg.hidden_size * es  # each block's (or sub-layer's) kept input
    full = inputs + plain // layers
    if checkpointing == "none":
        activations = plain
    elif checkpointing == "full":
        activations = full
    else:
        saved = plain - int(per_token_partial * tokens)
        activations = plain - saved + inputs + saved // layers
    v = cfg.vocab_size
    head_w = lm_head_weight(model)
    logits_full = 3 * tokens * v * 4 + (tokens * v * es if es != 4 else 0)
    logits_chunked = tokens * cfg.hidden_size * es + 2 * min(default_rows(v), tokens) * v * 4
    if head_w is not None and head_w.requires_grad:
        logits_chunked += head_w.numel() * 4
    chunked = head_w is not None and chunked_loss is not False
    runtime = 0
    notes = []
    if next(iter(uniq)).device.type == "cpu":
        runtime = max(0, _resident_bytes() - weights)
    return MemoryPlan((b, t), weights, grads, adamw8 if optimizer == "adamw8bit" else adamw, activations, plain, full,
                      logits_chunked if chunked else logits_full, logits_chunked, logits_full, runtime,
                      reference_bytes, checkpointing, chunked, optimizer, adamw8, notes)


def _resident_bytes() -> int:
    """This process's resident memory (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0
