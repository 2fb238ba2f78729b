"""The document pipeline: named steps applied in order, per-document work split from global state.

A step is one of five kinds (its class attribute `kind`):
- "clean": `step(text) -> text`; a document whose text becomes empty is removed (`<step>:empty`);
- "filter": `step(text) -> reason | None` (and optionally `step.batch(texts)`, the same for many);
- "annotate": `step.annotate(texts) -> [Annotation]`, batched: per document a removal reason (or None), metadata
  written into the document's `meta` (a model score, the eval items it overlaps), a score counted into the
  step's histogram (bins cut at `step.edges`) and names tallied in the report (contaminated eval items);
- "dedup": `step.keys(texts)` computes per-document keys (hashes, MinHash signatures) and
  `step.new_index()` holds the keys of kept documents; only the index is global;
- "augment": `step(text, doc_id) -> [(id_suffix, text)]` (or `step.batch(texts, doc_ids)`, the same for many),
  allowed only as the last step.

`process_chunk` runs every per-document computation of a chunk (cleaners, filters, annotations, dedup keys,
augmentation, tokenisation): it is pure, so worker processes can run chunks in parallel.
`Decider.decide` then walks the chunk's documents in input order in the main process, consults
and updates the dedup indexes, and counts per-step statistics. The output therefore depends only
on the input order and the config, never on how many workers computed it.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmcraft.config import build_options, unknown_name
from lmcraft.data.annotation import Annotation
from lmcraft.data.augment import Augment
from lmcraft.data.back_translation import BackTranslate
from lmcraft.data.clean import BoilerplateLines, HtmlToText, Normalize, Whitespace
from lmcraft.data.decontaminate import Decontaminate
from lmcraft.data.dedup import ExactDedup, MinHashDedup
from lmcraft.data.filters import Blocklist, C4Quality, GopherQuality, GopherRepetition, Language, MinLength
from lmcraft.data.licence import CopyrightNotices, LicenceBoilerplate
from lmcraft.data.model_scores import Classifier, Perplexity, Toxicity
from lmcraft.data.pii import PiiScrubber
from lmcraft.data.readers import Document

__all__ = [
    "STEP_TYPES",
    "Annotation",
    "ChunkResult",
    "Decider",
    "DocResult",
    "StepStats",
    "build_step",
    "build_steps",
    "check_step_order",
    "example",
    "process_chunk",
    "is_validation",
]

STEP_TYPES: dict[str, type] = {
    cls.name: cls
    for cls in (
        HtmlToText,
        Normalize,
        Whitespace,
        BoilerplateLines,
        LicenceBoilerplate,
        PiiScrubber,
        MinLength,
        Language,
        GopherQuality,
        GopherRepetition,
        C4Quality,
        Blocklist,
        CopyrightNotices,
        Perplexity,
        Classifier,
        Toxicity,
        Decontaminate,
        ExactDedup,
        MinHashDedup,
        Augment,
        BackTranslate,
    )
}


def build_step(options: dict[str, Any]) -> Any:
    """One step from its config entry `{type: NAME, key: value, ...}` (the prepare config's `named_options`
    builder); a bad entry raises `OptionsError` naming the key (`type`, or the unknown/invalid option)."""
    options = dict(options)
    kind = options.pop("type", None)
    if kind not in STEP_TYPES:
        raise unknown_name("step", "type", kind, STEP_TYPES)
    return build_options(STEP_TYPES[kind], options, f"step {kind!r}")


def check_step_order(kinds: list[str]) -> None:
    """An augment step (it emits several documents per input) may only be the last step."""
    for i, kind in enumerate(kinds[:-1]):
        if kind == "augment":
            raise ValueError(f"step {i} augments the documents: it must be the last step")


def build_steps(specs: list[dict[str, Any]]) -> list[Any]:
    """The steps of a prepare config's `steps:` entries, in order."""
    steps = [build_step(spec) for spec in specs]
    check_step_order([step.kind for step in steps])
    return steps


