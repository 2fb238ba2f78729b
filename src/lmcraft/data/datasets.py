"""Readers of packed token shards (see `lmcraft.data.pack`), as torch datasets.

- `PackedCorpus`: the memory-mapped shards of one split with document and sentence boundaries.
- `CausalWindows`: fixed windows of `seq_len` tokens for causal LM; window i of a shard covers
  tokens [i * stride, i * stride + seq_len) and never crosses a shard; documents are packed
  back to back, separated by EOS. Items are {"input_ids", "labels"} (int64, equal: the model or
  the loss shifts by one, the Hugging Face convention).
- `SentencePairs`: sentence pairs for next-sentence prediction (BERT, Devlin et al. 2019) or
  sentence-order prediction (ALBERT, Lan et al. 2020). Item i picks a split point inside a
  document; segment A is the sentences before it and segment B those after it, each grown up to
  half of `max_tokens`. NSP: with probability 1/2, B is replaced by sentences of another document
  (label 1 = not next; 0 = is next). SOP: with probability 1/2, A and B are swapped (label 1 =
  swapped; 0 = in order). Randomness comes from `seed` and i only, so item i is reproducible.

torch is imported lazily so that index inspection works without it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmcraft.errors import InputFileError

__all__ = ["CausalWindows", "PackedCorpus", "SentencePairs"]


class PackedCorpus:
    """One split of a packed folder: `tokens(doc)`, `sentences(doc)`, and the shard memmaps."""

    def __init__(self, path: str | Path, split: str = "train") -> None:
        root = Path(path)
        index_path = root / "index.json" if root.is_dir() else root
        root = index_path.parent
        try:
            self.index = json.loads(index_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            expected = "a packed-shard index.json (run `lmcraft prepare` with a tokenizer)"
            raise InputFileError(index_path, "file", expected) from None
        except json.JSONDecodeError as err:
            raise InputFileError(index_path, f"line {err.lineno}", f"valid JSON ({err.msg})") from None
        if not str(self.index.get("format", "")).startswith("lmcraft.packed/"):
            raise InputFileError(index_path, "key 'format'", "an lmcraft packed-shard index")
        if split not in self.index["splits"]:
            have = list(self.index["splits"])
            raise InputFileError(index_path, "key 'splits'", f"a split named {split!r}; the index has {have}")
        info = self.index["splits"][split]
        self.split = split
        self.dtype = np.dtype(self.index["dtype"])
        self.eos_id = int(self.index["eos_id"])
        self.vocab_size = int(self.index["vocab_size"])
        self.shards = []
        for shard in info["shards"]:
            file = root / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise InputFileError(file, "file", f"{expected} bytes ({shard['tokens']} tokens) as the index says")
            self.shards.append(np.memmap(file, dtype=self.dtype, mode="r") if expected else np.empty(0, self.dtype))
        self.docs = np.load(root / info["docs"])
        self.sent_ptr = np.load(root / info["sent_ptr"])
        self.sent_lens = np.load(root / info["sent_lens"])
        self.num_tokens = int(info["tokens"])

    def __len__(self) -> int:
        return len(self.docs)

    def tokens(self, doc: int) -> np.ndarray:
        """Token ids of document `doc`, including its final EOS."""
        shard, offset, length = self.docs[doc]
        return np.asarray(self.shards[shard][offset : offset + length])

    def sentences(self, doc: int) -> list[np.ndarray]:
        """The document's sentences as token arrays (EOS excluded)."""
        toks = self.tokens(doc)
        lens = self.sent_lens[self.sent_ptr[doc] : self.sent_ptr[doc + 1]]
        bounds = np.concatenate([[0], np.cumsum(lens)])
        return [toks[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True) if b > a]


def _torch() -> Any:
    import torch

    return torch


class CausalWindows:
    """Windows of `seq_len` tokens over the packed stream (a torch map-style dataset)."""

    def __init__(self, path: str | Path, split: str = "train", seq_len: int = 1024, stride: int | None = None) -> None:
        self.corpus = PackedCorpus(path, split)
        self.seq_len, self.stride = seq_len, stride or seq_len
        counts = [max(0, (len(s) - seq_len) // self.stride + 1) for s in self.corpus.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        offset = (i - int(self._starts[shard])) * self.stride
        window = np.asarray(self.corpus.shards[shard][offset : offset + self.seq_len], dtype=np.int64)
        ids = _torch().from_numpy(window)
        return {"input_ids": ids, "labels": ids.clone()}


class SentencePairs:
    """(segment A, segment B, label) items for NSP or SOP from documents with >= 2 sentences."""

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        task: Literal["nsp", "sop"] = "nsp",
        max_tokens: int = 128,
        seed: int = 0,
    ) -> None:
        if task not in ("nsp", "sop"):
            raise ValueError(f"task must be 'nsp' or 'sop', got {task!r}")
        self.corpus = PackedCorpus(path, split)
        self.task, self.max_tokens, self.seed = task, max_tokens, seed
        counts = np.diff(self.corpus.sent_ptr)
        self._docs = np.flatnonzero(counts >= 2)
        if len(self._docs) == 0:
            raise InputFileError(path, f"split {split!r}", "documents with at least two sentences for NSP/SOP")
        # split points: document d offers counts[d] - 1 points (between sentence k-1 and k)
        self._points = np.concatenate([[0], np.cumsum(counts[self._docs] - 1)]).astype(np.int64)

    def __len__(self) -> int:
        return int(self._points[-1])

    def _segment(self, sents: list[np.ndarray], start: int, step: int, budget: int) -> np.ndarray:
        """Sentences from `start` going in direction `step` until `budget` tokens (at least one)."""
        picked: list[np.ndarray] = []
        k, used = start, 0
        while 0 <= k < len(sents) and (not picked or used + len(sents[k]) <= budget):
            picked.append(sents[k])
            used += len(sents[k])
            k += step
        if step < 0:
            picked.reverse()
        return np.concatenate(picked)[:budget] if step > 0 else np.concatenate(picked)[-budget:]

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        rng = random.Random(self.seed * 1_000_003 + i)
        j = int(np.searchsorted(self._points, i, side="right") - 1)
        doc = int(self._docs[j])
        cut = 1 + i - int(self._points[j])  # B starts at sentence `cut`
        sents = self.corpus.sentences(doc)
        cut = min(max(cut, 1), len(sents) - 1)
        half = self.max_tokens // 2
        a = self._segment(sents, cut - 1, -1, half)
        b = self._segment(sents, cut, +1, self.max_tokens - len(a))
        label = 0
        if rng.random() < 0.5:
            label = 1
            if self.task == "sop":
                a, b = b, a
            elif len(self.corpus) > 1:
                other = doc
                while other == doc:
                    other = rng.randrange(len(self.corpus))
                osents = self.corpus.sentences(other) or [self.corpus.tokens(other)[:-1]]
                b = self._segment(osents, rng.randrange(len(osents)), +1, self.max_tokens - len(a))
            else:
                label = 0
        torch = _torch()
        return {
            "tokens_a": torch.from_numpy(a.astype(np.int64)),
            "tokens_b": torch.from_numpy(b.astype(np.int64)),
            "label": torch.tensor(label),
        }
