"""`lmcraft reward CONFIG.yaml [key=value ...]`: train a reward model on preference pairs (Bradley-Terry).

Wiring (the math lives in lmcraft.align.reward):

1. start model from `model.from` with a scalar head (new unless the folder has one): a decoder's `reward` head on
   the last real token, or an encoder's one-label `cls` head on the pooled [CLS]; with PEFT the head trains as a full
   copy (`modules_to_save`) next to the adapter;
2. pairs from `data.train` (prompt/chosen/rejected, alpaca or sharegpt preference records, an optional "margin"
   per record), rendered through the chat template; truncation keeps the answer (the prompt is cut from the left);
3. the Trainer with loss -log sigma(r_c - r_r - m); evaluation reports `eval_accuracy` (pairwise) and
   `eval_margin` (mean r_c - r_r) on `data.eval` / `data.val_size`; exact resume by rerunning the command;
4. OUT/final: the reward model (HF folder, a *ForSequenceClassification with one label) or its adapter.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmcraft.align.config import AlignmentConfig, PairsData, SaveSection
from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import run_alignment_stage
from lmcraft.train.config import TrainerConfig

__all__ = ["add_arguments", "config_class", "run"]


class RewardConfig(AlignmentConfig):
    data: PairsData
    trainer: TrainerConfig = TrainerConfig()
    save: SaveSection = SaveSection()
    output_dir: Path


def config_class() -> type[StageConfig]:
    """The config class, listed by `lmcraft reward --help` and checked by `lmcraft pipeline`."""
    return RewardConfig


def run(args: argparse.Namespace) -> int:
    return run_alignment_stage(args, "reward", RewardConfig, "lmcraft.align.reward:RewardModeling")