def is_validation(doc_id: str, fraction: float, seed: int = 0) -> bool:
    """Deterministic split: BLAKE2b(seed, id) read as a number in [0, 1) is below `fraction`."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


@dataclass
class DocResult:
    """What the workers computed for one input document."""

    id: str
    source: str
    sizes: list[tuple[int, int, bool]]  # per step reached: (bytes in, bytes out, modified)
    removed_at: int | None = None  # step index that removed it (clean -> empty, filter)
    reason: str | None = None
    keys: dict[int, Any] = field(default_factory=dict)  # dedup step index -> key
    outputs: list[tuple[str, str]] = field(default_factory=list)  # (id, text) emitted if kept
    tokens: list[Any] = field(default_factory=list)  # per output: (token ids, sentence lengths)
    meta: dict[str, Any] = field(default_factory=dict)  # what annotate steps wrote (written with the document)
    notes: dict[int, Annotation] = field(default_factory=dict)  # annotate step index -> its annotation
    licence: str | None = None  # the input's declared licence
    snippet: str = ""  # a removed document: the start of its text where it was removed (report examples)


@dataclass
class ChunkResult:
    docs: list[DocResult]


EXAMPLE_CHARS = 400  # the start of a document the report shows as an example
MAX_EXAMPLES = 2  # removed documents kept as examples per step (the first ones, in input order)


def _remove(result: DocResult, step: int, reason: str, text: str) -> None:
    result.removed_at, result.reason, result.snippet = step, reason, text[:EXAMPLE_CHARS]


def example(doc: DocResult) -> dict[str, Any]:
    """A kept document as a report example: id, the start of its (first) output text, its metadata."""
    return {"id": doc.id, "text": doc.outputs[0][1][:EXAMPLE_CHARS], "meta": doc.meta}


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def process_chunk(steps: list[Any], docs: list[Document], tokenize: Any = None) -> ChunkResult:
    """All per-document work for one chunk, step by step over the chunk (so keys batch well)."""
    results = [DocResult(id=d.id, source=d.meta.get("source", ""), sizes=[], licence=d.meta.get("licence"),
                         meta={k: v for k, v in d.meta.items() if k not in ("source", "licence")}) for d in docs]
    texts = [d.text for d in docs]
    alive = list(range(len(docs)))
    for s, step in enumerate(steps):
        if step.kind == "dedup":
            keys = step.keys([texts[i] for i in alive])
            for i, key in zip(alive, keys, strict=True):
                n = _nbytes(texts[i])
                results[i].sizes.append((n, n, False))
                results[i].keys[s] = key
            continue
        if step.kind == "annotate":
            notes = step.annotate([texts[i] for i in alive])
            survivors = []
            for i, note in zip(alive, notes, strict=True):
                n = _nbytes(texts[i])
                results[i].notes[s] = note
                if note.reason is not None:
                    results[i].sizes.append((n, 0, False))
                    _remove(results[i], s, note.reason, texts[i])
                    continue
                results[i].sizes.append((n, n, bool(note.meta)))
                results[i].meta.update(note.meta)
                survivors.append(i)
            alive = survivors
            continue
        survivors = []
        batch = getattr(step, "batch", None)
        verdicts = batch([texts[i] for i in alive]) if step.kind == "filter" and batch is not None else None
        if step.kind == "augment" and batch is not None:
            verdicts = batch([texts[i] for i in alive], [results[i].id for i in alive])
        for pos, i in enumerate(alive):
            text = texts[i]
            n_in = _nbytes(text)
            if step.kind == "clean":
                new = step(text)
                if not new.strip():
                    results[i].sizes.append((n_in, 0, True))
                    _remove(results[i], s, "empty", text)
                    continue
                results[i].sizes.append((n_in, _nbytes(new), new != text))
                texts[i] = new
            elif step.kind == "filter":
                reason = verdicts[pos] if verdicts is not None else step(text)
                if reason is not None:
                    results[i].sizes.append((n_in, 0, False))
                    _remove(results[i], s, reason, text)
                    continue
                results[i].sizes.append((n_in, n_in, False))
            else:  # augment: the last step
                versions = verdicts[pos] if verdicts is not None else step(text, results[i].id)
                results[i].sizes.append((n_in, sum(_nbytes(t) for _, t in versions), len(versions) != 1))
                results[i].outputs = [(results[i].id + suffix, t) for suffix, t in versions]
            survivors.append(i)
        alive = survivors
    for i in alive:
        if not results[i].outputs:
            results[i].outputs = [(results[i].id, texts[i])]
    if tokenize is not None:
        encoded = iter(tokenize.batch([t for i in alive for _, t in results[i].outputs]))
        for i in alive:
            results[i].tokens = [next(encoded) for _ in results[i].outputs]
    return ChunkResult(results)


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    modified: int = 0
    reasons: Counter = field(default_factory=Counter)
    edges: list[float] | None = None  # annotate steps with scores: histogram bin edges
    histogram: list[int] | None = None  # counts of scores in (-inf, e0), [e0, e1), ..., [e_last, inf)
    tally: Counter = field(default_factory=Counter)  # names an annotate step reported (e.g. eval items)
    examples: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_EXAMPLES removed documents

    def __post_init__(self) -> None:
        if self.edges is not None and self.histogram is None:
            self.histogram = [0] * (len(self.edges) + 1)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "name": self.name,
            "docs_in": self.docs_in,
            "docs_out": self.docs_out,
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
            "modified": self.modified,
            "reasons": dict(sorted(self.reasons.items())),
        }
        if self.edges is not None:
            out["histogram"] = {"edges": list(self.edges), "counts": list(self.histogram or [])}
        if self.tally:
            out["tally"] = dict(sorted(self.tally.items()))
        if self.examples:
            out["examples"] = list(self.examples)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StepStats:
        data = dict(data)
        hist = data.pop("histogram", None)
        return cls(reasons=Counter(data.pop("reasons", {})), tally=Counter(data.pop("tally", {})),
                   edges=hist["edges"] if hist else None, histogram=hist["counts"] if hist else None, **data)

    def add(self, other: StepStats) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.modified += other.modified
        self.reasons.update(other.reasons)
        self.tally.update(other.tally)
        self.examples += other.examples[: MAX_EXAMPLES - len(self.examples)]
        if other.histogram is not None:
            if self.histogram is None:
                self.edges, self.histogram = other.edges, [0] * len(other.histogram)
            self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]


def step_names(steps: list[Any]) -> list[str]:
    """Unique display names: `gopher_quality`, or `whitespace#2` when a type appears twice."""
    seen: Counter = Counter()
    names = []
    for step in steps:
        seen[step.name] += 1
        names.append(step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}")
    return names


class Decider:
    """Main-process state: the dedup indexes, in step order."""

    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps
        self.names = step_names(steps)
        self.indexes = {s: step.new_index() for s, step in enumerate(steps) if step.kind == "dedup"}

    def decide(self, chunk: ChunkResult) -> tuple[list[DocResult], list[StepStats], dict[int, list[Any]]]:
        """Kept documents (in order), per-step stats of this chunk, and the dedup keys it added."""
        stats = [StepStats(name, edges=getattr(step, "edges", None)) for name, step in zip(self.names, self.steps,
                                                                                           strict=True)]
        added: dict[int, list[Any]] = {s: [] for s in self.indexes}
        kept = []
        for doc in chunk.docs:
            removed = False
            for s, (n_in, n_out, modified) in enumerate(doc.sizes):
                st = stats[s]
                st.docs_in += 1
                st.bytes_in += n_in
                note = doc.notes.get(s)
                if note is not None:
                    st.tally.update(note.tally)
                    if note.score is not None and st.histogram is not None:
                        st.histogram[bisect.bisect_right(st.edges, note.score)] += 1
                reason, snippet = None, doc.snippet
                if s in self.indexes:
                    reason = self.indexes[s].check_and_add(doc.keys[s])
                    if reason is None:
                        added[s].append(doc.keys[s])
                    else:
                        snippet = doc.outputs[0][1][:EXAMPLE_CHARS]  # a duplicate passed every per-document step
                elif doc.removed_at == s:
                    reason = doc.reason
                if reason is not None:
                    st.reasons[reason] += 1
                    if len(st.examples) < MAX_EXAMPLES:
                        score = note.score if note is not None else None
                        st.examples.append({"id": doc.id, "reason": reason, "text": snippet,
                                            **({"score": score} if score is not None else {})})
                    removed = True
                    break
                st.bytes_out += n_out
                st.modified += int(modified)
                st.docs_out += len(doc.outputs) if self.steps[s].kind == "augment" else 1
            if not removed:
                kept.append(doc)
        return kept, stats, added

    def state(self, added: dict[int, list[Any]]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s, index in self.indexes.items():
            for key, arr in index.state(added[s]).items():
                out[f"{s}.{key}"] = arr
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        for s, index in self.indexes.items():
            index.restore({k.split(".", 1)[1]: v for k, v in arrays.items() if k.split(".", 1)[0] == str(s)})
