"""Prompts as data: a `PromptTemplate` fills documents into text, a `Prompt` is a list of chat messages plus
the start of the model's reply, and `Shots` chooses the few-shot demonstrations.

A `Prompt` renders two ways (`Prompt.render(lm, chat)`):

- plain: `system\\n\\n`, then each user turn followed by `\\n`, each assistant turn followed by `\\n\\n`, then the
  reply prefix, e.g. `"Question: 2+2?\\nAnswer: 4\\n\\nQuestion: 3+3?\\nAnswer:"`;
- chat: the model's own chat template over the messages (demonstrations become earlier user/assistant turns,
  "few-shot as multi-turn"), with the generation prompt, then the reply prefix.

Prompt styles (what the issue calls zero-shot, instruction and few-shot prompting):

- zero-shot: the task `description` as the system message, then the question;
- instruction: the explicit `instruction` and numbered `steps` as the system message, then the question;
- few-shot: the description, then k demonstrations (question + target), then the question.

Few-shot selection (`Shots`): `random` (k from the pool with an RNG seeded by `(seed, query id)`, so the
choice for a query never depends on batch order), `fixed` (the listed pool indices), or `similarity`
(k nearest by TF-IDF cosine, `w_t = (1 + log tf) * (1 + log((1 + N) / (1 + df)))`, vectors L2-normalised).
`order`: `selected` (selector's order; most similar first), `reversed` (most similar next to the query),
`shuffled` (seeded). A demonstration whose input equals the query's is never chosen.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from lmcraft.config import Section
from lmcraft.errors import ConfigError
from lmcraft.prompting.lm import LM

__all__ = ["Doc", "Prompt", "PromptTemplate", "Shots", "DemoPicker", "fill"]

Doc = Mapping[str, Any]


def fill(template: str, doc: Doc) -> str:
    """`template.format(**doc)`, with a clear error naming the missing field."""
    try:
        return template.format_map(doc)
    except KeyError as err:
        raise ConfigError(
            f"prompt template {template!r} uses the field {err.args[0]!r}, but the document has only "
            f"{sorted(k for k in doc if not k.startswith('_'))}. Map it in the task's data.fields."
        ) from None
    except (IndexError, ValueError) as err:
        raise ConfigError(f"prompt template {template!r} is not a valid format string: {err}") from None


@dataclass(frozen=True)
class Prompt:
    """Chat messages `(role, content)` and `reply`: the start of the assistant's answer, continued by the model."""

    messages: tuple[tuple[str, str], ...]
    reply: str = ""

    def continued(self, text: str) -> Prompt:
        """The same prompt with `text` appended to the assistant's reply (multi-stage prompting)."""
        return replace(self, reply=self.reply + text)

    def render(self, lm: LM, chat: bool) -> str:
        if chat:
            return lm.render_chat([{"role": r, "content": c} for r, c in self.messages]) + self.reply
        parts = []
        for role, content in self.messages:
            parts.append(content + ("\n\n" if role in ("system", "assistant") else "\n"))
        return "".join(parts) + self.reply


class PromptTemplate(Section):
    """How one task's documents become text. Fields are `str.format` templates over the document's fields.

    description: the task description (zero-shot and few-shot system message).
    instruction / steps: the explicit instruction and its numbered steps (instruction prompting).
    input: the question as shown to the model. answer_prefix: the start of the answer ("Answer:").
    target: the gold answer as written in demonstrations. reasoning: a worked solution that ends with the
    answer (few-shot chain-of-thought demonstrations). choices: the options for multiple choice scored by
    log-likelihood, either a fixed list (e.g. class labels) or the name of a list field of each document;
    `label` names the field holding the gold option (its text, or its index in the options).
    """

    description: str = ""
    instruction: str = ""
    steps: list[str] = []
    input: str = "{question}"
    answer_prefix: str = "Answer:"
    target: str = "{answer}"
    reasoning: str = ""
    choices: str | list[str] = ""
    label: str = "answer"

    def system(self, style: Literal["plain", "instruction"]) -> str:
        if style == "plain":
            return self.description
        steps = "\n".join(f"{i}. {step}" for i, step in enumerate(self.steps, 1))
        return "\n".join(part for part in (self.instruction or self.description, steps) if part)

    def options(self, doc: Doc) -> list[str]:
        if isinstance(self.choices, list):
            return list(self.choices)
        if self.choices not in doc or not isinstance(doc[self.choices], list):
            raise ConfigError(f"template.choices names the field {self.choices!r}, which is not a list in the document")
        return [str(o) for o in doc[self.choices]]

    def question(self, doc: Doc) -> str:
        return fill(self.input, doc)

    def answer(self, doc: Doc, with_reasoning: bool = False) -> str:
        """The assistant turn of a demonstration: prefix + target (or prefix + worked reasoning)."""
        body = fill(self.reasoning if with_reasoning else self.target, doc)
        return f"{self.answer_prefix} {body}".strip()

    def build(
        self,
        doc: Doc,
        demos: Sequence[Doc] = (),
        style: Literal["plain", "instruction"] = "plain",
        reply: str | None = None,
        with_reasoning: bool = False,
    ) -> Prompt:
        """System message, demonstrations as user/assistant turns, the question, and the reply prefix."""
        if with_reasoning and demos and not self.reasoning:
            raise ConfigError("few-shot chain-of-thought needs template.reasoning (a worked solution field)")
        messages: list[tuple[str, str]] = []
        system = self.system(style)
        if system:
            messages.append(("system", system))
        for demo in demos:
            messages += [("user", self.question(demo)), ("assistant", self.answer(demo, with_reasoning))]
        messages.append(("user", self.question(doc)))
        return Prompt(tuple(messages), self.answer_prefix if reply is None else reply)


