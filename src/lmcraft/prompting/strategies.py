"""Prompting strategies as composable objects. Each turns documents into prompts, calls the model through
the `LM` protocol (always one batched call per stage for all documents), and reads out answers.

Generative strategies implement `solve(ctx, docs, ids, sampling) -> list[Chain]` (one reasoning chain per
document) and get `run` from the base class; `SelfConsistency` wraps any of them.

- `zero_shot`: task description + question; the answer is read from a short completion.
- `instruction`: explicit instruction and numbered steps + question.
- `few_shot`: description + k demonstrations (`Shots`: random / fixed / similarity, seeded, ordered).
- `zero_shot_cot` (Kojima et al. 2022): reply starts with the trigger "Let's think step by step."; with
  `two_stage`, the generated reasoning Z is appended and the model is asked again:
  `<question> A: Let's think step by step. Z\\nTherefore, the answer (arabic numerals) is` -> short answer.
- `few_shot_cot` (Wei et al. 2022): k demonstrations with worked solutions; the answer is read from the
  generated solution (`#### n`, "the answer is n", last number).
- `self_consistency` (Wang et al. 2023): N chains of the base strategy sampled (temperature, top-p) in one
  batched call of N x documents prompts; the answer is the majority vote over extracted answers, ties going to
  the answer that appeared first; agreement = votes of the winner / N.
- `least_to_most` (Zhou et al. 2023): the model lists sub-questions; they are answered in order, each
  prompt carrying the earlier sub-questions and their answers; then the original question is answered.
- `multiple_choice`: argmax over options of log p(option | prompt), optionally divided by the option's
  token count (`normalize: tokens`) or byte count (`normalize: bytes`).
- `perplexity`: log-likelihood of each whole text (no prompt); the harness turns it into perplexity.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from lmcraft.config import Section
from lmcraft.errors import ConfigError
from lmcraft.generation_settings import Sampling as SamplingSection
from lmcraft.prompting.answers import AnswerSpec
from lmcraft.prompting.lm import LM, GenSettings
from lmcraft.prompting.templates import DemoPicker, Doc, Prompt, PromptTemplate, Shots, fill

__all__ = [
    "Chain",
    "Context",
    "FewShot",
    "FewShotCoT",
    "Instruction",
    "LeastToMost",
    "MultipleChoice",
    "Perplexity",
    "Prediction",
    "Sampling",
    "SelfConsistency",
    "Strategy",
    "ZeroShot",
    "ZeroShotCoT",
    "majority_vote",
    "parse_subquestions",
]


class Sampling(SamplingSection):
    """The generation section's sampling (`lmcraft.generation_settings.Sampling`) with self-consistency's usual
    defaults, temperature 0.7 and top-p 0.95."""

    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)


@dataclass
class Context:
    """Everything a strategy needs besides the documents: model, template, answer reading, demo pool, decoding."""

    lm: LM
    template: PromptTemplate
    answer: AnswerSpec
    pool: Sequence[Doc] = ()
    chat: bool = False
    max_new_tokens: int = 256
    answer_max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    seed: int = 0

    def settings(self, max_new_tokens: int, sampling: Sampling | None = None) -> GenSettings:
        stop = self.stop
        turn = self.template.input.split("{")[0].strip()
        if not self.chat and turn:  # plain prompts: stop when the model starts writing the next question
            stop = (*stop, "\n" + turn)
        base = GenSettings(max_new_tokens=max_new_tokens, stop=stop, seed=self.seed)
        if sampling is None:
            return base
        return replace(base, **sampling.model_dump())

    def generate(
        self, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling | None
    ) -> tuple[list[str], list[str]]:
        """Render and generate in one batched call; returns (rendered prompts, completions)."""
        texts = [p.render(self.lm, self.chat) for p in prompts]
        return texts, self.lm.generate(texts, self.settings(max_new_tokens, sampling))


@dataclass
class Chain:
    """One reasoning path: the rendered prompt and the completion of every stage, and the extracted answer."""

    prompts: list[str]
    outputs: list[str]
    answer: str | None


@dataclass
class Prediction:
    """The result for one document. `votes`/`agreement` are set by self-consistency; `extra` holds scores."""

    id: Any
    gold: str | None
    answer: str | None
    correct: bool | None
    chains: list[Chain] = field(default_factory=list)
    votes: dict[str, int] | None = None
    agreement: float | None = None
    extra: dict[str, float] = field(default_factory=dict)


def majority_vote(answers: Sequence[str | None], key: Any = str) -> tuple[str | None, dict[str, int], float]:
    """Most frequent answer (by `key(answer)`), ties to the earliest first appearance; `None` answers are not
    votes but count in the agreement's denominator. Returns (winner, votes by key, winner votes / len(answers))."""
    votes: dict[str, int] = {}
    first: dict[str, str] = {}
    for a in answers:
        if a is None:
            continue
        k = key(a)
        votes[k] = votes.get(k, 0) + 1
        first.setdefault(k, a)
    if not votes:
        return None, {}, 0.0
    best = max(votes, key=lambda k: votes[k])  # dicts keep insertion order: max() keeps the first of equals
    return first[best], votes, votes[best] / len(answers)


