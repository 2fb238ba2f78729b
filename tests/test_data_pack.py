"""Packing into token shards and reading them back: causal windows, document and sentence structure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmcraft.data.datasets import CausalWindows, PackedCorpus, SentencePairs
from lmcraft.data.pack import ShardWriter, sentence_spans, token_dtype
from lmcraft.errors import InputFileError


def test_sentence_spans_tile_the_text() -> None:
    text = "First one. Second one!  Third?\n\nNew paragraph without end"
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text
    assert [text[a:b] for a, b in spans] == [
        "First one.",
        " Second one!",
        "  Third?",
        "\n\nNew paragraph without end",
    ]
    assert sentence_spans("") == [(0, 0)]
    assert sentence_spans("no boundary") == [(0, 11)]


def test_token_dtype() -> None:
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32


def _docs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(30):
        lens = rng.integers(1, 9, size=int(rng.integers(1, 5))).astype(np.int32)
        out.append((rng.integers(1, 90, size=int(lens.sum())).astype(np.uint32), lens))
    return out


def _write(tmp_path: Path, vocab: int = 100, shard_tokens: int = 50) -> tuple[Path, list]:
    docs = _docs()
    writer = ShardWriter(tmp_path, vocab_size=vocab, eos_id=0, shard_tokens=shard_tokens, tokenizer="t")
    for i, (ids, lens) in enumerate(docs):
        writer.add("validation" if i % 10 == 0 else "train", ids, lens)
    index = writer.close()
    return tmp_path, [d for i, d in enumerate(docs) if i % 10], index


def test_shards_round_trip_with_boundaries(tmp_path: Path) -> None:
    root, train_docs, index = _write(tmp_path)
    assert index["dtype"] == "uint16" and index["splits"]["validation"]["documents"] == 3
    info = index["splits"]["train"]
    assert len(info["shards"]) > 1  # 50-token shards
    assert not list(tmp_path.glob("*.tmp"))
    corpus = PackedCorpus(root, "train")
    assert len(corpus) == len(train_docs) == 27
    assert corpus.num_tokens == sum(len(ids) + 1 for ids, _ in train_docs)
    for d, (ids, lens) in enumerate(train_docs):
        toks = corpus.tokens(d)
        assert toks[-1] == 0 and np.array_equal(toks[:-1], ids)
        sents = corpus.sentences(d)
        assert [len(s) for s in sents] == lens.tolist()
        assert np.array_equal(np.concatenate(sents), ids)
    uint32 = ShardWriter(tmp_path / "big", vocab_size=70_000, eos_id=69_999)
    uint32.add("train", np.array([65_600, 3], dtype=np.uint32), np.array([2]))
    assert uint32.close()["dtype"] == "uint32"
    assert PackedCorpus(tmp_path / "big").tokens(0).tolist() == [65_600, 3, 69_999]
    with pytest.raises(ValueError, match="vocab_size"):
        ShardWriter(tmp_path / "bad", vocab_size=10, eos_id=0).add("train", np.array([10]), np.array([1]))


def test_causal_windows(tmp_path: Path) -> None:
    root, _, _ = _write(tmp_path)
    ds = CausalWindows(root, "train", seq_len=16)
    corpus = ds.corpus
    expected = sum(len(s) // 16 for s in corpus.shards)
    assert len(ds) == expected
    item = ds[len(ds) - 1]
    assert item["input_ids"].shape == (16,) and item["input_ids"].dtype.is_floating_point is False
    assert item["labels"].tolist() == item["input_ids"].tolist()
    first = ds[0]["input_ids"].tolist()
    assert first == np.asarray(corpus.shards[0][:16]).tolist()
    strided = CausalWindows(root, "train", seq_len=16, stride=8)
    assert strided[1]["input_ids"].tolist() == np.asarray(corpus.shards[0][8:24]).tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]


@pytest.mark.parametrize("task", ["nsp", "sop"])
def test_sentence_pairs(tmp_path: Path, task: str) -> None:
    root, train_docs, _ = _write(tmp_path)
    ds = SentencePairs(root, "train", task=task, max_tokens=12, seed=1)
    assert len(ds) == sum(len(lens) - 1 for _, lens in train_docs if len(lens) >= 2)
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        a, b = item["tokens_a"], item["tokens_b"]
        assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) <= 12
        assert (a != 0).all() and (b != 0).all()  # no EOS inside segments
        labels.append(int(item["label"]))
    assert 0 < sum(labels) < len(labels)
    again = SentencePairs(root, "train", task=task, max_tokens=12, seed=1)
    assert again[3]["tokens_b"].tolist() == ds[3]["tokens_b"].tolist()


def test_sop_swaps_in_order_segments(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, vocab_size=100, eos_id=0)
    writer.add("train", np.array([1, 2, 3, 4], dtype=np.uint32), np.array([2, 2]))
    writer.close()
    ds = SentencePairs(tmp_path, "train", task="sop", seed=0)
    for seed in range(20):
        ds.seed = seed
        item = ds[0]
        pair = (item["tokens_a"].tolist(), item["tokens_b"].tolist())
        assert pair == ([1, 2], [3, 4]) if int(item["label"]) == 0 else pair == ([3, 4], [1, 2])


def test_bad_index_is_reported(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="index.json"):
        PackedCorpus(tmp_path)
    root, _, index = _write(tmp_path)
    with pytest.raises(InputFileError, match="split named 'test'"):
        PackedCorpus(root, "test")
    shard = root / index["splits"]["train"]["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(InputFileError, match="as the index says"):
        PackedCorpus(root, "train")
    (root / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(InputFileError, match="lmcraft packed-shard index"):
        PackedCorpus(root)
