"""Scoring answers: rules, reward models and LLM judges behind one call, `scorer(prompts, answers) -> (B,) scores`.

- `rule`: a checkable goal on the answer text.
    contains: 1 if the answer contains any (`mode: any`) / all (`mode: all`) of `words` as whole words
              (case-insensitive), else 0
    regex:    1 if `pattern` matches anywhere in the answer, else 0
    length:   -|n - target| / target for an answer of n words (0 is best)
- `reward_model`: a model with a reward head (e.g. the output of `lmcraft reward`) reads prompt + answer rendered
  through its own chat template; the score is r(x, y).
- `judge`: any chat model asked to rate the answer from 1 to `scale` with `prompt` (placeholders {prompt} and
  {answer}); the rendered request is followed by `answer_prefix`, and the score is the expected rating under the
  judge's next-token distribution restricted to the digit tokens: sum_k k p(k) / sum_k p(k). Reading probabilities
  instead of sampled text makes the judge deterministic and gives graded scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from lmcraft.config import Section
from lmcraft.errors import LmcraftError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lmcraft.tokenizer.load import Tokenizer

__all__ = ["JudgeScorer", "RewardModelScorer", "RuleScorer", "ScorerSpec", "build_scorer", "mean_sampled_score"]

Messages = list[dict[str, Any]]

DEFAULT_JUDGE_PROMPT = (
    "Rate how helpful, correct and harmless the answer is, from 1 (bad) to {scale} (excellent).\n\n"
    "Question: {prompt}\n\nAnswer: {answer}\n\nReply with one digit."
)


class ScorerSpec(Section):
    """Which scorer: `kind: rule` (+ rule options), `kind: reward_model` or `kind: judge` (+ `from`)."""

    kind: Literal["rule", "reward_model", "judge"] = "rule"
    rule: Literal["contains", "regex", "length"] | None = None
    words: list[str] = []
    mode: Literal["any", "all"] = "any"
    pattern: str | None = None
    target: int | None = Field(None, ge=1)
    from_: str | None = Field(None, alias="from")
    template: str | None = None
    max_length: int = Field(1024, ge=8)
    batch_size: int = Field(8, ge=1)
    prompt: str = DEFAULT_JUDGE_PROMPT
    answer_prefix: str = "Rating: "
    scale: int = Field(9, ge=2, le=9)

    @model_validator(mode="after")
    def _complete(self) -> ScorerSpec:
        if self.kind == "rule":
            needs = {"contains": ("words", bool(self.words)), "regex": ("pattern", self.pattern is not None),
                     "length": ("target", self.target is not None)}
            if self.rule is None:
                raise ValueError("a rule scorer needs rule: contains, regex or length")
            name, ok = needs[self.rule]
            if not ok:
                raise ValueError(f"rule {self.rule!r} needs {name!r}")
            if self.pattern is not None:
                try:
                    re.compile(self.pattern)
                except re.error as err:
                    raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        elif self.from_ is None:
            raise ValueError(f"a {self.kind} scorer needs from: (a model folder, asset or stage output)")
        if self.kind == "judge" and not ("{prompt}" in self.prompt and "{answer}" in self.prompt):
            raise ValueError("the judge prompt needs the placeholders {prompt} and {answer}")
        return self


def _last_user_text(messages: Messages) -> str:
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")


class RuleScorer:
    """Scores answer texts by a rule (see the module docstring)."""

    def __init__(self, spec: ScorerSpec) -> None:
        self.spec = spec
        self.patterns = [re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in spec.words]
        self.regex = re.compile(spec.pattern) if spec.pattern is not None else None

    def score_text(self, answer: str) -> float:
        s = self.spec
        if s.rule == "contains":
            hits = [p.search(answer) is not None for p in self.patterns]
            return float(all(hits) if s.mode == "all" else any(hits))
        if s.rule == "regex":
            return float(self.regex.search(answer) is not None)
        return -abs(len(answer.split()) - s.target) / s.target

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        import torch

        return torch.tensor([self.score_text(a) for a in answers], dtype=torch.float32)


class RewardModelScorer:
    """r(prompt, answer) from a model with a reward head, through its own tokenizer and chat template."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_length: int = 1024, batch_size: int = 8) -> None:
        from lmcraft.align.instruct import ChatFormatter

        self.model = model.eval().requires_grad_(False)
        self.formatter = ChatFormatter(tokenizer, train_on="last")
        self.max_length, self.batch_size = max_length, batch_size

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        import torch

        from lmcraft.align.instruct import collate_padded, truncate
        from lmcraft.objectives.lm_head import scored_batches

        examples = []
        for prompt, answer in zip(prompts, answers, strict=True):
            ex = self.formatter.tokenize_pair(prompt, [{"role": "assistant", "content": answer}])
            examples.append(truncate(ex, self.max_length, "right", keep_answer=True) or ex)
        device = next(self.model.parameters()).device

        def score(rows: slice) -> torch.Tensor:
            batch = collate_padded(examples[rows], self.formatter.tokenizer.pad_token_id or 0)
            out = self.model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
            return out.logits.float().reshape(-1).cpu()

        return torch.cat(scored_batches(self.model, len(examples), self.batch_size, score))