class _Base(Section):
    """Every strategy has a `label` (its name in tables; defaults to a short description of its settings)."""

    label: str = ""

    def title(self) -> str:
        shots = getattr(self, "shots", None)
        k = f"(k={shots.k})" if shots is not None and shots.k else ""
        return self.label or self.name + k  # type: ignore[attr-defined]


class _Generative(_Base):
    """Base of strategies whose answers come from generated text; subclasses define `solve`:
    `solve(ctx, docs, ids, sampling=None) -> list[Chain]`, one chain per document, greedy unless `sampling`."""

    def run(self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any]) -> list[Prediction]:
        chains = self.solve(ctx, docs, ids)
        return [_predict(ctx, doc, i, [c], c.answer) for doc, i, c in zip(docs, ids, chains, strict=True)]


def _predict(ctx: Context, doc: Doc, id_: Any, chains: list[Chain], answer: str | None, **kw: Any) -> Prediction:
    gold = fill(ctx.template.target, doc).strip()
    return Prediction(id_, gold, answer, ctx.answer.match(answer, gold), chains, **kw)


def _picker(ctx: Context, shots: Shots) -> DemoPicker:
    return shots.bind(ctx.pool, ctx.template.question)


class _Direct(_Generative):
    """Prompt once, read the answer from a short completion."""

    shots: Shots = Shots()
    style: ClassVar[Literal["plain", "instruction"]] = "plain"
    long: ClassVar[bool] = False  # instruction prompting asks for worked steps: reasoning-sized budget

    def solve(
        self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any], sampling: Sampling | None = None
    ) -> list[Chain]:
        picker = _picker(ctx, self.shots)
        prompts = [ctx.template.build(d, picker.pick(d, i), style=self.style) for d, i in zip(docs, ids, strict=True)]
        budget = ctx.max_new_tokens if self.long else ctx.answer_max_new_tokens
        texts, outs = ctx.generate(prompts, budget, sampling)
        where = "all" if self.long else "first_line"
        return [Chain([t], [o], ctx.answer.extract(o, where)) for t, o in zip(texts, outs, strict=True)]


class ZeroShot(_Direct):
    name: Literal["zero_shot"] = "zero_shot"


class Instruction(_Direct):
    name: Literal["instruction"] = "instruction"
    style: ClassVar[Literal["plain", "instruction"]] = "instruction"
    long: ClassVar[bool] = True


class FewShot(_Direct):
    name: Literal["few_shot"] = "few_shot"
    shots: Shots = Shots(k=4)


class ZeroShotCoT(_Generative):
    name: Literal["zero_shot_cot"] = "zero_shot_cot"
    trigger: str = "Let's think step by step."
    answer_trigger: str = "Therefore, the answer (arabic numerals) is"
    two_stage: bool = True

    def solve(
        self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any], sampling: Sampling | None = None
    ) -> list[Chain]:
        reply = f"{ctx.template.answer_prefix} {self.trigger}".strip()
        first = [ctx.template.build(d, reply=reply) for d in docs]
        texts1, reasons = ctx.generate(first, ctx.max_new_tokens, sampling)
        if not self.two_stage:
            return [Chain([t], [z], ctx.answer.extract(z)) for t, z in zip(texts1, reasons, strict=True)]
        second = [p.continued(f" {z.strip()}\n{self.answer_trigger}") for p, z in zip(first, reasons, strict=True)]
        texts2, finals = ctx.generate(second, ctx.answer_max_new_tokens, sampling)
        return [
            Chain([t1, t2], [z, a], ctx.answer.extract(a, "first"))
            for t1, t2, z, a in zip(texts1, texts2, reasons, finals, strict=True)
        ]


