"""`lmcraft label-preferences CONFIG.yaml [key=value ...]`: RLAIF preference data from an AI judge.

Wiring (the method lives in lmcraft.align.rlaif):

1. the policy (`policy.from`, typically the SFT output) answers every prompt `samples_per_prompt` times (sampling);
2. ranking mode: the `judge` (a rule, a reward model, or any chat model asked for a 1-9 rating) scores the answers
   and the best and worst become a pair (skipped when they differ by less than `min_gap`);
   constitution mode (`constitution:` set): the critic (`constitution.critic`, default the policy) critiques and
   revises one sampled answer per prompt; the revision is chosen over the original;
3. `output`: JSONL preference records (`prompt`/`chosen`/`rejected` messages, with the scores or critiques), which
   `lmcraft reward` and `lmcraft dpo` read.

Work is done in parts of `part_size` prompts, each written atomically under OUTPUT.parts/ with generation seeds fixed
by (seed, part), so a killed run resumes where it stopped and produces the same file as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lmcraft.align.config import ModelSource
from lmcraft.align.scoring import ScorerSpec
from lmcraft.config import Section, StageConfig
from lmcraft.generation_settings import SamplingSettings
from lmcraft.stages import add_config_arguments, load_stage_config

__all__ = ["ConstitutionSection", "GenerationSection", "LabelConfig", "add_arguments", "run", "run_labelling"]


class GenerationSection(SamplingSettings):
    seed: int = 0


class PrincipleSection(Section):
    critique: str
    revision: str


class ConstitutionSection(Section):
    principles: list[PrincipleSection] = []
    rounds: int = Field(1, ge=1)
    critic: ModelSource | None = None


class LabelConfig(StageConfig):
    policy: ModelSource
    template: str | None = None
    prompts: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    samples_per_prompt: int = Field(4, ge=2)
    generation: GenerationSection = GenerationSection()
    judge: ScorerSpec | None = None
    min_gap: float = Field(0.0, ge=0)
    constitution: ConstitutionSection | None = None
    batch_size: int = Field(8, ge=1)
    part_size: int = Field(64, ge=1)
    output: Path

    @model_validator(mode="after")
    def _mode(self) -> LabelConfig:
        if self.constitution is None and self.judge is None:
            raise ValueError("give a judge (ranking mode) or a constitution (critique-and-revise mode)")
        if self.constitution is not None and self.judge is not None:
            raise ValueError("judge and constitution are two modes; give one of them")
        return self


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def run(args: argparse.Namespace) -> int:
    from lmcraft.run_folder import claim_output_file

    cfg = load_stage_config(LabelConfig, args)
    with claim_output_file(cfg.output, "label-preferences", cfg, args.overwrite, "output"):
        run_labelling(cfg, progress=not args.no_progress)
    return 0


def _part(cfg: LabelConfig, index: int, prompts: list[tuple[Any, str]], policy: Any, tokenizer: Any, judge: Any,
          critic: Any) -> list[dict[str, Any]]:
    import numpy as np

    from lmcraft.align.rlaif import DEFAULT_PRINCIPLES, Principle, critique_and_revise, rank_samples, sample_answers
    from lmcraft.generate import GenerationConfig
    seed = int(np.random.SeedSequence([cfg.generation.seed, index]).generate_state(1)[0])
    config = GenerationConfig.from_settings(cfg.generation, seed=seed)
    if cfg.constitution is None:
        k = cfg.samples_per_prompt
        answers = sample_answers(policy, tokenizer, [p for p, _ in prompts for _ in range(k)], config, cfg.batch_size)
        groups = [answers[i * k: (i + 1) * k] for i in range(len(prompts))]
        pairs, scores = rank_samples(prompts, groups, judge, cfg.min_gap)
        by_source = dict(zip((s for _, s in prompts), zip(groups, scores, strict=True), strict=True))
        return [{**pair.to_record(), "answers": by_source[pair.source][0], "scores": by_source[pair.source][1]}
                for pair in pairs]
    principles = [Principle(p.critique, p.revision) for p in cfg.constitution.principles] or DEFAULT_PRINCIPLES
    answers = sample_answers(policy, tokenizer, [p for p, _ in prompts], config, cfg.batch_size)
    critic_model, critic_tok = critic
    revised = critique_and_revise(critic_model, critic_tok, prompts, answers, principles, config,
                                  cfg.constitution.rounds, seed, cfg.batch_size)
    return [{**pair.to_record(), "critiques": crit} for pair, crit in revised
            if pair.chosen[0]["content"] and pair.chosen[0]["content"] != pair.rejected[0]["content"]]


def run_labelling(cfg: LabelConfig, progress: bool = True) -> dict[str, Any]:
    """Run the stage; returns (and prints) a summary."""
    from tqdm.auto import tqdm

    from lmcraft.align.data import load_prompts
    from lmcraft.align.modeling import load_stage_tokenizer, load_start_model
    from lmcraft.align.scoring import build_scorer
    from lmcraft.io import read_json, remove_dir, write_json, write_jsonl

    policy, tok_dir = load_start_model(cfg.policy.from_, dtype=cfg.policy.dtype)
    tokenizer = load_stage_tokenizer(tok_dir, cfg.template)
    judge = build_scorer(cfg.judge) if cfg.judge is not None else None
    critic = None
    if cfg.constitution is not None:
        critic = (policy, tokenizer)
        if cfg.constitution.critic is not None:
            model, folder = load_start_model(cfg.constitution.critic.from_, dtype=cfg.constitution.critic.dtype)
            critic = (model, load_stage_tokenizer(folder, None))
    prompts = load_prompts(cfg.prompts, cfg.limit)
    out = Path(cfg.output)
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    chunks = range(0, len(prompts), cfg.part_size)
    for index, lo in enumerate(tqdm(chunks, desc="labelling", unit="part", disable=not progress)):
        path = parts / f"part-{index:05d}.json"
        if not path.is_file():
            write_json(path, _part(cfg, index, prompts[lo: lo + cfg.part_size], policy, tokenizer, judge, critic))
        records.extend(read_json(path))
    write_jsonl(out, records)
    remove_dir(parts)
    summary: dict[str, Any] = {"stage": "label-preferences", "prompts": len(prompts), "pairs": len(records),
                               "output": str(out)}
    if records and "scores" in records[0]:
        summary["mean_best_score"] = sum(max(r["scores"]) for r in records) / len(records)
        summary["mean_worst_score"] = sum(min(r["scores"]) for r in records) / len(records)
    print(json.dumps(summary, indent=1))
    return summary


def config_class() -> type:
    """The config class, listed by `lmcraft label-preferences --help` and checked by `lmcraft pipeline`."""
    return LabelConfig
