"""`lmcraft ppo CONFIG.yaml [key=value ...]`: RLHF with PPO against a reward model (or a rule / LLM judge).

Wiring (the math lives in lmcraft.align.ppo):

1. policy from `model.from` (typically the SFT output) plus a value head; PEFT keeps the base frozen and the
   reference is the policy with adapters disabled (no second copy); full fine-tuning keeps a frozen copy;
2. prompts from `prompts.train` (any record with a prompt: {"prompt"}, alpaca, sharegpt/messages, preference
   records) rendered with the chat template's generation prompt; prompts over `prompts.max_length` tokens are skipped;
3. the scorer `reward` (a reward model from `lmcraft reward`, a rule, or an LLM judge);
4. the Trainer runs `ppo.rollouts` rollouts; each is `ppo_epochs` x (rollout_batch_size / minibatch_size) optimizer
   steps, one per minibatch of `trainer.micro_batch_size`-row micro-batches. trainer.max_steps, grad_accum and
   save_every follow from the ppo section (setting them is an error); checkpoints fall on rollout boundaries so that
   a rerun resumes exactly; `score_eval` adds held-out scores every `ppo.eval_every` rollouts;
5. metrics.jsonl (per step: policy/value loss, clip fraction, approx KL, entropy, and the rollout's score, KL, beta),
   rollouts.jsonl, curves.png, OUT/final (the policy or its adapter), samples.json, summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import model_validator

from lmcraft.align.config import (
    AlignmentConfig,
    PPOSection,
    PromptsSection,
    SamplesSection,
    SaveSection,
    ScoreEval,
    check_rollout_trainer,
)
from lmcraft.align.scoring import ScorerSpec
from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import run_alignment_stage
from lmcraft.train.config import TrainerConfig

__all__ = ["PPOSection", "PromptsSection", "add_arguments", "config_class", "run"]


class PPOConfig(AlignmentConfig):
    prompts: PromptsSection
    reward: ScorerSpec
    ppo: PPOSection = PPOSection()
    trainer: TrainerConfig = TrainerConfig()
    score_eval: ScoreEval | None = None
    samples: SamplesSection = SamplesSection()
    save: SaveSection = SaveSection()
    output_dir: Path

    @model_validator(mode="after")
    def _derived(self) -> PPOConfig:
        check_rollout_trainer(self.trainer, "PPO", ("ppo.minibatch_size", self.ppo.minibatch_size))
        if self.ppo.eval_every is not None and self.score_eval is None:
            raise ValueError("ppo.eval_every needs a score_eval section (scorer and held-out prompts)")
        return self


def config_class() -> type[StageConfig]:
    """The config class, listed by `lmcraft ppo --help` and checked by `lmcraft pipeline`."""
    return PPOConfig


def run(args: argparse.Namespace) -> int:
    return run_alignment_stage(args, "ppo", PPOConfig, "lmcraft.align.ppo:PPO")

