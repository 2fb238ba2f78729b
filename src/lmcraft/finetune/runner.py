"""One fine-tuning run from a `FinetuneConfig`: data -> model + head -> PEFT / freezing -> Trainer -> outputs.

Outputs in `output_dir`:
  step-N/, best/, metrics.jsonl, ...   the trainer's checkpoints and logs (see lmcraft.train)
  final/                                full fine-tuning: a Hugging Face model folder (weights of the best
                                        evaluation, tokenizer, label names in config.json);
                                        PEFT: the adapter folder (lmcraft.peft layout) plus finetune.json
                                        (base model, head, labels) that `lmcraft merge` reads
  summary.json                          parameters (trainable / total), validation metrics of the best
                                        evaluation, peak memory, step time, tokens/s
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lmcraft.errors import ConfigError
from lmcraft.finetune.config import FinetuneConfig
from lmcraft.finetune.data import Collator, TaskData, build_task_data
from lmcraft.finetune.evaluation import TaskEvaluator
from lmcraft.finetune.heads import set_dropout
from lmcraft.finetune.layers import GradualUnfreezing, freeze_parameters, transformer_param_groups
from lmcraft.finetune.profiling import RunProfiler
from lmcraft.finetune.tasks import Task, make_task
from lmcraft.io import write_json
from lmcraft.peft.training import PeftTraining, fit_head, prepare_for_training, save_final
from lmcraft.tokenizer.load import Tokenizer, load_tokenizer
from lmcraft.train import EarlyStopping, Trainer, TrainerConfig, WeightsFormat, set_seed
from lmcraft.train.distributed import resolve_device

__all__ = ["FINETUNE_INFO", "headline_metric", "run_finetune"]

FINETUNE_INFO = "finetune.json"


def headline_metric(cfg: FinetuneConfig, task: Task) -> tuple[str, str]:
    """(metric name without `eval_`, mode): `cfg.metric` if set, else the task's own."""
    name, mode = task.headline()
    if cfg.metric:
        name = cfg.metric.removeprefix("eval_")
        mode = "min" if name in ("loss", "ppl", "mse", "mae") else "max"
    return name, mode


def _optimizer_steps(cfg: TrainerConfig, num_train: int) -> tuple[int, int]:
    """(total optimizer steps, optimizer steps per epoch), as the trainer will count them."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = num_train // (cfg.micro_batch_size * world)
    per_epoch = max(1, math.ceil(batches / cfg.grad_accum))
    total = cfg.max_steps if cfg.max_steps is not None else math.ceil(cfg.epochs * batches / cfg.grad_accum)
    return total, per_epoch


def _trainer_config(cfg: FinetuneConfig, metric: str, mode: str) -> TrainerConfig:
    """The trainer section; without an explicit early_stopping, best/ follows the headline metric (no stop)."""
    tc = cfg.trainer
    if tc.early_stopping is None and tc.eval_every is not None:
        never = EarlyStopping(metric=f"eval_{metric}", mode=mode, patience=2**31 - 1)
        tc = tc.model_copy(update={"early_stopping": never})
    return tc


def _own_memory(model: torch.nn.Module) -> None:
    """Copy every tensor out of the checkpoint file's memory map (hub.load_model maps safetensors files).

    Otherwise the file's pages stay mapped as long as any tensor from it lives, so weights a method drops
    (QLoRA replaces the float32 projections by NF4) would still occupy memory, and count in the peak.
    """
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()


def _load_model(cfg: FinetuneConfig, folder: Path, task: Task, data: TaskData, device: torch.device,
                ) -> torch.nn.Module:
    import warnings

    from lmcraft.hub import HubWarning, load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HubWarning)  # a new task head is expected here; fit_head sizes it
        model = load_model(folder, head=task.head, dtype=torch.float32, device=device)
    _own_memory(model)
    if cfg.init == "random":  # the same architecture, none of the pre-trained weights
        torch.manual_seed(cfg.trainer.seed)
        model.apply(model._init_weights)
    if task.head == "qa" and model.config.arch != "encoder":
        raise ConfigError(f"task qa needs an encoder (BERT-style) model; {cfg.model} is a {model.config.arch}")
    if task.head in ("cls", "token_cls"):
        fit_head(model, data.num_labels, data.labels)
    set_dropout(model, cfg.dropout, cfg.attention_dropout, cfg.classifier_dropout)
    return model


def _restore_best(trainer: Trainer, model: torch.nn.Module, fmt: WeightsFormat) -> dict[str, Any] | None:
    """Load best/'s weights into `model` when they differ from the last step; the best eval record (or None)."""
    state = trainer.state
    evals = [r for r in state.history if r.get("split") == "eval"]
    if not evals:
        return None
    best_file = trainer.output_dir / "best" / fmt.filename
    if state.best_step is not None and best_file.is_file():
        if state.best_step != state.step:
            model.load_state_dict(load_file(str(best_file)), strict=fmt.strict)
        return next((r for r in reversed(evals) if r["step"] == state.best_step), evals[-1])
    return evals[-1]


