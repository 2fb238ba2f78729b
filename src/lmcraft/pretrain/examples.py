"""The examples of one split of packed documents: windows of `seq_len` tokens over the packed stream (clm, mlm, rtd,
plm), or sentence pairs of at most `seq_len` tokens built from the documents' sentences (nsp, sop)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcraft.io import read_json

__all__ = ["split_examples"]


def split_examples(source: tuple[Path, str], pairs: str | None, seq_len: int, seed: int) -> Sequence[Any] | None:
    """Windows of split `source = (packed folder, split)`, or sentence pairs of kind `pairs` ("nsp"/"sop",
    drawn with a generator seeded by `seed`); None when the split is missing or too small."""
    import torch

    from lmcraft.data.datasets import CausalWindows, PackedCorpus

    packed, split = source
    if split not in read_json(packed / "index.json")["splits"]:
        return None
    if pairs is None:
        windows = CausalWindows(packed, split, seq_len)
        return windows if len(windows) else None
    from lmcraft.objectives.sentence_pairs import build_pairs

    corpus = PackedCorpus(packed, split)
    documents = [[s.tolist() for s in corpus.sentences(d)] for d in range(len(corpus))]
    if sum(1 for d in documents if d) < 2:
        return None
    return build_pairs(documents, pairs, seq_len, torch.Generator().manual_seed(seed)) or None
