"""`lmcraft eval CONFIG.yaml`: run tasks (built-in names or task YAML files) with their prompting strategies on
one model; write `results.json`, per-document samples, `report.md` + `report.html` and one plot per task.

    model: {path: smollm2-135m-instruct, batch_size: 8}
    tasks:
      - task: gsm_symbolic
        limit: 200
        overrides: {generation.max_new_tokens: 192}
      - task: my_task.yaml            # relative to this config file
    output_dir: runs/eval-smollm2
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from lmcraft.config import Section, StageConfig
from lmcraft.prompting.strategies import Strategy
from lmcraft.stages import add_config_arguments, claim, load_stage_config


class ModelSection(Section):
    """path: model folder, .gguf file or model asset name. adapter: a PEFT adapter folder (LoRA, prompt tuning,
    prefix tuning...) put on the model. chat: use the chat template (default: when the tokenizer has one).
    dtype: fp32, bf16, auto (bf16 where measured faster for batched scoring) or unset (the checkpoint's dtype).

    backend: torch, llamacpp (llama.cpp on the GGUF file or a cached f32/f16 export) or auto (llamacpp on CPU
    when llama-cpp-python is installed and the model exports; see `lmcraft.decoder_backend`)."""

    path: str
    adapter: Path | None = None
    backend: Literal["auto", "torch", "llamacpp"] = "auto"
    dtype: str | None = None
    device: str = "cpu"
    chat: bool | None = None
    chat_template: str | None = None
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=2)
    threads: int | None = Field(None, ge=1)


class TaskRef(Section):
    """task: a built-in task name or a task YAML path (relative to the eval config). limit: first n documents.
    overrides: dotted task keys (`data.size: 50`). strategies: replace the task's own list."""

    task: str
    limit: int | None = Field(None, ge=1)
    overrides: dict[str, Any] = {}
    strategies: list[Strategy] | None = None


class EvalConfig(StageConfig):
    model: ModelSection
    tasks: list[TaskRef] = Field(min_length=1)
    output_dir: Path = Path("runs/eval")
    title: str = "lmcraft evaluation"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)


def _task_ref(ref: TaskRef, config_path: Path | None) -> str:
    if config_path is not None:
        local = config_path.parent / ref.task
        if local.is_file():
            return str(local)
    return ref.task


def run(args: argparse.Namespace) -> int:
    cfg = load_stage_config(EvalConfig, args)
    with claim(args, "eval", cfg.output_dir, cfg):
        _evaluate(cfg, Path(args.config) if args.config else None)
    out = cfg.output_dir
    print(f"wrote {out / 'results.json'}, {out / 'report.md'}, {out / 'report.html'}")
    return 0


def _evaluate(cfg: EvalConfig, config_path: Path | None) -> None:
    """Every task with its strategies on the model; the outputs are rewritten after each strategy."""
    import torch

    from lmcraft.evaluate import build_report, evaluate_task, write_results
    from lmcraft.prompting.model_lm import ModelLM
    from lmcraft.prompting.tasks import load_task

    if cfg.model.threads:
        torch.set_num_threads(cfg.model.threads)
    tasks = []
    for ref in cfg.tasks:  # validate every task before loading the model
        overrides = dict(ref.overrides)
        if ref.strategies is not None:
            overrides["strategies"] = [s.model_dump() for s in ref.strategies]
        tasks.append((load_task(_task_ref(ref, config_path), overrides), ref.limit))
    if Path(cfg.model.path).is_dir():  # a model folder may record its training data (pretrain writes it)
        from lmcraft.prompting.contamination import overlap_warnings

        for task, _ in tasks:
            for warning in overlap_warnings(cfg.model.path, task):
                print(f"warning: {warning}", file=sys.stderr)
    lm = ModelLM.load(
        cfg.model.path,
        dtype=cfg.model.dtype,
        device=cfg.model.device,
        batch_size=cfg.model.batch_size,
        max_length=cfg.model.max_length,
        chat_template=cfg.model.chat_template,
        progress=sys.stderr.isatty(),
        backend=cfg.model.backend,
        adapter=cfg.model.adapter,
    )
    if lm.backend_note:
        print(f"note: {lm.backend_note}", file=sys.stderr)
    chat = lm.has_chat_template if cfg.model.chat is None else cfg.model.chat
    out = cfg.output_dir
    results: list[Any] = []

    def save(partial: Any) -> None:
        """After every strategy: print its line and rewrite the outputs, so a long run keeps what it finished."""
        sr = partial.strategies[-1]
        shown = {k: round(v, 4) for k, v in sr.metrics.items() if k in ("accuracy", "perplexity", "f1")}
        print(f"{partial.task:>20} {sr.strategy:<40} {shown} {sr.seconds_per_item:.2f} s/item", flush=True)
        write_results([*results, partial], out)
        build_report([*results, partial], out, cfg.title).write(out / "report.md", out / "report.html")

    for task, limit in tasks:
        results.append(evaluate_task(lm, task, model_name=cfg.model.path, chat=chat, limit=limit, on_result=save))


def config_class() -> type:
    """The config class, listed by `lmcraft eval --help` and checked by `lmcraft pipeline`."""
    return EvalConfig