def _save_final(cfg: FinetuneConfig, training: PeftTraining, folder: Path, tokenizer: Tokenizer, task: Task,
                data: TaskData) -> Path:
    """OUT/final (the model, or the adapter naming `folder` as its base); an adapter also gets finetune.json."""
    final = cfg.output_dir / "final"
    save_final(training.model, final, str(folder), tokenizer)
    if training.method != "full":
        info = {"task": task.name, "head": task.head, "num_labels": data.num_labels, "labels": data.labels,
                "base_model": str(folder), "method": training.method}
        write_json(final / FINETUNE_INFO, info)
    return final


def run_finetune(cfg: FinetuneConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the fine-tuning `cfg` describes; returns (and writes to summary.json) the run's summary."""
    from lmcraft import peft
    from lmcraft.assets import resolve, resolve_model
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    folder = resolve_model(cfg.model)
    tokenizer = load_tokenizer(resolve(cfg.tokenizer) if cfg.tokenizer else folder)
    data = build_task_data(cfg.data, cfg.task, tokenizer)
    cut = "split into windows of" if cfg.task == "qa" else "truncated to"
    log(f"data: {len(data.train)} training / {len(data.validation)} validation examples"
        + (f", labels {data.labels}" if data.labels else "")
        + (f" ({data.truncated} {cut} {cfg.data.max_length} tokens)" if data.truncated else ""))
    task = make_task(cfg.task, data.labels, **data.task_options)
    metric, mode = headline_metric(cfg, task)
    total_steps, steps_per_epoch = _optimizer_steps(cfg.trainer, len(data.train))

    set_seed(cfg.trainer.seed)
    device = resolve_device(cfg.trainer.device)
    model = _load_model(cfg, folder, task, data, device)
    num_layers = model.config.num_layers
    training = prepare_for_training(model, cfg.peft, task.head, total_steps)
    model, method = training.model, training.method
    frozen = freeze_parameters(model, cfg.freeze.embeddings, cfg.freeze.bottom_layers)
    if frozen:
        log(f"frozen: {len(frozen)} parameter tensors (embeddings={cfg.freeze.embeddings}, "
            f"bottom_layers={cfg.freeze.bottom_layers})")
    print(f"{method}: ", end="", flush=True)
    peft.print_trainable_parameters(model)
    trainable, total = peft.count_parameters(model)
    weights = training.weights()

    profiler = RunProfiler()
    callbacks: list[Any] = [profiler]
    if cfg.gradual_unfreezing is not None:
        g = cfg.gradual_unfreezing
        every = g.every * (steps_per_epoch if g.unit == "epochs" else 1)
        callbacks.append(GradualUnfreezing(model, num_layers, every, log))
    callbacks += training.callbacks()
    evaluator = TaskEvaluator(task)
    tc = _trainer_config(cfg, metric, mode)
    trainer = Trainer(
        model, training.loss(evaluator.loss_fn), data.train, data.validation, tc, cfg.output_dir,
        collate_fn=Collator(cfg.task, data.pad_token_id), callbacks=callbacks,
        param_groups=lambda m: transformer_param_groups(
            m, lr=tc.lr, weight_decay=tc.weight_decay, num_layers=num_layers, layer_lr_decay=cfg.layer_lr_decay,
            head_lr=cfg.head_lr),
        weights=weights, tokenizer_dir=folder, eval_fn=evaluator.eval_fn,
    )
    outcome = trainer.train(resume_from="auto" if cfg.resume else None)
    best = _restore_best(trainer, model, weights)
    final = _save_final(cfg, training, folder, tokenizer, task, data) if trainer.is_main else None
    validation = {k.removeprefix("eval_"): v for k, v in (best or {}).items() if k.startswith("eval_")}
    if task.name != "clm":
        validation.pop("ppl", None)  # exp(loss) means nothing for a classifier's loss
    results = {
        "task": task.name, "method": method, "model": cfg.model, "init": cfg.init, "peft": cfg.peft,
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / max(total, 1),
        "metric": metric, "metric_mode": mode, "metric_value": validation.get(metric),
        "validation": validation, "best_step": outcome["best_step"], "steps": outcome["step"],
        "stopped": outcome["stopped"], "train_examples": len(data.train), "validation_examples": len(data.validation),
        "labels": data.labels, "device": str(device), "precision": tc.precision, "threads": torch.get_num_threads(),
        "final": str(final) if final else None, **profiler.summary(),
    }
    if trainer.is_main:
        write_json(cfg.output_dir / "summary.json", json.loads(json.dumps(results, default=str)))
    return results
