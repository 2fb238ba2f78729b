"""Language identification with py3langid (the maintained fork of langid.py, Lui & Baldwin 2012).

Why this library: its naive-Bayes byte n-gram model (97 languages, 4.5 MB) ships inside the wheel,
so it works offline with no download step; it depends only on numpy; it is deterministic; and its
probabilities are calibrated (softmax with temperature sqrt(bytes)), so one `min_score` threshold
means the same thing on short and long documents. fastText's lid.176 is more accurate on web text
but needs a model download; lingua is accurate on short text but its wheel is ~10x larger and
slower; langdetect is non-deterministic unless seeded and much slower.

Only the first `max_chars` characters are scored: identification cost grows with length while the
answer stops changing after a few hundred words.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["identify", "identify_batch", "identifier"]


@lru_cache(maxsize=1)
def identifier() -> Any:
    """The process-wide py3langid model with normalised probabilities (loaded once, ~1 s)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify(text: str, max_chars: int = 2000) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the most likely language of `text[:max_chars]`.

    Text with no letters at all (empty, whitespace, digits, punctuation) returns ("und", 0.0).
    """
    sample = text[:max_chars]
    if not any(ch.isalpha() for ch in sample):
        return "und", 0.0
    lang, prob = identifier().classify(sample)
    return lang, float(prob)


def identify_batch(texts: list[str], max_chars: int = 2000, block: int = 16384) -> list[tuple[str, float]]:
    """`identify` for many texts at once: the same answers, with the naive-Bayes scoring batched.

    Per text, py3langid walks its byte DFA to count features f (count c_f), then scores class k
    as s_k = sum_f log(1 + c_f) P[f, k] + prior_k, divides by sqrt(bytes) and takes a softmax.
    Here the feature rows of up to `block` features are gathered at once and summed per text with
    `np.add.reduceat`.
    """
    from py3langid.langid import visit_counts

    ident = identifier()
    out: list[tuple[str, float]] = [("und", 0.0)] * len(texts)
    jobs = []  # (text index, feature ids, log1p counts, byte length)
    for i, text in enumerate(texts):
        sample = text[:max_chars]
        if any(ch.isalpha() for ch in sample):
            encoded = ident._encode(sample)
            visits = visit_counts(ident.tk_nextmove, ident._rowbase, ident.tk_output, encoded) or {}
            feats = np.fromiter(visits.keys(), dtype=np.intp, count=len(visits))
            weights = np.log1p(np.fromiter(visits.values(), dtype=np.float32, count=len(visits)))
            jobs.append((i, feats, weights, len(encoded) or 1))
    start = 0
    while start < len(jobs):
        stop, size = start, 0
        while stop < len(jobs) and (stop == start or size + len(jobs[stop][1]) <= block):
            size += len(jobs[stop][1])
            stop += 1
        group = jobs[start:stop]
        scores = np.zeros((len(group), len(ident.nb_classes)), dtype=np.float32)
        has = np.array([len(j[1]) > 0 for j in group])
        if has.any():
            feats = np.concatenate([j[1] for j in group])
            weights = np.concatenate([j[2] for j in group])
            contrib = ident.nb_ptc[feats].astype(np.float32) * weights[:, None]
            sizes = np.array([len(j[1]) for j in group if len(j[1])])
            scores[has] = np.add.reduceat(contrib, np.concatenate([[0], np.cumsum(sizes)[:-1]]), axis=0)
            scores[has] += ident.nb_pc
        scores /= np.sqrt(np.array([j[3] for j in group], dtype=np.float32))[:, None]
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for a, b in ident._alias_pairs:  # labels that appear twice in the model share one probability
            scores[:, a] += scores[:, b]
            scores[:, b] = 0.0
        best = scores.argmax(axis=1)
        for row, job in enumerate(group):
            out[job[0]] = (ident.nb_classes[best[row]], float(scores[row, best[row]]))
        start = stop
    return out
