"""The runs of a scaling sweep: one pre-training config per (size, token budget), as a pipeline plan."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmcraft.config import validate_config
from lmcraft.pretrain.config import PretrainConfig
from lmcraft.scaling.config import ScalingConfig

__all__ = ["plan_runs", "run_configs"]


def run_configs(cfg: ScalingConfig) -> list[tuple[str, dict[str, Any]]]:
    """(name, pre-training config) of every run of `cfg` (a `ScalingConfig`), smallest token budget
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


def plan_runs(cfg: ScalingConfig) -> list[tuple[str, PretrainConfig]]:
    """(name, validated pre-training config) of every run (see `run_configs`)."""
    return [(name, validate_config(PretrainConfig, data, f"scaling run {name}")) for name, data in run_configs(cfg)]