class FewShotCoT(_Generative):
    name: Literal["few_shot_cot"] = "few_shot_cot"
    shots: Shots = Shots(k=4)

    def solve(
        self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any], sampling: Sampling | None = None
    ) -> list[Chain]:
        picker = _picker(ctx, self.shots)
        prompts = [
            ctx.template.build(d, picker.pick(d, i), with_reasoning=True) for d, i in zip(docs, ids, strict=True)
        ]
        texts, outs = ctx.generate(prompts, ctx.max_new_tokens, sampling)
        return [Chain([t], [o], ctx.answer.extract(o)) for t, o in zip(texts, outs, strict=True)]


_LISTED = re.compile(r"^\s*(?:(?:Q|Sub-?question)?\s*\d+\s*[.):]|[-*•]|Q\s*:)\s*", re.IGNORECASE)


def parse_subquestions(text: str, limit: int) -> list[str]:
    """Sub-questions listed one per line (numbering / bullets stripped, repeats dropped); only the lines ending
    in "?" when any do."""
    lines, seen = [], set()
    for raw in text.splitlines():
        line = _LISTED.sub("", raw).strip()
        if line and line.lower() not in seen:
            seen.add(line.lower())
            lines.append(line)
    asked = [line for line in lines if line.endswith("?")]
    return (asked or lines)[:limit]


class Decomposition(Section):
    """A worked decomposition for least-to-most demonstrations."""

    question: str
    subquestions: list[str]


class LeastToMost(_Generative):
    name: Literal["least_to_most"] = "least_to_most"
    decompose_instruction: str = (
        "Break the problem into simpler sub-questions that lead to its answer. "
        "Write one sub-question per line, numbered, and do not answer them."
    )
    decompose_prefix: str = "Sub-questions:\n1."
    examples: list[Decomposition] = []
    max_subquestions: int = Field(4, ge=1)
    decompose_max_new_tokens: int = Field(96, ge=1)
    sub_max_new_tokens: int = Field(64, ge=1)
    final_question: str = "Now answer the original question."

    def _decompose_prompt(self, ctx: Context, doc: Doc) -> Prompt:
        messages: list[tuple[str, str]] = [("system", self.decompose_instruction)]
        for ex in self.examples:
            listed = "\n".join(f"{i}. {q}" for i, q in enumerate(ex.subquestions, 1))
            messages += [("user", ex.question), ("assistant", listed)]
        messages.append(("user", ctx.template.question(doc)))
        return Prompt(tuple(messages), self.decompose_prefix)

    def _solve_prompt(self, ctx: Context, doc: Doc, done: Sequence[tuple[str, str]], ask: str) -> Prompt:
        """Problem, then the answered sub-questions as earlier turns, then the next question."""
        messages: list[tuple[str, str]] = []
        if ctx.template.description:
            messages.append(("system", ctx.template.description))
        problem = ctx.template.question(doc)
        for j, (q, a) in enumerate(done):
            messages += [("user", f"{problem}\n\nQ: {q}" if j == 0 else f"Q: {q}"), ("assistant", f"A: {a}")]
        messages.append(("user", f"{problem}\n\nQ: {ask}" if not done else f"Q: {ask}"))
        return Prompt(tuple(messages), "A:")

    def solve(
        self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any], sampling: Sampling | None = None
    ) -> list[Chain]:
        decompose = [self._decompose_prompt(ctx, d) for d in docs]
        texts, outs = ctx.generate(decompose, self.decompose_max_new_tokens, sampling)
        prefix = self.decompose_prefix.rsplit("\n", 1)[-1]  # "1." begins the first listed line
        subqs = [parse_subquestions(prefix + o, self.max_subquestions) for o in outs]
        chains = [Chain([t], [o], None) for t, o in zip(texts, outs, strict=True)]
        answered: list[list[tuple[str, str]]] = [[] for _ in docs]
        for step in range(self.max_subquestions):
            todo = [i for i, qs in enumerate(subqs) if step < len(qs)]
            if not todo:
                break
            prompts = [self._solve_prompt(ctx, docs[i], answered[i], subqs[i][step]) for i in todo]
            texts, outs = ctx.generate(prompts, self.sub_max_new_tokens, sampling)
            for i, t, o in zip(todo, texts, outs, strict=True):
                answered[i].append((subqs[i][step], o.strip()))
                chains[i].prompts.append(t)
                chains[i].outputs.append(o)
        finals = [self._solve_prompt(ctx, d, answered[i], self.final_question) for i, d in enumerate(docs)]
        texts, outs = ctx.generate(finals, self.sub_max_new_tokens, sampling)
        for chain, t, o in zip(chains, texts, outs, strict=True):
            chain.prompts.append(t)
            chain.outputs.append(o)
            chain.answer = ctx.answer.extract(o)
        return chains


