"""Document filters: each returns None to keep a document, or the reason it is removed.

Reasons are `<filter>:<rule>` strings (e.g. `gopher_quality:too_few_words`) so the run report can
count removals per rule. The rules and default thresholds follow:

- Gopher quality (Rae et al. 2021, "Scaling Language Models", appendix A.1.1): 50 <= words <=
  100,000; mean word length in [3, 10]; ratio of "#" and "..." symbols to words < 0.1; < 90% of
  lines start with a bullet; < 30% of lines end with an ellipsis; >= 80% of words contain a letter;
  at least 2 of the stop words {the, be, to, of, and, that, have, with}.
- Gopher repetition (same appendix): duplicate-line fraction <= 0.30 and its character share <=
  0.20; same for paragraphs; the most frequent n-gram covers <= {2: 0.20, 3: 0.18, 4: 0.16} of the
  characters; characters inside duplicated n-grams <= {5: .15, 6: .14, 7: .13, 8: .12, 9: .11, 10: .10}.
- C4 (Raffel et al. 2020, section 2.2): remove pages containing "lorem ipsum" or a curly brace
  (code), and pages with fewer than `min_sentences` sentences.
- Blocklist: remove a document containing more than `max_hits` words from a list (whole-word,
  case-insensitive; multi-word phrases allowed).
- Language: keep documents whose py3langid language is in `languages` with probability >= `min_score`.

Words are whitespace-separated tokens, as in the Gopher rules; scripts written without spaces
(Chinese, Japanese, Thai) should be routed with the language filter before these rules apply.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from lmcraft.data.pickling import RebuiltOnUnpickle

__all__ = ["Blocklist", "C4Quality", "GopherQuality", "GopherRepetition", "Language", "MinLength"]

_CONFIG = {"extra": "forbid"}
_BULLETS = ("•", "●", "○", "▪", "▫", "■", "□", "◦", "‣", "⁃", "-", "*", "–", "—", "➢", "➤", "►", "→")
_ELLIPSES = ("...", "…")
_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
_LETTER = re.compile(r"[^\W\d_]")  # any Unicode letter


def _nonblank(parts: list[str]) -> list[str]:
    """The parts (lines, paragraphs) that are not blank, stripped."""
    return [p.strip() for p in parts if p.strip()]


@dataclass
class MinLength:
    """Remove documents shorter than `min_chars` characters (after stripping)."""

    name: ClassVar[str] = "min_length"
    kind: ClassVar[str] = "filter"
    min_chars: int = 1
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str | None:
        return "too_short" if len(text.strip()) < self.min_chars else None


@dataclass
class GopherQuality:
    """Gopher quality heuristics; `None` disables a rule."""

    name: ClassVar[str] = "gopher_quality"
    kind: ClassVar[str] = "filter"
    min_words: int | None = 50
    max_words: int | None = 100_000
    min_mean_word_length: float | None = 3.0
    max_mean_word_length: float | None = 10.0
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: list[str] = field(default_factory=lambda: list(_STOP_WORDS))
    __pydantic_config__ = _CONFIG

    def __post_init__(self) -> None:
        self._stop_regex: re.Pattern[str] | None = None  # built on first use (not pickled: rebuilt)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_stop_regex": None}

    def __call__(self, text: str) -> str | None:
        words = text.split()
        n = len(words)
        if self.min_words is not None and n < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n > self.max_words:
            return "too_many_words"
        if n == 0:
            return None
        mean_len = sum(map(len, words)) / n
        if self.min_mean_word_length is not None and mean_len < self.min_mean_word_length:
            return "short_mean_word_length"
        if self.max_mean_word_length is not None and mean_len > self.max_mean_word_length:
            return "long_mean_word_length"
        if self.max_symbol_word_ratio is not None:
            symbols = text.count("#") + text.count("...") + text.count("…")
            if symbols / n > self.max_symbol_word_ratio:
                return "symbol_word_ratio"
        lines = _nonblank(text.split("\n"))
        if lines and self.max_bullet_lines_ratio is not None:
            if sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) > self.max_bullet_lines_ratio:
                return "bullet_lines"
        if lines and self.max_ellipsis_lines_ratio is not None:
            if sum(ln.endswith(_ELLIPSES) for ln in lines) / len(lines) > self.max_ellipsis_lines_ratio:
                return "ellipsis_lines"
        if self.min_alpha_words_ratio is not None:
            alpha = sum(map(str.isalpha, words))  # fast path: words made of letters only
            if alpha / n < self.min_alpha_words_ratio:  # then count words with a letter among other characters
                alpha += sum(1 for w in words if not w.isalpha() and _LETTER.search(w))
            if alpha / n < self.min_alpha_words_ratio:
                return "few_alphabetic_words"
        if self.min_stop_words:
            if self._stop_regex is None:
                self._stop_regex = re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, self.stop_words)) + r")(?!\w)")
            if len(set(self._stop_regex.findall(text.lower()))) < self.min_stop_words:
                return "few_stop_words"
        return None


def _dup_stats(items: list[str]) -> tuple[float, float]:
    """(fraction of items that repeat an earlier item, fraction of characters in those repeats)."""
    seen: set[str] = set()
    dup_items = dup_chars = 0
    for item in items:
        if item in seen:
            dup_items += 1
            dup_chars += len(item)
        else:
            seen.add(item)
    total_chars = sum(len(i) for i in items) or 1
    return dup_items / len(items), dup_chars / total_chars


def _top_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters covered by the most frequent n-gram (count x its length) over all word characters."""
    if len(words) < n:
        return 0.0
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    gram, count = counts.most_common(1)[0]
    if count < 2:
        return 0.0
    return count * sum(len(w) for w in gram) / total_chars


