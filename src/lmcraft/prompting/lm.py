"""The small protocol through which prompting strategies and the evaluation harness talk to a model.

Anything with these methods can be evaluated: `ModelLM` (an lmcraft model + tokenizer, in
`lmcraft.prompting.model_lm`), `ScriptedLM` (deterministic fake for tests, in `lmcraft.prompting.scripted`),
or a user's own wrapper around another library.

- `generate(prompts, settings)`: one completion per prompt string (the prompt is not repeated). Greedy when
  `settings.temperature == 0`, else sampled with temperature / top-p / top-k. Text is cut at the first stop
  string (the stop string itself is removed).
- `loglikelihood(pairs)`: for each `(context, continuation)`, `(sum_t log p(c_t | context, c_<t), n_tokens)`
  over the continuation's tokens. Used for multiple choice.
- `loglikelihood_rolling(texts)`: `(sum_t log p(x_t | x_<t), n_tokens)` over every token of each text
  (sliding windows when the text is longer than the model's context; windows after the first advance by `stride`
  tokens). Used for perplexity.
- `render_chat(messages)`: the model's chat template applied to `[{"role", "content"}, ...]` with the
  generation prompt for the assistant turn appended; `has_chat_template` says whether there is one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["GenSettings", "LM", "cut_at_stop"]


@dataclass(frozen=True)
class GenSettings:
    """Decoding settings of one `generate` call. `temperature == 0` means greedy (top_p/top_k unused); otherwise the
    three knobs mean what they mean in `lmcraft.generation_settings.Sampling`, which fills them."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@runtime_checkable
class LM(Protocol):
    @property
    def has_chat_template(self) -> bool: ...

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str: ...

    def generate(self, prompts: Sequence[str], settings: GenSettings) -> list[str]: ...

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]: ...

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[tuple[float, int]]: ...


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        if s:
            i = text.find(s)
            if i != -1:
                cut = min(cut, i)
    return text[:cut]