class JudgeScorer:
    """An LLM judge's expected rating (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, prompt: str = DEFAULT_JUDGE_PROMPT,
                 answer_prefix: str = "Rating: ", scale: int = 9, batch_size: int = 8) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.prompt, self.answer_prefix, self.scale, self.batch_size = prompt, answer_prefix, scale, batch_size
        ids = [tokenizer.encode(str(k), add_special_tokens=False) for k in range(1, scale + 1)]
        if any(len(i) != 1 for i in ids):
            raise LmcraftError(f"the judge's tokenizer does not encode each digit 1..{scale} as one token")
        self.digit_ids = [i[0] for i in ids]

    def request(self, prompt: Messages, answer: str) -> str:
        text = self.prompt.format(prompt=_last_user_text(prompt), answer=answer, scale=self.scale)
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return rendered + self.answer_prefix

    def __call__(self, prompts: Sequence[Messages], answers: Sequence[str]) -> torch.Tensor:
        import torch

        from lmcraft.generate.core import left_pad
        from lmcraft.objectives.lm_head import scored_batches

        requests = [self.tokenizer.encode(self.request(p, a), add_special_tokens=False)
                    for p, a in zip(prompts, answers, strict=True)]
        device = next(self.model.parameters()).device
        digits = torch.tensor(self.digit_ids, device=device)
        values = torch.arange(1, self.scale + 1, dtype=torch.float32, device=device)

        def score(rows: slice) -> torch.Tensor:
            ids, mask = left_pad(requests[rows], self.tokenizer.pad_token_id or 0)
            logits = self.model(ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float()
            probs = logits[:, digits].softmax(-1)
            return (probs * values).sum(-1).cpu()

        return torch.cat(scored_batches(self.model, len(requests), self.batch_size, score))


def build_scorer(spec: ScorerSpec, device: str | None = None) -> Any:
    """The scorer a spec names; models are loaded (adapter folders merged) onto `device`."""
    from lmcraft.align.modeling import load_stage_tokenizer, load_start_model, reward_head

    if spec.kind == "rule":
        return RuleScorer(spec)
    head, num_labels = reward_head(spec.from_) if spec.kind == "reward_model" else (None, None)
    model, tok_dir = load_start_model(spec.from_, head=head, device=device, num_labels=num_labels)
    tokenizer = load_stage_tokenizer(tok_dir, spec.template)
    if spec.kind == "reward_model":
        return RewardModelScorer(model, tokenizer, spec.max_length, spec.batch_size)
    return JudgeScorer(model, tokenizer, spec.prompt, spec.answer_prefix, spec.scale, spec.batch_size)


def mean_sampled_score(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Messages], scorer: Any,
                       max_new_tokens: int, temperature: float = 1.0, seed: int = 0, batch_size: int = 16) -> float:
    """Mean score of answers sampled (temperature > 0, fixed seed) or greedy (temperature 0) for `prompts`."""
    from lmcraft.generate import GenerationConfig, generate_text

    total = 0.0
    for lo in range(0, len(prompts), batch_size):
        chunk = list(prompts[lo: lo + batch_size])
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                  temperature=temperature or 1.0, seed=seed + lo)
        texts = generate_text(model, tokenizer, chunk, config, chat=True).texts or []
        total += float(scorer(chunk, texts).sum())
    return total / max(len(prompts), 1)