_WORD = re.compile(r"\w+")


def _tfidf(texts: Sequence[str]) -> tuple[list[dict[str, float]], dict[str, float]]:
    counts = [Counter(_WORD.findall(t.lower())) for t in texts]
    df = Counter(w for c in counts for w in c)
    n = len(texts)
    idf = {w: 1.0 + math.log((1 + n) / (1 + d)) for w, d in df.items()}
    return [_weigh(c, idf) for c in counts], idf


def _weigh(counts: Counter[str], idf: Mapping[str, float]) -> dict[str, float]:
    vec = {w: (1.0 + math.log(tf)) * idf.get(w, 1.0 + math.log(2.0)) for w, tf in counts.items()}
    norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
    return {w: v / norm for w, v in vec.items()}


class Shots(Section):
    """Few-shot demonstrations: how many, how they are chosen, in which order, with which seed."""

    k: int = 0
    selection: Literal["random", "fixed", "similarity"] = "random"
    indices: list[int] = []
    order: Literal["selected", "reversed", "shuffled"] = "selected"
    seed: int = 1234

    def bind(self, pool: Sequence[Doc], text: Callable[[Doc], str]) -> DemoPicker:
        if self.k and not pool:
            raise ConfigError(f"{self.k}-shot prompting needs demonstrations: give the task a data.fewshot source")
        if self.selection == "fixed":
            bad = [i for i in self.indices if not 0 <= i < len(pool)]
            if bad or len(self.indices) < self.k:
                raise ConfigError(
                    f"fixed few-shot indices {self.indices} must name at least k={self.k} demonstrations "
                    f"among the pool's {len(pool)}"
                )
        return DemoPicker(self, list(pool), text)


class DemoPicker:
    """`Shots` bound to a pool: `pick(query, query_id)` returns the k demonstrations for one query."""

    def __init__(self, shots: Shots, pool: list[Doc], text: Callable[[Doc], str]) -> None:
        self.shots, self.pool, self.text = shots, pool, text
        self._texts = [text(d) for d in pool]
        self._vectors: list[dict[str, float]] | None = None
        self._idf: dict[str, float] = {}

    def _similar(self, query: str) -> list[int]:
        if self._vectors is None:
            self._vectors, self._idf = _tfidf(self._texts)
        q = _weigh(Counter(_WORD.findall(query.lower())), self._idf)
        sims = [sum(v * q.get(w, 0.0) for w, v in vec.items()) for vec in self._vectors]
        return sorted(range(len(self.pool)), key=lambda i: (-sims[i], i))

    def pick(self, query: Doc, query_id: object) -> list[Doc]:
        s = self.shots
        if s.k == 0:
            return []
        query_text = self.text(query)
        rng = random.Random(f"{s.seed}/{query_id}")
        if s.selection == "fixed":
            candidates = list(s.indices)
        elif s.selection == "similarity":
            candidates = self._similar(query_text)
        else:
            candidates = rng.sample(range(len(self.pool)), len(self.pool))
        chosen = [i for i in candidates if self._texts[i] != query_text][: s.k]
        if s.order == "reversed":
            chosen.reverse()
        elif s.order == "shuffled":
            rng.shuffle(chosen)
        return [self.pool[i] for i in chosen]
