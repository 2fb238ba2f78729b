"""Masked language modelling (BERT): corrupt a random selection of tokens, predict the originals.

Selection (never special tokens or padding), with rate p (default 0.15):
- `token`:      each eligible token independently with probability p;
- `whole_word`: each word independently with probability p, all its pieces together (words from a
                `word_ids` tensor: the same id on every piece of a word, -1 outside words; see
                `word_ids_from_pieces` for the WordPiece '##', byte-level 'Ġ' and SentencePiece '▁' conventions);
- `span`:       SpanBERT: spans of whole words with length l ~ Geometric(span_p) truncated to 1..max_span
                (P(l) = span_p (1 - span_p)^(l-1) / Z, mean 3.8 for span_p = 0.2, max 10), each starting at a
                uniformly drawn word, until round(p * n_eligible) tokens are selected.
Corruption of every selected token independently: with probability 0.8 -> [MASK], 0.1 -> a uniform random
vocabulary id, 0.1 -> unchanged. Labels are the original ids at selected positions and -100 elsewhere, so

    L = sum_{selected i} -log p(x_i | x_corrupted).

All randomness comes from the `torch.Generator` passed in, so a seed reproduces the masks exactly.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
from torch import nn

from lmcraft.models.config import ModelConfig
from lmcraft.models.model import LanguageModel
from lmcraft.objectives.base import (
    IGNORE_INDEX,
    Batch,
    LossOutput,
    TokenizerIds,
    masked_token_accuracy,
    required_token,
    token_cross_entropy,
)

__all__ = [
    "MaskedLM",
    "MaskingConfig",
    "corrupt",
    "eligible_tokens",
    "mask_tokens",
    "masked_batch",
    "masking_with_token_ids",
    "select_spans",
    "select_tokens",
    "select_whole_words",
    "span_length_distribution",
    "word_ids_from_pieces",
]

Strategy = Literal["token", "whole_word", "span"]
Convention = Literal["wordpiece", "bytelevel", "sentencepiece"]


@dataclass
class MaskingConfig:
    vocab_size: int
    mask_token_id: int
    special_token_ids: tuple[int, ...] = ()
    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1
    strategy: Strategy = "token"
    span_p: float = 0.2
    max_span: int = 10
    __pydantic_config__ = {"extra": "forbid"}  # pydantic reads this: an unknown masking key is an error

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ValueError(f"masking probability must be in (0, 1), got {self.probability}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError("mask_fraction and random_fraction must be >= 0 and sum to at most 1")
        if self.strategy not in ("token", "whole_word", "span"):
            raise ValueError(f"unknown masking strategy {self.strategy!r}; choose token, whole_word or span")
        if not 0.0 < self.span_p <= 1.0 or self.max_span < 1:
            raise ValueError("span masking needs 0 < span_p <= 1 and max_span >= 1")


def word_ids_from_pieces(pieces: Sequence[str], convention: Convention, special: Collection[str] = ()) -> list[int]:
    """Word index of every piece (-1 for special pieces), from the tokenizer's marking of word boundaries.

    wordpiece: a piece starting with '##' continues the previous word; bytelevel ('Ġ') and sentencepiece ('▁'):
    a piece starting with the marker begins a new word. A piece after a special piece always begins a word.
    """
    ids, word, prev_special = [], -1, True
    for piece in pieces:
        if piece in special:
            ids.append(-1)
            prev_special = True
            continue
        if convention == "wordpiece":
            starts = not piece.startswith("##")
        elif convention == "bytelevel":
            starts = piece.startswith("Ġ")
        elif convention == "sentencepiece":
            starts = piece.startswith("▁")
        else:
            raise ValueError(f"unknown word convention {convention!r}; choose wordpiece, bytelevel or sentencepiece")
        if starts or prev_special:
            word += 1
        ids.append(word)
        prev_special = False
    return ids


def eligible_tokens(input_ids: torch.Tensor, special_token_ids: Collection[int],
                    attention_mask: torch.Tensor | None = None,
                    special_tokens_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that may be selected: not special, not padding (bool, shape of input_ids)."""
    specials = torch.tensor(sorted(special_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    ok = ~torch.isin(input_ids, specials)
    if attention_mask is not None:
        ok &= attention_mask.bool()
    if special_tokens_mask is not None:
        ok &= ~special_tokens_mask.bool()
    return ok


def _rand(shape: torch.Size, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def select_tokens(eligible: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each eligible position independently with probability p."""
    return eligible & (_rand(eligible.shape, generator, eligible) < p)


def select_whole_words(eligible: torch.Tensor, word_ids: torch.Tensor, p: float,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Each word independently with probability p; a chosen word selects all its eligible pieces."""
    words = word_ids.clamp_min(0)
    u = _rand(torch.Size((word_ids.shape[0], int(words.max()) + 1)), generator, eligible)
    return eligible & (word_ids >= 0) & (u.gather(1, words) < p)


def span_length_distribution(span_p: float, max_span: int) -> torch.Tensor:
    """P(l) for l = 1..max_span: geometric(span_p) truncated at max_span and renormalised."""
    lengths = torch.arange(max_span, dtype=torch.float64)
    probs = span_p * (1 - span_p) ** lengths
    return probs / probs.sum()


def select_spans(eligible: torch.Tensor, word_ids: torch.Tensor, p: float, span_p: float, max_span: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """SpanBERT span selection over whole words, until round(p * n_eligible) tokens (at least 1) per row."""
    length_probs = span_length_distribution(span_p, max_span).float()
    gen_device = generator.device if generator is not None else "cpu"
    selected = torch.zeros_like(eligible)
    for b in range(eligible.shape[0]):
        positions = eligible[b].nonzero().squeeze(1)
        if positions.numel() == 0:
            continue
        _, unit_of_token, sizes = torch.unique_consecutive(word_ids[b, positions], return_inverse=True,
                                                           return_counts=True)
        sizes = sizes.tolist()
        budget = max(1, round(p * positions.numel()))
        chosen, count = [False] * len(sizes), 0
        while count < budget:
            length = int(torch.multinomial(length_probs, 1, generator=generator)) + 1
            anchor = int(torch.randint(len(sizes), (1,), generator=generator, device=gen_device))
            if chosen[anchor]:
                continue
            for unit in range(anchor, min(anchor + length, len(sizes))):
                if count >= budget:
                    break
                if not chosen[unit]:
                    chosen[unit] = True
                    count += sizes[unit]
        unit_chosen = torch.tensor(chosen, device=eligible.device)
        selected[b, positions] = unit_chosen[unit_of_token.to(eligible.device)]
    return selected


def corrupt(input_ids: torch.Tensor, selected: torch.Tensor, cfg: MaskingConfig,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """80/10/10 corruption of the selected positions; returns (corrupted inputs, labels with -100 elsewhere)."""
    u = _rand(input_ids.shape, generator, input_ids)
    device = generator.device if generator is not None else input_ids.device
    random_ids = torch.randint(cfg.vocab_size, input_ids.shape, generator=generator, device=device)
    to_mask = selected & (u < cfg.mask_fraction)
    to_random = selected & (u >= cfg.mask_fraction) & (u < cfg.mask_fraction + cfg.random_fraction)
    inputs = torch.where(to_mask, torch.full_like(input_ids, cfg.mask_token_id), input_ids)
    inputs = torch.where(to_random, random_ids.to(input_ids), inputs)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    return inputs, labels


def mask_tokens(input_ids: torch.Tensor, cfg: MaskingConfig, generator: torch.Generator | None = None,
                attention_mask: torch.Tensor | None = None, special_tokens_mask: torch.Tensor | None = None,
                word_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Select (per `cfg.strategy`) and corrupt; returns (inputs, labels). Without `word_ids` each token is a word."""
    eligible = eligible_tokens(input_ids, cfg.special_token_ids, attention_mask, special_tokens_mask)
    if word_ids is None:
        word_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    else:
        eligible &= word_ids >= 0
    if cfg.strategy == "token":
        selected = select_tokens(eligible, cfg.probability, generator)
    elif cfg.strategy == "whole_word":
        selected = select_whole_words(eligible, word_ids, cfg.probability, generator)
    else:
        selected = select_spans(eligible, word_ids, cfg.probability, cfg.span_p, cfg.max_span, generator)
    return corrupt(input_ids, selected, cfg, generator)


def masked_batch(batch: Batch, cfg: MaskingConfig, generator: torch.Generator | None) -> Batch:
    """`batch` with corrupted `input_ids` and MLM `labels` (reads attention_mask, special_tokens_mask, word_ids)."""
    inputs, labels = mask_tokens(batch["input_ids"], cfg, generator, batch.get("attention_mask"),
                                 batch.get("special_tokens_mask"), batch.get("word_ids"))
    return {**batch, "input_ids": inputs, "labels": labels}


def masking_with_token_ids(options: dict[str, Any], tokenizer: TokenizerIds, objective: str) -> dict[str, Any]:
    """`options` with its `masking` dict completed from the tokenizer: the vocabulary size, the [MASK] id
    (required) and the special ids never selected, each where the options leave it out."""
    masking = dict(options.get("masking") or {})
    masking.setdefault("vocab_size", tokenizer.vocab_size)
    if "mask_token_id" not in masking:
        masking["mask_token_id"] = required_token(tokenizer.mask_token_id, "mask", objective)
    masking.setdefault("special_token_ids", list(tokenizer.all_special_ids))
    return {**options, "masking": masking}


@dataclass
class MaskedLM:
    """BERT-style masked LM on an encoder with the MLM head."""

    masking: MaskingConfig
    name: ClassVar[str] = "mlm"

    @classmethod
    def with_token_ids(cls, options: dict[str, Any], tokenizer: TokenizerIds,
                       max_length: int | None = None) -> dict[str, Any]:
        return masking_with_token_ids(options, tokenizer, cls.name)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return LanguageModel(cfg, "mlm")

    def kept_model(self, model: nn.Module) -> LanguageModel:
        return cast(LanguageModel, model)

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        return masked_batch(batch, self.masking, generator)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        out = model(batch["input_ids"], attention_mask=batch.get("attention_mask"),
                    token_type_ids=batch.get("token_type_ids"))
        total, count = token_cross_entropy(out.logits, batch["labels"])
        padding = batch.get("attention_mask")
        tokens = int(padding.sum()) if padding is not None else batch["input_ids"].numel()
        metrics = {} if model.training else {"masked_accuracy": masked_token_accuracy(out.logits, batch["labels"])}
        return LossOutput(total, count, metrics, tokens)
