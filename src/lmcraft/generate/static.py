"""The static decode path: a fixed-shape KV cache and one decode step that `torch.compile` sees as one graph.

The eager path's cache hands attention the filled part of its buffers, `keys[:, :, :length]`, so every step has
a new shape. Here every decode step has the same shapes (gpt-fast style):

    cache     K, V: (B, kv_heads, C, D) per layer, C = capacity (prompt width + max_new_tokens, rounded up to a
              multiple of `BUCKET` so that nearby lengths share a compiled graph)
    step t    column i_t = P + t - 1 (a one-element tensor `index`, so its value is data, not shape):
              K[:, :, i_t] = k_t,  V[:, :, i_t] = v_t              (index_copy_)
              visible[:, i_t] = True                               (bool (B, C): prompt mask, then each new column)
              attention over all C columns with the explicit mask visible[:, None, None, :]  (B, 1, 1, C)

Masked columns get zero weight, so a row attends to exactly the keys the eager path gives it: the same tokens
(the logits may differ in the last bits, the softmax sums running over more, zero, terms). The backbone sees the
cache as C - 1 past columns plus the new one, the explicit mask deciding which are real.

`decode_step` is the step; `compiled_decode_step` is it under `torch.compile` (mode "default"), with the
persistent inductor cache and the eager fallback of `lmcraft.train.compile`. The model runs its reference modules
inside the compiled step (inductor fuses the pointwise work the eager fast path fuses by hand).

On CUDA a batch-1 step of a small model is a few hundred tiny kernels, and launching them from Python costs more
than running them. So the compiled step is captured once per run as a CUDA graph (`CudaGraphStep`): the run's
cache, mask, positions and index are the graph's fixed buffers (every step reads and moves them in place), the new
tokens are copied into one more fixed buffer, and each step is one `replay()`. The capture happens on the step
after the compiling one, so nothing compiles while capturing; a capture that fails is said and the run goes on
with the plain compiled step. torch.compile's own "reduce-overhead" mode is not used: it treats the cache, which
the step updates in place, as an input to copy or to re-record for.

`weights_fixed` (inference only: generate, chat, serve) lets the CPU step fold the weights into the graph as
constants (inductor `freezing`: prepacked matrices) and pick each matrix product's kernel by measuring inductor's
own C++ micro-kernels against oneDNN's (`max_autotune`). Measured on a 2-core AVX-512 EPYC (bf16, batch 1,
SmolLM2-135M's shapes): the LM head's matrix-vector product ran at 35 GB/s instead of 16, the whole decode at 70
tokens/s instead of 33, for a compile of ~100 s instead of ~40. A folded graph would keep stale weights if they
changed, so a model whose parameters moved after such a compile is refused (`check_weights_unchanged`).

`compile: auto` follows the training rule (`train.compile.should_compile`): compile when the steps left times the
measured time of the first (eager) step exceed `AMORTISE` times the expected compile time, which is 0 for a shape
already compiled in this process, the last measured compile time of this model and shape (kept in
`<cache>/compile/generate-<key>.json`), else `TYPICAL_COMPILE_S`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import weakref
from collections.abc import Callable
from dataclasses import asdict

import torch
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.layers import KVCache
from lmcraft.models.model import LanguageModel
from lmcraft.models.rope import RotaryEmbedding

__all__ = ["BUCKET", "CudaGraphStep", "StaticDecoder", "StaticKVCache", "check_weights_unchanged",
           "compiled_decode_step", "decode_step", "expected_compile_seconds", "record_compile_seconds",
           "static_capacity", "static_unsupported", "weights_version"]

log = logging.getLogger("lmcraft.generate")

BUCKET = 64


class StaticKVCache(KVCache):
    """A `KVCache` that, after `start_decoding()`, writes each step's keys/values at column `index` (a tensor) and
    returns the whole buffers; before it (the prefill) it fills columns 0..P-1 like the eager cache."""

    def __init__(self, cfg: ModelConfig, batch_size: int, capacity: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, batch_size, capacity, dtype, device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.decoding = False

    def start_decoding(self) -> None:
        """Switch to fixed-shape steps: the next token goes to column `length` (the prefill's end)."""
        self.index.fill_(self.length)
        self.decoding = True
        self.length = self.capacity - 1  # the backbone's view: every column is a key, the mask says which are real

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.decoding:
            return super().update(layer, k, v)
        self.keys[layer].index_copy_(2, self.index, k)
        self.values[layer].index_copy_(2, self.index, v)
        return self.keys[layer], self.values[layer]

    def advance(self, n: int) -> None:
        if not self.decoding:  # while decoding the step moves `index` (a tensor: the same graph every step)
            super().advance(n)


def static_capacity(width: int, max_new_tokens: int) -> int:
    """Cache columns for a prompt `width` wide and `max_new_tokens`, rounded up to a multiple of `BUCKET`."""
    need = width + max_new_tokens
    return -(-need // BUCKET) * BUCKET


def static_unsupported(model: nn.Module, capacity: int, has_prefix: bool) -> str | None:
    """Why `model` cannot decode on the static path (None when it can)."""
    if not isinstance(model, LanguageModel):
        return f"{type(model).__name__} is not a plain LanguageModel (adapters: merge them first)"
    cfg = model.config
    if has_prefix:
        return "prefix key/values (prefix tuning) are given"
    if any(cfg.layer_window(i) is not None and cfg.layer_window(i) < capacity for i in range(cfg.num_layers)):
        return "the model has sliding-window layers shorter than the cache"
    scaling = cfg.rope_scaling or {}
    if cfg.position == "rope" and scaling.get("rope_type", scaling.get("type")) == "dynamic" \
            and capacity > int(scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)):
        return "dynamic NTK RoPE past the trained length recomputes its table per length"
    return None


def decode_step(model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                visible: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) of `tokens` (B, 1) at `positions` (B, 1), written to column `cache.index`; then moves the
    index and the positions one on (in place: the inputs of the next step are the same tensors)."""
    visible.index_fill_(1, cache.index, True)
    logits = model(tokens, attention_mask=visible[:, None, None, :], position_ids=positions,
                   past_key_values=cache).logits[:, -1]
    cache.index.add_(1)
    positions.add_(1)
    return logits


_COMPILED: dict[tuple[str, bool], Callable[..., torch.Tensor]] = {}
_SHAPES_DONE: set[tuple] = set()
_FOLDED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def compiled_decode_step(device: torch.device, weights_fixed: bool = False) -> Callable[..., torch.Tensor]:
    """`decode_step` under torch.compile (one compiled function per device kind and `weights_fixed`; graphs per
    model and shape inside). See the module doc for the settings."""
    key = (device.type, weights_fixed and device.type == "cpu")
    if key not in _COMPILED:
        from lmcraft.train.compile import prepare_compile

        prepare_compile()
        if key[1]:  # freezing is read outside the compile's options: `StaticDecoder` patches it while compiling
            _COMPILED[key] = torch.compile(decode_step, dynamic=False, options={"max_autotune": True})
        else:
            _COMPILED[key] = torch.compile(decode_step, mode="default", dynamic=False)
    return _COMPILED[key]


def weights_version(model: nn.Module) -> int:
    """The sum of the parameters' version counters: any in-place update (an optimizer step) raises it."""
    return sum(p._version for p in model.parameters())


def check_weights_unchanged(model: nn.Module) -> None:
    """Refuse a model whose weights moved after a decode step was compiled with them folded in (stale constants)."""
    if model in _FOLDED and _FOLDED[model] != weights_version(model):
        from lmcraft.generate.core import GenerationError

        raise GenerationError("the model's weights changed after its decode step was compiled with weights_fixed "
                              "(weights folded into the graph); generate with weights_fixed=False while training")


def reserve_positions(model: nn.Module, capacity: int) -> None:
    """Size the RoPE tables for `capacity` positions before compiling (no data-dependent sizing in the graph)."""
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reserve(capacity)


def shape_key(model: nn.Module, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
              fixed: bool) -> tuple:
    """What one compiled graph is specific to: this model object, batch, capacity, dtype, device, weights_fixed."""
    return (id(model), batch, capacity, str(dtype), str(device), fixed)


def _record_key(model: LanguageModel, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                fixed: bool) -> list:
    return [asdict(model.config), batch, capacity, str(dtype), device.type] + (["fixed"] if fixed else [])


def expected_compile_seconds(model: LanguageModel, batch: int, capacity: int, dtype: torch.dtype,
                             device: torch.device, fixed: bool) -> tuple[float, str]:
    """(seconds a compile of this step is expected to take, where the number comes from)."""
    from lmcraft.train.compile import recorded_compile_seconds

    if shape_key(model, batch, capacity, dtype, device, fixed) in _SHAPES_DONE:
        return 0.0, "compiled earlier in this process"
    return recorded_compile_seconds("generate", _record_key(model, batch, capacity, dtype, device, fixed))


def record_compile_seconds(model: LanguageModel, batch: int, capacity: int, dtype: torch.dtype,
                           device: torch.device, fixed: bool, seconds: float) -> None:
    """Remember that this shape is compiled (in-process) and how long it took (on disk, for later runs)."""
    from lmcraft.train import compile as training_compile

    _SHAPES_DONE.add(shape_key(model, batch, capacity, dtype, device, fixed))
    training_compile.record_compile_seconds("generate", _record_key(model, batch, capacity, dtype, device, fixed),
                                            seconds)


def say_fallback(what: str, err: Exception, then: str) -> None:
    """Tell the user on stderr that `what` of the decode step failed and what decoding does instead."""
    print(f"lmcraft: {what} of the decode step failed ({type(err).__name__}: {err}); {then}", file=sys.stderr)


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    """(fn(), its wall seconds, synchronising CUDA so the time covers the work)."""
    start = time.perf_counter()
    out = fn()
    if out.device.type == "cuda":
        torch.cuda.synchronize(out.device)
    return out, time.perf_counter() - start


class CudaGraphStep:
    """A decode step replayed from one CUDA graph: the first call captures `step` with the run's fixed tensors (the
    tokens copied into a buffer of their own), every call copies its tokens in and replays. The logits returned are
    a copy: the graph's output buffer is overwritten by the next replay."""

    path = "static+compiled+cudagraph"

    def __init__(self, step: Callable[..., torch.Tensor]) -> None:
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.tokens: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, model: nn.Module, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticKVCache,
                 visible: torch.Tensor) -> torch.Tensor:
        if self.graph is None:
            self.tokens, self.graph = torch.empty_like(tokens), torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records the kernels; nothing runs until replay
                self.logits = self.step(model, self.tokens, positions, cache, visible)
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits.clone()


