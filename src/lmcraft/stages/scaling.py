"""`lmcraft scaling CONFIG.yaml [key=value ...]`: a sweep of model sizes (and token budgets) with the pre-training
stage, scaling-law fits with confidence intervals, plots, and a capability probe per model.

Each size (`sizes`, or a width x depth `grid`) at each token budget (`tokens`) is one `lmcraft pretrain` stage in
OUT/runs/NAME/ (`trainer.max_steps = tokens / (micro_batch_size * grad_accum * seq_len)`, `curve_points`
evaluations). The runs are a pipeline plan run in this process: a rerun skips the runs done with the same config
and resumes an interrupted one. The first run tokenises and packs `data.inputs` (and trains the tokenizer); later
runs read its folders. Probe, fits and report: `lmcraft.scaling` (OUT/scaling.json, scaling.png, report.md/html).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from lmcraft.config import StageConfig, validate_config
from lmcraft.scaling.sections import FitSection, GridSection, ProbeSection, ReportSection, SizeSpec
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

__all__ = ["FitSection", "GridSection", "ProbeSection", "ReportSection", "SizeSpec", "add_arguments",
           "config_class", "plan_runs", "run", "scaling"]


@functools.cache
def config_class() -> type[StageConfig]:
    """The stage config; built on first use because the pre-training sections import torch."""
    from lmcraft.pretrain import DataSection, ModelSection, ObjectiveSection, SamplesSection, TokenizerSection
    from lmcraft.train import TrainerConfig

    class ScalingConfig(StageConfig):
        output_dir: Path
        model: ModelSection
        sizes: list[SizeSpec] = []
        grid: GridSection | None = None
        tokens: int | list[int] = Field(description="training tokens per run (sets trainer.max_steps); a list "
                                                    "sweeps the data too")
        objective: ObjectiveSection = ObjectiveSection(name="clm")
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

    return ScalingConfig


def run(args: argparse.Namespace) -> int:
    from lmcraft.scaling.report import format_result

    cfg = load_training_config(config_class(), args)
    with claim(args, "scaling", cfg.output_dir, cfg):
        result = scaling(cfg, progress=not args.no_progress)
    print(format_result(result))
    return 0


def run_configs(cfg: StageConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, pre-training config) of every run of `cfg` (a `config_class()` instance), smallest token budget
    first. The first run prepares the tokenizer and packed data; the others read them from its folder."""
    from lmcraft.scaling.sweep import short_tokens

    budgets = cfg.token_budgets()
    per_step = cfg.trainer.micro_batch_size * cfg.trainer.grad_accum * cfg.data.seq_len
    data, tokenizer = cfg.data.model_dump(mode="json"), cfg.tokenizer.model_dump(mode="json")
    runs: list[tuple[str, dict[str, Any]]] = []
    for tokens in budgets:
        steps = max(1, round(tokens / per_step))
        for size in cfg.all_sizes():
            name = size.name if len(budgets) == 1 else f"{size.name}-{short_tokens(tokens)}"
            trainer = {**cfg.trainer.model_dump(mode="json"), "max_steps": steps,
                       "eval_every": max(1, steps // cfg.curve_points), **size.trainer}
            runs.append((name, {
                "model": {"preset": cfg.model.preset, "overrides": {**cfg.model.overrides, **size.overrides}},
                "objective": cfg.objective.model_dump(mode="json"), "data": data, "tokenizer": tokenizer,
                "trainer": trainer, "samples": cfg.samples.model_dump(mode="json"),
                "output_dir": str(Path(cfg.output_dir) / "runs" / name),
            }))
            if len(runs) == 1 and cfg.data.packed is None:  # later runs read the first run's folders
                first = Path(runs[0][1]["output_dir"])
                data = {"packed": str(first / "data"), "seq_len": cfg.data.seq_len, "seed": cfg.data.seed}
                tokenizer = {"path": str(first / "tokenizer")} if cfg.tokenizer.train is not None else tokenizer
    return runs


def plan_runs(cfg: StageConfig) -> list[tuple[str, StageConfig]]:
    """(name, validated pre-training config) of every run (see `run_configs`)."""
    from lmcraft.stage_table import stage_config_class

    pretrain_config = stage_config_class("pretrain")
    return [(name, validate_config(pretrain_config, data, f"scaling run {name}")) for name, data in run_configs(cfg)]


def scaling(cfg: StageConfig, progress: bool = True) -> dict[str, Any]:
    """Run the sweep, probe, fit, plot and report (see the module docstring); returns the content of scaling.json."""
    from lmcraft.io import write_json
    from lmcraft.pipeline import InProcessPipeline, PipelineConfig, StageSpec, read_summary
    from lmcraft.scaling.report import SweepDescription, write_report
    from lmcraft.scaling.sweep import FinishedRun, fit_laws, probe_runs, run_row, sweep_result

    out = Path(cfg.output_dir)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    runs = plan_runs(cfg)
    stages = [StageSpec(name=name, stage="pretrain", config={k: v for k, v in data.items() if k != "output_dir"})
              for name, data in run_configs(cfg)]
    plan = InProcessPipeline(PipelineConfig(run_dir=out / "runs", stages=stages), [] if progress else ["--no-progress"])
    plan.run_stages(sys.stderr)
    finished = [FinishedRun(name, Path(rc.output_dir), read_summary(Path(rc.output_dir)),
                            rc.trainer.micro_batch_size * rc.trainer.grad_accum * rc.data.seq_len) for name, rc in runs]
    probes: list[dict[str, Any] | None] = [None] * len(finished)
    reference = None
    if cfg.probe is not None:
        first = runs[0][1]
        packed = Path(first.data.packed or Path(first.output_dir) / "data")
        probes, reference = probe_runs(cfg.probe, finished, packed, cfg.data.eval_split, cfg.data.seq_len, out,
                                       progress)
    rows = [run_row(run, cfg.fit.embeddings, probe) for run, probe in zip(finished, probes, strict=True)]
    fits = fit_laws(rows, cfg.fit)
    result = sweep_result(rows, fits, reference)
    write_json(out / "scaling.json", result)
    write_report(SweepDescription(out, cfg.objective.name, cfg.data.seq_len, cfg.fit, cfg.report, cfg.probe),
                 rows, fits, result)
    return result
