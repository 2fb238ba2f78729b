"""`lmcraft merge ADAPTER_DIR --out DIR`: fold a PEFT adapter into its base model (Hugging Face folder).

    lmcraft merge runs/finetune-minilm-spam-lora/final --out runs/minilm-spam-merged
    lmcraft merge my-adapter/ --base smollm2-135m-instruct --head lm --out merged/

The result loads in lmcraft (`hub.load_model`) and transformers like any model. Prompt/prefix tuning,
bottleneck adapters and UniPELT cannot be merged (their function is not a weight update) and say so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmcraft.stages import add_overwrite_argument, claim


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("adapter", help="adapter folder (the final/ folder of a PEFT `lmcraft finetune` run)")
    parser.add_argument("--out", required=True, help="output folder for the merged model")
    parser.add_argument("--base", help="base model folder / asset (default: the one the adapter names)")
    parser.add_argument("--head", choices=["lm", "cls", "token_cls", "qa"],
                        help="head of the base (default: adapter's)")
    parser.add_argument("--num-labels", type=int, help="classes of a cls/token_cls head (default: adapter's)")
    add_overwrite_argument(parser)


def run(args: argparse.Namespace) -> int:
    from lmcraft.finetune.merge import merge_adapter_folder

    sources = {"adapter": args.adapter, "base": args.base, "head": args.head, "num_labels": args.num_labels}
    with claim(args, "merge", Path(args.out), sources):
        out = merge_adapter_folder(args.adapter, args.out, **{k: v for k, v in sources.items() if k != "adapter"})
    print(f"merged model written to {out}")
    return 0
