"""Sentence-pair pre-training: next-sentence prediction (BERT, "nsp") and sentence-order prediction (ALBERT, "sop").

Both build pairs (A, B, label) from documents given as lists of segments (sentences, as token-id lists), as
BERT's `create_instances_from_document` does: consecutive segments are gathered until a target length
(max_length - 3, or with probability `short_seq_prob` a random shorter one), and the gathered chunk is cut
at a random segment boundary into A and B.
- nsp: label 0 = B is the true continuation of A; label 1 (probability 1/2, and always when the chunk has one
  segment) = B is taken from a random position of another document (the unused segments are given back).
- sop: label 0 = A, B in document order; label 1 (probability 1/2) = swapped. Single-segment chunks give no pair.
A pair longer than max_length - 3 is truncated one token at a time from the longer side (front or back at
random). It is packed as  [CLS] A [SEP] B [SEP]  with token_type_ids 0 for [CLS] A [SEP] and 1 for B [SEP].

Loss (BERT pre-training): masked LM on the pair plus pair classification on the pooled [CLS] state,

    L = mean_{masked} CE_mlm + mean_{pairs} CE_pair,

returned as the sum (sum_mlm + mean_pair * n_masked) over n_masked targets.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lmcraft.data.collate import pad_with_mask
from lmcraft.errors import LmcraftError
from lmcraft.models.config import ModelConfig
from lmcraft.models.heads import SequenceClassificationHead
from lmcraft.models.model import LanguageModel, ModelOutput
from lmcraft.objectives.base import (
    Batch,
    LossOutput,
    TokenizerIds,
    declared_pad_id,
    masked_token_accuracy,
    required_token,
    token_cross_entropy,
)
from lmcraft.objectives.mlm import MaskingConfig, masked_batch, masking_with_token_ids

__all__ = [
    "PretrainingModel",
    "SentencePair",
    "SentencePairObjective",
    "as_pair",
    "build_pairs",
    "collate_pairs",
    "truncate_pair",
]

PairKind = Literal["nsp", "sop"]
Document = Sequence[Sequence[int]]


@dataclass(frozen=True)
class SentencePair:
    a: list[int]
    b: list[int]
    label: int  # 0 = true next / in order, 1 = random next / swapped


def as_pair(item: SentencePair | Mapping[str, Any]) -> SentencePair:
    """A `SentencePair` from itself or from a `lmcraft.data.datasets.SentencePairs` item
    {"tokens_a", "tokens_b", "label"} (same label convention)."""
    if isinstance(item, SentencePair):
        return item
    return SentencePair([int(t) for t in item["tokens_a"]], [int(t) for t in item["tokens_b"]], int(item["label"]))


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform integer in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def truncate_pair(a: list[int], b: list[int], max_tokens: int, generator: torch.Generator | None) -> None:
    """Drop tokens from the longer of a, b (front or back at random) until len(a) + len(b) <= max_tokens."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if _uniform(generator) < 0.5 else -1]


def _random_segments(documents: Sequence[Document], skip: int, target: int,
                     generator: torch.Generator | None) -> list[int]:
    """Tokens from a random start in a random document other than `skip`, up to `target` tokens."""
    other = _randint(0, len(documents) - 2, generator)
    doc = documents[other + (other >= skip)]
    start = _randint(0, len(doc) - 1, generator)
    tokens: list[int] = []
    for segment in doc[start:]:
        tokens.extend(segment)
        if len(tokens) >= target:
            break
    return tokens


def build_pairs(documents: Sequence[Document], kind: PairKind, max_length: int,
                generator: torch.Generator | None = None, short_seq_prob: float = 0.1) -> list[SentencePair]:
    """All pairs of one pass over `documents` (lists of token-id segments); see the module docstring."""
    if kind not in ("nsp", "sop"):
        raise ValueError(f"unknown sentence-pair objective {kind!r}; choose nsp or sop")
    documents = [[list(s) for s in doc if len(s)] for doc in documents]
    documents = [doc for doc in documents if doc]
    if kind == "nsp" and len(documents) < 2:
        raise LmcraftError("next-sentence prediction needs at least two non-empty documents to draw random "
                           f"segments from; got {len(documents)}. Give the corpus more documents or use sop.")
    max_tokens = max_length - 3
    if max_tokens < 2:
        raise ValueError(f"max_length={max_length} leaves no room for two segments after [CLS] A [SEP] B [SEP]")
    pairs: list[SentencePair] = []
    for d, doc in enumerate(documents):
        target = _randint(2, max_tokens, generator) if _uniform(generator) < short_seq_prob else max_tokens
        chunk: list[list[int]] = []
        length, i = 0, 0
        while i < len(doc):
            chunk.append(doc[i])
            length += len(doc[i])
            if i == len(doc) - 1 or length >= target:
                a_end = 1 if len(chunk) < 2 else _randint(1, len(chunk) - 1, generator)
                a = [t for seg in chunk[:a_end] for t in seg]
                b = [t for seg in chunk[a_end:] for t in seg]
                label = 0
                if kind == "nsp" and (len(chunk) == 1 or _uniform(generator) < 0.5):
                    label = 1
                    b = _random_segments(documents, d, max(1, target - len(a)), generator)
                    i -= len(chunk) - a_end  # the segments not used go back to the document
                elif kind == "sop" and b and _uniform(generator) < 0.5:
                    a, b, label = b, a, 1
                truncate_pair(a, b, max_tokens, generator)
                if a and b:
                    pairs.append(SentencePair(a, b, label))
                chunk, length = [], 0
            i += 1
    return pairs


