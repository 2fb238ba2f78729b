"""The end of a pre-training run: OUT/final/ (the kept model in Hugging Face layout with the tokenizer files, so it
opens in transformers), samples from decoders, and the run summary (OUT/summary.json, and the printed report)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.pretrain.config import PretrainConfig, SamplesSection

if TYPE_CHECKING:
    import torch

    from lmcraft.models import ModelConfig
    from lmcraft.objectives import Objective
    from lmcraft.train import Trainer

__all__ = ["format_summary", "run_summary", "samples", "save_final"]


def save_final(objective: Objective, mcfg: ModelConfig, state: dict[str, torch.Tensor], final: Path,
               tokenizer_dir: Path) -> Path:
    """Rebuild the trained model on CPU from the full state dict and save its kept part in HF layout."""
    from lmcraft.hub import save_model

    model = objective.build_model(mcfg)
    model.load_state_dict(state)
    return save_model(objective.kept_model(model), final, tokenizer_dir=tokenizer_dir)


def run_summary(cfg: PretrainConfig, objective: Objective, trainer: Trainer, result: dict[str, Any], final: Path,
                start: float) -> dict[str, Any]:
    """Steps, losses, the last evaluation, the best metric, throughput and where the model is."""
    history = trainer.state.history
    evals = [r for r in history if r["split"] == "eval"]
    train = [r for r in history if r["split"] == "train"]
    return {
        "objective": cfg.objective.name,
        "parameters": objective.kept_model(trainer.model).num_parameters(),
        "steps": result["step"],
        "stopped": result["stopped"],
        "train_targets": sum(r["targets"] for r in train),
        "final_train_loss": train[-1]["loss"] if train else None,
        "eval": {k: v for k, v in evals[-1].items() if k.startswith("eval_")} if evals else {},
        "best": {"metric": result["best_metric"], "step": result["best_step"]},
        "tokens_per_s": (sum(r["tokens_per_s"] for r in train) / len(train)) if train else None,
        "seconds": round(time.perf_counter() - start, 1),
        "final": str(final),
        "output_dir": str(cfg.output_dir),
    }


def samples(section: SamplesSection, final: Path) -> list[dict[str, str]]:
    """Continuations of `section.prompts` by the saved model, loaded back from final/ as any user would."""
    from lmcraft.generate import GenerationConfig, generate_text
    from lmcraft.hub import load_model
    from lmcraft.tokenizer.load import load_tokenizer

    model, tok = load_model(final), load_tokenizer(final)
    gen = GenerationConfig.from_settings(section, seed=section.seed)  # temperature 0: greedy
    result = generate_text(model, tok, list(section.prompts), gen)
    return [{"prompt": p, "completion": t} for p, t in zip(section.prompts, result.texts or [], strict=True)]


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report printed by the CLI."""
    ev = summary["eval"]
    lines = [f"pre-training ({summary['objective']}) done: {summary['steps']} steps, {summary['parameters']:,} "
             f"parameters, {summary['seconds']:.0f} s; model saved to {summary['final']}"]
    if summary["final_train_loss"] is not None:
        lines.append(f"  train loss {summary['final_train_loss']:.4f}")
    if ev:
        lines.append("  " + ", ".join(f"{k.removeprefix('eval_')} {v:.4f}" for k, v in sorted(ev.items())))
    if "eval_masked_accuracy" in ev:
        lines.append(f"  masked-token accuracy: {100 * ev['eval_masked_accuracy']:.2f}%")
    for i, s in enumerate(summary.get("samples", []), 1):
        lines.append(f"--- sample {i} ---\n{s['prompt']}{s['completion']}")
    return "\n".join(lines)