class StaticDecoder:
    """The decode steps of one run on the static cache: `decoder(tokens (B,)) -> logits (B, V)`.

    `compile` True: every step compiled (the first one compiles). False: eager, with the fast-decode modules
    (`fast_decoding`, entered on `stack`). "auto": the first step runs eager on the reference modules and is
    timed; then the rule of the module doc picks compiled or eager for the `remaining` steps. `path` says which ran.
    """

    def __init__(self, model: LanguageModel, cache: StaticKVCache, visible: torch.Tensor, positions: torch.Tensor,
                 compile: bool | str, remaining: int, install_fast: Callable[[], None],
                 weights_fixed: bool = False) -> None:
        self.model, self.cache, self.visible, self.positions = model, cache, visible, positions
        self.mode, self.remaining, self.install_fast = compile, remaining, install_fast
        self.fixed = weights_fixed and visible.device.type == "cpu"
        self.step: Callable[..., torch.Tensor] | None = None
        self.path = "static"
        self._shape = (visible.shape[0], visible.shape[1], cache.keys[0].dtype, visible.device, self.fixed)
        if self.fixed and compile is not False:
            check_weights_unchanged(model)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        args = (self.model, tokens[:, None], self.positions, self.cache, self.visible)
        if isinstance(self.step, CudaGraphStep) and self.step.graph is None:
            return self._capture(args)
        if self.step is not None:
            return self.step(*args)
        if self.mode is True:
            return self._compile_now(args)
        if self.mode is False:
            self._go_eager()
            return self.step(*args)
        logits, seconds = timed(lambda: decode_step(*args))  # "auto": one eager step to know the step time
        from lmcraft.train.compile import should_compile

        expected, source = expected_compile_seconds(self.model, *self._shape)
        left = self.remaining - 1
        if should_compile("auto", left, seconds, expected):
            log.info("compile auto: %d steps x %.4f s > 20 x %.1f s (%s): compiling the decode step",
                     left, seconds, expected, source)
            self.mode = True
        else:
            log.info("compile auto: %d steps x %.4f s <= 20 x %.1f s (%s): decoding eager", left, seconds, expected,
                     source)
            self._go_eager()
        return logits

    def _go_eager(self) -> None:
        self.install_fast()
        self.step = decode_step

    def _compile_now(self, args: tuple) -> torch.Tensor:
        reserve_positions(self.model, self.visible.shape[1])
        from torch._inductor import config as inductor_config

        compiled = compiled_decode_step(self.visible.device, self.fixed)
        try:
            with inductor_config.patch(freezing=True) if self.fixed else contextlib.nullcontext():
                logits, seconds = timed(lambda: compiled(*args))
        except Exception as err:  # noqa: BLE001 - any compiler failure: say so and decode eager
            say_fallback("torch.compile", err, "decoding eager")
            self._go_eager()
            return self.step(*args)
        record_compile_seconds(self.model, *self._shape, seconds)
        if self.fixed:
            _FOLDED[self.model] = weights_version(self.model)
        log.info("decode step compiled in %.1f s", seconds)
        self.step, self.path = compiled, "static+compiled"
        if self.visible.device.type == "cuda":
            self.step = CudaGraphStep(compiled)
        return logits

    def _capture(self, args: tuple) -> torch.Tensor:
        """This step through a new CUDA graph of the compiled step; the plain compiled step if capturing fails."""
        graph_step = self.step
        try:
            logits = graph_step(*args)
        except Exception as err:  # noqa: BLE001 - any capture failure: say so and go on without the graph
            say_fallback("CUDA graph capture", err, "decoding with the compiled step")
            self.step = graph_step.step
            return self.step(*args)
        self.path = graph_step.path
        return logits
