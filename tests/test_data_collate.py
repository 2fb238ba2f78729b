"""Padding ragged rows: right and left, masks, and the one IGNORE_INDEX."""

import torch

from lmcraft.data.collate import IGNORE_INDEX, attention_mask, pad, pad_with_mask


def test_right_and_left_padding_with_masks() -> None:
    rows = [[5, 6, 7], [8]]
    assert pad(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0]]
    assert pad(rows, IGNORE_INDEX, side="left").tolist() == [[5, 6, 7], [-100, -100, 8]]
    assert attention_mask(rows, side="left", width=4).tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    ids, mask = pad_with_mask(rows, 9)
    assert ids.dtype == mask.dtype == torch.long and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert pad([[], []], 0).shape == (2, 0)
