"""`ScriptedLM`: a deterministic fake model that follows a script, for testing prompting control flow.

Each rule is `(pattern, response)`. For every prompt the first rule whose pattern occurs in it wins
(a `str` pattern is a substring test, a compiled `re.Pattern` is searched). The response is

- a `str`: returned every time;
- a `list[str]`: successive prompts matching this rule get successive items (cycling) -- scripted samples;
- a callable `prompt -> str`: computed from the prompt.

Prompts matching no rule get `default`. Every call is recorded in `calls` (method name, inputs, settings),
so tests can assert on the exact prompts a strategy built. Stop strings are applied like a real model would.

Log-likelihoods come from `score(context, continuation) -> float` (default: 0); a "token" here is one
whitespace-separated word, so `n_tokens = max(1, len(text.split()))`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lmcraft.prompting.lm import GenSettings, cut_at_stop

__all__ = ["Call", "ScriptedLM"]

Response = str | list[str] | Callable[[str], str]


@dataclass
class Call:
    method: str
    inputs: list[Any]
    settings: GenSettings | None = None


@dataclass
class ScriptedLM:
    rules: Sequence[tuple[str | re.Pattern[str], Response]] = ()
    default: str = ""
    score: Callable[[str, str], float] = lambda context, continuation: 0.0  # noqa: E731
    chat: bool = False
    calls: list[Call] = field(default_factory=list)
    _counters: dict[int, int] = field(default_factory=dict)

    @property
    def has_chat_template(self) -> bool:
        return self.chat

    def render_chat(self, messages: Sequence[dict[str, str]]) -> str:
        """A toy template: `<|role|>content<|end|>` per message, then `<|assistant|>`."""
        turns = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages)
        return turns + "<|assistant|>"

    def _respond(self, prompt: str) -> str:
        for i, (pattern, response) in enumerate(self.rules):
            found = pattern.search(prompt) if isinstance(pattern, re.Pattern) else pattern in prompt
            if not found:
                continue
            if callable(response):
                return response(prompt)
            if isinstance(response, list):
                n = self._counters.get(i, 0)
                self._counters[i] = n + 1
                return response[n % len(response)]
            return response
        return self.default

    def generate(self, prompts: Sequence[str], settings: GenSettings) -> list[str]:
        self.calls.append(Call("generate", list(prompts), settings))
        return [cut_at_stop(self._respond(p), settings.stop) for p in prompts]

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int]]:
        self.calls.append(Call("loglikelihood", list(pairs)))
        return [(self.score(ctx, cont), max(1, len(cont.split()))) for ctx, cont in pairs]

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None) -> list[tuple[float, int]]:
        self.calls.append(Call("loglikelihood_rolling", list(texts)))
        return [(self.score("", text), max(1, len(text.split()))) for text in texts]

    def prompts(self, method: str = "generate") -> list[str]:
        """Every prompt sent to `method`, in call order (flattened over calls)."""
        return [p for c in self.calls if c.method == method for p in c.inputs]