def _dup_ngram_char_fraction(words: list[str], n: int, total_chars: int) -> float:
    """Characters of words that lie inside an n-gram occurring more than once, over all word characters.

    Overlapping occurrences are counted once per word (a boolean mask), as in the Gopher paper.
    """
    if len(words) < n:
        return 0.0
    grams = list(zip(*(words[i:] for i in range(n)), strict=False))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [False] * len(words)
    for start, gram in enumerate(grams):
        if counts[gram] > 1:
            for j in range(start, start + n):
                covered[j] = True
    return sum(len(w) for w, c in zip(words, covered, strict=True) if c) / total_chars


@dataclass
class GopherRepetition:
    """Gopher repetition rules over lines, paragraphs and word n-grams; `None` disables a rule."""

    name: ClassVar[str] = "gopher_repetition"
    kind: ClassVar[str] = "filter"
    max_dup_line_fraction: float | None = 0.30
    max_dup_line_char_fraction: float | None = 0.20
    max_dup_para_fraction: float | None = 0.30
    max_dup_para_char_fraction: float | None = 0.20
    top_ngram_max_fraction: dict[int, float] = field(default_factory=lambda: {2: 0.20, 3: 0.18, 4: 0.16})
    dup_ngram_max_fraction: dict[int, float] = field(
        default_factory=lambda: {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    )
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str | None:
        paragraphs = _nonblank(re.split(r"\n{2,}", text))
        if paragraphs:
            frac, chars = _dup_stats(paragraphs)
            if self.max_dup_para_fraction is not None and frac > self.max_dup_para_fraction:
                return "dup_paragraphs"
            if self.max_dup_para_char_fraction is not None and chars > self.max_dup_para_char_fraction:
                return "dup_paragraph_chars"
        lines = _nonblank(text.split("\n"))
        if lines:
            frac, chars = _dup_stats(lines)
            if self.max_dup_line_fraction is not None and frac > self.max_dup_line_fraction:
                return "dup_lines"
            if self.max_dup_line_char_fraction is not None and chars > self.max_dup_line_char_fraction:
                return "dup_line_chars"
        words = text.lower().split()
        total = sum(map(len, words))
        if not total:
            return None
        for n, limit in sorted(self.top_ngram_max_fraction.items()):
            if _top_ngram_char_fraction(words, n, total) > limit:
                return f"top_{n}gram"
        for n, limit in sorted(self.dup_ngram_max_fraction.items()):
            fraction = _dup_ngram_char_fraction(words, n, total)
            if fraction > limit:
                return f"dup_{n}gram"
            if fraction == 0.0:
                break  # every repeated (n+1)-gram contains a repeated n-gram: none for larger n either
        return None


_SENTENCE_END = re.compile(r"[.!?。！？]+(?=\s|$)")


@dataclass
class C4Quality:
    """C4 page rules: lorem ipsum, curly braces (code/templating), fewer than `min_sentences` sentences."""

    name: ClassVar[str] = "c4"
    kind: ClassVar[str] = "filter"
    remove_lorem_ipsum: bool = True
    remove_curly_brace: bool = True
    min_sentences: int | None = 3
    __pydantic_config__ = _CONFIG

    def __call__(self, text: str) -> str | None:
        if self.remove_lorem_ipsum and "lorem ipsum" in text.lower():
            return "lorem_ipsum"
        if self.remove_curly_brace and "{" in text:
            return "curly_brace"
        if self.min_sentences and len(_SENTENCE_END.findall(text)) < self.min_sentences:
            return "few_sentences"
        return None


# A deliberately small default: explicit-content terms that URL blocklists (C4's "bad words" list,
# UT1 "adult") key on. Real runs should pass a curated list with `words_file`.
_DEFAULT_BLOCKLIST = (
    "porn",
    "porno",
    "pornographic",
    "pornography",
    "xxx",
    "hentai",
    "camgirl",
    "camgirls",
    "nsfw",
    "blowjob",
    "gangbang",
    "milf",
)


@dataclass
class Blocklist(RebuiltOnUnpickle):
    """Remove documents with more than `max_hits` blocklisted words (whole words, case-insensitive)."""

    name: ClassVar[str] = "blocklist"
    kind: ClassVar[str] = "filter"
    words: list[str] = field(default_factory=lambda: list(_DEFAULT_BLOCKLIST))
    words_file: str | None = None
    max_hits: int = 0
    __pydantic_config__ = _CONFIG

    def __post_init__(self) -> None:
        terms = [w.strip().lower() for w in self.words if w.strip()]
        if self.words_file:
            lines = Path(self.words_file).expanduser().read_text(encoding="utf-8").splitlines()
            terms += [ln.strip().lower() for ln in lines if ln.strip() and not ln.startswith("#")]
        alternatives = "|".join(re.escape(t).replace(r"\ ", r"\s+") for t in sorted(set(terms), key=len, reverse=True))
        self._regex = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.I) if terms else None

    def hits(self, text: str) -> int:
        return 0 if self._regex is None else sum(1 for _ in self._regex.finditer(text))

    def __call__(self, text: str) -> str | None:
        if self._regex is None:
            return None
        count = 0
        for _ in self._regex.finditer(text):
            count += 1
            if count > self.max_hits:
                return "blocked_words"
        return None


@dataclass
class Language:
    """Keep documents identified (py3langid) as one of `languages` with probability >= `min_score`."""

    name: ClassVar[str] = "language"
    kind: ClassVar[str] = "filter"
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_score: float = 0.65
    max_chars: int = 2000
    __pydantic_config__ = _CONFIG

    def _reason(self, lang: str, prob: float) -> str | None:
        if lang not in self.languages:
            return f"lang_{lang}"
        if prob < self.min_score:
            return "low_score"
        return None

    def __call__(self, text: str) -> str | None:
        from lmcraft.data.langid import identify

        return self._reason(*identify(text, self.max_chars))

    def batch(self, texts: list[str]) -> list[str | None]:
        from lmcraft.data.langid import identify_batch

        return [self._reason(lang, prob) for lang, prob in identify_batch(texts, self.max_chars)]
