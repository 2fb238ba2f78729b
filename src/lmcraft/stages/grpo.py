"""`lmcraft grpo CONFIG.yaml [key=value ...]`: group-relative policy optimisation on verifiable rewards (GRPO, DAPO,
Dr.GRPO, RLOO as `grpo.loss`).

Wiring (the math lives in lmcraft.align.grpo, grpo_loss and rewards):

1. policy from `model.from` (an instruct model or an SFT output); PEFT trains adapters, full fine-tuning every weight;
   with `grpo.beta > 0` the reference is the policy with adapters disabled (PEFT) or a frozen copy (full);
   with beta = 0 no reference is kept or computed;
2. prompts and gold answers from `task` (the built-in arithmetic task, or a prompting task such as gsm_symbolic);
   `task.eval_size` held-out problems measure greedy accuracy before, every `grpo.eval_every` rollouts, and after;
3. `rewards`: a weighted sum of accuracy, format (regex; <think>/<answer> tags), length and any existing scorer;
4. the Trainer runs `grpo.rollouts` rollouts of prompts_per_rollout x num_generations completions, each `mu` passes
   of minibatch steps; trainer.max_steps, grad_accum and save_every follow from the grpo section (setting them is an
   error); checkpoints fall on rollout boundaries so that a rerun resumes exactly;
5. metrics.jsonl (per step: loss, clip ratios, entropy, ratio, kl, peak_memory_mb, and the rollout's reward and
   each reward term), rollouts.jsonl, OUT/final (the policy or its adapter), samples.json, summary.json
   (accuracy_before / accuracy_after).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pydantic import Field, model_validator

from lmcraft.align.config import AlignmentConfig, SamplesSection, SaveSection, check_rollout_trainer
from lmcraft.align.grpo_config import GRPOSection, RewardSpec, TaskSection
from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import run_alignment_stage
from lmcraft.train.config import TrainerConfig

__all__ = ["GRPOSection", "RewardSpec", "TaskSection", "add_arguments", "config_class", "run"]


class GRPOConfig(AlignmentConfig):
    task: TaskSection = TaskSection()
    rewards: list[RewardSpec] = Field(min_length=1)
    grpo: GRPOSection = GRPOSection()
    trainer: TrainerConfig = TrainerConfig()
    samples: SamplesSection = SamplesSection()
    save: SaveSection = SaveSection()
    output_dir: Path

    @model_validator(mode="after")
    def _derived(self) -> GRPOConfig:
        check_rollout_trainer(self.trainer, "GRPO", ("grpo minibatch rows", self.grpo.minibatch_rows))
        labels = [r.label for r in self.rewards]
        if len(set(labels)) != len(labels):
            raise ValueError(f"rewards: names must be unique (add `name:`), got {labels}")
        if self.grpo.eval_every is not None and not self.task.eval_size:
            raise ValueError("grpo.eval_every needs held-out problems (task.eval_size > 0)")
        return self


def config_class() -> type[StageConfig]:
    """The config class, listed by `lmcraft grpo --help` and checked by `lmcraft pipeline`."""
    return GRPOConfig


def run(args: argparse.Namespace) -> int:
    return run_alignment_stage(args, "grpo", GRPOConfig, "lmcraft.align.grpo:GRPO")

