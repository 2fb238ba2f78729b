"""Settings of one training run (`TrainerConfig`), kept free of torch so that every stage config that holds a
`trainer:` section can be imported, validated and listed by `--help` without loading torch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmcraft.config import Section

__all__ = ["EarlyStopping", "TrainerConfig"]


class EarlyStopping(Section):
    """Stop after `patience` evaluations without an improvement of `metric` by more than `min_delta`."""

    metric: str = "eval_loss"
    mode: Literal["min", "max"] = "min"
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)


class TrainerConfig(Section):
    """Optimisation, schedule, precision, evaluation, checkpointing and parallelism of one run."""

    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: share of steps spent decaying")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs when set")
    epochs: int = Field(1, ge=1)
    micro_batch_size: int = Field(8, ge=1, description="examples per forward pass on each rank")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step on each rank")
    eval_batch_size: int | None = Field(None, ge=1, description="default: micro_batch_size")
    max_grad_norm: float | None = Field(1.0, gt=0, description="clip the global L2 norm; null = no clipping")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast or fp32; auto = bf16 on CUDA with bf16, on CPU bf16 only where a cached "
                            "micro-benchmark shows bf16 matmul clearly faster (lmcraft.precision)")
    frozen_dtype: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="storage of frozen linear weights when only adapters train (PEFT): bf16 halves their "
                            "memory and, under bf16 autocast, changes no result; auto = bf16 when the run trains in "
                            "bf16 on one process, else as loaded (lmcraft.train.frozen)")
    compile: Literal["auto"] | bool = Field(
        "auto", description="torch.compile the model's forward; auto = only when the run is long enough to amortise "
                            "it (lmcraft.train.compile)")
    activation_checkpointing: Literal["none", "full", "attention", "mlp"] = Field(
        "none", description="recompute whole blocks (full) or one sub-layer in the backward pass to save memory")
    chunked_loss: Literal["auto"] | bool = Field(
        "auto", description="causal-LM losses through the LM head in chunks, without the (B, T, V) logits; auto = "
                            "whenever the model has a plain LM head")
    memory_limit: str | None = Field(
        None, description="e.g. 12GiB: stop before step 0, with the memory plan, when the predicted peak (or the "
                          "peak measured in the pre-flight step) exceeds it")
    preflight: Literal["auto"] | bool = Field(
        "auto", description="before step 0, one forward + backward of the longest batch without an update (results "
                            "unchanged), so a run that cannot fit fails at step 0 with the memory plan; auto = on "
                            "accelerators (CUDA) and whenever memory_limit is set")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw8bit keeps AdamW's moments in 8 bits (block-wise absmax), ~4x less state")
    eval_every: int | None = Field(None, ge=1, description="steps between evaluations (always at the end)")
    eval_max_batches: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1, description="steps between checkpoints (always at the end)")
    keep_last: int = Field(2, ge=1, description="step-N checkpoints kept")
    save_best: bool = Field(True, description="keep the best evaluation's weights in best/")
    early_stopping: EarlyStopping | None = None
    seed: int = 0
    shuffle: bool = True
    log_every: int = Field(10, ge=1)
    max_bad_steps: int = Field(5, ge=1, description="NaN/Inf guard: consecutive skipped steps before failing")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N")
    strategy: Literal["none", "ddp", "fsdp"] = "none"
    find_unused_parameters: bool = False
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not (v.startswith("cuda:") and v[5:].isdigit()):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v

    @model_validator(mode="after")
    def _early_stopping_needs_evals(self) -> TrainerConfig:
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs eval_every (steps between evaluations)")
        return self