Reasoner = Annotated[
    ZeroShot | Instruction | FewShot | ZeroShotCoT | FewShotCoT | LeastToMost, Field(discriminator="name")
]


class SelfConsistency(_Base):
    name: Literal["self_consistency"] = "self_consistency"
    base: Reasoner = ZeroShotCoT()
    n: int = Field(5, ge=1)
    sampling: Sampling = Sampling()

    def title(self) -> str:
        return self.label or f"self_consistency({self.base.title()}, n={self.n})"

    def run(self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any]) -> list[Prediction]:
        reps = [d for d in docs for _ in range(self.n)]
        rep_ids = [i for i in ids for _ in range(self.n)]
        chains = self.base.solve(ctx, reps, rep_ids, self.sampling)
        preds = []
        for j, (doc, id_) in enumerate(zip(docs, ids, strict=True)):
            group = chains[j * self.n : (j + 1) * self.n]
            winner, votes, agreement = majority_vote([c.answer for c in group], ctx.answer.key)
            preds.append(_predict(ctx, doc, id_, group, winner, votes=votes, agreement=agreement))
        return preds


class MultipleChoice(_Base):
    name: Literal["multiple_choice"] = "multiple_choice"
    shots: Shots = Shots()
    normalize: Literal["none", "tokens", "bytes"] = "none"

    def run(self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any]) -> list[Prediction]:
        t = ctx.template
        if not t.choices:
            raise ConfigError("multiple_choice needs template.choices: the document field listing the options")
        picker = _picker(ctx, self.shots)
        pairs, spans = [], []
        for d, i in zip(docs, ids, strict=True):
            context = t.build(d, picker.pick(d, i)).render(ctx.lm, ctx.chat)
            options = t.options(d)
            spans.append((len(pairs), options))
            pairs += [(context, " " + o) for o in options]
        scores = ctx.lm.loglikelihood(pairs)
        preds = []
        for d, i, (start, options) in zip(docs, ids, spans, strict=True):
            ranked = []
            for k, o in enumerate(options):
                logp, n_tok = scores[start + k]
                denom = {"none": 1, "tokens": n_tok, "bytes": len((" " + o).encode())}[self.normalize]
                ranked.append(logp / max(1, denom))
            best = max(range(len(options)), key=lambda k: ranked[k])
            gold = d[t.label]
            gold_text = options[gold] if isinstance(gold, int) else str(gold)
            extra = {f"score_{k}": s for k, s in enumerate(ranked)}
            preds.append(Prediction(i, gold_text, options[best], options[best] == gold_text, extra=extra))
        return preds


class Perplexity(_Base):
    """Log-likelihood of each whole text. A text longer than the context is scored in windows: the first predicts
    a full context, each later one the next `stride` tokens with the tokens before them as context (default half
    the context; `stride` = the context length gives lm-evaluation-harness's disjoint windows)."""

    name: Literal["perplexity"] = "perplexity"
    stride: int | None = Field(None, ge=1)

    def run(self, ctx: Context, docs: Sequence[Doc], ids: Sequence[Any]) -> list[Prediction]:
        texts = [ctx.template.question(d) for d in docs]
        scores = ctx.lm.loglikelihood_rolling(texts, stride=self.stride)
        return [
            Prediction(i, None, None, None, extra={"logprob": lp, "tokens": n, "bytes": len(t.encode())})
            for i, t, (lp, n) in zip(ids, texts, scores, strict=True)
        ]


Strategy = Annotated[
    ZeroShot
    | Instruction
    | FewShot
    | ZeroShotCoT
    | FewShotCoT
    | LeastToMost
    | SelfConsistency
    | MultipleChoice
    | Perplexity,
    Field(discriminator="name"),
]
