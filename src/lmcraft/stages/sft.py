"""`lmcraft sft CONFIG.yaml [key=value ...]`: supervised instruction tuning (full or any PEFT method).

Wiring (the math lives in lmcraft.align.sft / instruct):

1. start model and tokenizer from `model.from`; `template` replaces the tokenizer's chat template;
2. records from `data.train` (alpaca / sharegpt / messages, auto-detected), rendered through the chat template, loss
   only on assistant tokens (`data.train_on`: all turns or the last), truncated (`data.truncation`), optionally packed;
3. `--preview N` prints the first N rendered examples with the trained tokens highlighted and exits;
4. the Trainer (exact resume: rerun the same command), evaluation loss/perplexity on `data.eval` / `data.val_size`;
5. OUT/final: the model (HF folder) or adapter (PEFT layout) with the tokenizer and chat template; samples.json holds
   greedy replies to `samples.prompts` before and after training; summary.json the run's numbers.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any, Literal

from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments, claim, load_training_config

__all__ = ["add_arguments", "config_class", "run", "run_sft"]


@functools.cache
def config_class() -> type[StageConfig]:
    from lmcraft.align.config import AlignmentConfig, DataSection, SamplesSection, SaveSection
    from lmcraft.train import TrainerConfig

    class SFTData(DataSection):
        format: Literal["auto", "alpaca", "sharegpt", "messages"] = "auto"
        train_on: Literal["all", "last"] = "all"
        packing: bool = False

    class SFTConfig(AlignmentConfig):
        data: SFTData
        trainer: TrainerConfig = TrainerConfig()
        samples: SamplesSection = SamplesSection()
        save: SaveSection = SaveSection()
        output_dir: Path

    return SFTConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preview", type=int, metavar="N", help="print the first N rendered training examples with "
                        "the trained (assistant) tokens highlighted, then exit")
    parser.add_argument("--no-color", action="store_true", help="--preview marks trained text with «…» instead of "
                        "colour (the default when stdout is not a terminal)")
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    color = sys.stdout.isatty() and not args.no_color
    cfg = load_training_config(config_class(), args)
    if args.preview:  # nothing is written
        run_sft(cfg, preview=args.preview, color=color)
        return 0
    with claim(args, "sft", cfg.output_dir, cfg):
        run_sft(cfg)
    return 0


def run_sft(cfg: Any, preview: int | None = None, color: bool = False) -> dict[str, Any]:
    """Run the stage for a validated `SFTConfig`; returns the summary (also written to OUT/summary.json)."""
    from lmcraft.align.common import (
        open_start,
        record_samples,
        save_stage_final,
        stage_trainer,
        start_evaluation,
        write_summary,
    )
    from lmcraft.align.config import split_eval
    from lmcraft.align.data import load_conversations
    from lmcraft.align.instruct import ChatFormatter, highlight
    from lmcraft.align.modeling import add_peft, load_stage_tokenizer, planned_steps, tokenizer_folder
    from lmcraft.align.plots import plot_training
    from lmcraft.align.sft import build_sft_data, sft_loss
    from lmcraft.errors import ConfigError

    out, d = Path(cfg.output_dir), cfg.data
    convs = load_conversations(d.train, d.format, d.limit)
    evals = load_conversations(d.eval, d.format) if d.eval else []
    if not evals:
        convs, evals = split_eval(convs, d.val_size, d.seed)
    if preview:  # the tokenizer is enough: no model is loaded, nothing is written
        tokenizer = load_stage_tokenizer(tokenizer_folder(cfg.model.from_), cfg.template)
        train = build_sft_data(convs, ChatFormatter(tokenizer, train_on=d.train_on), d.max_length, d.truncation)
        for ex in train.examples[:preview]:
            print(f"── {ex.source}: {len(ex.input_ids)} tokens, {ex.num_trained} trained")
            print(highlight(ex, color=color))
        print(f"{train.stats['examples']} examples ({train.dropped} dropped by truncation / no trained tokens)")
        return train.stats
    start = open_start(cfg.model, cfg.template, out, cfg.trainer.seed)
    formatter = ChatFormatter(start.tokenizer, train_on=d.train_on)
    train = build_sft_data(convs, formatter, d.max_length, d.truncation, d.packing)
    evaluation = build_sft_data(evals, formatter, d.max_length, d.truncation, d.packing) if evals else None
    if not start.resuming:
        record_samples(out, "before", start.model, start.tokenizer, cfg.samples)
    model = add_peft(start.model, cfg.peft, planned_steps(cfg.trainer, len(train)))
    if d.packing and getattr(model, "providers", None):
        raise ConfigError("data.packing cannot be combined with prefix/prompt-style PEFT methods (their virtual tokens "
                          "would be shared by every packed example); set data.packing=false")
    trainer = stage_trainer(cfg, start, model, sft_loss, train, evaluation, out)
    start_eval = start_evaluation(trainer, out) if evaluation is not None else {}
    result = trainer.train()
    if not trainer.is_main:
        return result
    paths = save_stage_final(cfg, start, model, out)
    record_samples(out, "after", model, start.tokenizer, cfg.samples)
    if cfg.trainer.plot:
        plot_training(trainer.state.history, out / "sft_curves.png", "SFT", start_eval.get("eval_loss"))
    last = next((r for r in reversed(trainer.state.history) if r["split"] == "train"), {})
    last_eval = next((r for r in reversed(trainer.state.history) if r["split"] == "eval"), {})
    summary = {"stage": "sft", **result, **paths, "data": train.stats, "train_loss": last.get("loss"),
               "start_eval_loss": start_eval.get("eval_loss"), "eval_loss": last_eval.get("eval_loss")}
    write_summary(out, summary)
    return summary
