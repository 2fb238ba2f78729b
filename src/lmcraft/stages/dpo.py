"""`lmcraft dpo CONFIG.yaml [key=value ...]`: preference tuning, `dpo.loss` one of sigmoid (DPO), ipo, hinge, robust,
simpo, cpo, orpo (no reference model) or kto (answers labelled desirable/undesirable).

Wiring (the formulas live in lmcraft.align.preference_losses, the method in lmcraft.align.dpo):

1. policy from `model.from` (typically the SFT output; an adapter folder is merged into its base) and its tokenizer;
2. pairs as in `lmcraft reward` (answer tokens masked for the log-probs); for kto, labelled answers (`messages` +
   `label`, `prompt`/`completion`/`label`, or pairs split into a desirable and an undesirable answer);
3. the reference (not for simpo/cpo/orpo): the start model; with PEFT the policy with its adapters disabled (no
   second copy), else a frozen copy. `dpo.reference: precompute` computes the reference log-probs of every pair
   once (cached in OUT/, so a resumed run reuses them) and frees the copy; `on_the_fly` recomputes them in every
   step (always for kto, whose reference point comes from each micro-batch);
4. the Trainer (exact resume by rerunning the command); evaluation reports the DPO loss and reward accuracy/margin
   on held-out pairs, and `eval_score` (mean score of sampled answers to held-out prompts) when `score_eval` is set;
5. OUT/final (model or adapter, with the tokenizer), samples.json before/after, summary.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmcraft.align.config import AlignmentConfig, DPOSection, PairsData, SamplesSection, SaveSection, ScoreEval
from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import run_alignment_stage
from lmcraft.train.config import TrainerConfig

__all__ = ["DPOSection", "add_arguments", "config_class", "run"]


class DPOConfig(AlignmentConfig):
    data: PairsData
    dpo: DPOSection = DPOSection()
    trainer: TrainerConfig = TrainerConfig()
    score_eval: ScoreEval | None = None
    samples: SamplesSection = SamplesSection()
    save: SaveSection = SaveSection()
    output_dir: Path


def config_class() -> type[StageConfig]:
    """The config class, listed by `lmcraft dpo --help` and checked by `lmcraft pipeline`."""
    return DPOConfig


def run(args: argparse.Namespace) -> int:
    return run_alignment_stage(args, "dpo", DPOConfig, "lmcraft.align.dpo:DPO")

