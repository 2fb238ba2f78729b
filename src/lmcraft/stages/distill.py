"""`lmcraft distill CONFIG.yaml [key=value ...]`: knowledge distillation of a teacher into a student.

Wiring (the math lives in lmcraft.align.distill_loss, the data and the teacher in lmcraft.align.distill):

1. student from `model.from` (cut to its first `distill.student_layers` blocks when set), trained in full or with any
   PEFT method (`peft`); teacher from `teacher.from`, frozen: same tokenizer (checked), any size;
2. data: chat records (alpaca / sharegpt / messages; loss on the assistant tokens) or `format: text` (plain text,
   every token); on-policy: `distill.on_policy.fraction` of the micro-batches use completions the student samples;
3. loss `distill.loss` (forward_kl / reverse_kl / gkd with `beta`) at `temperature`, mixed with CE by `alpha`;
   `distill.teacher_cache: DIR` stores the teacher's top-k logits once (fp16) and trains from them (no teacher
   in memory: fastest on CPU);
4. the Trainer (exact resume: rerun the same command); eval_loss / eval_ppl are the student's CE on held-out data;
5. OUT/final (the student or its adapter), summary.json (start and final held-out perplexity).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from lmcraft.align.config import AlignmentConfig, DataSection, ModelSource, SaveSection
from lmcraft.config import Section, StageConfig
from lmcraft.generation_settings import SamplingSettings
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import run_alignment_stage
from lmcraft.train.config import TrainerConfig

__all__ = ["DistillConfig", "DistillData", "DistillSection", "OnPolicy", "add_arguments", "config_class", "run"]


class DistillData(DataSection):
    format: Literal["auto", "alpaca", "sharegpt", "messages", "text"] = "auto"
    train_on: Literal["all", "last"] = "all"
    text_field: str = Field("text", description="format text: the record field holding the text")


class OnPolicy(SamplingSettings):
    """GKD's lambda: the fraction of micro-batches whose completions the student samples (teacher scores them)."""

    fraction: float = Field(0.0, ge=0, le=1)


class DistillSection(Section):
    loss: Literal["forward_kl", "reverse_kl", "gkd"] = "forward_kl"
    beta: float = Field(0.5, ge=0, le=1, description="gkd: weight of the teacher in the mixture M")
    temperature: float = Field(1.0, gt=0, description="divides both logits before the divergence (no T^2 factor)")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the CE on the labels (1 = no teacher: baseline)")
    on_policy: OnPolicy = OnPolicy()
    teacher_cache: Path | None = Field(None, description="folder of the teacher's cached top-k logits (offline KD)")
    top_k: int = Field(64, ge=1, description="teacher_cache: logits kept per position")
    student_layers: int | None = Field(None, ge=1, description="cut the student to its first N blocks")

    @model_validator(mode="after")
    def _consistent(self) -> DistillSection:
        if self.teacher_cache is not None and self.on_policy.fraction > 0:
            raise ValueError("distill.teacher_cache scores fixed data only; on_policy.fraction > 0 needs the teacher "
                             "live (remove teacher_cache)")
        if "beta" in self.model_fields_set and self.loss != "gkd":
            raise ValueError(f"distill.beta applies to loss: gkd only, not {self.loss}")
        return self


class DistillConfig(AlignmentConfig):
    teacher: ModelSource
    data: DistillData
    distill: DistillSection = DistillSection()
    trainer: TrainerConfig = TrainerConfig()
    save: SaveSection = SaveSection()
    output_dir: Path

    @model_validator(mode="after")
    def _prompts(self) -> DistillConfig:
        if self.data.format == "text" and self.distill.on_policy.fraction > 0:
            raise ValueError("distill.on_policy needs prompts: chat data, not data.format: text")
        if self.peft is not None and self.distill.student_layers is not None:
            raise ValueError("distill.student_layers with peft: an adapter records model.from (all its layers) as its "
                             "base; train the cut student in full, or start from a saved cut model")
        return self


def config_class() -> type[StageConfig]:
    """The config class, listed by `lmcraft distill --help` and checked by `lmcraft pipeline`."""
    return DistillConfig


def run(args: argparse.Namespace) -> int:
    return run_alignment_stage(args, "distill", DistillConfig, "lmcraft.align.distill:Distillation")

