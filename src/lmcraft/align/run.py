"""The one run template of the alignment stages (sft, reward, dpo, ppo); each method supplies its data and its loss.

    start model + tokenizer (OUT/tokenizer)        open_start, with the method's head (reward)
    data                                           method.data(run) -> (train, evaluation or None)
    start score, "before" samples                  when the config has score_eval / samples (first run only)
    PEFT method (or full fine-tuning)              lmcraft.peft.training.prepare_for_training
    loss and the Trainer's inputs                  method.plan(run) -> TrainPlan
    Trainer (regulariser, AdaLoRA allocator,       the start model's evaluation first when the plan asks for it
      checkpoints in the method's format)
    OUT/final (+ OUT/merged), "after" samples      lmcraft.peft.training.save_final; the saved chat template is
                                                   checked against the one used in training
    summary.json                                   {"stage", trainer result, paths, **method.summary(run)}

Rerunning the same command resumes from the newest checkpoint; the start score, the start evaluation and the "before"
samples are kept from the first run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lmcraft.align.common import (
    ScoreEvaluator,
    StartPoint,
    open_start,
    record_samples,
    start_evaluation,
    write_summary,
)
from lmcraft.align.modeling import base_source_of, planned_steps

if TYPE_CHECKING:
    from torch import nn

    from lmcraft.align.config import ModelSource, SamplesSection, SaveSection, ScoreEval
    from lmcraft.peft.training import PeftTraining
    from lmcraft.train import Callback, LossOutput, Trainer, TrainerConfig

__all__ = ["AlignmentMethod", "Run", "StageConfig", "TrainPlan", "run_alignment"]


class StageConfig(Protocol):
    """The sections every alignment stage config has (`samples` and `score_eval` are optional)."""

    model: ModelSource
    template: str | None
    peft: dict[str, Any] | None
    trainer: TrainerConfig
    save: SaveSection
    output_dir: Path


@dataclass
class Run:
    """What the template knows so far, handed to the method's hooks."""

    cfg: StageConfig
    out: Path
    start: StartPoint
    train: Any = None  # the training items (with `collate` and `len`)
    evaluation: Any = None  # held-out items, or None
    scorer: ScoreEvaluator | None = None
    start_score: float | None = None
    training: PeftTraining | None = None
    trainer: Trainer | None = None
    start_eval: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainPlan:
    """The Trainer's inputs a method supplies; `model` defaults to the prepared model, `trainer_config` to the
    config's `trainer` section, and batches come from `train.collate` unless `collate` is False (a loader)."""

    loss_fn: Callable[[nn.Module, Any], LossOutput]
    train: Any
    evaluation: Any = None
    model: nn.Module | None = None
    trainer_config: TrainerConfig | None = None
    collate: bool = True
    callbacks: Sequence[Callback] = ()
    eval_fn: Callable[[Trainer], dict[str, float]] | None = None
    start_evaluation: bool = False  # evaluate the start model once (OUT/start_eval.json)


class AlignmentMethod:
    """One alignment method: its data, its loss, and its numbers; the template does the rest."""

    name: str

    @classmethod
    def from_config(cls, cfg: StageConfig) -> AlignmentMethod:
        """The method for a validated stage config (a method with settings of its own reads them here)."""
        return cls()

    def head(self, cfg: StageConfig) -> tuple[str | None, int | None]:
        """(head, num_labels) the stage adds to the start model; None keeps the model's own."""
        return None, None

    def data(self, run: Run) -> tuple[Any, Any]:
        raise NotImplementedError

    def total_steps(self, run: Run) -> int:
        """Optimizer steps of the run (AdaLoRA's schedule)."""
        return planned_steps(run.cfg.trainer, len(run.train))

    def plan(self, run: Run) -> TrainPlan:
        raise NotImplementedError

    def summary(self, run: Run) -> dict[str, Any]:
        """The stage's own numbers for summary.json (plots are drawn here too)."""
        return {}


def run_alignment(cfg: StageConfig, method: AlignmentMethod) -> dict[str, Any]:
    """Run `method` with `cfg` (see the module docstring); returns the summary (also in OUT/summary.json)."""
    from lmcraft.align.data_checks import check_saved_template
    from lmcraft.peft.training import prepare_for_training, save_final
    from lmcraft.train import Trainer

    out = Path(cfg.output_dir)
    head, num_labels = method.head(cfg)
    run = Run(cfg, out, open_start(cfg.model, cfg.template, out, cfg.trainer.seed, head, num_labels))
    start = run.start
    run.train, run.evaluation = method.data(run)
    score_eval: ScoreEval | None = getattr(cfg, "score_eval", None)
    if score_eval is not None:
        run.scorer = ScoreEvaluator(score_eval, start.tokenizer)
        run.start_score = run.scorer.baseline(out, start.model)
    samples: SamplesSection | None = getattr(cfg, "samples", None)
    if samples is not None and not start.resuming:
        record_samples(out, "before", start.model, start.tokenizer, samples)
    training = run.training = prepare_for_training(start.model, cfg.peft, getattr(start.model, "head_kind", "lm"),
                                                   method.total_steps(run))
    plan = method.plan(run)
    model = plan.model if plan.model is not None else training.model
    trainer = run.trainer = Trainer(
        model, training.loss(plan.loss_fn), plan.train, plan.evaluation, plan.trainer_config or cfg.trainer, out,
        collate_fn=plan.train.collate if plan.collate else None, callbacks=[*training.callbacks(), *plan.callbacks],
        weights=training.weights(model), tokenizer_dir=start.tokenizer_dir, eval_fn=plan.eval_fn)
    if plan.start_evaluation and plan.evaluation is not None:
        run.start_eval = start_evaluation(trainer, out)
    result = trainer.train()
    if not trainer.is_main:
        return result
    merged = out / "merged" if cfg.save.merge else None
    paths = save_final(training.model, out / "final", base_source_of(cfg.model.from_), start.tokenizer, merged)
    check_saved_template(out / "final", start.tokenizer.chat_template)  # prompted later as it was trained
    if samples is not None:
        record_samples(out, "after", training.model, start.tokenizer, samples)
    summary = {"stage": method.name, **result, **paths, **method.summary(run)}
    write_summary(out, summary)
    return summary
