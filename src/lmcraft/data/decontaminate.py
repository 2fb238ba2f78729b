"""Decontamination: n-gram overlap between training documents and evaluation items (GPT-3, Brown et al. 2020, C.;
the 13-gram rule of lm-evaluation-harness's decontamination).

Normalisation: text lower-cased, NFKC, split into words (`\\w+` runs, so punctuation and whitespace differences
vanish). An item's n-grams are the n consecutive normalised words at every position (n = 13 by default); an item
with fewer than n but at least `min_words` words is one shorter gram (all its words), so short questions are
still checked; shorter items cannot be told from chance overlap and are counted as unchecked. A training
document is contaminated when any of its n-grams (or short-item grams) is a gram of an item; it is removed
(`action: drop`) or kept with `contamination: [item ids]` in its metadata (`action: flag`). The report counts, per
contaminated item, the documents that contain it.

An eval set is identified by its fingerprint: sha256 over n, min_words and its sorted distinct grams, so `lmcraft
eval` can tell whether a model's training data was checked against the task as it evaluates it now. Eval sets
come from files (`files:`, any record format: every string field of a record, or `text_fields`) and from
evaluation tasks, which the prepare stage loads and attaches (`add_set`), since tasks live above this package.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from lmcraft.data.annotation import Annotation

__all__ = ["Decontaminate", "EvalSet", "normalized_words", "record_texts"]

_CONFIG = {"extra": "forbid"}
_WORD = re.compile(r"\w+")


def normalized_words(text: str) -> list[str]:
    """Lower-cased NFKC words (`\\w+` runs) of `text`."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def record_texts(record: Any, fields: Sequence[str] | None = None) -> str:
    """The text of an eval record: its string values (nested ones too, in order), or only `fields`, joined by
    newlines."""
    if fields is not None and isinstance(record, dict):
        return "\n".join(record_texts(record[f]) for f in fields if f in record)
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(t for v in record.values() if (t := record_texts(v)))
    if isinstance(record, list | tuple):
        return "\n".join(t for v in record if (t := record_texts(v)))
    return ""


@dataclass
class EvalSet:
    """The grams of one eval set: item texts -> {gram: item indexes}, with its fingerprint."""

    name: str
    size: int
    grams: dict[tuple[str, ...], list[int]]
    unchecked: int
    fingerprint: str

    @classmethod
    def build(cls, name: str, texts: Sequence[str], n: int, min_words: int) -> EvalSet:
        grams: dict[tuple[str, ...], list[int]] = {}
        unchecked = 0
        for index, text in enumerate(texts):
            words = normalized_words(text)
            if len(words) < min_words:
                unchecked += 1
                continue
            own = {tuple(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
            for gram in own:
                grams.setdefault(gram, []).append(index)
        digest = hashlib.sha256(f"{n}\0{min_words}\0".encode())
        for gram in sorted(grams):
            digest.update(" ".join(gram).encode() + b"\n")
        return cls(name, len(texts), grams, unchecked, digest.hexdigest())

    def lengths(self) -> set[int]:
        return {len(g) for g in self.grams}


@dataclass
class Decontaminate:
    """Remove (or flag) training documents that share a `n`-gram of normalised words with an eval item."""

    name: ClassVar[str] = "decontaminate"
    kind: ClassVar[str] = "annotate"
    tasks: list[str] = field(default_factory=lambda: ["builtin"])  # "builtin": every built-in eval task
    files: list[str] = field(default_factory=list)
    text_fields: list[str] | None = None
    n: int = 13
    min_words: int = 8
    action: Literal["drop", "flag"] = "drop"
    __pydantic_config__ = _CONFIG

    def __post_init__(self) -> None:
        if self.n < 1 or self.min_words < 1:
            raise ValueError("n and min_words must be >= 1")
        self._sets: list[EvalSet] = []
        self._tasks_attached = not self.tasks
        self._index: dict[tuple[str, ...], list[tuple[int, int]]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_index": None}  # rebuilt in each worker from the sets

    def add_set(self, name: str, texts: Iterable[str]) -> EvalSet:
        """Add an eval set (e.g. a task's documents as `record_texts`); returns it."""
        built = EvalSet.build(name, list(texts), self.n, self.min_words)
        self._sets.append(built)
        self._index = None
        return built

    def mark_tasks_attached(self) -> None:
        """Called by whoever loaded `tasks` into eval sets (the prepare stage)."""
        self._tasks_attached = True

    def sets(self) -> list[EvalSet]:
        """Every eval set: the attached tasks, then `files` (read on first use)."""
        if not self._tasks_attached:
            from lmcraft.errors import ConfigError

            raise ConfigError("decontaminate step: its tasks were not loaded; run it through `lmcraft prepare` "
                              "or call lmcraft.prompting.contamination.attach_eval_tasks(steps) first")
        if not any(s.name.startswith("file:") for s in self._sets):
            from lmcraft.data.records import read_records

            for path in self.files:
                self.add_set(f"file:{path}", (record_texts(r.fields, self.text_fields) for r in read_records(path)))
        return self._sets

    def _grams(self) -> dict[tuple[str, ...], list[tuple[int, int]]]:
        if self._index is None:
            index: dict[tuple[str, ...], list[tuple[int, int]]] = {}
            for s, eval_set in enumerate(self.sets()):
                for gram, items in eval_set.grams.items():
                    index.setdefault(gram, []).extend((s, i) for i in items)
            self._index = index
        return self._index

    def matches(self, text: str) -> list[str]:
        """Ids (`set:index`) of the eval items that share a gram with `text`, sorted."""
        index = self._grams()
        words = normalized_words(text)
        found: set[tuple[int, int]] = set()
        for length in {len(g) for g in index}:
            for i in range(len(words) - length + 1):
                hit = index.get(tuple(words[i:i + length]))
                if hit:
                    found.update(hit)
        sets = self._sets
        return [f"{sets[s].name}:{i}" for s, i in sorted(found)]

    def annotate(self, texts: list[str]) -> list[Annotation]:
        out = []
        for text in texts:
            items = self.matches(text)
            if not items:
                out.append(Annotation())
            elif self.action == "drop":
                out.append(Annotation("contaminated", tally=tuple(items)))
            else:
                out.append(Annotation(meta={"contamination": items}, tally=tuple(items)))
        return out

    def record(self, stats: dict[str, Any]) -> dict[str, Any]:
        """What the run checked, for stats.json and the packed index: per eval set its fingerprint and the
        contaminated items (with the number of training documents holding each)."""
        tally = stats.get("tally", {})
        sets = []
        for eval_set in self.sets():
            prefix = f"{eval_set.name}:"
            found = {k: v for k, v in tally.items() if k.startswith(prefix) and k[len(prefix):].isdigit()}
            sets.append({"name": eval_set.name, "fingerprint": eval_set.fingerprint, "items": eval_set.size,
                         "unchecked_items": eval_set.unchecked, "contaminated_items": len(found),
                         "contaminated": dict(sorted(found.items(), key=lambda kv: int(kv[0].rsplit(":", 1)[1])))})
        return {"step": stats["name"], "n": self.n, "min_words": self.min_words, "action": self.action,
                "documents": sum(stats["reasons"].values()) + stats["modified"], "sets": sets}
