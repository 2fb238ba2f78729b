"""Pieces of the alignment run template (align/run.py): start model + tokenizer, samples, held-out scores, summary.

Every stage run writes into `output_dir`: `tokenizer/` (with the chat template in use, copied into each
checkpoint), `step-N/` checkpoints, `metrics.jsonl`, `curves.png`, `final/`, `samples.json` and `summary.json`.
Rerunning the same command resumes from the newest checkpoint (exact resume); the "before" samples are kept from the
first run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.align.modeling import load_stage_tokenizer, load_start_model
from lmcraft.io import read_json, write_json
from lmcraft.train.checkpoint import latest_checkpoint

if TYPE_CHECKING:
    from torch import nn

    from lmcraft.align.config import ModelSource, SamplesSection, ScoreEval
    from lmcraft.generate import GenerationConfig
    from lmcraft.tokenizer.load import Tokenizer
    from lmcraft.train import Callback, Trainer

__all__ = ["ScoreEvaluator", "StartPoint", "generate_samples", "open_start", "record_samples", "score_eval_callback",
           "start_evaluation", "write_summary"]


@dataclass
class StartPoint:
    model: nn.Module
    tokenizer: Tokenizer
    tokenizer_dir: Path  # OUT/tokenizer: the tokenizer files with the chat template this run uses
    resuming: bool


def open_start(source: ModelSource, template: str | None, out: Path, seed: int, head: str | None = None,
               num_labels: int | None = None) -> StartPoint:
    """Load the start model and its tokenizer, and save the tokenizer with its chat template to OUT/tokenizer.

    `head` names a head the stage adds and trains (the reward head): when the checkpoint lacks it, it is initialised
    from `seed`, without hub's "newly initialised" warning."""
    import warnings

    import torch

    from lmcraft.hub import HubWarning

    if source.threads:
        torch.set_num_threads(source.threads)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        if head is not None:
            warnings.filterwarnings("ignore", message=".*newly initialised", category=HubWarning)
        model, tok_dir = load_start_model(source.from_, head=head, dtype=source.dtype, num_labels=num_labels)
    tokenizer = load_stage_tokenizer(tok_dir, template)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out / "tokenizer")
    return StartPoint(model, tokenizer, out / "tokenizer", latest_checkpoint(out) is not None)


def generate_samples(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str], config: GenerationConfig
                     ) -> list[str]:
    """Chat replies to `prompts` (one batch)."""
    from lmcraft.generate import generate_text

    if not prompts:
        return []
    return list(generate_text(model, tokenizer, list(prompts), config, chat=True).texts or [])


def record_samples(out: Path, key: str, model: nn.Module, tokenizer: Tokenizer, samples: SamplesSection) -> None:
    """Generate the samples and store them as `key` ("before"/"after") in OUT/samples.json, keeping other keys.
    "before" is generated once: a resumed run keeps the first run's."""
    from lmcraft.generate import GenerationConfig

    path = out / "samples.json"
    data: dict[str, Any] = read_json(path) if path.is_file() else {}
    if not samples.prompts or (key == "before" and key in data):
        return
    data["prompts"] = samples.prompts
    data[key] = generate_samples(model, tokenizer, samples.prompts, GenerationConfig.from_settings(samples))
    write_json(path, data)


def start_evaluation(trainer: Trainer, out: Path) -> dict[str, float]:
    """The trainer's evaluation of the start model (before any step), computed once per run folder and kept in
    OUT/start_eval.json; it uses no random numbers, so a fresh run stays identical to one without it."""
    path = out / "start_eval.json"
    if path.is_file():
        return read_json(path)
    metrics = trainer.evaluate()
    if trainer.is_main:
        write_json(path, metrics)
    return metrics


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    write_json(out / "summary.json", summary)
    print(json.dumps(summary, indent=1, default=str))


class ScoreEvaluator:
    """`evaluator(model) -> mean score` of sampled answers to held-out prompts (a `ScoreEval` section)."""

    def __init__(self, spec: ScoreEval, tokenizer: Tokenizer) -> None:
        from lmcraft.align.data import load_prompts
        from lmcraft.align.scoring import build_scorer

        self.spec, self.tokenizer = spec, tokenizer
        self.prompts = [p for p, _ in load_prompts(spec.prompts, spec.limit)]
        self.scorer = build_scorer(spec.scorer)

    def __call__(self, model: nn.Module) -> float:
        from lmcraft.align.scoring import mean_sampled_score
        from lmcraft.peft.training import unwrap

        s = self.spec
        return mean_sampled_score(unwrap(model), self.tokenizer, self.prompts, self.scorer, s.max_new_tokens,
                                  s.temperature, s.seed)

    def baseline(self, out: Path, model: nn.Module) -> float:
        """The start model's score, computed once per run folder (OUT/start_score.json) so resumes keep it."""
        path = out / "start_score.json"
        if path.is_file():
            return float(read_json(path)["score"])
        value = self(model)
        write_json(path, {"score": value})
        return value


def score_eval_callback(evaluator: ScoreEvaluator, every_steps: int, policy: nn.Module) -> Callback:
    """A trainer callback scoring `policy` every `every_steps` steps and at the end; each result becomes an eval
    record {"split": "eval", "step", "eval_score"} in the trainer's history (so checkpoints keep it) and its logs."""
    from lmcraft.train import Callback

    class _ScoreEval(Callback):
        def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
            step = trainer.state.step
            if step % every_steps and step != trainer.total_steps:
                return
            record = {"split": "eval", "step": step, "eval_score": evaluator(policy)}
            trainer.state.history.append(record)
            trainer.callbacks.on_log(trainer, record)

    return _ScoreEval()