def collate_pairs(pairs: Sequence[SentencePair], cls_token_id: int, sep_token_id: int,
                  pad_token_id: int) -> Batch:
    """Right-padded [CLS] A [SEP] B [SEP] batch: input_ids, token_type_ids, attention_mask,
    special_tokens_mask (B, T) and pair_labels (B,)."""
    rows = [[cls_token_id, *p.a, sep_token_id, *p.b, sep_token_id] for p in pairs]
    input_ids, attention = pad_with_mask(rows, pad_token_id)
    token_types = torch.zeros_like(input_ids)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    for r, (row, pair) in enumerate(zip(rows, pairs, strict=True)):
        token_types[r, len(pair.a) + 2: len(row)] = 1
        special[r, [0, len(pair.a) + 1, len(row) - 1]] = True
    labels = torch.tensor([p.label for p in pairs], dtype=torch.long)
    return {"input_ids": input_ids, "token_type_ids": token_types, "attention_mask": attention,
            "special_tokens_mask": special, "pair_labels": labels}


def _init_linear(module: nn.Module, std: float) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class PretrainingModel(nn.Module):
    """BERT pre-training heads: `lm` (encoder + MLM head) and `pair_head` (tanh pooler on [CLS] + 2-way linear).

    forward returns (mlm output, pair logits (B, 2)). `lm` is the model to keep after pre-training.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lm = LanguageModel(cfg, "mlm")
        self.pair_head = SequenceClassificationHead(dataclasses.replace(cfg, num_labels=2))
        self.pair_head.apply(lambda m: _init_linear(m, cfg.initializer_range))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[ModelOutput, torch.Tensor]:
        out = self.lm(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        return out, self.pair_head(out.hidden_states, attention_mask)


@dataclass
class SentencePairObjective:
    """NSP or SOP + MLM. `transform` takes {"pairs": [...]}: `SentencePair`s (from `build_pairs`) or
    `lmcraft.data.datasets.SentencePairs` items; pairs longer than `max_length` with specials are truncated."""

    kind: PairKind
    masking: MaskingConfig
    cls_token_id: int
    sep_token_id: int
    pad_token_id: int
    max_length: int = 512

    @property
    def name(self) -> str:
        return self.kind

    @classmethod
    def with_token_ids(cls, options: dict[str, Any], tokenizer: TokenizerIds,
                       max_length: int | None = None) -> dict[str, Any]:
        """The masking ids, [CLS], [SEP] and padding (all required) and `max_length`, where `options` lack them."""
        kind = options["kind"]
        options = masking_with_token_ids(options, tokenizer, kind)
        for key, value, what in (("cls_token_id", tokenizer.cls_token_id, "[CLS]"),
                                 ("sep_token_id", tokenizer.sep_token_id, "[SEP]"),
                                 ("pad_token_id", declared_pad_id(tokenizer), "padding")):
            if key not in options:
                options[key] = required_token(value, what, kind)
        if max_length is not None:
            options.setdefault("max_length", max_length)
        return options

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        return PretrainingModel(cfg)

    def kept_model(self, model: nn.Module) -> LanguageModel:
        """The encoder with its MLM head (the pair head is dropped)."""
        return model.lm

    def transform(self, batch: Batch, generator: torch.Generator | None = None) -> Batch:
        pairs = []
        for item in batch["pairs"]:
            pair = as_pair(item)
            a, b = list(pair.a), list(pair.b)
            truncate_pair(a, b, self.max_length - 3, generator)
            pairs.append(SentencePair(a, b, pair.label))
        packed = collate_pairs(pairs, self.cls_token_id, self.sep_token_id, self.pad_token_id)
        return masked_batch(packed, self.masking, generator)

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        out, pair_logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        mlm_sum, count = token_cross_entropy(out.logits, batch["labels"])
        pair_mean = F.cross_entropy(pair_logits.float(), batch["pair_labels"])
        accuracy = (pair_logits.argmax(-1) == batch["pair_labels"]).float().mean()
        metrics = {"mlm_loss": mlm_sum.detach() / max(count, 1), f"{self.kind}_loss": pair_mean.detach(),
                   f"{self.kind}_accuracy": accuracy}
        if not model.training:
            metrics["masked_accuracy"] = masked_token_accuracy(out.logits, batch["labels"])
        return LossOutput(mlm_sum + pair_mean * count, count, metrics, int(batch["attention_mask"].sum()))
