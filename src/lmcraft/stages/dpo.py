"""`lmcraft dpo CONFIG.yaml [key=value ...]`: direct preference optimisation (DPO, IPO, label-smoothed DPO).

Wiring (the math lives in lmcraft.align.dpo):

1. policy from `model.from` (typically the SFT output; an adapter folder is merged into its base) and its tokenizer;
2. pairs as in `lmcraft reward` (answer tokens masked for the log-probs);
3. the reference: the start model; with PEFT the policy with its adapters disabled (no second copy), else a frozen
   copy. `dpo.reference: precompute` computes the reference log-probs of every pair once (cached in OUT/, so a
   resumed run reuses them) and frees the copy; `on_the_fly` recomputes them in every step;
4. the Trainer (exact resume by rerunning the command); evaluation reports the DPO loss and reward accuracy/margin
   on held-out pairs, and `eval_score` (mean score of sampled answers to held-out prompts) when `score_eval` is set;
5. OUT/final (model or adapter, with the tokenizer), samples.json before/after, summary.json.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from lmcraft.config import Section, StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

__all__ = ["DPOSection", "add_arguments", "config_class", "run", "run_dpo"]


class DPOSection(Section):
    beta: float = Field(0.1, gt=0)
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    reference: Literal["precompute", "on_the_fly"] = "precompute"

    @model_validator(mode="after")
    def _smoothing(self) -> DPOSection:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("label_smoothing applies to loss: sigmoid only")
        return self


@functools.cache
def config_class() -> type[StageConfig]:
    from lmcraft.align.config import AlignmentConfig, PairsData, SamplesSection, SaveSection, ScoreEval
    from lmcraft.train import TrainerConfig

    class DPOConfig(AlignmentConfig):
        data: PairsData
        dpo: DPOSection = DPOSection()
        trainer: TrainerConfig = TrainerConfig()
        score_eval: ScoreEval | None = None
        samples: SamplesSection = SamplesSection()
        save: SaveSection = SaveSection()
        output_dir: Path

    return DPOConfig


def run(args: argparse.Namespace) -> int:
    cfg = load_training_config(config_class(), args)
    with claim(args, "dpo", cfg.output_dir, cfg):
        run_dpo(cfg)
    return 0


def _plot(history: list[dict[str, Any]], start_score: float | None, path: Path) -> None:
    """Train loss and implicit-reward margin, held-out reward accuracy, and the held-out score (from the start)."""
    from lmcraft.align.plots import plot_metrics

    train = [r for r in history if r["split"] == "train"]
    evals = [r for r in history if r["split"] == "eval"]
    series = {"DPO loss (train)": ([r["step"] for r in train], [r["loss"] for r in train]),
              "reward margin (train)": ([r["step"] for r in train], [r["reward_margin"] for r in train]),
              "reward accuracy (held-out pairs)": ([r["step"] for r in evals],
                                                   [r["eval_reward_accuracy"] for r in evals])}
    scored = [(r["step"], r["eval_score"]) for r in evals if "eval_score" in r]
    if scored:
        scored.insert(0, (0, start_score))
        series["held-out score (sampled answers)"] = ([s for s, _ in scored], [v for _, v in scored])
    plot_metrics(series, path, "DPO")


def run_dpo(cfg: Any) -> dict[str, Any]:
    """Run the stage for a validated `DPOConfig`; returns the summary (also in OUT/summary.json)."""
    from lmcraft.align.common import (
        ScoreEvaluator,
        open_start,
        record_samples,
        save_stage_final,
        stage_trainer,
        write_summary,
    )
    from lmcraft.align.dpo import DPOLoss, Reference, WithReference, precompute_reference
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.align.modeling import add_peft, is_peft, planned_steps
    from lmcraft.stages.reward import load_pairs

    out, d = Path(cfg.output_dir), cfg.dpo
    start = open_start(cfg.model, cfg.template, out, cfg.trainer.seed)
    train, evaluation = load_pairs(cfg.data, ChatFormatter(start.tokenizer, train_on="last"))
    scorer = ScoreEvaluator(cfg.score_eval, start.tokenizer) if cfg.score_eval is not None else None
    start_score = scorer.baseline(out, start.model) if scorer is not None else None
    if not start.resuming:
        record_samples(out, "before", start.model, start.tokenizer, cfg.samples)
    model = add_peft(start.model, cfg.peft, planned_steps(cfg.trainer, len(train)))
    reference = Reference() if is_peft(model) else Reference.frozen_copy(model)
    if d.reference == "precompute":
        batch = cfg.trainer.eval_batch_size or cfg.trainer.micro_batch_size
        progress = cfg.trainer.progress
        train = WithReference(train, precompute_reference(model, reference, train, batch, out / "reference_train.json",
                                                          progress))
        if evaluation is not None:
            evaluation = WithReference(evaluation, precompute_reference(model, reference, evaluation, batch,
                                                                        out / "reference_eval.json", progress))
        reference = None  # the copy (if any) is no longer needed
    loss = DPOLoss(d.beta, d.loss, d.label_smoothing, reference)
    eval_fn = (lambda tr: {"score": scorer(tr.model)}) if scorer is not None else None
    trainer = stage_trainer(cfg, start, model, loss, train, evaluation, out, eval_fn=eval_fn)
    result = trainer.train()
    if not trainer.is_main:
        return result
    paths = save_stage_final(cfg, start, model, out)
    record_samples(out, "after", model, start.tokenizer, cfg.samples)
    if cfg.trainer.plot:
        _plot(trainer.state.history, start_score, out / "dpo_curves.png")
    evals = [r for r in trainer.state.history if r["split"] == "eval"]
    last = evals[-1] if evals else {}
    summary = {"stage": "dpo", **result, **paths, "pairs": len(train), "start_score": start_score,
               "eval_score": last.get("eval_score"), "eval_reward_accuracy": last.get("eval_reward_accuracy"),
               "eval_loss": last.get("eval_loss")}
    write_summary(out, summary)
    return summary
