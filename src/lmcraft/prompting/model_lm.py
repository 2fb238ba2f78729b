"""`ModelLM`: the `LM` protocol on an lmcraft model and tokenizer.

- generate: prompts sorted by token length (longest first) and cut into micro-batches of `batch_size`;
  each micro-batch is one left-padded `lmcraft.generate.generate` call (KV cache, EOS ids of the model and
  tokenizer, stop strings), so N identical self-consistency prompts share one batch. Sampling uses
  `seed + micro-batch index`, so equal prompts in different micro-batches draw different samples.
- loglikelihood: `(context, continuation)` is encoded as `enc(context + continuation)`; the continuation's
  tokens are those after `enc(context)` (so a word split differently at the boundary is still scored once);
  score = sum over continuation tokens of log softmax(logits)[token].
- loglikelihood_rolling: the text (after a BOS/EOS "start" token) is cut into windows of at most
  `max_length` tokens; every token is predicted exactly once, with up to `max_length - stride` earlier tokens
  of context in later windows.

A plain prompt is encoded with the tokenizer's special tokens; a prompt that already starts with the BOS
token (a rendered chat template) is encoded without adding them again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lmcraft.data.back_translation import DecoderSpec
from lmcraft.data.collate import pad_with_mask
from lmcraft.errors import ConfigError
from lmcraft.generate import GenerationConfig, generate, stop_token_ids
from lmcraft.objectives.lm_head import scored_batches, token_logprobs
from lmcraft.prompting.lm import GenSettings

__all__ = ["ModelLM", "open_generator"]


class ModelLM:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        batch_size: int = 8,
        max_length: int | None = None,
        progress: bool = True,
        chat_template: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model.eval()
        self.backend, self.backend_note = ("torch" if isinstance(model, nn.Module) else "llamacpp"), None
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        cfg = getattr(model, "config", None)
        self.max_length = max_length or min(int(getattr(cfg, "max_position_embeddings", 2048)), 4096)
        self.progress = progress
        self.chat_template = chat_template
        self.eos_ids = stop_token_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or [0])[0]
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.start_id = int(start if start is not None else self.pad_id)

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        dtype: str | None = None,
        device: str | None = None,
        backend: str = "torch",
        adapter: str | Path | None = None,
        **kwargs: Any,
    ) -> ModelLM:
        """A model folder, a .gguf file, or a model asset name (fetched once) with its tokenizer and an optional
        PEFT `adapter`, on `backend` (torch, llamacpp or auto: `lmcraft.decoder_backend`). `dtype="auto"`: bf16
        where the measured batched matmul (the scoring forwards' product) is faster in bf16, else fp32."""
        from lmcraft.decoder_backend import load_decoder

        if dtype == "auto":
            from lmcraft.precision import weights_dtype

            dtype = weights_dtype("auto", torch.device(device or "cpu"), workload="train")[0]
        decoder = load_decoder(name_or_path, backend, dtype=dtype, device=device, adapter=adapter)
        lm = cls(decoder.model, decoder.tokenizer, **kwargs)
        lm.backend, lm.backend_note = decoder.backend, decoder.note
        return lm

    @property
    def device(self) -> torch.device:
        model = self.model
        return next(model.parameters()).device if isinstance(model, nn.Module) else model.device

    # ------------------------------------------------------------------------------------- chat
    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_template or getattr(self.tokenizer, "chat_template", None))

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        return self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, template=self.chat_template
        )

    def encode(self, text: str) -> list[int]:
        bos = getattr(self.tokenizer, "bos_token", None)
        return list(self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))))

    # ------------------------------------------------------------------------------------- generate
    def _batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Row indices, longest first, in chunks of `batch_size` (similar lengths share a batch: less padding)."""
        order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
        return [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def generate(self, prompts: Sequence[str], settings: GenSettings) -> list[str]:
        encoded = [self.encode(p) for p in prompts]
        config = GenerationConfig.sampled_by(settings.max_new_tokens, None if settings.greedy else settings,
                                             stop_strings=tuple(settings.stop), eos_token_ids=self.eos_ids,
                                             pad_token_id=self.pad_id)
        out: list[str] = [""] * len(prompts)
        batches = self._batches([len(e) for e in encoded])
        for b, rows in enumerate(tqdm(batches, desc="generate", leave=False, disable=not self.progress)):
            seed = None if settings.seed is None else settings.seed + b
            result = generate(
                self.model, [encoded[i] for i in rows], dataclasses.replace(config, seed=seed), tokenizer=self.tokenizer
            )
            for i, text in zip(rows, result.texts or [], strict=True):
                out[i] = text
        return out

    # ------------------------------------------------------------------------------------- scoring
    def _score(self, items: Sequence[tuple[list[int], int]], desc: str) -> list[tuple[float, int]]:
        """items: (token ids, n): sum of log p(ids[t] | ids[:t]) over the last n tokens of each sequence."""
        scores: list[tuple[float, int]] = [(0.0, 0)] * len(items)
        order = [i for rows in self._batches([len(ids) for ids, _ in items]) for i in rows]

        def score(part: slice) -> None:
            rows = order[part]
            keep = max(items[i][1] for i in rows)
            ids, mask = pad_with_mask([items[i][0][:-1] for i in rows], self.pad_id, side="left")
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=positions.to(self.device), logits_to_keep=keep).logits
            for r, i in enumerate(rows):
                seq, n = items[i]
                targets = torch.tensor([seq[-n:]], device=logits.device)
                scores[i] = (float(token_logprobs(logits[r:r + 1, keep - n:], targets).sum()), n)

        scored_batches(self.model, len(order), self.batch_size, score, progress=desc if self.progress else None)
        return scores

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        items = []
        for context, continuation in pairs:
            ctx = self.encode(context) if context else [self.start_id]
            whole = self.encode(context + continuation) if context else [self.start_id, *self.encode(continuation)]
            if whole[: len(ctx)] != ctx or len(whole) == len(ctx):
                whole = ctx + list(self.tokenizer.encode(continuation, add_special_tokens=False))
            n = len(whole) - len(ctx)
            items.append((whole[-self.max_length - 1 :], min(n, self.max_length)))
        return self._score(items, "loglikelihood")

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[tuple[float, int]]:
        stride = min(stride or self.max_length // 2, self.max_length)  # a window predicts at most its length
        items, owner = [], []
        for k, text in enumerate(texts):
            ids = [self.start_id, *self.tokenizer.encode(text, add_special_tokens=False)]
            done = 1  # tokens[0] is the start token: never predicted
            while done < len(ids):
                end = min(len(ids), done + (self.max_length if done == 1 else stride))
                begin = max(0, end - self.max_length - 1)
                items.append((ids[begin:end], end - done))
                owner.append(k)
                done = end
        totals = [[0.0, 0] for _ in texts]
        for k, (logp, n) in zip(owner, self._score(items, "perplexity"), strict=True):
            totals[k][0] += logp
            totals[k][1] += n
        return [(float(lp), int(n)) for lp, n in totals]


def open_generator(spec: DecoderSpec) -> Callable[[list[str]], list[str]]:
    """lmcraft's decoder as the data library's `GeneratorLoader` (the prepare stage's back_translate step): `spec`'s
    model and adapter on the torch backend; greedy replies, each prompt sent as a user message through the chat
    template when `spec.chat` and the model has one."""
    lm = ModelLM.load(spec.model, dtype=spec.dtype, device=spec.device, backend="torch", adapter=spec.adapter,
                      batch_size=spec.batch_size, progress=False)
    settings = GenSettings(max_new_tokens=spec.max_new_tokens)
    chat = spec.chat and lm.has_chat_template

    def generate(prompts: list[str]) -> list[str]:
        return lm.generate([lm.render_chat([{"role": "user", "content": p}]) if chat else p for p in prompts],
                           settings)

    return generate
