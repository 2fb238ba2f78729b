"""Answer extraction and matching: from a model's free text to a comparable answer.

Extractors turn generated text into a short answer string (or `None` when nothing fits):

- `extract_gsm`: the number after the GSM8K marker `#### n`.
- `extract_numeric`: `#### n`, else the number after "the answer is", else the last number in the text.
- `extract_label`: the label (from a closed set) that occurs first in the text, whole words, any case.
- `extract_first_line`: the first non-empty line (for exact / normalised match of short answers).

Matchers compare an extracted answer with the gold answer:

- exact: strings equal after stripping surrounding whitespace.
- normalised (SQuAD): lower case, punctuation and the articles a/an/the removed, whitespace collapsed.
- numeric: both parse as numbers (commas, `$`, `%`, a trailing `.` tolerated) and |a - b| <= 1e-6 * max(1, |b|).

`AnswerSpec` bundles one extractor with one matcher; tasks name it in YAML (`answer: {type: numeric}`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

from lmcraft.config import Section
from lmcraft.metrics import normalize_text

__all__ = [
    "AnswerSpec",
    "extract_first_line",
    "extract_gsm",
    "extract_label",
    "extract_numeric",
    "normalize_text",
    "numeric_equal",
    "parse_number",
]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_GSM = re.compile(r"####\s*(" + _NUMBER + r")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\s]*\**\s*(" + _NUMBER + r")", re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)


def parse_number(text: str) -> float | None:
    """`"1,234.50"`, `"$12"`, `"40%"`, `"7."` -> float; anything else -> None."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip("%").rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _canonical_number(raw: str) -> str | None:
    value = parse_number(raw)
    if value is None:
        return None
    return str(int(value)) if value.is_integer() else repr(value)


def extract_gsm(text: str) -> str | None:
    """The number after the last `#### ` marker (GSM8K answer format), canonicalised ("1,000" -> "1000")."""
    hits = _GSM.findall(text)
    return _canonical_number(hits[-1]) if hits else None


def extract_numeric(text: str) -> str | None:
    """`#### n`, else "the answer is n" (last occurrence), else the last number anywhere in the text."""
    for pattern in (_GSM, _ANSWER_IS, _ANY_NUMBER):
        hits = pattern.findall(text)
        if hits:
            return _canonical_number(hits[-1])
    return None


def extract_label(text: str, labels: Sequence[str]) -> str | None:
    """The label whose first whole-word, case-insensitive occurrence comes earliest in `text`."""
    best: tuple[int, str] | None = None
    for label in labels:
        hit = re.search(r"(?<!\w)" + re.escape(label) + r"(?!\w)", text, re.IGNORECASE)
        if hit and (best is None or hit.start() < best[0]):
            best = (hit.start(), label)
    return best[1] if best else None


def extract_first_line(text: str) -> str | None:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return None


def numeric_equal(pred: str, gold: str, rel_tol: float = 1e-6) -> bool:
    a, b = parse_number(pred), parse_number(gold)
    if a is None or b is None:
        return False
    return abs(a - b) <= rel_tol * max(1.0, abs(b))


class AnswerSpec(Section):
    """How to read an answer out of generated text and compare it with the gold one.

    type: `numeric` (GSM `#### n` / "answer is n" / last number), `label` (first of `labels` in the text),
    `exact` (first line, exact), `normalized` (first line, SQuAD-normalised).
    """

    type: Literal["numeric", "label", "exact", "normalized"] = "normalized"
    labels: list[str] = []

    def extract(self, text: str, where: Literal["all", "first", "first_line"] = "all") -> str | None:
        """The answer in `text`. For numbers, `where` says which: `all` (`#### n`, "answer is n", last number;
        worked solutions), `first` (the first number; the stage after "the answer is"), or `first_line` (the
        `all` rule on the first non-empty line; direct short answers such as "12 + 17 = 29\n\nExplanation: ...")."""
        if self.type == "numeric":
            if where == "first":
                hit = _ANY_NUMBER.search(text)
                return _canonical_number(hit.group()) if hit else None
            return extract_numeric(extract_first_line(text) or "" if where == "first_line" else text)
        if self.type == "label":
            return extract_label(text, self.labels)
        return extract_first_line(text)

    def match(self, pred: str | None, gold: str) -> bool:
        if pred is None:
            return False
        if self.type == "numeric":
            return numeric_equal(pred, gold)
        if self.type == "exact":
            return pred.strip() == gold.strip()
        return normalize_text(pred) == normalize_text(gold)

    def key(self, pred: str) -> str:
        """The voting key of an answer: equal keys are the same answer (self-consistency)."""
        if self.type == "numeric":
            return _canonical_number(pred) or pred.strip()
        if self.type == "exact":
            return pred.strip()
        return normalize_text(pred)
