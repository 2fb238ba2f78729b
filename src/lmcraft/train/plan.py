"""The memory planner: the predicted peak memory of a training step, split by what holds it, and advice.

    peak = runtime + weights + gradients + optimizer state + activations + LM-head loss (logits) + extras

- weights: every parameter and buffer of the model as stored (frozen ones too);
- gradients: the trainable parameters' size (gradients are freed after each step, `zero_grad(set_to_none=True)`);
- optimizer state: AdamW's two moments in the parameters' dtype (2 x trainable bytes), 8-bit AdamW's one byte each
  plus an fp32 absmax per 256 values;
- activations: what autograd keeps for the backward pass, measured, not guessed: one forward of a 64-token row under
  `saved_tensors_hooks` counts the bytes of the tensors saved per token (parameters excluded), which scales linearly
  to the largest batch (B x T tokens; SDPA keeps O(T) per token row). With activation checkpointing the kept part is
  each block's input (L x tokens x H) plus one block's (or sub-layer's) activations while it is recomputed;
- LM-head loss: full logits keep the (B, T, V) logits, their fp32 log-softmax and, in the backward pass, its
  gradient (3 B T V x 4 bytes in fp32; the Trainer's measured peak on CPU, 2 x 512 tokens: 0.98 of the plan at 34M
  parameters and at SmolLM2-135M's shape); the chunked loss keeps dL/dh
  (B T H) and two chunks of rows x V fp32 logits (plus dL/dW in fp32 when the head trains);
- runtime: on CPU the process's resident memory besides the weights when the plan is made (libraries, allocator);
- extras: what a stage holds besides the trained model (a frozen reference or reward model, old-policy log-probs).

A model whose parameters are on the meta device (`lmcraft plan`: no weights loaded) is counted from its shapes and
dtypes; its activations are measured on stand-ins of 1 and 2 layers with real (zero) parameters
(`stand_in_activations`): per token, a + L x b.

The trainer prints this table before step 0 and, with `trainer.memory_limit`, stops there when the peak exceeds it.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["MemoryPlan", "activation_bytes_per_token", "activation_profile", "can_plan", "item_lengths",
           "largest_batch_shape", "longest_batch", "materialise", "plan_memory", "reset_peak_resident",
           "resident_bytes", "stand_in_activations"]

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
    extras: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes): reference copies, old log-probs
    checkpointing: str = "none"
    chunked: bool = False
    optimizer_name: str = "adamw"
    optimizer_8bit: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return (self.runtime + self.weights + self.gradients + self.optimizer + self.activations + self.logits
                + sum(n for _, n in self.extras))

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
        rows += self.extras
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


def item_lengths(dataset: Any, scan_limit: int = 50_000) -> list[int] | None:
    """Token count of every item (items with `input_ids`, as objects, dicts or lists of them for packed rows), or
    None when some item says nothing of its length or the dataset has more than `scan_limit` items."""
    n = len(dataset)
    if n > scan_limit:
        return None
    lengths = [_length(dataset[i]) for i in range(n)]
    return lengths if all(x is not None for x in lengths) else None  # type: ignore[return-value]


def longest_batch(dataset: Any, batch_size: int, scan_limit: int = 50_000) -> list[int] | None:
    """Indices of the `batch_size` longest items (longest first; ties by index), or None when lengths are unknown
    (see `item_lengths`)."""
    lengths = item_lengths(dataset, scan_limit)
    if not lengths:
        return None
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[:batch_size]


def largest_batch_shape(dataset: Any, batch_size: int, collate_fn: Any = None, scan_limit: int = 50_000
                        ) -> tuple[int, int] | None:
    """(rows, tokens) of the largest micro-batch: `batch_size` rows of the longest item (see `item_lengths`); for
    datasets whose items say nothing of their length, or larger than `scan_limit`, the shape of the first batch;
    None when the batches are made during training (GRPO's rollouts: their length is not known before sampling)."""
    lengths = item_lengths(dataset, scan_limit)
    if lengths:
        return batch_size, max(lengths)
    from torch.utils.data import default_collate

    n = len(dataset)
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


def activation_profile(model: nn.Module, checkpointing: str = "none") -> dict[str, float]:
    """Activation bytes per token of `model` without checkpointing ("none") and, for "attention"/"mlp", with it;
    the model's own setting is restored."""
    backbone = _language_model(model).model
    mode = backbone.checkpointing
    profile = {}
    try:
        for m in dict.fromkeys(("none", checkpointing if checkpointing in ("attention", "mlp") else "none")):
            backbone.set_checkpointing(m)
            profile[m] = activation_bytes_per_token(model)
    finally:
        backbone.set_checkpointing(mode)
    return profile


def materialise(model: nn.Module) -> nn.Module:
    """Give every meta parameter of `model` zero-filled CPU storage of its shape and dtype, in place (tied parameters
    stay tied; buffers are kept as they are)."""
    done: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_meta:
                if id(p) not in done:
                    done[id(p)] = nn.Parameter(torch.zeros(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
                module._parameters[name] = done[id(p)]
    return model


def stand_in_activations(build: Callable[[int], nn.Module], num_layers: int, checkpointing: str = "none"
                         ) -> dict[str, float]:
    """`activation_profile` of a model of `num_layers` layers, from stand-ins of 1 and 2 layers built by
    `build(k)` (parameters on meta are materialised): per token a + L b, with b = m(2) - m(1), a = m(1) - b.
    Every layer is taken to keep what the stand-ins' layers keep (true of one block type; for mixed
    full/sliding layers the probe's 64 tokens sit inside every window)."""
    ones, twos = (activation_profile(materialise(build(k)), checkpointing) for k in (1, 2))
    gc.collect()  # the stand-ins are gone before the runtime is read
    return {m: ones[m] + (num_layers - 1) * (twos[m] - ones[m]) for m in ones}


def plan_memory(model: nn.Module, batch_shape: tuple[int, int], checkpointing: str = "none",
                chunked_loss: bool | str = "auto", optimizer: str = "adamw", extras: Sequence[tuple[str, int]] = (),
                per_token: dict[str, float] | None = None, runtime: int | None = None) -> MemoryPlan:
    """The `MemoryPlan` of training `model` (a LanguageModel or PeftModel) on batches of `batch_shape`.

    per_token: the `activation_profile` to use (default: measured on `model`; give `stand_in_activations` for a
    model on the meta device, with the `runtime` read before the stand-ins ran: their freed memory may stay resident);
    extras: (what, bytes) the stage holds besides the model."""
    from lmcraft.objectives.lm_head import default_rows, lm_head_weight

    lm = _language_model(model)
    cfg = lm.config
    uniq = {id(p): p for p in model.parameters()}.values()
    tensors = [*uniq, *model.buffers()]
    weights = sum(t.numel() * t.element_size() for t in tensors)
    resident = sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)
    trainable = [p for p in uniq if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)
    adamw = 2 * grads
    adamw8 = sum(2 * p.numel() + 8 * -(-p.numel() // 256) for p in trainable)
    b, t = batch_shape
    tokens = b * t
    profile = per_token if per_token is not None else activation_profile(model, checkpointing)
    es = next(iter(uniq)).element_size()
    layers = cfg.num_layers
    plain = int(profile["none"] * tokens)
    inputs = layers * tokens * cfg.hidden_size * es  # each block's (or sub-layer's) kept input
    full = inputs + plain // layers
    if checkpointing == "none":
        activations = plain
    elif checkpointing == "full":
        activations = full
    else:
        saved = plain - int(profile[checkpointing] * tokens)
        activations = plain - saved + inputs + saved // layers
    v = cfg.vocab_size
    head_w = lm_head_weight(model)
    logits_full = 3 * tokens * v * 4 + (tokens * v * es if es != 4 else 0)
    logits_chunked = tokens * cfg.hidden_size * es + 2 * min(default_rows(v), tokens) * v * 4
    if head_w is not None and head_w.requires_grad:
        logits_chunked += head_w.numel() * 4
    chunked = head_w is not None and chunked_loss is not False
    device = next(iter(uniq)).device.type
    if runtime is None:
        runtime = max(0, resident_bytes() - resident) if device in ("cpu", "meta") else 0
    return MemoryPlan((b, t), weights, grads, adamw8 if optimizer == "adamw8bit" else adamw, activations, plain, full,
                      logits_chunked if chunked else logits_full, logits_chunked, logits_full, runtime,
                      list(extras), checkpointing, chunked, optimizer, adamw8, [])


def resident_bytes(field: str = "VmRSS:") -> int:
    """This process's resident memory (`VmRSS:`) or its peak (`VmHWM:`) from Linux /proc; 0 elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))
    except (OSError, StopIteration):
        return 0


def reset_peak_resident() -> None:
    """Restart this process's peak resident memory (`VmHWM:`; Linux, a no-op elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
