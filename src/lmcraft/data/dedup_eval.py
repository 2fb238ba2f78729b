"""Measuring near-duplicate detection: plant edited copies of real paragraphs, score what dedup removes.

`plant_near_duplicates` takes distinct paragraphs and appends, for a random `fraction` of them, a
copy in which a random 5-10% of the words were edited (each edit one of: substitute a word with a
random word of the corpus vocabulary, delete a word, insert a random word, swap two neighbours).
The corpus is shuffled with a seed. Ground truth: each copy is a duplicate of its original.

`dedup_precision_recall` runs a streaming dedup over the corpus (first occurrence kept) and counts:
a removed planted copy is a true positive; a removed original is a false positive (originals are
distinct paragraphs, exact-deduplicated beforehand). precision = TP / removed,
recall = TP / planted pairs (whichever member comes later is the one to remove).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lmcraft.data.dedup import normalize_for_hash

__all__ = ["PlantedCorpus", "dedup_precision_recall", "edit_words", "plant_near_duplicates"]


def edit_words(words: list[str], rate: float, vocab: Sequence[str], rng: random.Random) -> list[str]:
    """Apply round(rate * len(words)) (at least 1) random word edits: substitute, delete, insert or swap."""
    out = list(words)
    for _ in range(max(1, round(rate * len(words)))):
        op = rng.randrange(4)
        if op == 0 and out:
            out[rng.randrange(len(out))] = rng.choice(vocab)
        elif op == 1 and len(out) > 1:
            del out[rng.randrange(len(out))]
        elif op == 2:
            out.insert(rng.randrange(len(out) + 1), rng.choice(vocab))
        elif len(out) > 1:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
    return out


@dataclass
class PlantedCorpus:
    texts: list[str]
    original_of: dict[int, int]  # index of a planted copy -> index of its original


def plant_near_duplicates(
    paragraphs: Sequence[str],
    fraction: float = 0.2,
    rate: tuple[float, float] = (0.05, 0.10),
    min_words: int = 30,
    seed: int = 0,
) -> PlantedCorpus:
    """Distinct paragraphs of >= `min_words` words plus edited copies of `fraction` of them, shuffled."""
    rng = random.Random(seed)
    seen, originals = set(), []
    for p in paragraphs:
        key = normalize_for_hash(p)
        if len(p.split()) >= min_words and key not in seen:
            seen.add(key)
            originals.append(p)
    vocab = sorted({w for p in originals for w in p.split()})
    items: list[tuple[str, int, bool]] = [(p, i, False) for i, p in enumerate(originals)]
    for i in rng.sample(range(len(originals)), int(fraction * len(originals))):
        words = edit_words(originals[i].split(), rng.uniform(*rate), vocab, rng)
        items.append((" ".join(words), i, True))
    rng.shuffle(items)
    position = {i: pos for pos, (_, i, copy) in enumerate(items) if not copy}
    original_of = {pos: position[i] for pos, (_, i, copy) in enumerate(items) if copy}
    return PlantedCorpus([t for t, _, _ in items], original_of)


def dedup_precision_recall(
    corpus: PlantedCorpus, is_duplicate: Callable[[list[str]], list[bool]]
) -> dict[str, float | int]:
    """Score `is_duplicate(texts) -> removed flags` (in order, first occurrence kept) against the plant.

    A copy placed before its original is the first occurrence of its pair, so the expected
    removal is then the original: each pair counts once, found when its later member is removed.
    """
    removed = is_duplicate(corpus.texts)
    later = {max(copy, orig) for copy, orig in corpus.original_of.items()}  # what a correct dedup removes
    tp = sum(1 for i, r in enumerate(removed) if r and i in later)
    n_removed = sum(removed)
    planted = len(corpus.original_of)
    return {
        "documents": len(corpus.texts),
        "planted": planted,
        "removed": n_removed,
        "true_positives": tp,
        "precision": tp / n_removed if n_removed else 1.0,
        "recall": tp / planted if planted else 1.0,
    }
