"""The capability probe: next-speaker cloze items from play scripts, scored by log-likelihood.

How items are built and scored: see `lmcraft.scaling`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SPEAKER_LINE", "ClozeItem", "score_cloze", "speaker_cloze"]

SPEAKER_LINE = re.compile(r"^[A-Z][A-Za-z' .-]{0,30}\.$")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class ClozeItem:
    """A multiple-choice item scored by log-likelihood: `options[answer]` is the true continuation of `context`."""

    context: str
    options: tuple[str, ...]
    answer: int


def _speeches(text: str) -> list[tuple[int, str | None]]:
    """(start offset, speaker or None) of every paragraph; a speech's first line is its speaker's name."""
    starts = [0] + [m.end() for m in _PARAGRAPH_BREAK.finditer(text)]
    out = []
    for start in starts:
        lines = text[start:].split("\n", 2)
        first = lines[0].strip()
        is_speech = len(lines) > 1 and lines[1].strip() and SPEAKER_LINE.match(first)
        out.append((start, first if is_speech else None))
    return out


def speaker_cloze(
    texts: Sequence[str], n_items: int, n_options: int = 4, context_chars: int = 400, seed: int = 0
) -> list[ClozeItem]:
    """Next-speaker items from play scripts (module docstring); at most `n_items`, sampled with `seed`."""
    rng = random.Random(seed)
    candidates: list[tuple[str, list[str], str, list[str]]] = []
    for text in texts:
        paragraphs = _speeches(text)
        cast = sorted({who for _, who in paragraphs if who})
        if len(cast) < n_options:
            continue
        for k, (start, who) in enumerate(paragraphs):
            if who is None:
                continue
            window = [(s, w) for s, w in paragraphs[:k] if s >= start - context_chars]
            if not window:
                continue
            seen = sorted({w for _, w in window if w})
            if who in seen:
                candidates.append((text[window[0][0] : start], seen, who, cast))
    items = []
    for context, seen, who, cast in rng.sample(candidates, min(n_items, len(candidates))):
        others = [w for w in seen if w != who]
        rng.shuffle(others)
        options = [who, *others[: n_options - 1]]
        absent = [w for w in cast if w not in seen]
        options += rng.sample(absent, n_options - len(options))
        rng.shuffle(options)
        items.append(ClozeItem(context, tuple(options), options.index(who)))
    return items


def score_cloze(lm: Any, items: Sequence[ClozeItem]) -> list[int]:
    """The option each item's model picks: argmax of the options' log-likelihoods (`lm.loglikelihood`, the
    `lmcraft.prompting.lm.LM` protocol)."""
    pairs = [(item.context, option) for item in items for option in item.options]
    scores = lm.loglikelihood(pairs)
    picks, at = [], 0
    for item in items:
        logps = [scores[at + k][0] for k in range(len(item.options))]
        picks.append(int(np.argmax(logps)))
        at += len(item.options)
    return picks
