"""Extractive question answering data: the answer is a span of a given context (SQuAD); the task is
`lmcraft.finetune.tasks.QATask`.

Data: records with a question, a context and gold answers, either flat (`{"question", "context", "answers":
{"text": [...], "answer_start": [...]}}`, the Hugging Face SQuAD layout; `answers` may also be a list of
`{"text", "answer_start"}`) or SQuAD's nested JSON file (`{"data": [{"paragraphs": [{"context", "qas": [...]}]}]}`),
read through the one record reader. Each answer must be the context's text at `answer_start`.

Windows: `[CLS] question [SEP] context [SEP]` is cut to `max_length` tokens; a context that does not fit is split
into overlapping windows that share `doc_stride` tokens, each with the whole question (a question longer than
`max_length - 3 - 2 doc_stride` tokens keeps its beginning, so that every window holds context). A training
window's labels are the first and last token of the first gold answer when the answer lies wholly inside it, else
the [CLS] position 0 ("no answer here"), as BERT's SQuAD recipe does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmcraft.data.records import Record
from lmcraft.errors import ConfigError

__all__ = ["QAExample", "qa_examples", "qa_records"]


@dataclass(frozen=True)
class QAExample:
    """One question with its context and gold answers `(text, character start)`; `where` names its source."""

    question: str
    context: str
    answers: tuple[tuple[str, int], ...]
    where: str


def _answers(record: Record, raw: Any, context: str) -> tuple[tuple[str, int], ...]:
    if isinstance(raw, dict):  # {"text": [...], "answer_start": [...]}
        texts, starts = raw.get("text"), raw.get("answer_start")
        pairs = list(zip(texts, starts, strict=False)) if isinstance(texts, list) and isinstance(starts, list) else None
    elif isinstance(raw, list):  # [{"text", "answer_start"}, ...]
        pairs = [(a.get("text"), a.get("answer_start")) for a in raw if isinstance(a, dict)]
    else:
        pairs = None
    if not pairs or any(not isinstance(t, str) or isinstance(s, bool) or not isinstance(s, int) for t, s in pairs):
        raise record.error("answers as {text: [...], answer_start: [...]} or a list of {text, answer_start}, with at "
                           "least one answer")
    for text, start in pairs:
        if context[start:start + len(text)] != text:
            raise record.error(f"each answer to be the context's text at its answer_start; {text!r} is not at "
                               f"character {start}")
    return tuple(pairs)


def _string(record: Record, fields: dict[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str) or not value.strip():
        raise record.error(f"a non-empty string in field {name!r}; the record has {sorted(fields)[:10]}")
    return value


def qa_records(records: list[Record], question: str = "question", context: str = "context",
               answers: str = "answers") -> list[QAExample]:
    """QA examples from flat records, or from SQuAD's nested `data` / `paragraphs` / `qas` records."""
    out: list[QAExample] = []
    for record in records:
        fields = record.fields
        if isinstance(fields.get("data"), list):  # SQuAD's nested file, read as one record
            for article in fields["data"]:
                for paragraph in (article or {}).get("paragraphs", []):
                    ctx = _string(record, paragraph, "context")
                    for qa in paragraph.get("qas", []):
                        out.append(QAExample(_string(record, qa, "question"), ctx,
                                             _answers(record, qa.get("answers"), ctx), record.source))
            continue
        ctx = _string(record, fields, context)
        out.append(QAExample(_string(record, fields, question), ctx, _answers(record, fields.get(answers), ctx),
                             record.source))
    return out


def _span_tokens(offsets: list[tuple[int, int]], in_context: list[bool], start: int, end: int) -> tuple[int, int]:
    """(first, last) token of the character span [start, end) when the window holds all of it, else (0, 0)."""
    tokens = [i for i, inside in enumerate(in_context) if inside]
    if not tokens or offsets[tokens[0]][0] > start or offsets[tokens[-1]][1] < end:
        return 0, 0
    first = next(i for i in tokens if offsets[i][1] > start)
    last = next(i for i in reversed(tokens) if offsets[i][0] < end)
    return first, last


def _first_tokens(backend: Any, text: str, limit: int) -> str:
    """`text` cut after its first `limit` tokens (a question longer than that keeps its beginning)."""
    offsets = backend.encode(text, add_special_tokens=False).offsets
    return text if len(offsets) <= limit else text[:offsets[limit - 1][1]]


def qa_examples(examples: list[QAExample], backend: Any, max_length: int, doc_stride: int, first_index: int = 0,
                ) -> tuple[list[dict[str, Any]], int]:
    """Token windows of `examples` (see the module docstring) and how many examples needed more than one.

    Each window: input_ids, token_type_ids, start/end labels, and `qa` (the example's index counted from
    `first_index`, the character offsets of its context tokens (None elsewhere), the context and gold answers)."""
    if doc_stride >= max_length // 2:
        raise ConfigError(f"data.doc_stride ({doc_stride}) must be below half of data.max_length ({max_length})")
    max_question = max_length - 3 - 2 * doc_stride  # a window keeps room for twice the stride of context
    questions = [_first_tokens(backend, ex.question, max_question) for ex in examples]
    backend.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
    try:
        windows, split = [], 0
        for k, (ex, question) in enumerate(zip(examples, questions, strict=True)):
            encoding = backend.encode(question, ex.context)
            parts = [encoding, *encoding.overflowing]
            split += len(parts) > 1
            text, start = ex.answers[0]
            for part in parts:
                in_context = [s == 1 for s in part.sequence_ids]
                first, last = _span_tokens(part.offsets, in_context, start, start + len(text))
                offsets = [tuple(o) if inside else None for o, inside in zip(part.offsets, in_context, strict=True)]
                windows.append({"input_ids": list(part.ids), "token_type_ids": list(part.type_ids), "start": first,
                                "end": last, "qa": {"example": first_index + k, "offsets": offsets,
                                                    "context": ex.context, "answers": [a for a, _ in ex.answers]}})
    finally:
        backend.no_truncation()
    return windows, split
