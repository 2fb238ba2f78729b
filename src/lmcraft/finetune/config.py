"""The `lmcraft finetune` / `lmcraft compare` configs (pydantic; validated before any work starts).

    task: cls                              # cls | token_cls | regression | clm | qa
    model: minilm-l6                       # HF folder, .gguf file or model asset name
    data:
      train: {path: "asset:spam-assassin/data/*/*.json", label_field: group}
      label_map: {easy-ham-1: ham, easy-ham-2: ham, hard-ham-1: ham, spam-1: spam, spam-2: spam}
      clean: email
      max_length: 128
    trainer: {lr: 5.0e-5, warmup_steps: 10, schedule: linear, weight_decay: 0.01, eval_every: 20}
    layer_lr_decay: 0.9                    # LLRD: block i (0-based) of L trains at lr * 0.9^(L - 1 - i)
    head_lr: 1.0e-3
    freeze: {embeddings: true, bottom_layers: 2}
    gradual_unfreezing: {every: 1, unit: epochs}
    peft: {method: lora, r: 8}             # any lmcraft.peft method; omitted = full fine-tuning
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmcraft.config import PeftOptions, Section, StageConfig
from lmcraft.data.readers import text_encoding
from lmcraft.train.config import TrainerConfig

TASKS = ("cls", "token_cls", "regression", "clm", "qa")
Task = Literal["cls", "token_cls", "regression", "clm", "qa"]
SourceFormat = Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "conll", "text", "folder"]


class DataSource(Section):
    """One input: a file, a glob, or (format `folder`) a folder with one subfolder per class.

    `path` may start with `asset:NAME/` (a fetched lmcraft asset). Field names select the text, the optional
    second text of a pair (`text_pair_field`), the label, or for token classification the word list and the
    tag list (JSONL) / the tag column (CoNLL: whitespace-separated columns, word first, blank line between
    sentences). `text_mode` splits plain-text files into records for causal-LM data. Extractive QA reads a
    question, a context and SQuAD-style answers (`{text: [...], answer_start: [...]}`), or SQuAD's nested JSON.
    """

    path: str
    format: SourceFormat = "auto"
    text_field: str = "text"
    text_pair_field: str | None = None
    label_field: str = "label"
    tokens_field: str = "tokens"
    tags_field: str = "tags"
    conll_tag_column: int = -1
    text_mode: Literal["file", "paragraph", "line"] = "file"
    question_field: str = "question"
    context_field: str = "context"
    answers_field: str = "answers"
    encoding: str = "utf-8"  # the files' text encoding (any Python codec name: latin-1, cp1252, utf-16, ...)

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, name: str) -> str:
        return text_encoding(name)


class DataConfig(Section):
    """Training / validation data. Without `validation`, a seeded `validation_fraction` of train is held out.

    labels:     class (or tag) names in id order; default: the sorted names seen in the training data
    label_map:  raw label -> class name, applied first (e.g. merge source groups into ham/spam)
    clean:      `email`: keep the Subject line and the decoded text body of RFC 822 messages (headers dropped)
    max_length: tokens per example (longer ones are truncated); for `clm`, the length of each packed block;
                for `qa`, of each window of question + context
    doc_stride: `qa`: tokens shared by consecutive windows of a context longer than one window
    max_answer_length: `qa`: the longest answer span (tokens) considered at prediction
    max_*_examples: a seeded random subset of each split (after the hold-out; for clm, of the packed blocks)
    """

    train: DataSource
    validation: DataSource | None = None
    validation_fraction: float = Field(0.1, gt=0, lt=1)
    labels: list[str] | None = None
    label_map: dict[str, str] = {}
    clean: Literal["none", "email"] = "none"
    max_length: int = Field(256, ge=2)
    max_train_examples: int | None = Field(None, ge=1)
    max_validation_examples: int | None = Field(None, ge=1)
    doc_stride: int = Field(128, ge=0)
    max_answer_length: int = Field(30, ge=1)
    seed: int = 0


class FreezeConfig(Section):
    """Parameters that never train: the embeddings and/or the bottom `bottom_layers` transformer blocks."""

    embeddings: bool = False
    bottom_layers: int = Field(0, ge=0)


class GradualUnfreezing(Section):
    """ULMFiT-style: start with only the head training, then unfreeze one block (top first) every `every` units;
    the embeddings come last. Applies to whatever trains (full weights, or a PEFT method's adapter weights)."""

    every: int = Field(1, ge=1)
    unit: Literal["steps", "epochs"] = "epochs"


class FinetuneConfig(StageConfig):
    """Everything `lmcraft finetune` needs. `trainer` is lmcraft.train's TrainerConfig (lr, schedule, warmup,
    weight_decay, grad_accum, precision, eval_every, early_stopping, save_best, ...)."""

    task: Task
    model: str
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: the model's architecture and tokenizer with freshly initialised weights "
        "(seeded by trainer.seed): the from-scratch baseline of a pre-training study")
    tokenizer: str | None = None
    output_dir: Path = Path("runs/finetune")
    data: DataConfig
    trainer: TrainerConfig = TrainerConfig()
    peft: PeftOptions | None = None
    layer_lr_decay: float | None = Field(None, gt=0, le=1)
    head_lr: float | None = Field(None, gt=0)
    freeze: FreezeConfig = FreezeConfig()
    gradual_unfreezing: GradualUnfreezing | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    attention_dropout: float | None = Field(None, ge=0, lt=1)
    classifier_dropout: float | None = Field(None, ge=0, lt=1)
    metric: str | None = Field(None, description="headline validation metric; default per task")
    threads: int | None = Field(None, ge=1, description="CPU intra-op threads (default: torch's choice)")
    resume: bool = True

    @model_validator(mode="after")
    def _task_fits(self) -> FinetuneConfig:
        if self.task == "clm" and (self.data.labels or self.data.label_map):
            raise ValueError("data.labels / data.label_map do not apply to task clm")
        if self.task == "regression" and self.data.labels:
            raise ValueError("data.labels does not apply to task regression (labels are numbers)")
        if self.task == "qa" and (self.data.labels or self.data.label_map):
            raise ValueError("data.labels / data.label_map do not apply to task qa (answers are spans)")
        return self


class RunOverride(Section):
    """Per-method settings of a compare run: `peft` keys (method defaults to the run's name) and trainer keys."""

    peft: dict[str, Any] | None = None
    trainer: dict[str, Any] = {}


class CompareSection(Section):
    """methods: run names; each is `full`, a PEFT method name, or a key of `runs` whose `peft.method` says which.
    peft_trainer: trainer keys applied to every PEFT run (PEFT usually wants a larger lr than full fine-tuning).
    """

    methods: list[str] = ["full", "lora", "qlora"]
    peft_trainer: dict[str, Any] = {}
    runs: dict[str, RunOverride] = {}
    title: str = "Fine-tuning methods compared"


class CompareConfig(FinetuneConfig):
    """A finetune config plus the `compare` section; `output_dir` holds one folder per method and the report."""

    output_dir: Path = Path("runs/compare")
    compare: CompareSection = CompareSection()
