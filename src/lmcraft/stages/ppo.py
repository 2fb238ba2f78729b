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
import functools
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lmcraft.config import Section, StageConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

__all__ = ["PPOSection", "PromptsSection", "add_arguments", "config_class", "run", "run_ppo"]


class PromptsSection(Section):
    train: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    max_length: int = Field(512, ge=1, description="prompts longer than this (tokens) are skipped")


class PPOSection(Section):
    """Rollout and update settings (see lmcraft.align.ppo for the symbols)."""

    rollouts: int = Field(20, ge=1)
    rollout_batch_size: int = Field(16, ge=1)
    minibatch_size: int = Field(8, ge=1)
    ppo_epochs: int = Field(2, ge=1)
    kl_coef: float = Field(0.05, ge=0)
    kl_target: float | None = Field(None, gt=0, description="adaptive beta when set (Ziegler et al.)")
    kl_horizon: float = Field(10000.0, gt=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    ent_coef: float = Field(0.0, ge=0)
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    missing_eos_penalty: float | None = None
    forward_batch_size: int = Field(8, ge=1, description="rows per no-grad forward while scoring a rollout")
    save_every: int | None = Field(None, ge=1, description="rollouts between checkpoints (always at the end)")
    eval_every: int | None = Field(None, ge=1, description="rollouts between score_eval evaluations")

    @model_validator(mode="after")
    def _divisible(self) -> PPOSection:
        if self.rollout_batch_size % self.minibatch_size:
            raise ValueError(f"rollout_batch_size ({self.rollout_batch_size}) must be a multiple of minibatch_size "
                             f"({self.minibatch_size})")
        return self


@functools.cache
def config_class() -> type[StageConfig]:
    from lmcraft.align.config import AlignmentConfig, SamplesSection, SaveSection, ScoreEval
    from lmcraft.align.scoring import ScorerSpec
    from lmcraft.train import TrainerConfig

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
            t, p = self.trainer, self.ppo
            set_by_user = [k for k in ("max_steps", "save_every", "eval_every", "early_stopping")
                           if getattr(t, k) is not None] + (["grad_accum"] if t.grad_accum != 1 else [])
            if set_by_user:
                raise ValueError(f"trainer.{', trainer.'.join(set_by_user)}: PPO derives these from the ppo section "
                                 "(ppo.rollouts, ppo.minibatch_size, ppo.save_every, ppo.eval_every)")
            if p.minibatch_size % t.micro_batch_size:
                raise ValueError(f"ppo.minibatch_size ({p.minibatch_size}) must be a multiple of "
                                 f"trainer.micro_batch_size ({t.micro_batch_size})")
            if p.eval_every is not None and self.score_eval is None:
                raise ValueError("ppo.eval_every needs a score_eval section (scorer and held-out prompts)")
            return self

    return PPOConfig


def run(args: argparse.Namespace) -> int:
    cfg = load_training_config(config_class(), args)
    with claim(args, "ppo", cfg.output_dir, cfg):
        run_ppo(cfg)
    return 0


def _prompts(cfg: Any, formatter: Any) -> tuple[list[dict[str, Any]], int]:
    from lmcraft.align.data import load_prompts
    from lmcraft.errors import ConfigError

    items, skipped = [], 0
    for messages, source in load_prompts(cfg.prompts.train, cfg.prompts.limit):
        ids = formatter.prompt_ids(messages)
        if len(ids) > cfg.prompts.max_length:
            skipped += 1
            continue
        items.append({"messages": messages, "ids": ids, "source": source})
    if len(items) < cfg.ppo.rollout_batch_size:
        raise ConfigError(f"{len(items)} usable prompts ({skipped} longer than prompts.max_length), fewer than "
                          f"ppo.rollout_batch_size={cfg.ppo.rollout_batch_size}")
    return items, skipped


def run_ppo(cfg: Any) -> dict[str, Any]:
    """Run the stage for a validated `PPOConfig`; returns the summary (also in OUT/summary.json)."""
    import dataclasses
    import json

    from lmcraft.align.common import (
        ScoreEvaluator,
        open_start,
        record_samples,
        save_stage_final,
        score_eval_callback,
        write_summary,
    )
    from lmcraft.align.instruct import ChatFormatter
    from lmcraft.align.modeling import add_peft, checkpoint_format, is_peft, peft_callbacks, with_regularization
    from lmcraft.align.plots import plot_ppo
    from lmcraft.align.ppo import (
        AdaptiveKLController,
        PolicyWithValue,
        PPOHyper,
        PPOLoss,
        RolloutEngine,
        RolloutLoader,
    )
    from lmcraft.align.scoring import build_scorer
    from lmcraft.generate import stop_token_ids
    from lmcraft.train import Trainer
    from lmcraft.train.checkpoint import atomic_write_text

    out, p = Path(cfg.output_dir), cfg.ppo
    start = open_start(cfg.model, cfg.template, out, cfg.trainer.seed)
    prompts, skipped = _prompts(cfg, ChatFormatter(start.tokenizer))
    evaluator = ScoreEvaluator(cfg.score_eval, start.tokenizer) if cfg.score_eval is not None else None
    start_score = evaluator.baseline(out, start.model) if evaluator is not None else None
    if not start.resuming:
        record_samples(out, "before", start.model, start.tokenizer, cfg.samples)
    micro = cfg.trainer.micro_batch_size
    steps_per_rollout = p.ppo_epochs * p.rollout_batch_size // p.minibatch_size
    total = p.rollouts * steps_per_rollout
    trainer_cfg = cfg.trainer.model_copy(update={
        "max_steps": total, "grad_accum": p.minibatch_size // micro, "plot": False,
        "save_every": None if p.save_every is None else p.save_every * steps_per_rollout})
    policy = add_peft(start.model, cfg.peft, total)
    reference = None if is_peft(policy) else RolloutEngine.frozen_copy(policy)
    model = PolicyWithValue(policy)
    hyper = PPOHyper(**{f.name: getattr(p, f.name) for f in dataclasses.fields(PPOHyper)})
    engine = RolloutEngine(model, reference, build_scorer(cfg.reward), start.tokenizer, hyper,
                           AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon),
                           stop_token_ids(policy, start.tokenizer), start.tokenizer.pad_token_id or 0,
                           p.forward_batch_size)
    loader = RolloutLoader(prompts, engine, p.rollout_batch_size, p.minibatch_size, micro, p.ppo_epochs,
                           cfg.trainer.seed, cfg.trainer.shuffle)
    callbacks = peft_callbacks(policy)
    if evaluator is not None:
        callbacks.append(score_eval_callback(evaluator, (p.eval_every or p.rollouts) * steps_per_rollout, policy))
    trainer = Trainer(model, with_regularization(PPOLoss(hyper), policy), loader, None, trainer_cfg, out,
                      callbacks=callbacks, weights=checkpoint_format(model), tokenizer_dir=start.tokenizer_dir)
    result = trainer.train()
    paths = save_stage_final(cfg, start, policy, out)
    record_samples(out, "after", policy, start.tokenizer, cfg.samples)
    atomic_write_text(out / "rollouts.jsonl", "".join(json.dumps(r) + "\n" for r in loader.history))
    if cfg.trainer.plot:
        plot_ppo(loader.history, trainer.state.history, steps_per_rollout, out / "curves.png",
                 start_score=start_score)
    evals = [r for r in trainer.state.history if r["split"] == "eval"]
    first, last = loader.history[0], loader.history[-1]
    summary = {"stage": "ppo", **result, **paths, "prompts": len(prompts), "skipped_prompts": skipped,
               "rollouts": len(loader.history), "first_rollout_score": first["score"],
               "last_rollout_score": last["score"], "last_kl": last["kl"], "last_beta": last["beta"],
               "start_score": start_score, "eval_score": evals[-1]["eval_score"] if evals else None}
    write_summary(out, summary)
    return summary
