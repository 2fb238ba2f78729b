"""`lmcraft pretrain CONFIG.yaml [key=value ...]`: pre-train a model (or continue pre-training one) with one objective.

The stage wires parts together, in this order (lmcraft.pretrain holds the parts):

1. inputs (rank 0): the tokenizer (given, trained on `data.inputs`, or the packed data's or `model.from`'s) and the
   packed training and evaluation documents (`data.packed`, or `data.inputs` packed into OUT/data/);
2. the objective, with the token ids it needs taken from the tokenizer;
3. examples: windows of `data.seq_len` tokens (clm, mlm, rtd, plm) or sentence pairs (nsp, sop);
4. model: a preset sized to the tokenizer, or the HF folder `model.from` (continued pre-training); the objective
   builds the model it trains around it;
5. `Trainer`: optimisation, evaluation (loss, perplexity, objective metrics, masked-token accuracy for MLM-style
   objectives), checkpoints, exact resume (rerunning the same config continues from the newest OUT/step-N),
   DDP/FSDP under torchrun (`trainer.strategy`), metrics.jsonl, TensorBoard events and curves.png;
6. OUT/final/: the objective's kept model (the MLM model of nsp/sop, ELECTRA's discriminator, XLNet's LM) in
   Hugging Face layout with the tokenizer files; samples (decoders) and the run summary in OUT/summary.json.

Training batches draw their masks from the checkpointed global torch generator; evaluation batches from a generator
seeded by (trainer.seed, first example), so every evaluation scores the same masks (lmcraft.data.batches).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmcraft.errors import InputFileError
from lmcraft.pretrain.config import PretrainConfig
from lmcraft.stages import add_training_arguments as add_arguments
from lmcraft.stages import claim, load_training_config

if TYPE_CHECKING:
    from lmcraft.train import Callback

__all__ = ["PretrainConfig", "add_arguments", "config_class", "pretrain", "run"]


def config_class() -> type[PretrainConfig]:
    """The config class, listed by `lmcraft pretrain --help` and checked by `lmcraft pipeline`."""
    return PretrainConfig


def run(args: argparse.Namespace) -> int:
    from lmcraft.pretrain.report import format_summary

    cfg = load_training_config(PretrainConfig, args)
    with claim(args, "pretrain", cfg.output_dir, cfg):
        summary = pretrain(cfg, progress=not args.no_progress)
    if summary["is_main"]:
        print(format_summary(summary))
    return 0


def pretrain(cfg: PretrainConfig, progress: bool = True, callbacks: Iterable[Callback] = ()) -> dict[str, Any]:
    """Run the stage (see the module docstring) with extra trainer `callbacks`; returns the summary (also written
    to OUT/summary.json on rank 0; other ranks get {"is_main": False})."""
    from lmcraft.data.batches import BatchMaker, Indexed
    from lmcraft.hub.transfer import load_pretrained_weights
    from lmcraft.io import write_json
    from lmcraft.objectives import PAIR_OBJECTIVES, build_objective
    from lmcraft.pretrain.examples import split_examples
    from lmcraft.pretrain.inputs import check_input_files, load_resolved, resolve_inputs
    from lmcraft.pretrain.model import model_config
    from lmcraft.pretrain.report import run_summary, samples, save_final
    from lmcraft.pretrain.resume import check_run_folder
    from lmcraft.tokenizer.load import load_tokenizer
    from lmcraft.train import ResumableLoader, Trainer, set_seed
    from lmcraft.train.distributed import barrier, full_model_state, init_distributed

    start = time.perf_counter()
    out, tcfg, seq_len = Path(cfg.output_dir), cfg.trainer, cfg.data.seq_len
    ctx = init_distributed(tcfg.device)
    if ctx.is_main:
        check_input_files(cfg.data)  # before anything is written
        check_run_folder(cfg, out)
        resolve_inputs(cfg, out, progress)
    barrier()  # the other ranks wait for the tokenizer and the packed data
    resolved = load_resolved(out)
    sources, tokenizer_dir = resolved.sources, resolved.tokenizer_dir
    packed = sources.train[0]
    tokenizer = load_tokenizer(resolved.tokenizer)
    resolved.check_vocabulary(tokenizer.vocab_size)

    objective = build_objective(cfg.objective.name, tokenizer, seq_len, **cfg.objective.options)
    pairs = cfg.objective.name if cfg.objective.name in PAIR_OBJECTIVES else None
    train_data = split_examples(sources.train, pairs, seq_len, cfg.data.seed)
    if train_data is None:
        raise InputFileError(packed, f"split {sources.train[1]!r}", f"at least one training example of {seq_len} "
                                                                    "tokens; lower data.seq_len or give more text")
    eval_data = split_examples(sources.eval, pairs, seq_len, cfg.data.seed + 1)
    if eval_data is None and ctx.is_main:
        print(f"note: no evaluation examples in {sources.eval[0]} (split {sources.eval[1]!r}); training without "
              "evaluation", file=sys.stderr)

    mcfg, from_folder = model_config(cfg.model, tokenizer, seq_len, progress)
    set_seed(tcfg.seed)  # the same initial weights on every rank and every rerun
    model = objective.build_model(mcfg)
    if from_folder is not None:
        load_pretrained_weights(objective.kept_model(model), from_folder)

    loader = ResumableLoader(train_data, tcfg.micro_batch_size, BatchMaker(objective, pairs is not None),
                             seed=tcfg.seed, shuffle=tcfg.shuffle, rank=ctx.rank, world_size=ctx.world_size)
    trainer = Trainer(model, objective.loss, loader, Indexed(eval_data) if eval_data is not None else None, tcfg, out,
                      collate_fn=BatchMaker(objective, pairs is not None, seed=tcfg.seed), tokenizer_dir=tokenizer_dir,
                      callbacks=callbacks)
    if ctx.is_main:
        trained = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        print(f"pretrain: {cfg.objective.name} on a {mcfg.model_type} {mcfg.arch}, "
              f"{objective.kept_model(model).num_parameters():,} parameters kept ({trained:,} trained); "
              f"{len(train_data):,} training / {len(eval_data or ()):,} evaluation examples; "
              f"{trainer.total_steps:,} steps", file=sys.stderr)
    result = trainer.train()

    state = full_model_state(trainer.wrapped)
    summary: dict[str, Any] = {"is_main": ctx.is_main}
    if ctx.is_main:
        final = save_final(objective, mcfg, state, out / "final", tokenizer_dir)
        from lmcraft.data.provenance import write_provenance

        write_provenance(final, *sources.train)  # what it was trained on, for `lmcraft eval`'s overlap warning
        summary = run_summary(cfg, objective, trainer, result, final, start)
        if objective.kept_model(model).head_kind == "lm":
            summary["samples"] = samples(cfg.samples, final)
        write_json(out / "summary.json", summary)
        summary["is_main"] = True
    barrier()
    return summary
