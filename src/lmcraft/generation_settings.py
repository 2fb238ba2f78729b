"""The one generation-settings section of the stages that generate answers.

    max_new_tokens: 64     # answer length limit (tokens); alone: greedy answers (sft/dpo/ppo `samples`)
    compile: auto          # torch.compile the decode step on a fixed-shape cache: true, false, or auto (when the
                           # tokens to generate amortise the measured compile time; see lmcraft.generate.static)
    temperature: 1.0       # SamplingSettings (ppo rollouts, label-preferences): logits / T before sampling (> 0)
    top_k: 0               # keep the k most likely tokens (0 = off)
    top_p: 1.0             # keep the smallest set with probability >= p (1 = off)

A stage section subclasses one of them to add its own keys or a different default; the prompting strategies' sampling
section is `Sampling` alone (their lengths are the strategy's). No torch here (stage configs import it);
`lmcraft.generate.GenerationConfig.from_settings` turns a section into the decode loop's config.
"""

from __future__ import annotations

from typing import Literal, Protocol

from pydantic import Field

from lmcraft.config import Section

__all__ = ["GenerationSettings", "Sampling", "SamplingKnobs", "SamplingSettings"]


class SamplingKnobs(Protocol):
    """What sampled decoding reads: a `Sampling` section, or the prompting protocol's `GenSettings`."""

    temperature: float
    top_k: int
    top_p: float


class Sampling(Section):
    """p(token) = softmax(logits / temperature), then only the top_k most likely, then only the smallest set whose
    probability reaches top_p."""

    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class GenerationSettings(Section):
    """Greedy answers of at most `max_new_tokens` tokens."""

    max_new_tokens: int = Field(64, ge=1)
    compile: bool | Literal["auto"] = "auto"


class SamplingSettings(Sampling, GenerationSettings):
    """Sampled answers of at most `max_new_tokens` tokens."""
