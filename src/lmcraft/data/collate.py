"""Padding ragged token rows into batch tensors, and the one `IGNORE_INDEX`.

A batch of rows r_1..r_B (lists of token ids, lengths n_b) becomes a (B, W) tensor, W = max_b n_b unless given:

    right padding:  x[b, t] = r_b[t]            for t < n_b,        fill otherwise
    left padding:   x[b, t] = r_b[t - W + n_b]  for t >= W - n_b,    fill otherwise

and the attention mask is 1 exactly where x holds a real token. Labels are padded with `IGNORE_INDEX` (-100), the
target every loss skips (`torch.nn.functional.cross_entropy(ignore_index=-100)`, Hugging Face's convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["IGNORE_INDEX", "Side", "attention_mask", "pad", "pad_with_mask"]

IGNORE_INDEX = -100
Side = Literal["right", "left"]


def _width(rows: Sequence[Sequence[int]], width: int | None) -> int:
    return max((len(r) for r in rows), default=0) if width is None else width


def pad(rows: Sequence[Sequence[int]], fill: int, side: Side = "right", width: int | None = None) -> torch.Tensor:
    """(B, W) long tensor of `rows`, each padded with `fill` on `side` up to `width` (default: the longest row)."""
    width = _width(rows, width)
    if side == "right":
        return torch.tensor([[*r, *([fill] * (width - len(r)))] for r in rows], dtype=torch.long).view(len(rows), width)
    return torch.tensor([[*([fill] * (width - len(r))), *r] for r in rows], dtype=torch.long).view(len(rows), width)


def attention_mask(rows: Sequence[Sequence[int]], side: Side = "right", width: int | None = None) -> torch.Tensor:
    """(B, W) long tensor: 1 at the positions `pad(rows, ..., side, width)` fills with real tokens, 0 at padding."""
    return pad([[1] * len(r) for r in rows], 0, side, width)


def pad_with_mask(rows: Sequence[Sequence[int]], pad_id: int, side: Side = "right",
                  width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, W): `rows` padded with `pad_id` on `side`."""
    return pad(rows, pad_id, side, width), attention_mask(rows, side, width)
