"""Autoregressive generation with a pre-allocated KV cache.

For prompts x_1..x_P (a batch, left-padded to a common length P):

    prefill:  one forward over all P positions fills the cache; logits only for the last position
    decode:   y_t = choose(logits_t);  logits_{t+1} = model(y_t | cache)      t = 1..max_new_tokens

Left padding keeps every row's last prompt token in the same column, so a single decode step serves
the whole batch. Padded columns are masked out of attention, and position ids count real tokens only
(a row with p pad columns starts at position 0 in column p), so each row computes exactly what it
would alone. A row finishes at an end-of-sequence token, a stop string (needs the tokenizer) or
`max_new_tokens`; generation ends when every row has finished.

The cache holds `P + max_new_tokens` positions from the start (no reallocation), the prefill computes
logits for one position only, and each decode step runs one forward and one `tolist()`. During a run the
decode fast path of `fast_decode.py` is installed (single-token attention; q/k/v and gate/up weights of plain
linear layers held stacked, one matrix product each instead of three and two; `fuse=False` saves that memory).

`cache="static"` or `compile` (True/"auto") decodes on the fixed-shape cache of `static.py`, where one decode step
has the same shapes at every position and `torch.compile` compiles it once (`compile: auto` compiles only when
the run amortises it). Models it does not cover (adapters, prefix tuning, short sliding windows) decode on the
path above, with a log line saying why.

The model may also be a llama.cpp model (`llamacpp_backend.LlamaCppModel`): then its `prefill`/`step` give the
logits (each row an unpadded llama.cpp sequence) and everything else, token choice and stop rules, is the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lmcraft.data.collate import pad_with_mask
from lmcraft.errors import ConfigError, LmcraftError
from lmcraft.generate.fast_decode import fast_decoding
from lmcraft.generate.sampling import TokenChooser
from lmcraft.generate.static import StaticDecoder, StaticKVCache, static_capacity, static_unsupported
from lmcraft.generate.streaming import Streamer, TextTracker, decode_continuation
from lmcraft.generation_settings import GenerationSettings, Sampling, SamplingKnobs
from lmcraft.models.config import ModelConfig
from lmcraft.models.layers import KVCache
from lmcraft.models.model import Prefix
from lmcraft.train.compile import eager_forward

log = logging.getLogger("lmcraft.generate")

COMPILE_MODES = (False, True, "auto")
CACHE_KINDS = ("dynamic", "static")

class GenerationError(LmcraftError):
    """Generation cannot run with these inputs (empty prompt, too long for the model, not a decoder)."""


@dataclass
class GenerationConfig:
    """How to pick tokens and when to stop.

    `do_sample=False` (or `temperature=0`) is greedy decoding. `eos_token_ids=None` uses the model config's
    `eos_token_id` (one id or a list); `()` disables EOS stopping. Stop strings need a tokenizer; the
    returned text ends right before the stop string. `seed` makes sampling reproducible. `weights_fixed`: the
    weights never change while this model generates (inference only, not inside training), so a compiled CPU
    decode step may fold them into its graph (`generate.static`; about 2x faster at batch 1, 2x the compile time).
    """

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    eos_token_ids: Sequence[int] | None = None
    stop_strings: Sequence[str] = ()
    pad_token_id: int | None = None
    seed: int | None = None
    compile: bool | str = False
    cache: str = "dynamic"
    weights_fixed: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0"),
            (self.temperature >= 0, "temperature", ">= 0 (0 means greedy)"),
            (self.top_k >= 0, "top_k", "an integer >= 0 (0 turns it off)"),
            (0 < self.top_p <= 1, "top_p", "in (0, 1] (1 turns it off)"),
            (0 <= self.min_p < 1, "min_p", "in [0, 1) (0 turns it off)"),
            (self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 turns it off)"),
        ]
        for ok, name, expected in checks:
            if not ok:
                raise ConfigError(
                    f"generation setting {name}={getattr(self, name)!r} is out of range: expected {expected}."
                )
        if self.compile not in COMPILE_MODES or self.cache not in CACHE_KINDS:
            raise ConfigError(f"generation setting compile={self.compile!r} / cache={self.cache!r}: expected compile "
                              "true, false or 'auto' and cache 'dynamic' or 'static'.")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def sampled_by(cls, max_new_tokens: int, sampling: SamplingKnobs | None, **fixed: Any) -> GenerationConfig:
        """Greedy when `sampling` is None, else sampled with its temperature, top-k and top-p; `fixed` adds the
        caller's other fields (seed, eos/pad ids, stop strings, compile)."""
        knobs = {} if sampling is None else {"do_sample": True, "temperature": sampling.temperature,
                                             "top_k": sampling.top_k, "top_p": sampling.top_p}
        return cls(max_new_tokens=max_new_tokens, **knobs, **fixed)

    @classmethod
    def from_settings(cls, settings: GenerationSettings, **fixed: Any) -> GenerationConfig:
        """The config of a stage's generation section (`lmcraft.generation_settings`): greedy for
        `GenerationSettings`, sampled for `SamplingSettings` (temperature 0 is greedy too)."""
        sampling = settings if isinstance(settings, Sampling) else None
        return cls.sampled_by(settings.max_new_tokens, sampling, compile=settings.compile, **fixed)


