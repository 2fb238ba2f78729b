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
import sys
from pathlib import Path
from typing import Literal

from lmcraft.align.config import AlignmentConfig, DataSection, SamplesSection, SaveSection
from lmcraft.config import StageConfig
from lmcraft.stages import add_training_arguments, load_training_config, run_alignment_stage
from lmcraft.train.config import TrainerConfig

__all__ = ["add_arguments", "config_class", "preview_sft", "run"]


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


def config_class() -> type[StageConfig]:
    """The config class, listed by `lmcraft sft --help` and checked by `lmcraft pipeline`."""
    return SFTConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preview", type=int, metavar="N", help="print the first N rendered training examples with "
                        "the trained (assistant) tokens highlighted, then exit")
    parser.add_argument("--no-color", action="store_true", help="--preview marks trained text with «…» instead of "
                        "colour (the default when stdout is not a terminal)")
    add_training_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if args.preview:  # nothing is written
        color = sys.stdout.isatty() and not args.no_color
        preview_sft(load_training_config(config_class(), args), args.preview, color=color)
        return 0
    return run_alignment_stage(args, "sft", SFTConfig, "lmcraft.align.sft:SFT")


def preview_sft(cfg: SFTConfig, count: int, color: bool = False) -> dict[str, float]:
    """Print the first `count` rendered training examples with the trained tokens highlighted; returns the data's
    numbers. The tokenizer is enough: no model is loaded, nothing is written."""
    from lmcraft.align.instruct import ChatFormatter, highlight
    from lmcraft.align.modeling import load_stage_tokenizer, tokenizer_folder
    from lmcraft.align.sft import build_sft_data, load_sft_conversations

    d = cfg.data
    convs, _ = load_sft_conversations(d)
    tokenizer = load_stage_tokenizer(tokenizer_folder(cfg.model.from_), cfg.template)
    train = build_sft_data(convs, ChatFormatter(tokenizer, train_on=d.train_on), d.max_length, d.truncation)
    for ex in train.examples[:count]:
        print(f"── {ex.source}: {len(ex.input_ids)} tokens, {ex.num_trained} trained")
        print(highlight(ex, color=color))
    print(f"{train.stats['examples']} examples ({train.dropped} dropped by truncation / no trained tokens)")
    return train.stats
