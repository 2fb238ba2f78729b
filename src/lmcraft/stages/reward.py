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
import functools
from pathlib import Path
from typing import Any

from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

__all__ = ["add_arguments", "config_class", "load_pairs", "run", "run_reward"]


@functools.cache
def config_class() -> type[StageConfig]:
    from lmcraft.align.config import AlignmentConfig, PairsData, SaveSection
    from lmcraft.train import TrainerConfig

    class RewardConfig(AlignmentConfig):
        data: PairsData
        trainer: TrainerConfig = TrainerConfig()
        save: SaveSection = SaveSection()
        output_dir: Path

    return RewardConfig


def run(args: argparse.Namespace) -> int:
    cfg = load_training_config(config_class(), args)
    with claim(args, "reward", cfg.output_dir, cfg):
        run_reward(cfg)
    return 0


def load_pairs(data: Any, formatter: Any) -> tuple[Any, Any]:
    """(train PairData, eval PairData or None) from a preference `data` section."""
    from lmcraft.align.config import split_eval
    from lmcraft.align.data import load_preferences
    from lmcraft.align.reward import build_pair_data

    pairs = load_preferences(data.train, data.format, data.limit)
    evals = load_preferences(data.eval, data.format) if data.eval else []
    if not evals:
        pairs, evals = split_eval(pairs, data.val_size, data.seed)
    train = build_pair_data(pairs, formatter, data.max_length, data.truncation)
    evaluation = build_pair_data(evals, formatter, data.max_length, data.truncation) if evals else None
    return train, evaluation


def run_reward(cfg: Any) -> dict[str, Any]:
    """Run the stage for a validated `RewardConfig`; returns the summary (also in OUT/summary.json)."""
    from lmcraft.align.common import open_start, save_stage_final, stage_trainer, start_evaluation, write_summary
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.align.modeling import add_peft, planned_steps, reward_head
    from lmcraft.align.reward import reward_loss

    out = Path(cfg.output_dir)
    head, num_labels = reward_head(cfg.model.from_)
    start = open_start(cfg.model, cfg.template, out, cfg.trainer.seed, head, num_labels)
    train, evaluation = load_pairs(cfg.data, ChatFormatter(start.tokenizer, train_on="last"))
    model = add_peft(start.model, cfg.peft, planned_steps(cfg.trainer, len(train)))
    trainer = stage_trainer(cfg, start, model, reward_loss, train, evaluation, out)
    start_eval = start_evaluation(trainer, out) if evaluation is not None else {}
    result = trainer.train()
    if not trainer.is_main:
        return result
    paths = save_stage_final(cfg, start, model, out)
    evals = [r for r in trainer.state.history if r["split"] == "eval"]
    summary = {"stage": "reward", **result, **paths, "pairs": len(train), "dropped": train.dropped,
               "start_eval_accuracy": start_eval.get("eval_accuracy"),
               "eval_accuracy": evals[-1].get("eval_accuracy") if evals else None,
               "eval_margin": evals[-1].get("eval_margin") if evals else None}
    write_summary(out, summary)
    return summary