@dataclass
class GenerationResult:
    """New tokens per row (the EOS token that ended a row included), why each row stopped, and timings."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop_string" or "length"
    prompt_lengths: list[int]
    elapsed_s: float
    prefill_s: float
    texts: list[str] | None = None  # decoded new text per row when a tokenizer was given (stop string cut)
    path: str = "dynamic"  # the decode path that ran: "dynamic", "static" or "static+compiled"

    @property
    def num_new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged prompts -> (input_ids, attention_mask), both (B, P), padded on the left."""
    return pad_with_mask(prompts, pad_id, side="left")


def _eos_ids(config: GenerationConfig, model: nn.Module) -> frozenset[int]:
    if config.eos_token_ids is not None:
        return frozenset(int(i) for i in config.eos_token_ids)
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([int(eos)] if isinstance(eos, int) else [int(i) for i in eos])


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")


class Generation:
    """One generation run. Iterate it to stream: each step yields one entry per row (the new token id,
    or None for a row that had already finished); `result()` afterwards returns the `GenerationResult`.
    `generate()` is the non-streaming wrapper.
    """

    def __init__(
        self,
        model: nn.Module,
        prompts: torch.Tensor | Sequence[Sequence[int]],
        config: GenerationConfig | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        tokenizer: Any = None,
        prefix: Prefix | None = None,
        fuse: bool = True,
    ) -> None:
        self.model = model
        self.fuse = fuse
        self.config = config or GenerationConfig()
        self.tokenizer = tokenizer
        self.prefix = prefix
        cfg = getattr(model, "config", None)
        if cfg is not None and not getattr(cfg, "is_causal", True):
            raise GenerationError(f"generation needs a decoder; this model's arch is {cfg.arch!r}.")
        if self.config.stop_strings and tokenizer is None:
            raise GenerationError("stop strings need the tokenizer: pass tokenizer= to generate().")
        self.eos = _eos_ids(self.config, model)
        self.input_ids, self.attention_mask = self._batch(prompts, attention_mask)
        rows = self.input_ids.shape[0]
        width = self.input_ids.shape[1]
        self.prompt_lengths = [width] * rows if self.attention_mask is None else self.attention_mask.sum(-1).tolist()
        self._check_length(cfg)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.finish_reasons: list[str | None] = [None] * rows
        self.trackers: list[TextTracker] | None = None
        if self.config.stop_strings:
            contexts = self._prompt_contexts()
            self.trackers = [TextTracker(tokenizer, self.config.stop_strings, c) for c in contexts]
        self.elapsed_s = self.prefill_s = 0.0
        self.path = "dynamic"
        self._done = False

    # ----------------------------------------------------------------------------------------- inputs
    def _batch(
        self, prompts: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        device = _model_device(self.model)
        if isinstance(prompts, torch.Tensor):
            ids = prompts if prompts.dim() == 2 else prompts[None]
            mask = attention_mask
            if mask is not None and ((mask[:, 1:] < mask[:, :-1]).any() or (mask.sum(-1) == 0).any()):
                raise GenerationError(
                    "the attention mask must be left padding (0...0 1...1) with at least one real token per row."
                )
        else:
            prompts = [list(p) for p in prompts]
            if not prompts:
                raise GenerationError("no prompts given.")
            for i, p in enumerate(prompts):
                if not p:
                    raise GenerationError(f"prompt {i} has no tokens; generation needs at least one (e.g. BOS).")
            pad = self.config.pad_token_id if self.config.pad_token_id is not None else 0
            ids, mask = left_pad(prompts, pad)
        if ids.shape[1] == 0:
            raise GenerationError("the prompt has no tokens; generation needs at least one (e.g. BOS).")
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: the model's fast unmasked attention paths apply
        return ids.to(device), None if mask is None else mask.to(device).long()

    def _check_length(self, cfg: ModelConfig | None) -> None:
        total = self.input_ids.shape[1] + self.config.max_new_tokens
        if cfg is not None and getattr(cfg, "position", "rope") == "learned" and total > cfg.max_position_embeddings:
            raise GenerationError(
                f"prompt ({self.input_ids.shape[1]} tokens) + max_new_tokens ({self.config.max_new_tokens}) = {total} "
                f"exceeds this model's {cfg.max_position_embeddings} learned positions; shorten one of them."
            )

    def _prompt_contexts(self) -> list[list[int]]:
        width = self.input_ids.shape[1]
        return [self.input_ids[r, width - n:].tolist() for r, n in enumerate(self.prompt_lengths)]

    # ----------------------------------------------------------------------------------------- decoding
    def _chooser(self) -> TokenChooser:
        c = self.config
        generator = None
        if c.seed is not None:
            generator = torch.Generator(device=self.input_ids.device).manual_seed(c.seed)
        return TokenChooser(
            greedy=c.greedy, temperature=c.temperature, top_k=c.top_k, top_p=c.top_p, min_p=c.min_p,
            repetition_penalty=c.repetition_penalty, generator=generator,
        )

    def _record(self, row_tokens: list[int]) -> list[int | None]:
        """Append each unfinished row's token, mark rows that end here; return this step's entries."""
        step: list[int | None] = []
        for row, token in enumerate(row_tokens):
            if self.finish_reasons[row] is not None:
                step.append(None)
                continue
            self.tokens[row].append(token)
            step.append(token)
            if token in self.eos:
                self.finish_reasons[row] = "eos"
            elif self.trackers is not None:
                self.trackers[row].push(token)
                if self.trackers[row].stopped:
                    self.finish_reasons[row] = "stop_string"
        return step

    def __iter__(self) -> Iterator[list[int | None]]:
        if self._done:
            raise RuntimeError("a Generation runs once; create a new one to generate again")
        self._done = True
        model = self.model
        torch_model = isinstance(model, nn.Module)  # else llama.cpp: no torch state to set
        was_training = torch_model and model.training
        if torch_model:
            model.eval()
        start = time.perf_counter()
        try:
            with ExitStack() as stack:
                if torch_model:
                    stack.enter_context(eager_forward(model))
                yield from self._decode(stack)
        finally:
            self.elapsed_s = time.perf_counter() - start
            if torch_model:
                model.train(was_training)

    def _static_capacity(self) -> int | None:
        """The static cache's capacity when this run decodes on it, else None (with the reason logged)."""
        c = self.config
        if c.compile is False and c.cache == "dynamic":
            return None
        capacity = static_capacity(self.input_ids.shape[1], c.max_new_tokens)
        why = static_unsupported(self.model, capacity, self.prefix is not None)
        if why is not None:
            (log.warning if c.compile is True else log.info)("decoding eager on the dynamic cache: %s", why)
            return None
        return capacity

    def _decode(self, stack: ExitStack) -> Iterator[list[int | None]]:
        """Prefill, then one step per token: on the dynamic cache with the fast-decode modules, on the static cache
        through a `StaticDecoder`, or from llama.cpp; `stack` holds the fast-decode modules while installed."""
        c = self.config
        if c.max_new_tokens == 0:
            return
        start = time.perf_counter()
        with torch.inference_mode():
            logits, step = self._prefill(stack) if isinstance(self.model, nn.Module) else self._external_prefill()
            chooser = self._chooser()
            chooser.observe_prompt(self.input_ids, self.attention_mask, logits.shape[-1])
        self.prefill_s = time.perf_counter() - start
        try:
            for i in range(c.max_new_tokens):
                with torch.inference_mode():
                    chosen = chooser(logits)
                    chooser.observe(chosen)
                    entries = self._record(chosen.tolist())
                yield entries
                if i == c.max_new_tokens - 1 or all(r is not None for r in self.finish_reasons):
                    break
                with torch.inference_mode():
                    logits = step(chosen)
        finally:  # also when the caller stops early (closes the generator)
            self.path = getattr(step, "path", "dynamic" if isinstance(self.model, nn.Module) else "llamacpp")

    def _external_prefill(self) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The prefill logits and the step of a model with `prefill(prompts, max_new_tokens)` and
        `step(tokens, active)` (llama.cpp): unpadded prompts; finished rows are not decoded further."""
        if self.prefix is not None:
            raise GenerationError("prefix tuning needs the torch model; this model is decoded by llama.cpp.")

        def step(chosen: torch.Tensor) -> torch.Tensor:
            return self.model.step(chosen.tolist(), [reason is None for reason in self.finish_reasons])

        return self.model.prefill(self._prompt_contexts(), self.config.max_new_tokens), step

    def _prefill(self, stack: ExitStack) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """The torch model's prefill logits (rows, vocab) and its decode step (dynamic or static cache)."""
        model, c = self.model, self.config
        ids, mask = self.input_ids, self.attention_mask
        rows, width = ids.shape
        extra = {} if self.prefix is None else {"prefix": self.prefix}
        capacity = self._static_capacity()

        def install_fast() -> None:
            stack.enter_context(fast_decoding(model, fuse=self.fuse))

        if capacity is None:
            install_fast()
            cache = model.new_cache(rows, width + c.max_new_tokens)
        else:
            param = model.get_input_embeddings().weight
            cache = StaticKVCache(model.config, rows, capacity, param.dtype, param.device)
        if mask is None:
            positions = torch.arange(width, device=ids.device).expand(rows, -1)
        else:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
        logits = model(ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       logits_to_keep=1, **extra).logits[:, -1]
        next_pos = positions[:, -1:] + 1
        if capacity is None:
            return logits, self._dynamic_step(cache, mask, next_pos, extra)
        visible = torch.zeros(rows, capacity, dtype=torch.bool, device=ids.device)
        visible[:, :width] = True if mask is None else mask.bool()
        cache.start_decoding()
        return logits, StaticDecoder(model, cache, visible, next_pos, c.compile, c.max_new_tokens - 1, install_fast,
                                     c.weights_fixed)

    def _dynamic_step(self, cache: KVCache, mask: torch.Tensor | None, next_pos: torch.Tensor,
                      extra: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        """One decode step on the dynamic cache: the attention mask grows by a column per step."""
        rows, width = self.input_ids.shape
        full_mask = None
        if mask is not None:
            full_mask = torch.ones(rows, width + self.config.max_new_tokens, dtype=mask.dtype, device=mask.device)
            full_mask[:, :width] = mask
        positions = [next_pos]

        def step(chosen: torch.Tensor) -> torch.Tensor:
            step_mask = None if full_mask is None else full_mask[:, : cache.length + 1]
            logits = self.model(chosen[:, None], attention_mask=step_mask, position_ids=positions[0],
                                past_key_values=cache, **extra).logits[:, -1]
            positions[0] = positions[0] + 1
            return logits

        return step

    def result(self) -> GenerationResult:
        reasons = [r or "length" for r in self.finish_reasons]
        texts = None
        if self.tokenizer is not None:
            if self.trackers is not None:
                for tracker in self.trackers:
                    tracker.finish()
                texts = [t.final_text for t in self.trackers]
            else:
                texts = [decode_continuation(self.tokenizer, ctx, toks)
                         for ctx, toks in zip(self._prompt_contexts(), self.tokens, strict=True)]
        return GenerationResult(self.tokens, reasons, self.prompt_lengths, self.elapsed_s, self.prefill_s, texts,
                                self.path)


def generate(
    model: nn.Module,
    prompts: torch.Tensor | Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    attention_mask: torch.Tensor | None = None,
    tokenizer: Any = None,
    streamer: Streamer | None = None,
    prefix: Prefix | None = None,
    fuse: bool = True,
) -> GenerationResult:
    """Generate new tokens for a batch of prompts.

    `prompts` is a (B, P) / (P,) tensor of token ids, with an optional left-padding `attention_mask`,
    or a list of token-id lists of any lengths (left-padded here). `streamer.put` receives every step
    (see `Generation`); `tokenizer` enables stop strings and fills `GenerationResult.texts`. `prefix`
    (per-layer key/value prefixes, prefix tuning) is passed to every forward. `fuse=False` skips the stacked
    q/k/v and gate/up weight copies (less memory, slower decoding).
    """
    run = Generation(model, prompts, config, attention_mask=attention_mask, tokenizer=tokenizer, prefix=prefix,
                     fuse=fuse)
    for entries in run:
        if streamer is not None:
            streamer.put(entries)
    if streamer is not None:
        streamer.end()
    return run.result()
