"""Packing tokenised documents into memory-mapped token shards with a JSON index.

Layout of a packed folder:
- `{split}-{k:05d}.bin`: raw little-endian token ids (uint16 when vocab_size <= 65,536, else
  uint32); each document is its tokens followed by EOS; a shard ends at a document boundary once
  it holds `shard_tokens` tokens or more.
- `{split}.docs.npy`: int64 (documents, 3) = (shard, offset in shard, length incl. EOS).
- `{split}.sent_ptr.npy` (documents + 1) and `{split}.sent_lens.npy` (sentences): sentence k of
  document d has length sent_lens[sent_ptr[d] + k]; sentences tile the document before its EOS.
- `index.json`: format, dtype, vocab size, EOS id, tokenizer, and per split its shards and counts.

Sentences are found before tokenisation (`sentence_spans`: after . ! ? and at blank lines, the
whitespace going to the next sentence) and each is encoded separately, so sentence boundaries
are exact token boundaries; for byte-level BPE this equals encoding the whole text because the
pre-tokenizer already splits before the whitespace.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmcraft.io import atomic_file, save_npy, write_text

__all__ = ["DocTokenizer", "ShardWriter", "sentence_spans", "token_dtype"]

FORMAT = "lmcraft.packed/1"
_BOUNDARY = re.compile(r"(?<=[.!?。！？])\s+|\n\s*\n\s*")


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) spans that tile `text`; a new span starts at the whitespace after . ! ? or a blank line."""
    spans, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.start() > start:
            spans.append((start, m.start()))
            start = m.start()
    if start < len(text) or not spans:
        spans.append((start, len(text)))
    return spans


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class DocTokenizer:
    """Picklable wrapper of a `tokenizer.json`: text -> (token ids, sentence lengths), no special tokens."""

    def __init__(self, path: str | Path, sentences: bool = True) -> None:
        self.path, self.sentences = str(path), sentences
        self._tok: Any = None

    def __getstate__(self) -> dict:
        return {"path": self.path, "sentences": self.sentences, "_tok": None}

    @property
    def tokenizer(self) -> Any:
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(self.path)
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return self.batch([text])[0]

    def batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """[(token ids uint32, sentence token lengths int32)] per text, encoded in one batch call."""
        pieces: list[str] = []
        counts = []
        for text in texts:
            spans = sentence_spans(text) if self.sentences else [(0, len(text))]
            pieces.extend(text[a:b] for a, b in spans)
            counts.append(len(spans))
        encs = self.tokenizer.encode_batch(pieces, add_special_tokens=False) if pieces else []
        out, k = [], 0
        for count in counts:
            group = encs[k : k + count]
            k += count
            lens = np.array([len(e.ids) for e in group], dtype=np.int32)
            ids = np.fromiter((i for e in group for i in e.ids), dtype=np.uint32, count=int(lens.sum()))
            out.append((ids, lens))
        return out


@dataclass
class _Split:
    shards: list[dict[str, Any]] = field(default_factory=list)
    docs: list[tuple[int, int, int]] = field(default_factory=list)
    sent_lens: list[np.ndarray] = field(default_factory=list)
    fh: Any = None
    shard_file: ExitStack = field(default_factory=ExitStack)  # the open shard's atomic write
    shard_tokens: int = 0


class ShardWriter:
    """Append documents (token ids + sentence lengths) per split; `close()` writes the index.

    Shards are written atomically (a temporary file renamed when the shard is complete), the index last, so
    a reader never sees a half-written folder as complete.
    """

    def __init__(
        self, out_dir: str | Path, vocab_size: int, eos_id: int, shard_tokens: int = 100_000_000, **meta: Any
    ) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size, self.eos_id, self.shard_tokens, self.meta = vocab_size, eos_id, shard_tokens, meta
        self.splits: dict[str, _Split] = {}

    def _open_shard(self, name: str, sp: _Split) -> None:
        path = self.out / f"{name}-{len(sp.shards):05d}.bin"
        sp.fh = sp.shard_file.enter_context(atomic_file(path, "wb"))  # renamed in place by _close_shard
        sp.shards.append({"file": path.name, "tokens": 0})
        sp.shard_tokens = 0

    def _close_shard(self, sp: _Split) -> None:
        sp.shard_file.close()
        sp.shards[-1]["tokens"] = sp.shard_tokens
        sp.fh = None

    def add(self, split: str, ids: np.ndarray, sent_lens: np.ndarray) -> None:
        """Append one document: `ids` (without EOS) and the lengths of its sentences (sum = len(ids))."""
        sp = self.splits.setdefault(split, _Split())
        if sp.fh is None:
            self._open_shard(split, sp)
        if len(ids) and int(ids.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(ids.max())} >= vocab_size {self.vocab_size}")
        doc = np.empty(len(ids) + 1, dtype=self.dtype)
        doc[:-1] = ids
        doc[-1] = self.eos_id
        sp.fh.write(doc.tobytes())
        sp.docs.append((len(sp.shards) - 1, sp.shard_tokens, len(doc)))
        sp.sent_lens.append(np.asarray(sent_lens, dtype=np.int32))
        sp.shard_tokens += len(doc)
        if sp.shard_tokens >= self.shard_tokens:
            self._close_shard(sp)

    def close(self) -> dict[str, Any]:
        index: dict[str, Any] = {
            "format": FORMAT,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            **self.meta,
            "splits": {},
        }
        for name, sp in sorted(self.splits.items()):
            if sp.fh is not None:
                self._close_shard(sp)
            counts = np.array([len(s) for s in sp.sent_lens], dtype=np.int64)
            ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            lens = np.concatenate(sp.sent_lens) if sp.sent_lens else np.empty(0, np.int32)
            save_npy(self.out / f"{name}.docs.npy", np.array(sp.docs, dtype=np.int64).reshape(-1, 3))
            save_npy(self.out / f"{name}.sent_ptr.npy", ptr)
            save_npy(self.out / f"{name}.sent_lens.npy", lens)
            index["splits"][name] = {
                "tokens": int(sum(s["tokens"] for s in sp.shards)),
                "documents": len(sp.docs),
                "sentences": int(len(lens)),
                "shards": sp.shards,
                "docs": f"{name}.docs.npy",
                "sent_ptr": f"{name}.sent_ptr.npy",
                "sent_lens": f"{name}.sent_lens.npy",
            }
        write_text(self.out / "index.json", json.dumps(index, indent=2) + "\n")
        return index
