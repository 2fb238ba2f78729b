"""Config sections shared by the alignment stages (sft, reward, dpo, ppo, label-preferences).

    model:    {from: smollm2-135m-instruct, dtype: float32}     # HF folder, asset, .gguf, or an earlier stage's output
    template: chatml                                             # optional: replaces the tokenizer's chat template
    peft:     {method: lora, r: 8}                               # optional: null = full fine-tuning
    data:     {train: [...], eval: [...], val_size: 0.05, max_length: 512, truncation: right, limit: 200}
    trainer:  {...}                                              # lmcraft.train.TrainerConfig
    samples:  {prompts: [...], max_new_tokens: 64}               # generations before and after training
    save:     {merge: false}
    output_dir: runs/sft

No torch here: stage modules build their config classes lazily (TrainerConfig imports torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from lmcraft.align.grpo_config import TaskSection
from lmcraft.align.scoring import ScorerSpec
from lmcraft.config import PeftOptions, Section, StageConfig
from lmcraft.errors import ConfigError
from lmcraft.generation_settings import GenerationSettings, SamplingSettings

if TYPE_CHECKING:
    from lmcraft.train.config import TrainerConfig

__all__ = ["AlignmentConfig", "DPOSection", "DataSection", "ModelSource", "PPOSection", "PairsData", "PromptsSection",
           "SamplesSection", "SaveSection", "ScoreEval", "check_rollout_trainer", "split_eval"]


class ModelSource(Section):
    """`from:` a model folder, asset name, .gguf file, or an earlier stage's `final/` (adapter folders are merged)."""

    model_config = ConfigDict(populate_by_name=False)

    from_: str = Field(alias="from")
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's choice)")


class DataSection(Section):
    """Training records (JSON/JSONL files, globs or `asset:NAME/file` paths) and how they become token sequences.

    Evaluation records: `eval` files, else `val_size` records held out of `train` (a fraction < 1 or a count),
    chosen by a shuffle seeded with `seed`. `limit` keeps only the first records of `train` (small runs).
    """

    train: list[str] = Field(min_length=1)
    eval: list[str] = []
    format: str = "auto"
    val_size: float = Field(0.0, ge=0)
    limit: int | None = Field(None, ge=1)
    seed: int = 0
    max_length: int = Field(1024, ge=8)
    truncation: Literal["right", "left", "drop"] = "right"

    @model_validator(mode="after")
    def _eval_source(self) -> DataSection:
        if self.eval and self.val_size:
            raise ValueError("give data.eval (files) or data.val_size (held out of train), not both")
        return self


class PairsData(DataSection):
    """Preference pairs (reward, dpo): prompt/chosen/rejected records, alpaca or sharegpt preference records; or,
    instead of `train` files, pairs made from a prompting task (`task`: its `size` items train, the next `eval_size`
    are held out; chosen = the gold answer, rejected = another item's different gold answer, drawn with `seed`: see
    `lmcraft.align.task_pairs`). With a task, the dpo stage also reports the held-out accuracy of greedy answers
    before and after training."""

    train: list[str] = []
    format: Literal["auto", "prompt", "alpaca", "sharegpt"] = "auto"
    task: TaskSection | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PairsData:
        if (self.task is None) == (not self.train):
            raise ValueError("give data.train (preference files) or data.task (pairs made from a prompting task), "
                             "exactly one of them")
        if self.task is not None and (self.eval or self.val_size or self.limit):
            raise ValueError("with data.task, the held-out pairs are its eval_size items and its size bounds the "
                             "training pairs: remove data.eval, data.val_size and data.limit")
        return self


class SamplesSection(GenerationSettings):
    """Greedy replies to these prompts (chat) before and after training, written to OUT/samples.json."""

    prompts: list[str] = []


class SaveSection(Section):
    merge: bool = Field(False, description="PEFT runs: also write OUT/merged, the adapter folded into a full model")


class AlignmentConfig(StageConfig):
    """The keys every alignment stage starts with: the start model, its chat template and the PEFT method.

    A stage's config class (built lazily: `TrainerConfig` imports torch) subclasses this and adds its own sections,
    `trainer`, `save` and `output_dir`; pydantic keeps these three keys first.
    """

    model: ModelSource
    template: str | None = None
    peft: PeftOptions | None = None


