"""The scaling sweep's config (torch-free; validating the objective imports the objectives, as for pre-training)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from lmcraft.config import StageConfig
from lmcraft.pretrain.config import DataSection, ModelSection, ObjectiveSection, SamplesSection, TokenizerSection
from lmcraft.scaling.sections import FitSection, GridSection, ProbeSection, ReportSection, SizeSpec
from lmcraft.train.config import TrainerConfig

__all__ = ["ScalingConfig"]


class ScalingConfig(StageConfig):
    output_dir: Path
    model: ModelSection
    sizes: list[SizeSpec] = []
    grid: GridSection | None = None
    tokens: int | list[int] = Field(description="training tokens per run (sets trainer.max_steps); a list "
                                                "sweeps the data too")
    objective: ObjectiveSection = Field(default_factory=lambda: ObjectiveSection(name="clm"))  # validated on use
    data: DataSection
    tokenizer: TokenizerSection = TokenizerSection()
    trainer: TrainerConfig = TrainerConfig()
    samples: SamplesSection = SamplesSection(max_new_tokens=32)
    curve_points: int = Field(8, ge=1, description="evaluations per run (sets trainer.eval_every)")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (1 is often faster on a busy machine)")
    fit: FitSection = FitSection()
    probe: ProbeSection | None = ProbeSection()
    report: ReportSection = ReportSection()

    @model_validator(mode="after")
    def _consistent(self) -> ScalingConfig:
        if self.model.preset is None:
            raise ValueError("the sweep trains fresh models: give model.preset (+ model.overrides), not model.from")
        if bool(self.sizes) == (self.grid is not None):
            raise ValueError("give exactly one of sizes (a list of {name, overrides}) and grid (width x depth)")
        names = [s.name for s in self.all_sizes()]
        if len(set(names)) != len(names):
            raise ValueError(f"size names must be unique, got {names}")
        budgets = self.token_budgets()
        if any(t < 1 for t in budgets) or len(set(budgets)) != len(budgets):
            raise ValueError(f"tokens must be positive and distinct, got {budgets}")
        if getattr(self.data, "eval_inputs", None) is not None:  # pretrain's held-out files (newer pretrain)
            raise ValueError("data.eval_inputs is not supported by the sweep (later runs reuse the first run's "
                             "packed data, which has one folder); hold out documents with data.val_fraction")
        if self.probe is not None and self.objective.name != "clm":
            raise ValueError("the probe scores a decoder's log-likelihoods: set probe: null for objective "
                             f"{self.objective.name!r}")
        return self

    def all_sizes(self) -> list[SizeSpec]:
        return self.grid.sizes() if self.grid is not None else list(self.sizes)

    def token_budgets(self) -> list[int]:
        return [self.tokens] if isinstance(self.tokens, int) else list(self.tokens)
