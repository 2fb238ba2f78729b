"""The config sections of `lmcraft grpo` (torch-free: stage configs are read without importing torch).

    task:    {name: arithmetic, size: 512, eval_size: 64, seed: 0}     # or a prompting task: gsm_symbolic, a .yaml
    rewards: [{kind: accuracy, weight: 1.0}, {kind: format, weight: 0.2}]
    grpo:    {loss: grpo, num_generations: 8, prompts_per_rollout: 4, rollouts: 50, ...}

See lmcraft.align.grpo for the symbols (G, mu, eps_low/high, beta) and lmcraft.align.rewards for the rewards.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, model_validator

from lmcraft.align.scoring import ScorerSpec
from lmcraft.config import Section
from lmcraft.generation_settings import SamplingSettings

__all__ = ["GRPOSection", "RewardSpec", "TaskSection", "THINK_ANSWER_PATTERN"]

# the DeepSeek-R1 format: reasoning in <think>...</think>, then the answer in <answer>...</answer>, nothing else
THINK_ANSWER_PATTERN = r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$"


class TaskSection(Section):
    """Where the prompts and their gold answers come from.

    `name` is a prompting task (`lmcraft eval`'s: a built-in such as `arithmetic` or `gsm_symbolic`, or a task
    .yaml), whose template renders the question and whose answer spec scores the reply; `overrides` are its dotted
    keys (`{data.max_operand: 50}` for two-digit arithmetic). `size` prompts train, the next `eval_size` are held
    out (accuracy before and after training); a generated data source (`data.size`) is sized to cover both.
    `system` is an optional system message (e.g. asking for the <think>/<answer> format); default: the task's
    description."""

    name: str = "arithmetic"
    overrides: dict[str, Any] = {}
    size: int = Field(512, ge=1)
    eval_size: int = Field(64, ge=0)
    system: str | None = None


class RewardSpec(Section):
    """One term of the reward r = sum_k weight_k r_k, logged as reward/<name> (default name: the kind).

    accuracy: 1 if the task's answer spec matches the gold answer (read inside <answer>...</answer> when present)
    format:   1 if `pattern` (default: <think>...</think><answer>...</answer>) matches the whole answer (DOTALL)
    length:   -max(0, n - max_tokens) / max_tokens for an answer of n tokens (0 up to max_tokens)
    scorer:   an existing scorer (`lmcraft.align.scoring`: rule, reward_model, judge)"""

    kind: Literal["accuracy", "format", "length", "scorer"]
    name: str | None = None
    weight: float = 1.0
    pattern: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    scorer: ScorerSpec | None = None

    @model_validator(mode="after")
    def _complete(self) -> RewardSpec:
        if self.kind == "format" and self.pattern is not None:
            try:
                re.compile(self.pattern)
            except re.error as err:
                raise ValueError(f"pattern {self.pattern!r} is not a regular expression: {err}") from None
        if self.kind == "length" and self.max_tokens is None:
            raise ValueError("a length reward needs max_tokens")
        if (self.kind == "scorer") != (self.scorer is not None):
            raise ValueError("a `scorer` section goes with kind: scorer (and only there)")
        return self

    @property
    def label(self) -> str:
        return self.name or self.kind


class GRPOSection(SamplingSettings):
    """Rollout and update settings (see lmcraft.align.grpo for the formulas); completions sample with the generation
    settings, `max_new_tokens` is the maximum completion length L (temperature also divides the log-prob logits)."""

    loss: Literal["grpo", "dapo", "dr_grpo", "rloo"] = "grpo"
    num_generations: int = Field(8, ge=2, description="G: completions per prompt")
    prompts_per_rollout: int = Field(4, ge=1, description="groups per rollout (rows = prompts_per_rollout x G)")
    rollouts: int = Field(50, ge=1)
    minibatch_size: int | None = Field(None, ge=1, description="rows per optimizer step (default: the whole rollout)")
    mu: int = Field(1, ge=1, description="passes over each rollout (old-policy log-probs kept for the ratio)")
    epsilon_low: float = Field(0.2, gt=0, lt=1)
    epsilon_high: float | None = Field(None, gt=0, description="clip-higher (DAPO: 0.28); default epsilon_low")
    beta: float = Field(0.0, ge=0, description="k3 KL to the reference; 0 computes no reference log-probs")
    scale_eps: float = Field(1e-4, gt=0, description="eps in (r - mean) / (std + eps)")
    dynamic_sampling: bool = False
    max_sampling_rounds: int = Field(3, ge=1, description="prompt batches drawn to fill a rollout (dynamic sampling)")
    overlong_buffer: int | None = Field(None, ge=1, description="DAPO's soft overlong penalty over the last tokens")
    overlong_penalty: float = Field(1.0, ge=0)
    max_new_tokens: int = Field(64, ge=1)
    forward_batch_size: int = Field(16, ge=1, description="rows per no-grad forward while scoring a rollout, and "
                                    "prompts per batch of the held-out accuracy's greedy decode")
    save_every: int | None = Field(None, ge=1, description="rollouts between checkpoints (always at the end)")
    eval_every: int | None = Field(None, ge=1, description="rollouts between held-out accuracy evaluations")

    @property
    def rows(self) -> int:
        return self.prompts_per_rollout * self.num_generations

    @property
    def minibatch_rows(self) -> int:
        return self.minibatch_size or self.rows

    @property
    def eps_high(self) -> float:
        return self.epsilon_low if self.epsilon_high is None else self.epsilon_high

    @property
    def steps_per_rollout(self) -> int:
        return self.mu * self.rows // self.minibatch_rows

    @model_validator(mode="after")
    def _geometry(self) -> GRPOSection:
        if self.rows % self.minibatch_rows:
            raise ValueError(f"prompts_per_rollout x num_generations ({self.rows}) must be a multiple of "
                             f"minibatch_size ({self.minibatch_rows})")
        if self.overlong_buffer is not None and self.overlong_buffer >= self.max_new_tokens:
            raise ValueError(f"overlong_buffer ({self.overlong_buffer}) must be below max_new_tokens "
                             f"({self.max_new_tokens})")
        return self