def check_rollout_trainer(trainer: TrainerConfig, method: str, minibatch: tuple[str, int]) -> None:
    """Raise ValueError unless the `trainer` section of a rollout method (`method`: "PPO", "GRPO") leaves
    max_steps, save_every, eval_every, early_stopping and grad_accum to the method's own section, and its
    micro-batches divide the method's minibatch (`minibatch`: its name in the message and its rows)."""
    set_by_user = [k for k in ("max_steps", "save_every", "eval_every", "early_stopping")
                   if getattr(trainer, k) is not None] + (["grad_accum"] if trainer.grad_accum != 1 else [])
    section = method.lower()
    if set_by_user:
        raise ValueError(f"trainer.{', trainer.'.join(set_by_user)}: {method} derives these from the {section} "
                         f"section ({section}.rollouts, {section}.minibatch_size, {section}.save_every, "
                         f"{section}.eval_every)")
    name, rows = minibatch
    if rows % trainer.micro_batch_size:
        raise ValueError(f"{name} ({rows}) must be a multiple of trainer.micro_batch_size ({trainer.micro_batch_size})")


def split_eval(items: list[Any], val_size: float, seed: int) -> tuple[list[Any], list[Any]]:
    """(train, eval): `val_size` items (a fraction if < 1, else a count) drawn by a seeded permutation, order kept."""
    import numpy as np

    if not val_size:
        return items, []
    n = len(items)
    k = int(round(val_size * n)) if val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise ConfigError(f"data.val_size={val_size} holds out {k} of {n} records; need at least one on each side")
    held = set(np.random.Generator(np.random.PCG64(seed)).permutation(n)[:k].tolist())
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]


class ScoreEval(Section):
    """Periodic check of the policy: mean `scorer` score of answers to held-out prompts (reported as eval_score).

    Answers are sampled at `temperature` with a fixed seed (the same draws at every evaluation), or greedy at 0.
    """

    scorer: ScorerSpec
    prompts: list[str] = Field(min_length=1)
    limit: int | None = Field(64, ge=1)
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(1.0, ge=0)
    seed: int = 0


class PromptsSection(Section):
    train: list[str] = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    max_length: int = Field(512, ge=1, description="prompts longer than this (tokens) are skipped")


class PPOSection(SamplingSettings):
    """Rollout and update settings (see lmcraft.align.ppo for the symbols); rollouts sample with the generation
    settings (temperature also divides the logits of the log-probs)."""

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


class DPOSection(Section):
    """The preference stage's loss (formulas in lmcraft.align.preference_losses) and its settings.

    Reference-based: sigmoid (DPO), ipo, hinge, robust; reference-free (no reference model): simpo, cpo, orpo;
    unpaired: kto (examples labelled desirable/undesirable; the reference runs in every step, since the reference
    point comes from the micro-batch). A setting given a non-default value for a loss that does not use it is an
    error.
    """

    beta: float = Field(0.1, gt=0, description="beta (ORPO: lambda, the weight of the odds-ratio term)")
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "cpo", "orpo", "kto"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid, robust: label-flip rate e")
    gamma: float = Field(0.5, description="simpo: target reward margin gamma")
    nll_weight: float = Field(1.0, ge=0, description="cpo: alpha, the weight of the chosen answer's NLL")
    desirable_weight: float = Field(1.0, gt=0, description="kto: lambda_D")
    undesirable_weight: float = Field(1.0, gt=0, description="kto: lambda_U")
    reference: Literal["precompute", "on_the_fly"] = Field(
        "precompute", description="sigmoid/ipo/hinge/robust: reference log-probs computed once or in every step")

    _ONLY = {"label_smoothing": ("sigmoid", "robust"), "gamma": ("simpo",), "nll_weight": ("cpo",),
             "desirable_weight": ("kto",), "undesirable_weight": ("kto",),
             "reference": ("sigmoid", "ipo", "hinge", "robust", "kto")}  # kto: on_the_fly whatever is set

    @model_validator(mode="after")
    def _settings_of_the_loss(self) -> DPOSection:
        for key, losses in self._ONLY.items():
            if key in self.model_fields_set and self.loss not in losses and getattr(self, key) != \
                    type(self).model_fields[key].default:
                raise ValueError(f"dpo.{key} applies to loss: {' / '.join(losses)} only, not {self.loss}")
        return self
